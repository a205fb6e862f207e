"""Rollout speed at real model shapes, against transformers+torch and the memory-bandwidth roofline.

  .venv/bin/python bench/rollout_scale.py [--models smollm2,qwen2.5-0.5b-shape]
      [--batches 1,8,32,64] [--turn_tokens 24] [--contexts 256,1024,4096]
  (also reached as `bench/rollout.py --models ...`)

Models: `smollm2` is the real SmolLM2-135M-Instruct (converted once from the offline GGUF) with its
own tokenizer; `qwen2.5-0.5b-shape` is Qwen2.5-0.5B's config (24 layers, width 896, 14/2 heads,
151,936-token tied vocabulary) with random weights (torch's init, saved as safetensors and loaded
by both sides), tokenised with SmolLM2's BPE tokenizer: speed does not depend on the values.

Scripted episodes. Neither policy searches by itself, so every contender runs the same turn
structure: each of the 5 search turns decodes exactly `--turn_tokens` tokens (no stop sequence, no
EOS: the engine gets a stop set the model can never emit, torch `min_new_tokens`), issues the
record's question as its query to the real retrieval server (BM25 over the synthetic world), and
appends the formatted top-3 passages (with the last-turn warning before the final turn, as the
agent loop does); then one final answer turn of `--turn_tokens` tokens. Every contender therefore
generates and appends exactly the same number of tokens, so tokens/s compare exactly:
  native:    our continuous-batching driver (rollout/native.py) as the trainer runs it;
  jetstream: JetStream's orchestrator over our engine, one request per turn (re-prefilling);
  torch:     transformers `generate`, turn by turn, the batch left-padded, all cores.
Timed runs go round-robin over the contenders after one untimed warm-up each (compilation
excluded); the fastest of `--repeats` is reported. Float32 on CPU (bf16 is slower on XLA:CPU).

Roofline of one decode step at batch B: the bytes it must read, the weights (every parameter once;
a tied embedding is read once, as the LM head) plus the live KV window of each row (the mean
context position over the run's generated tokens x layers x 2 x kv_heads x head_dim x 4 bytes),
divided by the memory bandwidth measured in the same run (best of a jitted float32 copy of
512 MiB: bytes read + written per second). `decode_step_ms` is the native driver's decode-call
time per step (the host transfer of each block's tokens included); `decode_over_roofline` =
roofline time / our step time (1.0 = at the hardware limit). On a CPU a batched step reaches the
compute limit first, so each row also has `compute_step_ms` (model FLOPs of the step: 2 per weight
of the layers and LM head per row plus attention over the cache, divided by the peak float32
matmul rate measured in the same run, bench/update.py's) and `decode_over_bound` (the larger of
the two limits / our step time).

Context sweep: decode-step time of the engine alone at batch 1 and 32 with every row holding
`--contexts` tokens of cache (one prefill, copied to the other rows), beside its roofline.

Writes bench/results/rollout_scale.json (`results`: one row per (model, batch) with model, batch,
native_tok_s, jetstream_tok_s, torch_tok_s, native_over_torch, decode_step_ms, roofline_step_ms,
decode_over_roofline; `contexts`: the sweep), bench/results/rollout_scale.md and
docs/rollout_scale.png. Results are kept per model as they finish (`--reuse` skips done models
and runs only the batches a done model lacks: `--models smollm2 --batches 64 --contexts ''
--reuse`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.join(ROOT, "tests"))  # test-support modules (tests/toy_world.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from stepsearch_jax import hostmem, models  # noqa: E402
from stepsearch_jax.config import base_config  # noqa: E402
from stepsearch_jax.engine import SamplingParams, StepSearchEngine  # noqa: E402
from stepsearch_jax.rollout import episode  # noqa: E402
from stepsearch_jax.rollout.jetstream_driver import run_jetstream  # noqa: E402
from stepsearch_jax.rollout.native import run_native  # noqa: E402
from stepsearch_jax.rollout.retriever import RetrieverClient  # noqa: E402
import toy_world  # noqa: E402
from torch_batch import left_padded  # noqa: E402
from update import peak_matmul_flops  # noqa: E402  (bench/update.py: the same peak as the MFU)

QWEN05 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936,
              hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
              rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
              hidden_act="silu", bos_token_id=151643, eos_token_id=151643)


def bandwidth_gb_s(mib: int = 512, repeats: int = 5) -> float:
  """Best-of-`repeats` jitted float32 copy (x + 1): (bytes read + written) / s, in GB/s."""
  x = jnp.zeros((mib * (1 << 20) // 4,), jnp.float32)
  f = jax.jit(lambda a: a + 1.0)
  jax.block_until_ready(f(x))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    best = min(best, time.perf_counter() - t0)
  return 2 * x.nbytes / best / 1e9


class NoStops:
  """The policy's tokenizer with EOS and PAD moved to an id past the model's vocabulary, so the
  engine's stop set holds nothing the model can emit: every turn runs its full token cap."""

  def __init__(self, hf, never: int):
    self._hf, self.eos_token_id, self.pad_token_id = hf, never, never

  def __getattr__(self, name):
    return getattr(self._hf, name)

  def __len__(self):
    return len(self._hf)


