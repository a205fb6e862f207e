"""Training across processes: 2 processes x 4 CPU devices (JAX multi-controller over loopback,
as the launchers start one process per host) equal 1 process x 8 devices, and resume.

Real `python -m stepsearch_jax.train` subprocesses on `configs/demo.py:test` (the shared warm
start, tokenizer and index of conftest's `train_base`); each process starts its own retrieval
sidecar. The mesh is fsdp=8 either way, so the two runs compute the same programs.
"""

import subprocess
from pathlib import Path

import numpy as np
import portpicker
import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("reward/final", "reward/answer_f1", "rollout/searches", "rollout/response_len",
        "rollout/model_tokens", "pg_loss", "vf_loss", "kl", "entropy")


def _env(base: dict, devices: int, **extra) -> dict:
  env = dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", **extra)
  return env


def _two_processes(train_runs, workdir, overrides, timeout=900):
  port = portpicker.pick_unused_port()
  procs, logs = [], []
  for i in range(2):
    log = open(f"{workdir}.p{i}.log", "w")
    env = _env(train_runs.env(), 4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(train_runs.argv(workdir, overrides), cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, text=True))
    logs.append(log)
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for log in logs:
      log.close()
  out = [open(f"{workdir}.p{i}.log").read() for i in range(2)]
  for p, text in zip(procs, out):
    assert p.returncode == 0, text[-4000:]
  return out


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume(train_runs, train_base):
  mesh = ["--config.mesh.fsdp=-1", "--config.total_steps=2"]
  one = train_runs.root / "one_process_8_devices"
  p = subprocess.run(train_runs.argv(one, mesh), cwd=ROOT, env=_env(train_runs.env(), 8),
                     capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-4000:]
  two = train_runs.root / "two_processes_4_devices"
  _two_processes(train_runs, two, mesh)

  want = {r["step"]: r for r in train_runs.read_metrics(one)}
  got = {r["step"]: r for r in train_runs.read_metrics(two)}
  assert sorted(got) == sorted(want) == [1, 2]
  for step in (1, 2):
    for k in KEYS:
      if k in want[step]:
        np.testing.assert_allclose(got[step][k], want[step][k], rtol=1e-4, atol=1e-5,
                                   err_msg=f"step {step} {k}")
  assert train_runs.committed_steps(two) == [1, 2]
  # (the checkpoints hold 8-device arrays: this 1-device test process compares their metrics,
  # whose losses after step 1's update depend on every weight)

  # resume in the same 2-process setup
  out = _two_processes(train_runs, two, ["--config.mesh.fsdp=-1", "--config.total_steps=3"])
  assert all("resumed from step 2" in text for text in out)
  assert train_runs.committed_steps(two)[-1] == 3
  assert [r["step"] for r in train_runs.read_metrics(two)] == [1, 2, 3]
  # every process served its own retrieval sidecar
  urls = {line for text in out for line in text.splitlines() if line.startswith("retrieval: ")}
  assert len(urls) == 2, urls
