"""What the step rewards buy (method §7.2, §7.3) in miniature: StePPO vs outcome-only PPO vs GRPO,
and StePPO's ablations, across chain length on the synthetic world's `credit` task.

    .venv/bin/python bench/rl_compare.py --hops 2,3,4 --seeds 0,1,2,3,4 --algos steppo,ppo,grpo
    .venv/bin/python bench/rl_compare.py --hops 4 --seeds 0,1,2,3,4 \\
        --algos steppo-no-info-gain,steppo-no-redundancy,steppo-no-key
    (add --reuse to keep finished runs and resume unfinished ones from their last checkpoint;
    --out DIR, default bench/results)

For each hop count H the task is `configs/demo.py:creditH` (its docstring says why the step rewards
should matter there). Every run of one H starts from the same warm-started policy, tokenizer,
world and retrieval index (built once in OUT/rl_compare/hH/base by a 1-step run, copied into each
run's workdir, where the training entry point reuses them) and gets the same budget: the same
number of trajectories per step and of steps. GRPO samples `--grpo_n` answers per prompt over
batch / grpo_n prompts. Each finished run leaves run.json in its workdir; OUT/rl_compare.json is
rewritten after every run from all finished runs under OUT/rl_compare (so the grid can be split
over several invocations): a `runs` list (algo, hops, seed, em_after, f1_after, wall_s, ...) and a
`summary` per (hops, algo) with means and 95% t-intervals over seeds; OUT/rl_compare.md holds the
tables and OUT/rl_compare_hH.png the train curves per method.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from stepsearch_jax import metrics  # noqa: E402

SHARED = ("world", "tokenizer", "index", "warmstart")
CURVE_KEYS = (("reward/answer_f1", "answer F1 of the sampled trajectories"),
              ("reward/info_gain", "information gain per trajectory (gold passages found)"),
              ("reward/redundancy", "redundancy per trajectory (passages seen again)"),
              ("rollout/searches", "searches per trajectory"))


def train(config: str, workdir: str, overrides: list[str], log_path: str) -> float:
  cmd = [sys.executable, "-m", "stepsearch_jax.train", "--config", config, "--workdir", workdir,
         *overrides]
  t0 = time.time()
  with open(log_path, "w") as log:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed with code {proc.returncode}; see {log_path}")
  return time.time() - t0


def interval95(xs) -> tuple[float, float | None]:
  """(mean, half-width of the 95% t-interval over seeds); half-width None for one seed."""
  from scipy import stats
  xs = np.asarray(xs, np.float64)
  if len(xs) < 2:
    return float(xs.mean()), None
  return float(xs.mean()), float(stats.t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / np.sqrt(len(xs)))


def ensure_base(root: str, config: str, hops: int, common: list[str]) -> dict:
  """The shared warm start of hop count `hops` (and its before-RL evaluation)."""
  base = os.path.join(root, f"h{hops}", "base")
  # results.json alone (committed) is not enough to start new runs: they copy SHARED from here
  if not all(os.path.exists(os.path.join(base, n)) for n in ("results.json", *SHARED)):
    if os.path.exists(base):
      shutil.rmtree(base)
    os.makedirs(base)
    print(f"== h{hops}: warm start and before-RL evaluation ({config})", flush=True)
    wall = train(config, base, common + ["--config.total_steps=1", "--config.save_every=0",
                                         "--config.eval_before_train=True",
                                         "--config.eval_every=0"],
                 os.path.join(root, f"h{hops}", "base.log"))
    with open(os.path.join(base, "base_wall_s.json"), "w") as f:
      json.dump({"wall_s": wall}, f)
  with open(os.path.join(base, "results.json")) as f:
    res = json.load(f)
  return {"hops": hops, "em": res["em_before"], "f1": res["f1_before"],
          "searches": res.get("searches_before")}


def run_state(wd: str, reuse: bool) -> str:
  """What to do with a run's workdir: "done" (reuse run.json), "resume" (an unfinished run that
  saved a checkpoint: the training entry point resumes it, equal to an uninterrupted run, see
  tests/test_fault_tolerance.py) or "fresh" (wipe and start from the warm start). Only --reuse
  keeps anything."""
  if not reuse:
    return "fresh"
  if os.path.exists(os.path.join(wd, "run.json")):
    return "done"
  ckpts = os.path.join(wd, "checkpoints")
  if os.path.isdir(ckpts) and any(name.isdigit() for name in os.listdir(ckpts)):
    return "resume"
  return "fresh"


def timed_attempt(wd: str, run) -> float:
  """Run `run(log_path)` as one more attempt at the run in `wd`; returns the wall time summed over
  all attempts. A resumed run's own call times only its remainder, so every attempt is recorded in
  wd/attempts.json when it starts; one that was killed is timed to its log's last write."""
  path = os.path.join(wd, "attempts.json")
  attempts = []
  if os.path.exists(path):
    with open(path) as f:
      attempts = json.load(f)
  if not attempts and os.path.exists(os.path.join(wd, "train.log")):
    # an attempt that left no record (an older rl_compare): timed from the config it wrote first
    # to its log's last write, and its log kept
    os.replace(os.path.join(wd, "train.log"), os.path.join(wd, "train.0.log"))
    attempts.append({"log": "train.0.log", "wall_s": None,
                     "start": os.path.getmtime(os.path.join(wd, "config.json"))})
  for a in attempts:
    if a.get("wall_s") is None:
      log = os.path.join(wd, a["log"])
      a["wall_s"] = (os.path.getmtime(log) - a["start"]) if os.path.exists(log) else 0.0
  log = "train.log" if not attempts else f"train.{len(attempts)}.log"
  if os.path.exists(os.path.join(wd, log)):
    raise RuntimeError(f"{wd}: {log} exists but attempts.json does not list it")
  attempts.append({"log": log, "start": time.time(), "wall_s": None})
  with open(path, "w") as f:
    json.dump(attempts, f)
  attempts[-1]["wall_s"] = run(os.path.join(wd, log))
  with open(path, "w") as f:
    json.dump(attempts, f)
  return sum(a["wall_s"] for a in attempts)


