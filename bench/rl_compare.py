"""The paper's RL comparison (method §7.2) in miniature: StePPO vs PPO vs GRPO on the synthetic world.

    .venv/bin/python bench/rl_compare.py [--seeds 0,1,2] [--steps 30] [--out bench/results]

All runs start from the same warm-started policy, tokenizer, world and retrieval index (built once
in OUT/rl_compare/base by the demo config and copied into every run's workdir, where the training
entry point reuses them), and get the same budget: the same number of trajectories per step and the
same number of steps. GRPO samples `--grpo_n` answers per prompt over batch_size / grpo_n prompts.
Writes rl_compare.json (per run and mean/std per algorithm) and rl_compare.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from stepsearch_jax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = ("world", "tokenizer", "index", "warmstart")


def train(workdir: str, overrides: list[str], log_path: str) -> dict:
  cmd = [sys.executable, "-m", "stepsearch_jax.train", "--config", "configs/demo.py",
         "--workdir", workdir, *overrides]
  t0 = time.time()
  with open(log_path, "w") as log:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed with code {proc.returncode}; see {log_path}")
  with open(os.path.join(workdir, "results.json")) as f:
    out = json.load(f)
  out["wall_s"] = time.time() - t0
  return out


def train_answer_f1(workdir: str) -> list[float]:
  """Per-step answer F1 of the sampled training trajectories (how fast each method learns)."""
  rows = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return [r["reward/answer_f1"] for r in rows if "reward/answer_f1" in r]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--algos", default="steppo,ppo,grpo")
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--batch", type=int, default=64, help="trajectories per step (all algorithms)")
  p.add_argument("--grpo_n", type=int, default=4)
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
  p.add_argument("--base", default="", help="a finished demo workdir (e.g. runs/demo) whose "
                 "world, tokenizer, index, warm start and before-RL evaluation are reused")
  p.add_argument("--reuse", action="store_true",
                 help="keep finished runs (OUT/rl_compare/ALGO_seedN/results.json), train the rest")
  args = p.parse_args()
  root = os.path.join(args.out, "rl_compare")
  base = args.base or os.path.join(root, "base")
  missing = [n for n in SHARED + ("results.json",) if not os.path.exists(os.path.join(base, n))]
  if args.base and missing:
    sys.exit(f"--base {args.base}: missing {missing} (run the demo there first)")
  os.makedirs(root, exist_ok=True)
  common = [f"--config.total_steps={args.steps}", "--config.eval_every=0",
            "--config.eval_before_train=True", f"--config.save_every={args.steps}",
            "--config.curves_png=False"]
  if not os.path.exists(os.path.join(base, "warmstart", "config.json")):
    # The shared warm start (and its before-RL evaluation) comes from one 1-step run.
    train(base, ["--config.total_steps=1", "--config.eval_every=0",
                 "--config.eval_before_train=True", "--config.save_every=0",
                 "--config.curves_png=False"], os.path.join(root, "base.log"))
  with open(os.path.join(base, "results.json")) as f:
    base_res = json.load(f)
  runs = []
  for algo in args.algos.split(","):
    for seed in [int(s) for s in args.seeds.split(",")]:
      wd = os.path.join(root, f"{algo}_seed{seed}")
      n = args.grpo_n if algo == "grpo" else 1
      over = common + [f"--config.algo.name={algo}", f"--config.seed={seed}",
                       f"--config.rollout.n={n}", f"--config.data.batch_size={args.batch // n}"]
      done = os.path.join(wd, "results.json")
      if args.reuse and os.path.exists(done):
        print(f"== {algo} seed {seed}: reusing {done}", flush=True)
        with open(done) as f:
          res = json.load(f)
        res["wall_s"] = res.get("timings", {}).get("total_s")
      else:
        if os.path.exists(wd):
          shutil.rmtree(wd)
        os.makedirs(wd)
        for name in SHARED:
          shutil.copytree(os.path.join(base, name), os.path.join(wd, name))
        print(f"== {algo} seed {seed}", flush=True)
        res = train(wd, over, os.path.join(root, f"{algo}_seed{seed}.log"))
      train_f1 = train_answer_f1(wd)
      runs.append({"algo": algo, "seed": seed, "em": res["em_after"], "f1": res["f1_after"],
                   "searches": res.get("searches_after"), "wall_s": res["wall_s"],
                   "train_answer_f1_mean": float(np.mean(train_f1)),
                   "train_answer_f1_last4": float(np.mean(train_f1[-4:]))})
      print(json.dumps(runs[-1]), flush=True)
  table = []
  for algo in args.algos.split(","):
    rs = [r for r in runs if r["algo"] == algo]
    em, f1 = np.array([r["em"] for r in rs]), np.array([r["f1"] for r in rs])
    table.append({"algo": algo, "seeds": len(rs), "em_mean": float(em.mean()),
                  "em_std": float(em.std()), "f1_mean": float(f1.mean()),
                  "f1_std": float(f1.std()),
                  "searches": float(np.mean([r["searches"] or 0 for r in rs])),
                  "train_f1_mean": float(np.mean([r["train_answer_f1_mean"] for r in rs])),
                  "train_f1_std": float(np.std([r["train_answer_f1_mean"] for r in rs]))})
  out = {"warm_start": {"em": base_res.get("em_before"), "f1": base_res.get("f1_before")},
         "base": os.path.relpath(base, ROOT), "command": " ".join(sys.argv), "steps": args.steps, "trajectories_per_step": args.batch, "runs": runs, "table": table}
  with open(os.path.join(args.out, "rl_compare.json"), "w") as f:
    json.dump(out, f, indent=2)
  lines = ["| method | held-out EM (mean ± std) | held-out F1 (mean ± std) | searches/q | "
           "train answer F1, mean over steps |",
           "|---|---|---|---|---|",
           f"| warm start (no RL) | {out['warm_start']['em']:.3f} | {out['warm_start']['f1']:.3f} | "
           "| |"]
  for r in table:
    lines.append(f"| {r['algo']} ({r['seeds']} seeds) | {r['em_mean']:.3f} ± {r['em_std']:.3f} | "
                 f"{r['f1_mean']:.3f} ± {r['f1_std']:.3f} | {r['searches']:.2f} | "
                 f"{r['train_f1_mean']:.3f} ± {r['train_f1_std']:.3f} |")
  md = "\n".join(lines)
  with open(os.path.join(args.out, "rl_compare.md"), "w") as f:
    f.write(md + "\n")
  print(md)


if __name__ == "__main__":
  main()
