"""Why a batched decode step is slow on this CPU: the weight matmuls of one step alone, at M rows.

  .venv/bin/python bench/decode_matmul.py [--rows 1,8,32,64] [--xla_flags "" "--xla_cpu_use_xnnpack=true"]

One decode step of SmolLM2-135M's shape without attention (30 layers of q/k/v/o, gate/up, down
projections at width 576, FFN 1536, then the 49,152-token LM head), float32, random weights:
JAX jitted (one subprocess per XLA_FLAGS setting, since flags are read at import) and torch
(`torch.no_grad`, all cores) side by side, best of 15 calls each. GFLOP/s = 2 x weights x rows /
time; at M=1 the step is a weight read (compare bytes/time with the bandwidth in
bench/results/rollout_scale.json). Writes bench/results/decode_matmul.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, F, V, L = 576, 1536, 49152, 30   # SmolLM2-135M: hidden, FFN, vocab, layers
KV = 3 * 64                          # 3 kv heads of 64


def flops(rows: int) -> float:
  per_layer = D * D + 2 * D * KV + D * D + 2 * D * F + F * D
  return 2.0 * rows * (L * per_layer + D * V)


def _time(fn, calls: int = 15) -> float:
  fn()
  best = float("inf")
  for _ in range(calls):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def jax_worker(rows: list[int]) -> dict:
  import jax
  import jax.numpy as jnp
  k = iter(jax.random.split(jax.random.PRNGKey(0), 8 * L + 2))
  w = lambda *s: jax.random.normal(next(k), s) * 0.02   # noqa: E731
  layers = [(w(D, D + 2 * KV), w(D, D), w(D, 2 * F), w(F, D)) for _ in range(L)]
  head = w(D, V)

  @jax.jit
  def step(x, layers, head):
    for qkv, o, gu, down in layers:
      x = x + (x @ qkv)[:, :D] @ o
      u = x @ gu
      x = x + (jax.nn.silu(u[:, :F]) * u[:, F:]) @ down
    return jnp.argmax(x @ head, -1)

  out = {}
  for m in rows:
    x = jax.random.normal(next(k), (m, D))
    out[m] = _time(lambda: step(x, layers, head).block_until_ready())
  return out


def torch_run(rows: list[int]) -> dict:
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  g = torch.Generator().manual_seed(0)
  w = lambda *s: torch.randn(*s, generator=g) * 0.02   # noqa: E731
  layers = [(w(D, D + 2 * KV), w(D, D), w(D, 2 * F), w(F, D)) for _ in range(L)]
  head = w(D, V)

  def step(x):
    with torch.no_grad():
      for qkv, o, gu, down in layers:
        x = x + (x @ qkv)[:, :D] @ o
        u = x @ gu
        x = x + (torch.nn.functional.silu(u[:, :F]) * u[:, F:]) @ down
      return (x @ head).argmax(-1)

  return {m: _time(lambda: step(torch.randn(m, D, generator=g))) for m in rows}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", default="1,8,32,64")
  p.add_argument("--xla_flags", nargs="*", default=["", "--xla_cpu_use_xnnpack=true",
                                                     "--xla_cpu_use_onednn=true"])
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "decode_matmul.json"))
  a = p.parse_args()
  rows = [int(x) for x in a.rows.split(",")]
  if a.worker:
    print(json.dumps(jax_worker(rows)))
    return
  weight_bytes = 4 * (L * (D * (D + 2 * KV) + D * D + 2 * D * F + F * D) + D * V)
  results = []
  for i, flags in enumerate(a.xla_flags):   # jax per flag setting, torch (no XLA) after each
    env = {**os.environ, "XLA_FLAGS": flags}
    got = subprocess.run([sys.executable, __file__, "--worker", "--rows", a.rows], env=env,
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    for m, s in json.loads(got).items():
      results.append({"contender": "jax", "xla_flags": flags, "rows": int(m), "ms": 1e3 * s,
                      "gflop_s": flops(int(m)) / s / 1e9, "weight_gb_s": weight_bytes / s / 1e9})
    for m, s in torch_run(rows).items():
      results.append({"contender": "torch", "xla_flags": None, "round": i, "rows": m, "ms": 1e3 * s,
                      "gflop_s": flops(m) / s / 1e9, "weight_gb_s": weight_bytes / s / 1e9})
  report = {"bench": "decode_matmul", "shape": "SmolLM2-135M without attention",
            "weight_bytes": weight_bytes, "cpus": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0], "results": results}
  with open(a.out, "w") as f:
    json.dump(report, f, indent=1)
  for r in results:
    label = f"round {r['round']}" if r["xla_flags"] is None else r["xla_flags"] or "(default)"
    print(f"{r['contender']:5s} {label:32s} M={r['rows']:3d} "
          f"{r['ms']:8.1f} ms {r['gflop_s']:6.1f} GFLOP/s")


if __name__ == "__main__":
  main()