def run_one(root: str, config: str, hops: int, algo: str, seed: int, args, common) -> dict:
  wd = os.path.join(root, f"h{hops}", f"{algo}_seed{seed}")
  done = os.path.join(wd, "run.json")
  state = run_state(wd, args.reuse)
  if state == "done":
    print(f"== h{hops} {algo} seed {seed}: reusing {done}", flush=True)
    with open(done) as f:
      return json.load(f)
  if state == "fresh":
    if os.path.exists(wd):
      shutil.rmtree(wd)
    os.makedirs(wd)
    base = os.path.join(root, f"h{hops}", "base")
    for name in SHARED:
      shutil.copytree(os.path.join(base, name), os.path.join(wd, name))
  n = args.grpo_n if algo == "grpo" else 1
  # eval_every=steps: the one held-out evaluation after the last step (the base did the one before)
  over = common + ["--config.eval_before_train=False", f"--config.eval_every={args.steps}",
                   f"--config.algo.name={algo}", f"--config.seed={seed}",
                   f"--config.total_steps={args.steps}", f"--config.save_every={args.save_every}",
                   f"--config.rollout.n={n}", f"--config.data.batch_size={args.batch // n}"]
  print(f"== h{hops} {algo} seed {seed}" + (" (resuming its checkpoint)" if state == "resume"
                                           else ""), flush=True)
  wall = timed_attempt(wd, lambda log: train(config, wd, over, log))
  with open(os.path.join(wd, "results.json")) as f:
    res = json.load(f)
  rows = metrics.read_metrics(os.path.join(wd, "metrics.jsonl"))
  curves = {k: [r[k] for r in rows if k in r] for k, _ in CURVE_KEYS}
  out = {"algo": algo, "hops": hops, "seed": seed, "em_after": res["em_after"],
         "f1_after": res["f1_after"], "searches_after": res.get("searches_after"),
         "wall_s": round(wall, 1), "steps": args.steps,
         "trajectories_per_step": args.batch, "curves": curves}
  with open(done, "w") as f:
    json.dump(out, f)
  return out


def collect(root: str) -> tuple[list[dict], list[dict]]:
  runs = []
  for path in sorted(glob.glob(os.path.join(root, "h*", "*_seed*", "run.json"))):
    with open(path) as f:
      runs.append(json.load(f))
  bases = []
  for path in sorted(glob.glob(os.path.join(root, "h*", "base", "results.json"))):
    with open(path) as f:
      res = json.load(f)
    hops = int(os.path.basename(os.path.dirname(os.path.dirname(path)))[1:])
    bases.append({"hops": hops, "em": res["em_before"], "f1": res["f1_before"],
                  "searches": res.get("searches_before")})
  return runs, bases


def summarise(runs: list[dict]) -> list[dict]:
  rows = []
  for hops in sorted({r["hops"] for r in runs}):
    # Same seed = same warm start, question order and first sampling key: StePPO minus a method
    # per seed is the paired comparison (a tighter interval than two independent ones)
    ref = {r["seed"]: r["em_after"] for r in runs if r["hops"] == hops and r["algo"] == "steppo"}
    for algo in dict.fromkeys(r["algo"] for r in runs if r["hops"] == hops):
      rs = [r for r in runs if r["hops"] == hops and r["algo"] == algo]
      em, em_h = interval95([r["em_after"] for r in rs])
      f1, f1_h = interval95([r["f1_after"] for r in rs])
      train_f1 = [float(np.mean(r["curves"]["reward/answer_f1"])) for r in rs]
      rows.append({"hops": hops, "algo": algo, "seeds": sorted(r["seed"] for r in rs),
                   "em_mean": em, "em_ci95": em_h, "f1_mean": f1, "f1_ci95": f1_h,
                   "searches": float(np.mean([r["searches_after"] or 0 for r in rs])),
                   "train_answer_f1_mean": float(np.mean(train_f1)),
                   "wall_s_mean": float(np.mean([r["wall_s"] for r in rs]))})
      diffs = [ref[r["seed"]] - r["em_after"] for r in rs if r["seed"] in ref]
      if algo != "steppo" and diffs:
        rows[-1]["steppo_minus_em"], rows[-1]["steppo_minus_em_ci95"] = interval95(diffs)
  return rows


