"""Model throughput: our Flax decoder next to transformers+torch on the same weights, one run.

  .venv/bin/python bench/model.py [--no-smollm2] [--out bench/results/model.json]

For each model (a ~20M-parameter random Qwen2 config and, by default, the real SmolLM2-135M) it
measures full-sequence forward tokens/s, greedy decode tokens/s at batch 1 and 16 (prefill of a
32-token prompt + 64 new tokens, the same work on both sides: torch via `generate`, ours via
prefill + `forward_cached` steps), and our compile seconds. Ratios are ours / torch. Writes JSON to
--out and stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stepsearch_jax import models  # noqa: E402

PROMPT, NEW = 32, 64


def _best(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def _ours(config, params, fwd_shape, repeats):
  res = {}
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, fwd_shape), jnp.int32)
  fwd = jax.jit(functools.partial(models.apply_lm, config))
  t0 = time.perf_counter()
  fwd(params, tokens).block_until_ready()
  res["compile_forward_s"] = time.perf_counter() - t0
  res["forward_tok_s"] = tokens.size / _best(lambda: fwd(params, tokens).block_until_ready(), repeats)

  @functools.partial(jax.jit, donate_argnums=(2,))
  def step(p, tok, cache, index, last_index):
    logits, cache = models.forward_cached(config, p, tok, cache, index, last_only=True,
                                          last_index=last_index)
    return jnp.argmax(logits, -1).astype(jnp.int32), cache

  for batch in (1, 16):
    prompt = jnp.asarray(np.random.RandomState(1).randint(0, config.vocab_size, (batch, PROMPT)),
                         jnp.int32)
    last = jnp.full((batch,), PROMPT - 1, jnp.int32)

    def generate():
      cache = models.init_cache(config, batch, PROMPT + NEW)
      tok, cache = step(params, prompt, cache, jnp.zeros(batch, jnp.int32), last)
      index = jnp.full((batch,), PROMPT, jnp.int32)
      zero = jnp.zeros((batch,), jnp.int32)
      for _ in range(NEW - 1):
        tok, cache = step(params, tok[:, None], cache, index, zero)
        index = index + 1
      tok.block_until_ready()
    t0 = time.perf_counter()
    generate()
    res[f"compile_decode_b{batch}_s"] = time.perf_counter() - t0  # includes one generation
    res[f"decode_b{batch}_tok_s"] = batch * NEW / _best(generate, repeats)
  return res


def _torch(path, fwd_shape, vocab, repeats):
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  res = {"threads": torch.get_num_threads()}
  tokens = torch.tensor(np.random.RandomState(0).randint(0, vocab, fwd_shape))
  with torch.no_grad():
    model(tokens)
    res["forward_tok_s"] = tokens.numel() / _best(lambda: model(tokens), repeats)
    for batch in (1, 16):
      prompt = torch.tensor(np.random.RandomState(1).randint(0, vocab, (batch, PROMPT)))
      gen = functools.partial(model.generate, prompt, max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, pad_token_id=0)
      gen()
      res[f"decode_b{batch}_tok_s"] = batch * NEW / _best(gen, repeats)
  return res


def bench(name, path, config, params, fwd_shape, repeats):
  ours = _ours(config, params, fwd_shape, repeats)
  print(f"{name} ours: {ours}", file=sys.stderr, flush=True)
  ref = _torch(path, fwd_shape, config.vocab_size, repeats)
  print(f"{name} torch: {ref}", file=sys.stderr, flush=True)
  n = sum(x.size for x in jax.tree.leaves(params))
  ratios = {k: ours[k] / ref[k] for k in ("forward_tok_s", "decode_b1_tok_s", "decode_b16_tok_s")}
  return {"model": name, "params_m": round(n / 1e6, 2), "forward_shape": list(fwd_shape),
          "prompt": PROMPT, "new_tokens": NEW, "ours_jax": ours, "transformers_torch": ref,
          "ratio_ours_over_torch": ratios}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "model.json"))
  ap.add_argument("--no-smollm2", action="store_true")
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  results = []
  config = models.ModelConfig(model_type="qwen2", vocab_size=8192, hidden_size=512,
                              intermediate_size=1408, num_layers=6, num_heads=8, num_kv_heads=4,
                              head_dim=64, tie_word_embeddings=True, rope_theta=10000.0)
  params = models.init_params(config, jax.random.key(0))
  with tempfile.TemporaryDirectory() as d:
    models.save_pretrained(d, config, params)
    results.append(bench("qwen2-20m-random", d, config, params, (8, 256), args.repeats))
  if not args.no_smollm2:
    path = models.smollm2_path()
    config, params = models.load_pretrained(path)
    results.append(bench("smollm2-135m-instruct", path, config, params, (4, 256), args.repeats))
  out = {"device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
         "machine": platform.machine(), "dtype": "float32", "results": results}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
