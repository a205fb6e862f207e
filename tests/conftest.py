"""Shared fixtures.

Trainer end-to-end runs (tests/test_train.py, tests/test_fault_tolerance.py): every run is a real
`python -m stepsearch_jax.train --config configs/demo.py:test` subprocess (real retrieval server,
engine, learner). They share one JAX persistent compilation cache and one built world: the first
run (`train_base`) trains the tokenizer, builds the BM25 index and runs the warm start; every later
run points model.hf_path / tokenizer.path / retrieval.index_dir at it, so it only pays for its
own steps. `train_reference` is the one uninterrupted 3-step StePPO run that the resume and kill
tests compare their parameters against.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = "configs/demo.py:test"


class TrainRuns:
  """Launch and inspect trainer subprocesses that share one cache and one built world."""

  def __init__(self, root: Path, cache_dir: str):
    self.root = root
    self.cache_dir = cache_dir
    self.base: Path | None = None

  def env(self) -> dict:
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=self.cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    return env

  def reuse(self) -> list[str]:
    """Overrides that reuse the base run's warm start, tokenizer and index."""
    assert self.base is not None, "the base run must come first"
    return [f"--config.model.hf_path={self.base / 'warmstart'}",
            f"--config.tokenizer.path={self.base / 'tokenizer'}",
            f"--config.retrieval.index_dir={self.base / 'index'}", "--config.sft.steps=0"]

  def argv(self, workdir: Path, overrides=(), reuse: bool = True) -> list[str]:
    given = {o.split("=", 1)[0] for o in overrides}
    shared = [o for o in self.reuse() if o.split("=", 1)[0] not in given] if reuse else []
    return [sys.executable, "-m", "stepsearch_jax.train", f"--config={TEST_CONFIG}",
            f"--workdir={workdir}", *shared, *overrides]

  def spawn(self, workdir: Path, overrides=(), reuse: bool = True) -> subprocess.Popen:
    """Start a run in the background; its output goes to files (a full pipe would block it)."""
    log = Path(str(workdir) + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
      proc = subprocess.Popen(self.argv(workdir, overrides, reuse), cwd=ROOT, env=self.env(),
                              stdout=f, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log
    return proc

  def run(self, workdir: Path, overrides=(), reuse: bool = True, ok: bool = True,
          timeout: float = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(self.argv(workdir, overrides, reuse), cwd=ROOT, env=self.env(),
                       capture_output=True, text=True, timeout=timeout)
    if ok and p.returncode != 0:
      raise AssertionError(f"train run in {workdir} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                           f"{p.stderr[-5000:]}")
    return p


def read_metrics(workdir: Path) -> list[dict]:
  path = Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def committed_steps(workdir: Path) -> list[int]:
  """Checkpoint steps whose directory orbax has committed (renamed from its temporary name)."""
  d = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) \
      if d.exists() else []


def load_state(workdir: Path, step: int) -> dict:
  """The checkpointed learner state of `step` as {'policy/...': np.ndarray} (orbax, no target)."""
  import jax
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(str(Path(workdir) / "checkpoints"), item_names=("state", "meta"))
  try:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    mngr.close()
  flat = jax.tree_util.tree_leaves_with_path(out["state"])
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}


def child_pids(pid: int) -> list[int]:
  """Direct children of `pid` (from /proc), e.g. the retrieval server a trainer started."""
  out = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      out.append(int(entry))
  return out


def kill_tree(proc: subprocess.Popen) -> None:
  """SIGKILL a trainer we started and the retrieval server it started (which would outlive it)."""
  children = child_pids(proc.pid)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  for pid in children:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None,
             poll: float = 0.02):
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = predicate()
    if value:
      return value
    if proc is not None and proc.poll() is not None:
      log = getattr(proc, "log_path", None)
      raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}:\n"
                           f"{Path(log).read_text()[-4000:] if log else ''}")
    time.sleep(poll)
  raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# The helpers travel with the fixture (tests do not import conftest).
TrainRuns.read_metrics = staticmethod(read_metrics)
TrainRuns.committed_steps = staticmethod(committed_steps)
TrainRuns.load_state = staticmethod(load_state)
TrainRuns.kill_tree = staticmethod(kill_tree)
TrainRuns.wait_for = staticmethod(wait_for)


@pytest.fixture(scope="session")
def train_runs(tmp_path_factory) -> TrainRuns:
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("jax_cache"))
  return TrainRuns(tmp_path_factory.mktemp("train"), cache)


@pytest.fixture(scope="session")
def train_base(train_runs) -> dict:
  """`configs/demo.py:test` as is: 2 StePPO steps after building world, tokenizer, index, warm start."""
  workdir = train_runs.root / "base"
  proc = train_runs.run(workdir, reuse=False)
  train_runs.base = workdir
  return dict(workdir=workdir, proc=proc, metrics=read_metrics(workdir),
              steps=committed_steps(workdir))


@pytest.fixture(scope="session")
def train_reference(train_runs, train_base) -> dict:
  """One uninterrupted 3-step StePPO run: test 2 (steppo) and the reference of resume/kill tests."""
  workdir = train_runs.root / "reference"
  proc = train_runs.run(workdir, ["--config.total_steps=3"])
  return dict(workdir=workdir, proc=proc, metrics=read_metrics(workdir))