class ScriptedEpisode(episode.Episode):
  """An Episode whose every non-final turn is a search for the record's question, whatever was
  generated: the turn structure is fixed, the rest (observations, context, caps) is the agent
  loop's own."""

  def finish_turn(self, ids, logprobs) -> str:
    t = self.traj
    t.add_model_tokens(list(ids), list(logprobs))
    t.num_turns += 1
    self._turn_ids = list(ids)
    if self.final_turn:
      self.done = True
      return "done"
    self.query = self.question
    t.queries.append(self.query)
    return "search"


def scripted(records, tok, cfg: episode.LoopConfig) -> list[ScriptedEpisode]:
  eps = []
  for i, r in enumerate(records):
    ep = ScriptedEpisode(r, tok, cfg, np.asarray(jax.random.PRNGKey(i), np.uint32))
    ep.question = r.question
    eps.append(ep)
  return eps


def torch_scripted(hf, tok, eps, cfg: episode.LoopConfig, retriever, device: str) -> float:
  import torch
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  t0 = time.perf_counter()
  while True:
    active = [e for e in eps if not e.done]
    if not active:
      break
    ids, mask = left_padded(active, pad)
    n = cfg.max_tokens_per_turn
    with torch.no_grad():
      out = hf.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                        max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)[:, ids.shape[1]:].tolist()
    searching = [e for e, row in zip(active, out) if e.finish_turn(row, [0.0] * len(row)) == "search"]
    if searching:
      results = retriever.search([e.query for e in searching], topk=cfg.topk)
      for e, res in zip(searching, results):
        e.observe_search(res)
  return time.perf_counter() - t0


def build_model(name: str, work: str):
  """(hf folder, tokenizer) of a benchmark model; the folder is what both sides load."""
  import torch
  import transformers
  smol = models.smollm2_path()
  tok = transformers.AutoTokenizer.from_pretrained(smol)
  if name == "smollm2":
    return smol, tok
  if name == "qwen2.5-0.5b-shape":
    folder = os.path.join(work, "qwen2.5-0.5b-shape")
    if not os.path.exists(os.path.join(folder, "config.json")):
      torch.manual_seed(0)
      hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN05))
      hf.save_pretrained(folder)
    return folder, tok
  raise ValueError(f"--models: unknown model {name!r} (smollm2, qwen2.5-0.5b-shape)")


def weight_bytes(config, params) -> int:
  """Bytes of weights one decode step reads: every parameter, less an untied input embedding
  (only B of its rows are gathered)."""
  total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  if not config.tie_word_embeddings:
    total -= config.vocab_size * config.hidden_size * 4
  return int(total)


def flops_per_row(config, ctx: float) -> float:
  """Model FLOPs of one decode step for one row at cache length `ctx`: 2 per weight of the
  layers and the LM head, plus attention's QK^T and AV over the cache."""
  d, h, kv, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  layer = d * h * dh * 2 + d * kv * dh * 2 + 3 * d * config.intermediate_size
  return 2 * (config.num_layers * layer + d * config.vocab_size) + 4 * config.num_layers * h * dh * ctx


