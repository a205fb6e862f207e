"""PPO update throughput and model-FLOP utilisation against the peak matmul rate of the same run.

For each model (a ~20M decoder and a SmolLM2-135M-shaped one, random init, float32 compute), builds
a StePPO Learner (policy + critic + reference) on the local devices, runs the prepare pass, the
advantages and one mini-batch update on random trajectories, and reports tokens/s and

  mfu = achieved model FLOP/s / peak float32 matmul FLOP/s (a big jnp.dot, measured in this run).

FLOP count (model FLOPs: recomputation under remat is not counted):
  matmul params per token: N_body = every weight matrix of the layers (q, k, v, o, gate, up, down);
  LM head D*V only on the R response columns (the trainer projects only those); critic head D.
  attention per layer, forward: 4 * T^2 * H * Dh per row (QK^T and AV over the full T x T
  masked score matrix, which is what the kernel computes).
  update   = 3 x forward (fwd + bwd) for policy and critic:
             6 * (N_body * T + D * V * R) * B + 3 * attn   (policy)
           + 6 * (N_body * T + D * T) * B + 3 * attn       (critic)
  prepare  = forward only of policy, reference and critic (2 * ... + attn each).
Tokens = B * T (prompt + response columns) per update.

  .venv/bin/python bench/update.py [--models 20m,135m] [--batch 8] [--prompt 64] [--response 192]
Writes bench/results/update.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from stepsearch_jax.config import base_config  # noqa: E402
from stepsearch_jax.models import ModelConfig, init_params, init_value_params  # noqa: E402
from stepsearch_jax.models.sharding import make_mesh  # noqa: E402
from stepsearch_jax.ppo import make_learner  # noqa: E402

MODELS = {
    # ~20M: 6 layers of width 512 + a tied 8192-token vocabulary.
    "20m": ModelConfig(model_type="qwen2", vocab_size=8192, hidden_size=512, intermediate_size=1408,
                       num_layers=6, num_heads=8, num_kv_heads=4, head_dim=64),
    # SmolLM2-135M's shape (llama, tied embeddings).
    "135m": ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576,
                        intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                        head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, attention_bias=False,
                        max_position_embeddings=8192),
}


_PEAK = {}


def peak_matmul_flops(n: int = 2048, repeats: int = 3) -> float:
  """Best-of-`repeats` float32 [n, n] @ [n, n] rate (FLOP/s)."""
  if not _PEAK:
    _PEAK["a"] = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    _PEAK["b"] = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    _PEAK["f"] = jax.jit(lambda x, y: x @ y)
    _PEAK["f"](_PEAK["a"], _PEAK["b"]).block_until_ready()
  a, b, f = _PEAK["a"], _PEAK["b"], _PEAK["f"]
  best = min(_timed(lambda: f(a, b).block_until_ready()) for _ in range(repeats))
  return 2 * n ** 3 / best


def peak_matmul_cpu(n: int = 2048, repeats: int = 3) -> float:
  """The same matmul's FLOP per process CPU-second (robust to time-slicing on a shared host)."""
  peak_matmul_flops(n, 1)
  a, b, f = _PEAK["a"], _PEAK["b"], _PEAK["f"]
  c0 = time.process_time()
  for _ in range(repeats):
    f(a, b).block_until_ready()
  return 2 * n ** 3 * repeats / (time.process_time() - c0)


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def flops(mc: ModelConfig, B: int, P: int, R: int) -> dict:
  T = P + R
  D, H, Dh, Hkv, F = mc.hidden_size, mc.num_heads, mc.head_dim, mc.num_kv_heads, mc.intermediate_size
  body = mc.num_layers * (D * H * Dh + 2 * D * Hkv * Dh + H * Dh * D + 3 * D * F)
  attn_fwd = mc.num_layers * 4 * T * T * H * Dh * B
  pol_fwd = 2 * (body * T + D * mc.vocab_size * R) * B + attn_fwd
  cri_fwd = 2 * (body * T + D * T) * B + attn_fwd
  return dict(body_params=body, update=3 * (pol_fwd + cri_fwd), prepare=2 * pol_fwd + cri_fwd)


