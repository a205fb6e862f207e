"""The entry points' one-time re-exec with huge-page host allocations (stepsearch_jax.hostmem)."""

import json
import os
import subprocess
import sys

import pytest

from stepsearch_jax import hostmem

SCRIPT = """
import json, os, sys
from stepsearch_jax import hostmem
print("start", os.getpid(), flush=True)
hostmem.reexec_with_hugepages()
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:],
                  "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
"""


def _run(env_extra, *args):
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "STEPSEARCH_HUGEPAGE_MALLOC")}
  env.update(env_extra)
  out = subprocess.run([sys.executable, "-c", SCRIPT, *args], env=env, capture_output=True,
                       text=True, timeout=60, check=True).stdout.splitlines()
  return out, json.loads(out[-1])


@pytest.mark.skipif(not hostmem._glibc_supports_hugetlb(), reason="needs glibc >= 2.35")
def test_reexec_once_with_the_tunable_keeping_argv_pid_and_other_tunables():
  lines, got = _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "--x", "a b")
  starts = [line for line in lines if line.startswith("start")]
  assert len(starts) == 2                                # ran again, exactly once
  # execv keeps the pid (a parent-pid watchdog of a child server still sees its parent)
  assert starts == [f"start {got['pid']}"] * 2
  assert got["argv"] == ["--x", "a b"]
  assert got["tunables"] == "glibc.malloc.arena_max=2:" + hostmem.TUNABLE
  lines, opted_out = _run({"STEPSEARCH_HUGEPAGE_MALLOC": "0"})
  assert sum(line.startswith("start") for line in lines) == 1
  assert opted_out["tunables"] == ""