def bounds(config, params, b: int, ctx: float, bw: float, peak: float) -> dict:
  """The step's two hardware limits: bytes / bandwidth and FLOPs / peak matmul rate."""
  roof = (weight_bytes(config, params) + b * ctx * kv_bytes_per_token(config)) / (bw * 1e9)
  compute = b * flops_per_row(config, ctx) / peak
  return {"roofline_step_ms": 1e3 * roof, "compute_step_ms": 1e3 * compute}


def kv_bytes_per_token(config) -> int:
  return int(config.num_layers * 2 * config.num_kv_heads * config.head_dim * 4)


def mean_decode_position(trajs) -> float:
  """Mean cache length at which the run's model tokens were generated."""
  pos = []
  for t in trajs:
    base = len(t.prompt_ids)
    pos += [base + i for i, m in enumerate(t.loss_mask) if m]
  return float(np.mean(pos))


def context_sweep(config, params, tok, contexts, batches, bw, peak, steps=16) -> list[dict]:
  """Decode-step ms of the engine alone with every row holding `ctx` tokens of cache: one
  prefill per context, copied to every slot; each measurement re-appends the last prompt token
  to the rows it decodes (so they restart at the same length) and times one decode block."""
  rows = []
  rng = np.random.default_rng(0)
  nslots = max(batches)
  for ctx in contexts:
    engine = StepSearchEngine(config, params, NoStops(tok, config.vocab_size), num_slots=nslots,
                              cache_len=ctx + steps + 128,
                              max_prefill_length=min(4096, 1 << (ctx - 1).bit_length()),
                              stop_strings=(), eos_ids=[config.vocab_size])
    prompt = rng.integers(3, len(tok), ctx).tolist()
    state = engine.init_decode_state()
    state = engine.append(state, [0], [prompt[:-1]], [0], max_new=[1])
    state = engine.copy_prefix(state, 0, list(range(1, nslots)), ctx - 1)
    for b in batches:
      slots = list(range(b))

      def run():
        nonlocal state
        state = engine.append(state, slots, [[prompt[-1]]] * b, [ctx - 1] * b, max_new=[steps] * b)
        jax.block_until_ready(state.tokens)
        t0 = time.perf_counter()
        state, out = engine.decode_block(params, state, steps, steps, rows=slots)
        return (time.perf_counter() - t0) / len(out["tokens"])
      run()
      step = min(run() for _ in range(2))
      lim = bounds(config, params, b, ctx + steps / 2, bw, peak)
      rows.append({"context": ctx, "batch": b, "decode_step_ms": 1e3 * step, **lim,
                   "decode_over_roofline": lim["roofline_step_ms"] / (1e3 * step),
                   "decode_over_bound": max(lim.values()) / (1e3 * step),
                   "tokens_per_s": b / step})
      print(json.dumps(rows[-1]), flush=True)
    engine.release_decode_state(state)
    engine = state = None   # free the cache before the next context
  return rows


