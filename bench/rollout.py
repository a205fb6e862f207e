"""Rollout throughput: native driver vs JetStream driver vs transformers+torch, side by side.

  .venv/bin/python bench/rollout.py [--batches 1,8,32] [--out bench/results/rollout.json]
  .venv/bin/python bench/rollout.py --models smollm2,qwen2.5-0.5b-shape [--batches 1,8,32,64]
      (real shapes: scripted episodes, bandwidth roofline, context sweep; see `bench/rollout_scale.py`)

Without `--models` (the toy), one run builds the synthetic world, its BM25 index behind the real retrieval server, and a small
word-level policy warm-started to search (tests/toy_world.py). Then, for each batch size,
the same greedy 5-turn search rollout (max_turns=5, then the final answer turn) is run by
  native:    our continuous-batching driver (slots kept across turns, appended tokens prefilled
             in one batched call, the prompts' common prefix prefilled once and copied,
             `--decode_steps`..`--max_decode_steps` generate steps per device call on a window
             of the KV cache, batched retrieval overlapped with decoding), and the same driver
             with prefix sharing off (`native_unshared_prefix`, an ablation);
  jetstream: JetStream's orchestrator, one request per turn re-prefilling the history (logprob
             rescoring off, so only generation is compared);
  torch:     transformers `generate` on the same weights, turn by turn, the batch left-padded,
             stopping rows on `</search>`/`</answer>`/EOS, one retrieval request per turn; on
             CPU run with 1 thread and with all cores, the faster run reported; when JAX runs on
             a GPU, torch runs on CUDA too (`--torch_device`).
All three feed the same Episode state machine. Reported: model tokens generated per second of
wall time (retrieval included) of the fastest of `--repeats` timed runs, after untimed warm-up
runs (compilation excluded); the timed runs go round-robin over the contenders, and every run's
wall time is kept too.
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
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from stepsearch_jax import hostmem, models  # noqa: E402
from stepsearch_jax.config import base_config  # noqa: E402
from stepsearch_jax.engine import SamplingParams, StepSearchEngine  # noqa: E402
from stepsearch_jax.rollout import episode  # noqa: E402
from stepsearch_jax.rollout.driver import RolloutResult, rollout  # noqa: E402
from stepsearch_jax.rollout.retriever import RetrieverClient  # noqa: E402
import toy_world  # noqa: E402
from torch_batch import left_padded  # noqa: E402


def torch_rollout(hf, tok, records, cfg: episode.LoopConfig, retriever,
                  device="cpu") -> tuple[list, float]:
  import torch
  eps = episode.make_episodes(records, tok, cfg, jax.random.PRNGKey(0),
                           eos_ids=[tok.eos_token_id, tok.pad_token_id])
  stops = [tok.convert_tokens_to_ids(t) for t in ("</search>", "</answer>")]
  stop_ids = stops + [tok.eos_token_id, tok.pad_token_id]
  t0 = time.perf_counter()
  while True:
    active = [e for e in eps if not e.done]
    if not active:
      break
    ids, mask = left_padded(active, tok.pad_token_id)
    with torch.no_grad():
      out = hf.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                        max_new_tokens=cfg.max_tokens_per_turn, eos_token_id=stop_ids,
                        pad_token_id=tok.pad_token_id)[:, ids.shape[1]:].tolist()
    searching = []
    for e, row in zip(active, out):
      end = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
      row = row[:end + 1] if end < len(row) and row[end] in stops else row[:end]
      if e.finish_turn(row, [0.0] * len(row)) == "search":
        searching.append(e)
    if searching:
      results = retriever.search([e.query for e in searching], topk=cfg.topk)
      for e, res in zip(searching, results):
        e.observe_search(res)
  return [e.traj for e in eps], time.perf_counter() - t0


def model_tokens(trajs) -> int:
  return int(sum(sum(t.loss_mask) for t in trajs))


def main() -> None:
  if any(a == "--models" or a.startswith("--models=") for a in sys.argv[1:]):
    import rollout_scale   # bench/rollout_scale.py: the same contenders at real model shapes
    return rollout_scale.main()
  p = argparse.ArgumentParser()
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "rollout.json"))
  p.add_argument("--sft_steps", type=int, default=80)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--repeats", type=int, default=5,
                 help="timed runs per driver (and torch thread count); the fastest is reported")
  p.add_argument("--workdir", default="", help="reuse the world and trained policy kept here")
  defaults = base_config().rollout
  p.add_argument("--decode_steps", type=int, default=defaults.decode_steps_per_call,
                 help="native driver: generate steps per device call (rollout.decode_steps_per_call)")
  p.add_argument("--max_decode_steps", type=int, default=defaults.max_decode_steps_per_call,
                 help="native driver: rollout.max_decode_steps_per_call")
  p.add_argument("--torch_device", default="auto",
                 help="cpu, cuda, or auto: cuda when JAX runs on a GPU and torch sees one, so "
                      "both sides use the same accelerator")
  args = p.parse_args()
  hostmem.reexec_with_hugepages()     # for torch and JAX alike: both allocate through glibc
  batches = [int(b) for b in args.batches.split(",")]
  load_start = os.getloadavg()[0]   # the CPU may be shared: ratios are side by side, not absolutes
  import torch
  import transformers
  from retrieval.server import start_subprocess

  work = args.workdir or tempfile.mkdtemp(prefix="bench_rollout_")
  world = toy_world.build_world(work, num_people=60, num_train=128, num_test=max(batches))
  proc, url = start_subprocess(world["index_dir"], timeout_s=120)
  try:
    retriever = RetrieverClient(url, topk=3)
    hf_dir = os.path.join(work, "hf")
    if os.path.exists(os.path.join(hf_dir, "config.json")):
      config, params = models.load_pretrained(hf_dir)
    else:
      config, params = toy_world.train_policy(world, retriever, hidden=args.hidden,
                                              layers=args.layers, steps=args.sft_steps,
                                              batch_size=8, lr=3e-3, limit=128,
                                              tie_word_embeddings=False)
      models.save_pretrained(hf_dir, config, params)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
    tok = world["tokenizer"]
    torch_device = args.torch_device
    if torch_device == "auto":
      torch_device = ("cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available()
                      else "cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf = hf.to(torch_device)
    rcfg = defaults.copy_and_resolve_references()
    rcfg.update(dict(
        driver="native", max_turns=5, max_tokens_per_turn=64, max_obs_tokens=800,
        max_context=1024, max_start=2048, temperature=1.0, top_p=1.0, top_k=-1, n=1,
        num_slots=32, prefill_buckets=tuple(b for b in defaults.prefill_buckets if b <= 1024),
        decode_steps_per_call=args.decode_steps, max_decode_steps_per_call=args.max_decode_steps,
        share_prefix=True))
    lcfg = episode.LoopConfig.from_config(rcfg, topk=3)
    results = []
    for b in batches:
      records = world["test_records"][:b]
      engine = StepSearchEngine(config, params, tok, num_slots=b, cache_len=1024 + 65,
                                max_prefill_length=1024, default_sampling=SamplingParams.greedy())
      row = {"batch": b}
      unshared = ml_collections.ConfigDict(rcfg.to_dict())
      unshared.share_prefix = False

      def ours(driver, cfg):
        return lambda: rollout(engine, records, cfg, retriever, jax.random.PRNGKey(0),
                               greedy=True, driver=driver, score_logprobs=False)

      def theirs(threads):
        def run():
          torch.set_num_threads(threads)
          trajs, wall = torch_rollout(hf, tok, records, lcfg, retriever, torch_device)
          out = RolloutResult(trajs)
          out.stats = {"total_s": wall, "threads": threads}
          return out
        return run

      # torch's thread count matters on a shared CPU (OpenMP threads spin against other
      # processes), so it runs with 1 and with all cores and its faster run is the baseline.
      contenders = {"native": ours("native", rcfg), "jetstream": ours("jetstream", rcfg),
                    "native_unshared_prefix": ours("native", unshared)}
      # On a GPU the thread count hardly matters: one torch run, with all cores.
      threads = ({1, os.cpu_count() or 1} if torch_device == "cpu" else {os.cpu_count() or 1})
      contenders.update({f"torch_{t}": theirs(t) for t in sorted(threads)})
      for run in contenders.values():   # warm-up: compiles; a second rollout reuses a state
        run(), run()
      before = engine.compile_counts()
      # Repeats go round-robin over the contenders, so a slow spell of a shared CPU does not
      # fall on one of them only; each reports its fastest run.
      runs = {name: [] for name in contenders}
      for _ in range(args.repeats):
        for name, run in contenders.items():
          runs[name].append(run())
      compiles = sum(engine.compile_counts().values()) - sum(before.values())
      row["compiles_during_timed_runs"] = compiles
      responses = {}
      for name, outs in runs.items():
        out = min(outs, key=lambda o: o.stats["total_s"])
        s = out.stats
        row[name] = {"tokens_per_s": model_tokens(out) / s["total_s"], "wall_s": s["total_s"],
                     "wall_s_all_runs": [o.stats["total_s"] for o in outs],
                     "model_tokens": model_tokens(out), "searches": int(sum(
                         len(t.search_end_indices) for t in out))}
        if name.startswith("torch"):
          row[name]["threads"] = s["threads"]
        else:
          row[name].update({
              "retrieval_requests": int(s.get("retrieval_batches", 0)),
              "retrieval_s": s.get("retrieval_s", 0.0), "prefill_tokens":
              int(s.get("prefill_tokens", 0)), "decode_steps": int(s.get("steps", 0))})
        if name.startswith("native"):   # phase profile of the native loop (seconds / calls)
          row[name]["shared_prefix_tokens"] = int(s.get("shared_prefix_tokens", 0))
          row[name]["phases"] = {k: s[k] for k in (
              "decode_call_s", "decode_calls", "prefill_s", "prefill_calls", "host_s",
              "retrieval_wait_s") if k in s}
        responses[name] = [t.response_ids for t in out]
      by_threads = {k: row.pop(k) for k in contenders if k.startswith("torch_")}
      best = max(by_threads, key=lambda k: by_threads[k]["tokens_per_s"])
      row["torch"] = by_threads[best]
      row["torch_tokens_per_s_by_threads"] = {str(r["threads"]): r["tokens_per_s"]
                                              for r in by_threads.values()}
      for other, name in (("jetstream", "jetstream"), ("unshared_prefix", "native_unshared_prefix"),
                          ("torch", best)):
        row[f"native_equals_{other}"] = responses["native"] == responses[name]
      row["native_over_jetstream"] = row["native"]["tokens_per_s"] / row["jetstream"]["tokens_per_s"]
      row["native_over_torch"] = row["native"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
      results.append(row)
      print(json.dumps(row), flush=True)
    report = {"benchmark": "rollout", "device": str(jax.devices()[0]),
              "device_kind": jax.devices()[0].device_kind, "torch_device": torch_device,
              "model_params": n_params,
              "model": {"hidden": args.hidden, "layers": args.layers, "vocab": len(tok)},
              "rollout": {k: rcfg[k] for k in ("max_turns", "max_tokens_per_turn", "max_context",
                                               "decode_steps_per_call",
                                               "max_decode_steps_per_call", "prefill_buckets")},
              "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
              "results": results,
              "targets": {"native_over_jetstream_at_32": ">= 2", "native_over_torch_at_32": ">= 3"}}
    at32 = next((r for r in results if r["batch"] == 32), None)
    if at32 is not None:
      report["targets_met"] = {"native_over_jetstream_at_32": at32["native_over_jetstream"] >= 2,
                               "native_over_torch_at_32": at32["native_over_torch"] >= 3}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))
  finally:
    proc.terminate()


if __name__ == "__main__":
  main()
