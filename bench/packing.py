"""Packed vs padded PPO update on a realistic trajectory-length mix, side by side in one run.

One learner pass = prepare (old/ref log-probs, values) + advantages + update, on the same
trajectories laid out two ways (ppo/batch.py): padded (one trajectory per row, prompt bucket +
response bucket) and packed (each mini-batch's trajectories first-fit into shared rows). Both
give the same losses and gradients (tests/test_ppo_pack.py), so the figure of merit is real
trajectory tokens per second; the two layouts are timed alternately, repetition by repetition,
and the ratio is taken per repetition (the machine may be shared).

Lengths: (prompt, response) token counts read from trajectories files that a training run wrote
(`--trajectories 'runs/x/trajectories/train_step_*.jsonl'`; `stepsearch_jax.report` reads the
same files), sampled with replacement; the token ids are random (speed does not depend on them).

  .venv/bin/python bench/packing.py --trajectories 'GLOB' [--models demo,20m,135m] [--batch 32]
      [--row_len N]    (force the packed rows' length; default: the packer's choice)
Writes bench/results/packing.json and packing.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.attention import DEMO  # noqa: E402
from bench.update import MODELS  # noqa: E402
from stepsearch_jax.config import base_config  # noqa: E402
from stepsearch_jax.models import ModelConfig, init_params, init_value_params  # noqa: E402
from stepsearch_jax.models.sharding import make_mesh  # noqa: E402
from stepsearch_jax.ppo import make_learner  # noqa: E402


class _Traj:
  def __init__(self, prompt, response, mask, tid):
    self.prompt_ids, self.response_ids, self.loss_mask, self.id = prompt, response, mask, tid


def read_lengths(pattern: str) -> list[tuple[int, int]]:
  out = []
  for path in sorted(glob.glob(pattern)):
    with open(path) as f:
      for line in f:
        t = json.loads(line)
        out.append((len(t["prompt_ids"]), len(t["response_ids"])))
  if not out:
    raise SystemExit(f"--trajectories {pattern!r}: no trajectories found")
  return out


def trajectories(lengths, B: int, vocab: int, seed: int):
  rng = np.random.default_rng(seed)
  trajs, rewards = [], []
  for i, j in enumerate(rng.integers(0, len(lengths), size=B)):
    p, r = lengths[j]
    mask = [1] * r
    mask[r // 3:r // 3 + r // 4] = [0] * len(mask[r // 3:r // 3 + r // 4])   # inserted passages
    rew = np.zeros(r, np.float32)
    rew[-1] = float(rng.normal())
    trajs.append(_Traj(rng.integers(1, vocab, size=p).tolist(),
                       rng.integers(1, vocab, size=r).tolist(), mask, str(i)))
    rewards.append(rew)
  return trajs, rewards


def bench_model(name: str, lengths, B: int, mini: int, micro: int, repeats: int,
                row_len: int | None = None) -> dict:
  mc = ModelConfig(**DEMO) if name == "demo" else MODELS[name]
  policy = init_params(mc, jax.random.key(0))
  critic = init_value_params(mc, jax.random.key(1), policy)
  trajs, rewards = trajectories(lengths, B, mc.vocab_size, seed=0)
  real = sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
  learners, hosts = {}, {}
  for pack in (False, True):
    cfg = base_config()
    cfg.data.batch_size, cfg.rollout.n = B, 1
    cfg.algo.mini_batch, cfg.algo.micro_batch, cfg.algo.pack = mini, micro, pack
    cfg.optim.actor_warmup = cfg.optim.critic_warmup = 0
    learners[pack] = make_learner(cfg, policy, critic, policy, make_mesh((1, -1, 1)),
                                  policy_config=mc)
    hosts[pack] = learners[pack].make_batch(trajs, rewards, **({"row_len": row_len}
                                                               if pack and row_len else {}))

  def one_pass(pack: bool) -> float:
    learner = learners[pack]
    t0 = time.perf_counter()
    dev, _ = learner.advantages(learner.prepare(hosts[pack]))
    learner.update(dev)          # returns host floats: synchronised
    return time.perf_counter() - t0

  first = {pack: one_pass(pack) for pack in (False, True)}     # compiles
  times = {False: [], True: []}
  for _ in range(repeats):
    for pack in (False, True):
      times[pack].append(one_pass(pack))
  ratios = [a / b for a, b in zip(times[False], times[True])]
  row = dict(model=name, trajectories=B, mini_batch=mini, micro_batch=micro,
             real_tokens=real, ratio_packed_over_padded=float(np.median(ratios)), ratios=ratios)
  for pack, tag in ((False, "padded"), (True, "packed")):
    h = hosts[pack]
    row.update({f"{tag}_shape": list(np.shape(h.tokens)), f"{tag}_slots": int(np.size(h.rewards)),
                f"{tag}_padding_share": h.padding_share, f"{tag}_s": min(times[pack]),
                f"{tag}_times_s": times[pack], f"{tag}_first_call_s": first[pack],
                f"{tag}_traj_tokens_per_s": real / min(times[pack])})
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--trajectories", required=True, help="glob of trajectories jsonl files")
  ap.add_argument("--models", default="20m,135m")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--mini", type=int, default=16)
  ap.add_argument("--micro", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--row_len", type=int, default=None,
                  help="packed row length (default: the packer's choice by models.decoder.row_cost)")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = ap.parse_args()
  lengths = read_lengths(args.trajectories)
  totals = np.array([p + r for p, r in lengths])
  rows = []
  for m in args.models.split(","):
    rows.append(bench_model(m, lengths, args.batch, args.mini, args.micro, args.repeats,
                            args.row_len))
    print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("times_s")}), flush=True)
  out = dict(bench="ppo_packing", backend=jax.default_backend(), devices=len(jax.devices()),
             command=" ".join(["bench/packing.py", *sys.argv[1:]]),
             length_source=args.trajectories, length_samples=len(lengths),
             length_percentiles={str(q): float(np.percentile(totals, q)) for q in (5, 25, 50, 75, 95)},
             results=rows,
             note="ratio = padded pass time / packed pass time, per repetition (alternated), "
                  "median; one pass = prepare + advantages + update; tokens/s = real trajectory "
                  "tokens (prompt + response) / best pass time")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "packing.json"), "w") as f:
    json.dump(out, f, indent=1)
  lines = ["| model | trajectories | padded layout (padding) | packed layout (padding) | "
           "padded traj tok/s | packed traj tok/s | packed / padded |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['trajectories']} | {r['padded_shape']} "
                 f"({r['padded_padding_share']:.0%}) | {r['packed_shape']} "
                 f"({r['packed_padding_share']:.0%}) | {r['padded_traj_tokens_per_s']:.0f} | "
                 f"{r['packed_traj_tokens_per_s']:.0f} | {r['ratio_packed_over_padded']:.2f}x |")
  with open(os.path.join(args.out, "packing.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