def _pm(mean: float, half: float | None) -> str:
  return f"{mean:.3f}" if half is None else f"{mean:.3f} ± {half:.3f}"


def markdown(summary: list[dict], bases: list[dict]) -> str:
  lines = ["| hops | method | seeds | held-out EM (mean ± 95% CI) | held-out F1 (mean ± 95% CI) | "
           "StePPO EM minus this, paired by seed (mean ± 95% CI) | "
           "searches/q | train answer F1 (mean over steps) | wall s/run |",
           "|---|---|---|---|---|---|---|---|---|"]
  for b in sorted(bases, key=lambda b: b["hops"]):
    lines.append(f"| {b['hops']} | warm start (no RL) | | {b['em']:.3f} | {b['f1']:.3f} | | "
                 f"{b['searches'] or 0:.2f} | | |")
    for r in (r for r in summary if r["hops"] == b["hops"]):
      paired = (_pm(r["steppo_minus_em"], r["steppo_minus_em_ci95"])
                if "steppo_minus_em" in r else "")
      lines.append(f"| {r['hops']} | {r['algo']} | {len(r['seeds'])} | "
                   f"{_pm(r['em_mean'], r['em_ci95'])} | {_pm(r['f1_mean'], r['f1_ci95'])} | "
                   f"{paired} | {r['searches']:.2f} | {r['train_answer_f1_mean']:.3f} | "
                   f"{r['wall_s_mean']:.0f} |")
  return "\n".join(lines)


def plot(runs: list[dict], hops: int, out_png: str, task: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(11, 7))
  for ax, (key, title) in zip(axes.flat, CURVE_KEYS):
    for algo in dict.fromkeys(r["algo"] for r in runs if r["hops"] == hops):
      curves = [r["curves"][key] for r in runs if r["hops"] == hops and r["algo"] == algo]
      n = min(len(c) for c in curves)
      if not n:
        continue
      arr = np.array([c[:n] for c in curves])
      mean, std = arr.mean(0), arr.std(0)
      steps = np.arange(1, n + 1)
      line, = ax.plot(steps, mean, label=f"{algo} ({len(curves)} seeds)")
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.suptitle(f"{task}{hops}, {hops} hops: train curves per method (mean ± std over seeds)")
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)


def write_outputs(out_dir: str, root: str, command: str, config: str) -> dict:
  runs, bases = collect(root)
  summary = summarise(runs)
  out = {"command": command, "task": f"{config}H", "warm_start": bases,
         "summary": summary, "runs": runs}
  with open(os.path.join(out_dir, "rl_compare.json"), "w") as f:
    json.dump(out, f, indent=1)
  with open(os.path.join(out_dir, "rl_compare.md"), "w") as f:
    f.write(markdown(summary, bases) + "\n")
  for hops in sorted({r["hops"] for r in runs}):
    plot(runs, hops, os.path.join(out_dir, f"rl_compare_h{hops}.png"),
         config.rsplit(":", 1)[-1])
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--hops", default="2,3,4")
  p.add_argument("--seeds", default="0,1,2,3,4")
  p.add_argument("--algos", default="steppo,ppo,grpo")
  p.add_argument("--steps", type=int, default=16)
  p.add_argument("--batch", type=int, default=32, help="trajectories per step (all algorithms)")
  p.add_argument("--grpo_n", type=int, default=4)
  p.add_argument("--save_every", type=int, default=4,
                 help="checkpoint every N steps, so a run cut short resumes there with --reuse")
  p.add_argument("--config", default="configs/demo.py:credit",
                 help="config prefix; the hop count is appended (configs/demo.py:credit3)")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
  p.add_argument("--reuse", action="store_true",
                 help="keep finished runs (OUT/rl_compare/hH/ALGO_seedN/run.json), train the rest")
  args = p.parse_args()
  root = os.path.join(args.out, "rl_compare")
  os.makedirs(root, exist_ok=True)
  common = ["--config.curves_png=False"]
  command = " ".join(["bench/rl_compare.py", *sys.argv[1:]])
  out = None
  for hops in [int(h) for h in args.hops.split(",")]:
    config = f"{args.config}{hops}"
    ensure_base(root, config, hops, common)
    # seed-major: a grid cut short still holds every method at the seeds it reached
    for seed in [int(s) for s in args.seeds.split(",")]:
      for algo in args.algos.split(","):
        run = run_one(root, config, hops, algo, seed, args, common)
        print(json.dumps({k: v for k, v in run.items() if k != "curves"}), flush=True)
        # after every run: partial results kept
        out = write_outputs(args.out, root, command, args.config)
  if out is not None:
    print(markdown(out["summary"], out["warm_start"]))


if __name__ == "__main__":
  main()