def random_batch(B, P, R, vocab, seed=0):
  class Traj:
    pass
  rng = np.random.default_rng(seed)
  trajs, rewards = [], []
  for i in range(B):
    t = Traj()
    t.prompt_ids = rng.integers(1, vocab, size=P).tolist()
    t.response_ids = rng.integers(1, vocab, size=R).tolist()
    t.loss_mask = [1] * R
    t.loss_mask[R // 3:R // 3 + R // 6] = [0] * (R // 6)   # an inserted <information> span
    t.id = str(i)
    r = np.zeros(R, np.float32)
    r[-1] = float(rng.normal())
    trajs.append(t)
    rewards.append(r)
  return trajs, rewards


def bench_model(name: str, B: int, P: int, R: int, repeats: int) -> dict:
  mc = MODELS[name]
  cfg = base_config()
  cfg.data.batch_size = B
  cfg.algo.mini_batch = B
  cfg.algo.micro_batch = B
  cfg.optim.actor_warmup = cfg.optim.critic_warmup = 0
  policy = init_params(mc, jax.random.key(0))
  critic = init_value_params(mc, jax.random.key(1), policy)
  mesh = make_mesh((1, -1, 1))
  learner = make_learner(cfg, policy, critic, policy, mesh, policy_config=mc)
  trajs, rewards = random_batch(B, P, R, mc.vocab_size)
  host = learner.make_batch(trajs, rewards, prompt_len=P, response_len=R)

  t0 = time.perf_counter()
  dev = learner.prepare(host)
  jax.block_until_ready(dev)
  prep_compile = time.perf_counter() - t0
  # The machine is shared: measure the matmul peak right before each timed call and take the
  # ratio per repetition (side by side), then report the median and best ratio.
  prep_times, prep_peaks = [], []
  for _ in range(repeats):
    prep_peaks.append(peak_matmul_flops())
    t0 = time.perf_counter()
    dev = jax.block_until_ready(learner.prepare(host))
    prep_times.append(time.perf_counter() - t0)
  dev, _ = learner.advantages(dev)
  t0 = time.perf_counter()
  learner.update(dev)   # includes compilation
  upd_compile = time.perf_counter() - t0
  upd_times, upd_peaks, upd_cpu_ratio = [], [], []
  for _ in range(repeats):
    upd_peaks.append(peak_matmul_flops())
    cpu_peak = peak_matmul_cpu()
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = learner.update(dev)   # returns host floats: synchronised
    upd_times.append(time.perf_counter() - t0)
    upd_cpu_ratio.append(flops(mc, B, P, R)["update"] / (time.process_time() - c0) / cpu_peak)
  f = flops(mc, B, P, R)
  tokens = B * (P + R)
  upd, prep = min(upd_times), min(prep_times)
  upd_mfu = [f["update"] / t / p for t, p in zip(upd_times, upd_peaks)]
  prep_mfu = [f["prepare"] / t / p for t, p in zip(prep_times, prep_peaks)]
  return dict(
      model=name, params=count_params(policy), body_params=f["body_params"], batch=B,
      prompt_len=P, response_len=R, tokens_per_update=tokens,
      update_s=upd, update_tokens_per_s=tokens / upd, update_flops=f["update"],
      update_flop_per_s=f["update"] / upd, update_mfu=float(np.median(upd_mfu)),
      update_mfu_best=max(upd_mfu), update_mfu_cputime=float(np.median(upd_cpu_ratio)), update_times_s=upd_times, update_peaks=upd_peaks,
      prepare_s=prep, prepare_tokens_per_s=tokens / prep, prepare_flop_per_s=f["prepare"] / prep,
      prepare_mfu=float(np.median(prep_mfu)), prepare_times_s=prep_times,
      prepare_peaks=prep_peaks, update_first_call_s=upd_compile,
      prepare_first_call_s=prep_compile, pg_loss=metrics["pg_loss"], vf_loss=metrics["vf_loss"])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", default="20m,135m")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--response", type=int, default=192)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "update.json"))
  args = ap.parse_args()
  rows = [bench_model(m, args.batch, args.prompt, args.response, args.repeats)
          for m in args.models.split(",")]
  out = dict(
      bench="ppo_update", backend=jax.default_backend(), devices=len(jax.devices()),
      cpu=platform.processor() or platform.machine(), dtype="float32",
      peak_matmul_flop_per_s=max(p for r in rows for p in r["update_peaks"] + r["prepare_peaks"]),
      target_update_mfu=0.35, results=rows,
      note_cputime="update_mfu_cputime = (update FLOP per process CPU-second) / (matmul FLOP per "
                   "process CPU-second), both measured back to back: insensitive to other "
                   "processes taking cores, but counts idle-spinning worker threads",
      note="update_mfu = median over repetitions of model FLOP/s (6N per token for policy and "
           "critic + attention, see module docstring) / the peak float32 2048^3 jnp.dot FLOP/s "
           "measured right before that repetition (shared machine: side-by-side ratio)")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(out, fh, indent=2)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
