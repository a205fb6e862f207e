"""What multi-controller costs: one training step on 8 CPU devices as 1 process vs 2 processes x 4.

Both run `python -m stepsearch_jax.train --config configs/demo.py:smoke --config.mesh.fsdp=-1`
from the same warm start, tokenizer and index (built once by a first run), so they compute the
same programs on the same mesh shape; the 2-process run joins over loopback as the launchers
join hosts, and each process serves its own retrieval sidecar. Reported per setup: seconds per
step (steps after the first, which compiles) and per phase, and the ratio (target <= 1.5x).

  .venv/bin/python bench/multihost.py [--steps 4] [--out bench/results/multihost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import portpicker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("time/step_s", "time/rollout_s", "time/logprobs_values_s", "time/update_s",
          "time/weight_push_s")


def _argv(workdir: str, extra: list[str]) -> list[str]:
  return [sys.executable, "-m", "stepsearch_jax.train", "--config=configs/demo.py:smoke",
          f"--workdir={workdir}", "--config.mesh.fsdp=-1", *extra]


def _env(devices: int, cache: str, **kw) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache, **kw)
  return env


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _summary(rows: list[dict], wall: float) -> dict:
  steps = [r for r in rows if "time/step_s" in r][1:]        # the first step compiles
  return {"wall_s": round(wall, 1), "steps_timed": len(steps),
          **{k.split("/")[1]: float(np.mean([r[k] for r in steps])) for k in PHASES
             if steps and k in steps[0]}}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "multihost.json"))
  args = ap.parse_args()
  tmp = tempfile.mkdtemp(prefix="multihost_")
  cache = os.path.join(tmp, "jax_cache")
  try:
    base = os.path.join(tmp, "base")
    print("building the shared warm start, tokenizer and index ...", flush=True)
    subprocess.run(_argv(base, ["--config.total_steps=0"]), cwd=ROOT, env=_env(1, cache),
                   check=True, capture_output=True, text=True)
    reuse = [f"--config.model.hf_path={base}/warmstart", f"--config.tokenizer.path={base}/tokenizer",
             f"--config.retrieval.index_dir={base}/index", "--config.sft.steps=0",
             f"--config.total_steps={args.steps}", "--config.eval_before_train=False",
             "--config.save_every=0"]
    results = {}
    one = os.path.join(tmp, "one")
    t0 = time.time()
    print("1 process x 8 devices ...", flush=True)
    subprocess.run(_argv(one, reuse), cwd=ROOT, env=_env(8, cache), check=True,
                   capture_output=True, text=True)
    results["1x8"] = _summary(_metrics(one), time.time() - t0)
    two = os.path.join(tmp, "two")
    port = portpicker.pick_unused_port()
    print("2 processes x 4 devices ...", flush=True)
    t0 = time.time()
    procs = [subprocess.Popen(_argv(two, reuse), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(4, cache, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    for p in procs:
      out, _ = p.communicate(timeout=3600)
      if p.returncode:
        raise SystemExit(f"2-process run failed:\n{out[-4000:]}")
    results["2x4"] = _summary(_metrics(two), time.time() - t0)
    ratio = results["2x4"]["step_s"] / results["1x8"]["step_s"]
    report = {"config": "configs/demo.py:smoke, mesh fsdp=8", "steps": args.steps,
              "results": results, "step_ratio_2x4_over_1x8": round(ratio, 3),
              "target_ratio": 1.5, "meets_target": ratio <= 1.5,
              "cpu_count": os.cpu_count()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
