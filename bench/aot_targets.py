"""Compile every TPU target of the paper configs ahead of time (stepsearch_jax.aot), resumably.

    .venv/bin/python bench/aot_targets.py [--only qwen2_5_3b:v5e-16,...]

Each (config, target) writes bench/results/aot/<config>_<target>/aot.{json,md}; a target whose
aot.json exists is skipped, so the command can be split across several runs (one target takes
~15 min on a 2-core CPU). Then bench/results/aot/README.md collects every compiled table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results", "aot")
CONFIGS = ("qwen2_5_3b", "qwen2_5_7b")
TPU = ("v4", "v5e", "v5p", "v6e")


def targets(name: str) -> list[str]:
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return [t for t in module.TARGETS if t.split("-")[0] in TPU]


def collect() -> str:
  sys.path.insert(0, ROOT)
  from stepsearch_jax.aot import markdown
  parts = ["# Compiled for TPU slices (stepsearch_jax.aot)", "",
           "Made by `.venv/bin/python bench/aot_targets.py` on a CPU machine with libtpu; one "
           "section per `python -m stepsearch_jax.aot --config configs/NAME.py:TARGET`.", ""]
  for name in CONFIGS:
    for target in targets(name):
      path = os.path.join(OUT, f"{name}_{target}", "aot.json")
      if os.path.exists(path):
        with open(path) as f:
          report = json.load(f)
        parts += [f"## `configs/{name}.py:{target}`", "", markdown(report)]
      else:
        parts += [f"## `configs/{name}.py:{target}`", "", "not compiled yet", ""]
  return "\n".join(parts)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--only", default="", help="comma-separated config:target pairs")
  args = ap.parse_args()
  todo = [(n, t) for n in CONFIGS for t in targets(n)]
  if args.only:
    want = set(args.only.split(","))
    todo = [(n, t) for n, t in todo if f"{n}:{t}" in want]
  for name, target in todo:
    out = os.path.join(OUT, f"{name}_{target}")
    if os.path.exists(os.path.join(out, "aot.json")):
      print(f"{name}:{target}: done already", flush=True)
      continue
    t0 = time.time()
    print(f"{name}:{target}: compiling ...", flush=True)
    proc = subprocess.run([sys.executable, "-m", "stepsearch_jax.aot",
                           f"--config=configs/{name}.py:{target}", f"--out={out}"], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True)
    if proc.returncode:
      print(proc.stderr[-3000:], flush=True)
      raise SystemExit(f"{name}:{target} failed")
    print(f"{name}:{target}: {time.time() - t0:.0f} s", flush=True)
    with open(os.path.join(OUT, "README.md"), "w") as f:
      f.write(collect())
  with open(os.path.join(OUT, "README.md"), "w") as f:
    f.write(collect())


if __name__ == "__main__":
  main()
