"""Causal attention in query chunks vs one dense block: the training forward + gradient, side by side.

`models/decoder._causal_attention` splits a row's queries into up to QUERY_CHUNKS chunks, each
against the keys up to its own end, so the masked blocks above the diagonal are never computed.
This measures what that buys on the policy's log-prob + gradient (the update's inner pass) at
the row lengths training sees, against QUERY_CHUNKS = 1 (one dense masked block, the code before).

Each (model, rows x tokens, variant) runs in its own process (jit caches inside one process would
hand a variant the other's compiled program); variants alternate round by round and the ratio is
taken per round, so a shared machine slows both sides alike.

  .venv/bin/python bench/attention.py [--shapes demo:16x640,demo:4x2048,20m:4x640] [--rounds 2]
Writes bench/results/attention.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEMO = dict(model_type="qwen2", vocab_size=2048, hidden_size=128, intermediate_size=384,
            num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32)   # configs/demo.py's policy


def _one(model: str, rows: int, tokens: int, chunks: int, repeats: int) -> dict:
  """Runs in the child: best-of-`repeats` seconds of value_and_grad of the summed log-probs."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bench.update import MODELS
  from stepsearch_jax.models import ModelConfig, decoder, init_params
  from stepsearch_jax.ppo.logprobs import policy_logprobs
  decoder.QUERY_CHUNKS = chunks
  mc = ModelConfig(**DEMO) if model == "demo" else MODELS[model]
  params = init_params(mc, jax.random.key(0))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, mc.vocab_size, (rows, tokens)), jnp.int32)
  seg = np.zeros((rows, tokens), np.int32)      # three packed trajectories and a padded tail
  bounds = [0, tokens // 3, 2 * tokens // 3, tokens - tokens // 32]
  for s in range(3):
    seg[:, bounds[s]:bounds[s + 1]] = s + 1
  slots = jnp.asarray(np.tile(np.arange(tokens // 2, tokens - 1), (rows, 1)), jnp.int32)

  def loss(p):
    lp, ent = policy_logprobs(mc, p, ids, jnp.asarray(seg), slots, 1.0)
    return lp.sum() + ent.sum()

  f = jax.jit(jax.value_and_grad(loss))
  t0 = time.perf_counter()
  value = float(jax.block_until_ready(f(params))[0])
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(params))
    times.append(time.perf_counter() - t0)
  return dict(best_s=min(times), times_s=times, first_call_s=first, loss=value,
              chunks=decoder._chunk_count(tokens) if chunks > 1 else 1)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--shapes", default="demo:16x640,demo:4x2048,20m:4x640")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
  ap.add_argument("--child", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    model, rows, tokens, chunks = args.child.split(",")
    print(json.dumps(_one(model, int(rows), int(tokens), int(chunks), args.repeats)))
    return
  from stepsearch_jax.models import decoder
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR="")     # fair first calls on both sides
  results = []
  for shape in args.shapes.split(","):
    model, dims = shape.split(":")
    rows, tokens = (int(x) for x in dims.split("x"))
    runs = {1: [], decoder.QUERY_CHUNKS: []}
    for r in range(args.rounds):
      for chunks in runs:
        out = subprocess.run([sys.executable, __file__, "--child", f"{model},{rows},{tokens},{chunks}",
                              "--repeats", str(args.repeats)], env=env, cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        runs[chunks].append(json.loads(out.strip().splitlines()[-1]))
        print(f"[{shape} round {r + 1}/{args.rounds}] chunks={runs[chunks][-1]['chunks']}: "
              f"{runs[chunks][-1]['best_s']:.2f} s", flush=True)
    dense, chunked = runs[1], runs[decoder.QUERY_CHUNKS]
    ratios = [d["best_s"] / c["best_s"] for d, c in zip(dense, chunked)]
    results.append(dict(model=model, rows=rows, tokens=tokens, chunks=chunked[0]["chunks"],
                        dense_s=min(d["best_s"] for d in dense),
                        chunked_s=min(c["best_s"] for c in chunked),
                        ratio_dense_over_chunked=statistics.median(ratios),
                        ratios=ratios, loss_dense=dense[0]["loss"], loss_chunked=chunked[0]["loss"],
                        dense_runs=dense, chunked_runs=chunked))
  doc = {"bench": "causal_attention_chunks",
         "command": "bench/attention.py " + " ".join(sys.argv[1:]),
         "pass": "policy log-probs + entropy, value_and_grad, float32, one jit per process",
         "note": "ratio = dense time / chunked time per round (processes alternated), median",
         "results": results}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "attention.json"), "w") as f:
    json.dump(doc, f, indent=1)
  lines = ["| model | rows x tokens | query chunks | dense s | chunked s | dense / chunked (per round) |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {r['model']} | {r['rows']} x {r['tokens']} | {r['chunks']} | {r['dense_s']:.2f} | "
            f"{r['chunked_s']:.2f} | {r['ratio_dense_over_chunked']:.2f}x "
            f"({', '.join('%.2f' % x for x in r['ratios'])}) |" for r in results]
  with open(os.path.join(args.out, "attention.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