def bench_model(name: str, args, work: str, world, retriever, bw: float, peak: float,
                batches: list[int] | None = None, contexts: list[int] | None = None) -> dict:
  import torch
  import transformers
  folder, tok = build_model(name, work)
  config, params = models.load_pretrained(folder, dtype="float32", param_dtype="float32")
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  torch.set_num_threads(os.cpu_count() or 1)
  n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
  rcfg = base_config().rollout
  rcfg.update(dict(max_turns=5, max_tokens_per_turn=args.turn_tokens, max_obs_tokens=400,
                   max_context=2048, max_start=1024, max_response_tokens=4096))
  lcfg = episode.LoopConfig.from_config(rcfg, topk=3)
  buckets = tuple(b for b in rcfg.prefill_buckets if b <= 2048)
  never = config.vocab_size
  engine_tok = NoStops(tok, never)
  out_rows = []
  for b in batches if batches is not None else wanted_batches(args, name):
    records = world["test_records"][:b]
    engine = StepSearchEngine(config, params, engine_tok, num_slots=b, cache_len=2048 + 128,
                              max_prefill_length=2048, stop_strings=(), eos_ids=[never],
                              default_sampling=SamplingParams.greedy())
    greedy = SamplingParams.greedy()

    def native():
      eps = scripted(records, engine_tok, lcfg)
      s = run_native(engine, eps, retriever, greedy, lcfg, buckets=buckets,
                     decode_steps=int(rcfg.decode_steps_per_call),
                     max_decode_steps=int(rcfg.max_decode_steps_per_call), share_prefix=True)
      return eps, s

    def jetstream():
      eps = scripted(records, engine_tok, lcfg)
      return eps, run_jetstream(engine, eps, retriever, greedy, lcfg, score_logprobs=False)

    def torch_run():
      eps = scripted(records, tok, lcfg)
      return eps, {"total_s": torch_scripted(hf, tok, eps, lcfg, retriever, "cpu")}

    contenders = {"native": native, "torch": torch_run}
    if b <= args.jetstream_max_batch:
      contenders["jetstream"] = jetstream
    for k in ("native", "jetstream"):   # warm-up: compilation (torch compiles nothing)
      if k in contenders:
        contenders[k]()
    runs = {k: [] for k in contenders}
    for _ in range(args.repeats):
      for k, fn in contenders.items():
        runs[k].append(fn())
    row = {"model": name, "batch": b, "params": n_params}
    structure = {}
    for k, outs in runs.items():
      eps, s = min(outs, key=lambda o: o[1]["total_s"])
      toks = int(sum(sum(e.traj.loss_mask) for e in eps))
      row[f"{k}_tok_s"] = toks / s["total_s"]
      row[f"{k}_wall_s"] = s["total_s"]
      row[f"{k}_wall_s_all_runs"] = [o[1]["total_s"] for o in outs]
      structure[k] = [(sum(e.traj.loss_mask), len(e.traj.response_ids)) for e in eps]
      if k == "native":
        row["model_tokens"] = toks
        row["decode_steps"] = int(s["steps"])
        row["decode_step_ms"] = 1e3 * s["decode_call_s"] / max(1, s["steps"])
        row["native_phases_s"] = {p: s.get(p, 0.0) for p in (
            "decode_call_s", "prefill_s", "host_s", "retrieval_wait_s", "retrieval_s")}
        row["mean_context"] = mean_decode_position([e.traj for e in eps])
    # the scripted turn structure held: same model and response token counts everywhere
    row["same_turn_structure"] = all(v == structure["native"] for v in structure.values())
    row["native_over_torch"] = row["native_tok_s"] / row["torch_tok_s"]
    if "jetstream" in contenders:
      row["native_over_jetstream"] = row["native_tok_s"] / row["jetstream_tok_s"]
    else:   # JetStream re-prefills every turn one request at a time: too slow to run here
      row["jetstream_tok_s"] = row["native_over_jetstream"] = None
    row.update(bounds(config, params, b, row["mean_context"], bw, peak))
    row["decode_over_roofline"] = row["roofline_step_ms"] / row["decode_step_ms"]
    # on a CPU a batched step is bound by compute before bandwidth: the larger limit is the bound
    row["decode_over_bound"] = (max(row["roofline_step_ms"], row["compute_step_ms"])
                                / row["decode_step_ms"])
    out_rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("all_runs")}), flush=True)
    engine = None   # free the cache before the next batch
  contexts = args.context_list if contexts is None else contexts
  sweep = context_sweep(config, params, tok, contexts, (1, 32), bw, peak) if contexts else []
  return {"model": name, "params": n_params, "weight_bytes": weight_bytes(config, params),
          "kv_bytes_per_token": kv_bytes_per_token(config), "rows": out_rows, "contexts": sweep}


def wanted_batches(args, name: str) -> list[int]:
  return args.model_batch_list.get(name, args.batch_list)


def _num(x) -> str:
  return "not run" if x is None else f"{x:.0f}"


