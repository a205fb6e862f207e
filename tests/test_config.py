"""The config entry point: parse, override, reject unknown keys/wrong types, write the config."""

import json
import subprocess
import sys

import pytest

from stepsearch_jax import config as config_lib


def _train(tmp_path, *args):
  cmd = [sys.executable, "-m", "stepsearch_jax.train", "--config", "configs/demo.py:smoke",
         "--workdir", str(tmp_path / "w"), "--dry_run", *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


def test_override_is_written(tmp_path):
  r = _train(tmp_path, "--config.algo.clip_ratio=0.3")
  assert r.returncode == 0, r.stderr
  cfg = json.loads((tmp_path / "w" / "config.json").read_text())
  assert cfg["algo"]["clip_ratio"] == 0.3
  assert cfg["total_steps"] == 2


@pytest.mark.parametrize("arg,needle", [
    ("--config.algo.nme=grpo", "nme"),
    ("--config.data.batch_size=abc", "batch_size"),
    ("--config.algo.name=grpo", "rollout.n"),
    ("--config.rollout.driver=vllm", "rollout.driver"),
])
def test_bad_config_fails_naming_the_key(tmp_path, arg, needle):
  r = _train(tmp_path, arg)
  assert r.returncode != 0
  assert needle in r.stderr
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "w" / "config.json").exists()


def test_validate_divisibility():
  c = config_lib.base_config()
  c.algo.mini_batch = 48
  with pytest.raises(ValueError, match="algo.mini_batch"):
    config_lib.validate(c)
  assert config_lib.validate(config_lib.base_config())


def test_validate_sft_flaws():
  c = config_lib.base_config()
  c.sft.flaws = "early, skip"
  assert config_lib.validate(c)
  c.sft.flaws = "early,sloppy"
  with pytest.raises(ValueError, match="sft.flaws"):
    config_lib.validate(c)


@pytest.mark.parametrize("value", ["CACHE", "none"])
def test_compile_cache_dir_is_applied_by_the_entry_points(tmp_path, value):
  """`config.compile_cache_dir` reaches JAX's persistent cache (on by default, "none" = off)."""
  want = str(tmp_path / "cache") if value == "CACHE" else "none"
  code = ("import sys, jax\n"
          "from absl import flags\n"
          "from stepsearch_jax import cli\n"
          "flags.FLAGS(sys.argv)\n"
          "cli.load()\n"
          "print('CACHE_DIR', jax.config.jax_compilation_cache_dir)\n")
  r = subprocess.run([sys.executable, "-c", code, "--config", "configs/demo.py:smoke",
                      f"--config.compile_cache_dir={want}"], capture_output=True, text=True,
                     timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert r.returncode == 0, r.stderr[-2000:]
  line = next(x for x in r.stdout.splitlines() if x.startswith("CACHE_DIR"))
  assert line == f"CACHE_DIR {want if value == 'CACHE' else None}"
