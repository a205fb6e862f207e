"""maybe_initialize: environment detection, and two real CPU processes joined over loopback."""

import json
import os
import pathlib
import subprocess
import sys

import portpicker
import pytest

from stepsearch_jax import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "STEPSEARCH_"))}
  env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)
  return env


def test_detect_explicit_env():
  plan = distributed.detect({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                             "JAX_PROCESS_ID": "3"})
  assert plan.kind == "explicit"
  assert plan.kwargs == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)


def test_detect_arguments_override_env_and_slurm_fills_count_and_id():
  env = {"JAX_COORDINATOR_ADDRESS": "a:1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
  assert distributed.detect(env).kwargs == dict(coordinator_address="a:1", num_processes=2,
                                                 process_id=1)
  plan = distributed.detect(env, coordinator_address="b:2", num_processes=8, process_id=5,
                            local_device_ids=[0, 1])
  assert plan.kwargs == dict(coordinator_address="b:2", num_processes=8, process_id=5,
                             local_device_ids=[0, 1])


@pytest.mark.parametrize("env,kind", [
    ({}, "single"),
    ({"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, "single"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, "single"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, "single"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "h:8080"}, "tpu"),
    ({"STEPSEARCH_DISTRIBUTED": "1"}, "auto"),
    ({"STEPSEARCH_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "t0,t1"}, "single"),
])
def test_detect_kinds(env, kind):
  plan = distributed.detect(env)
  assert plan.kind == kind, plan
  if kind != "explicit":
    assert plan.kwargs == {}


@pytest.mark.parametrize("env,match", [
    ({"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS"),
    ({"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "0 <= id < count"),
    ({"JAX_COORDINATOR_ADDRESS": "a:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two'"),
    ({"STEPSEARCH_DISTRIBUTED": "maybe"}, "STEPSEARCH_DISTRIBUTED"),
])
def test_detect_bad_settings_name_the_variable(env, match):
  with pytest.raises(ValueError, match=match):
    distributed.detect(env)


def test_two_cpu_processes_join_and_reduce():
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "stepsearch_jax.distributed"], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True,
      env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))) for i in range(2)]
  results = []
  for p in procs:
    out, _ = p.communicate(timeout=180)
    assert p.returncode == 0, out
    line = [l for l in out.splitlines() if l.startswith("DISTRIBUTED_CHECK ")][-1]
    results.append(json.loads(line.split(" ", 1)[1]))
  assert sorted(r["process_index"] for r in results) == [0, 1]
  for r in results:
    assert r["process_count"] == 2 and r["idempotent"]
    assert r["global_devices"] == 2 * r["local_devices"]
    assert r["allgather"] == [1, 2]                       # both processes' values, in order
    assert r["device_sum"] == 1.0 * r["local_devices"] + 2.0 * r["local_devices"]


def test_single_process_and_late_call_error():
  code = ("from stepsearch_jax import distributed as d\n"
          "print('FIRST', d.maybe_initialize(), d.maybe_initialize())\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=120)
  assert "FIRST (0, 1) (0, 1)" in out.stdout, out.stderr
  code = ("import jax; jax.devices()\nfrom stepsearch_jax import distributed as d\n"
          "d.maybe_initialize()\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=_env(JAX_COORDINATOR_ADDRESS="127.0.0.1:1",
                                             JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1"))
  assert out.returncode != 0 and "before any jax.devices()" in out.stderr, out.stderr