def markdown(report: dict) -> str:
  lines = [f"Scripted episodes: 5 search turns + 1 answer turn of {report['turn_tokens']} tokens. "
           "Each model's rooflines use the memory bandwidth (jitted f32 copy) and peak float32 "
           "matmul (jitted 2048^3) measured in the run that benched it:", ""]
  lines += [f"- {m['model']}: {m['bandwidth_gb_s']:.1f} GB/s, {m['peak_matmul_gflop_s']:.0f} GFLOP/s, "
            f"load average {m.get('load_average_1m', float('nan')):.1f} at its end"
            for m in report["models"]]
  lines += ["", "| model | batch | native tok/s | JetStream tok/s | torch tok/s | native / torch | "
           "decode step ms | bandwidth roofline ms | compute bound ms | roofline / step | "
           "max(bounds) / step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in report["results"]:
    later = (f" ({r['run_note']}: {r['bandwidth_gb_s']:.1f} GB/s, "
             f"load {r['load_average_1m']:.1f})" if "run_note" in r else "")
    lines.append(f"| {r['model']} | {r['batch']}{later} | {r['native_tok_s']:.0f} | "
                 f"{_num(r['jetstream_tok_s'])} | {r['torch_tok_s']:.0f} | "
                 f"{r['native_over_torch']:.2f}x | {r['decode_step_ms']:.1f} | "
                 f"{r['roofline_step_ms']:.1f} | {r['compute_step_ms']:.1f} | "
                 f"{r['decode_over_roofline']:.2f} | {r['decode_over_bound']:.2f} |")
  if report["contexts"]:
    lines += ["", "| model | context | batch | decode step ms | bandwidth roofline ms | "
              "compute bound ms | roofline / step | max(bounds) / step | tok/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["contexts"]:
      note = f" ({r['run_note']}: {r['bandwidth_gb_s']:.1f} GB/s)" if "run_note" in r else ""
      lines.append(f"| {r['model']} | {r['context']}{note} | {r['batch']} | {r['decode_step_ms']:.1f} | "
                   f"{r['roofline_step_ms']:.1f} | {r['compute_step_ms']:.1f} | "
                   f"{r['decode_over_roofline']:.2f} | {r['decode_over_bound']:.2f} | "
                   f"{r['tokens_per_s']:.0f} |")
  return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
  for m in dict.fromkeys(r["model"] for r in report["results"]):
    rows = [r for r in report["results"] if r["model"] == m]
    for key, style in (("native_tok_s", "-o"), ("jetstream_tok_s", ":^"), ("torch_tok_s", "--s")):
      pts = [(r["batch"], r[key]) for r in rows if r[key] is not None]
      if pts:
        a.plot(*zip(*pts), style, label=f"{m} {key.split('_')[0]}")
  a.set(xscale="log", yscale="log", xlabel="batch (episodes at once)",
        ylabel="generated tokens / s (retrieval incl.)", title="scripted 5-search episodes")
  a.grid(alpha=0.3, which="both")
  a.legend(fontsize=7)
  for m in dict.fromkeys(r["model"] for r in report["contexts"]):
    for bsz in (1, 32):
      rows = [r for r in report["contexts"] if r["model"] == m and r["batch"] == bsz]
      if not rows:
        continue
      cs = [r["context"] for r in rows]
      line, = b.plot(cs, [r["decode_step_ms"] for r in rows], "-o", label=f"{m} batch {bsz}")
      b.plot(cs, [r["roofline_step_ms"] for r in rows], "--", color=line.get_color(), alpha=0.6)
      b.plot(cs, [r["compute_step_ms"] for r in rows], ":", color=line.get_color(), alpha=0.6)
  b.set(xscale="log", yscale="log", xlabel="cache length per row (tokens)",
        ylabel="ms per decode step", title="decode step (solid), bandwidth roofline (dashed),\ncompute bound (dotted)")
  b.grid(alpha=0.3, which="both")
  b.legend(fontsize=7)
  fig.suptitle(f"{report['device_kind']}, measured bandwidth " + ", ".join(
      f"{m['model']} {m['bandwidth_gb_s']:.1f} GB/s" for m in report["models"]))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", default="smollm2,qwen2.5-0.5b-shape")
  p.add_argument("--batches", default="1,8,32,64")
  p.add_argument("--turn_tokens", type=int, default=24, help="tokens decoded per turn")
  p.add_argument("--contexts", default="256,1024,4096",
                 help="cache lengths of the engine-only decode sweep ('' to skip)")
  p.add_argument("--repeats", type=int, default=2, help="timed runs per contender")
  p.add_argument("--jetstream_max_batch", type=int, default=64,
                 help="skip the JetStream contender above this batch (its per-turn re-prefill "
                      "is the slowest contender; on a small CPU it dominates the run time)")
  p.add_argument("--model_batches", default="",
                 help="per-model batch lists, e.g. 'qwen2.5-0.5b-shape=1,8' (default --batches)")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "rollout_scale.json"))
  p.add_argument("--png", default=os.path.join(ROOT, "docs", "rollout_scale.png"))
  p.add_argument("--workdir", default="", help="keeps the world and generated weights")
  p.add_argument("--reuse", action="store_true", help="keep models already in --out")
  args = p.parse_args()
  args.batch_list = [int(x) for x in args.batches.split(",")]
  args.context_list = [int(x) for x in args.contexts.split(",") if x]
  args.model_batch_list = {}
  for item in filter(None, args.model_batches.split(";")):
    name, _, bs = item.partition("=")
    args.model_batch_list[name] = [int(x) for x in bs.split(",")]
  hostmem.reexec_with_hugepages()
  from retrieval.server import start_subprocess
  work = args.workdir or tempfile.mkdtemp(prefix="bench_rollout_scale_")
  done = {}
  if args.reuse and os.path.exists(args.out):
    with open(args.out) as f:
      old = json.load(f)
    # entries from before the per-model figures were kept carry the file's run-level ones
    done = {m["model"]: {"bandwidth_gb_s": old["bandwidth_gb_s"],
                         "peak_matmul_gflop_s": old["peak_matmul_gflop_s"],
                         "load_average_1m": old.get("load_average_1m_end"), **m}
            for m in old.get("models", [])}
  world = toy_world.build_world(work, num_people=60, num_train=64, num_test=max(args.batch_list))
  proc, url = start_subprocess(world["index_dir"], timeout_s=120)
  try:
    retriever = RetrieverClient(url, topk=3)
    bw = bandwidth_gb_s()
    peak = peak_matmul_flops()
    print(json.dumps({"bandwidth_gb_s": bw, "peak_matmul_gflop_s": peak / 1e9}), flush=True)
    for name in args.models.split(","):
      if name not in done:
        done[name] = bench_model(name, args, work, world, retriever, bw, peak)
        done[name].update(bandwidth_gb_s=bw, peak_matmul_gflop_s=peak / 1e9,
                          load_average_1m=os.getloadavg()[0])
      else:   # --reuse: add only the batches this model lacks; they keep this run's figures
        have = {r["batch"] for r in done[name]["rows"]}
        missing = [b for b in wanted_batches(args, name) if b not in have]
        if missing:
          extra = bench_model(name, args, work, world, retriever, bw, peak, batches=missing,
                              contexts=[])["rows"]
          for r in extra:
            r.update(bandwidth_gb_s=bw, peak_matmul_gflop_s=peak / 1e9,
                     load_average_1m=os.getloadavg()[0], run_note="later run")
          done[name]["rows"] = sorted(done[name]["rows"] + extra, key=lambda r: r["batch"])
      report = {"benchmark": "rollout_scale", "device": str(jax.devices()[0]),
                "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
                "bandwidth_gb_s": bw, "peak_matmul_gflop_s": peak / 1e9, "turn_tokens": args.turn_tokens, "dtype": "float32",
                "load_average_1m_end": os.getloadavg()[0],
                "models": list(done.values()),
                "results": [r for m in done.values() for r in m["rows"]],
                "contexts": [dict(r, model=m["model"]) for m in done.values() for r in m["contexts"]],
                "targets": {"smollm2_native_over_torch_at_32": ">= 3",
                            "smollm2_decode_over_roofline_at_32": ">= 0.5"}}
      at32 = next((r for r in report["results"] if r["model"] == "smollm2" and r["batch"] == 32), None)
      if at32:
        report["targets_met"] = {"smollm2_native_over_torch_at_32": at32["native_over_torch"] >= 3,
                                 "smollm2_decode_over_roofline_at_32": at32["decode_over_roofline"] >= 0.5}
      os.makedirs(os.path.dirname(args.out), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
      with open(args.out[:-5] + ".md", "w") as f:
        f.write(markdown(report))
      os.makedirs(os.path.dirname(args.png), exist_ok=True)
      plot(report, args.png)
    print(markdown(report))
  finally:
    proc.terminate()


if __name__ == "__main__":
  main()
