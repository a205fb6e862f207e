"""launch/*.sh: --help, argument errors, the commands their dry runs print, and real local runs
of the GPU launchers with `--module stepsearch_jax.distributed` (the wiring check) on CPU."""

import json
import os
import pathlib
import shlex
import subprocess
import tarfile

import portpicker
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ["tpu_pod.sh", "gpu_node.sh", "gpu_multinode.sh"]


def _env(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "SLURM_", "OMPI_", "TPU_", "STEPSEARCH_"))}
  env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", **extra)
  return env


def sh(script, *args, env=None, timeout=60):
  return subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env or _env())


def commands(proc):
  assert proc.returncode == 0, proc.stderr
  return [l[2:] for l in proc.stdout.splitlines() if l.startswith("+ ")]


def _checks(out):
  return [json.loads(l.split(" ", 1)[1]) for l in out.splitlines()
          if l.startswith("DISTRIBUTED_CHECK ")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_missing_flags(script):
  proc = sh(script, "--help")
  assert proc.returncode == 0 and proc.stdout.startswith("Usage")
  assert f"launch/{script} --" in proc.stdout.splitlines()[0]
  assert "--dry-run" in proc.stdout
  proc = sh(script, "--dry-run")
  assert proc.returncode == 2 and "is required" in proc.stderr
  proc = sh(script, "--bogus")
  assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr


def test_tpu_pod_dry_run_runs_every_step_on_all_workers():
  cmds = commands(sh("tpu_pod.sh", "--tpu", "pod1", "--zone", "us-west4-a", "--project", "proj",
                     "--config", "configs/qwen2_5_3b.py:v5e-16", "--workdir", "gs://b/runs/x",
                     "--manifest", "gs://b/manifest.json", "--dry-run", "--",
                     "--config.total_steps=5", "--config.data.train_files=/data/a b.parquet"))
  ssh = [c for c in cmds if c.startswith("gcloud compute tpus tpu-vm ssh pod1 ")]
  assert len(ssh) == 4     # unpack, install, stage, train
  for c in ssh:
    assert "--zone=us-west4-a --project=proj --worker=all" in c
  argv = [shlex.split(c) for c in ssh]
  remote = [a[-1].removeprefix("--command=") for a in argv]
  assert "tar -xzf /tmp/stepsearch_jax-src.tgz -C stepsearch_jax" in remote[0]
  assert remote[1] == "cd stepsearch_jax && bash launch/install.sh --tpu"
  assert ("launch/stage_data.py --manifest gs://b/manifest.json --dest /data" in remote[2])
  train = remote[3]
  assert "nohup env STEPSEARCH_DISTRIBUTED=1 .venv/bin/python -m stepsearch_jax.train" in train
  assert "> logs/train.log" in train and "logs/train.pid" in train
  # The remote line re-parses into the exact train argv, extra flags (with a space) included.
  inner = shlex.split(train.split("nohup ", 1)[1].split(" > logs/train.log")[0])
  assert inner[-6:] == ["--config", "configs/qwen2_5_3b.py:v5e-16", "--workdir", "gs://b/runs/x",
                        "--config.total_steps=5", "--config.data.train_files=/data/a b.parquet"]
  assert any(c.startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in c for c in cmds)


def test_tpu_pod_logs_and_stop_steps_and_local_manifest(tmp_path):
  cmds = commands(sh("tpu_pod.sh", "--tpu", "pod1", "--zone", "z", "--steps", "logs,stop",
                     "--num-workers", "3", "--logs-out", str(tmp_path / "L"), "--dry-run"))
  scp = [c for c in cmds if " scp " in c]
  assert scp == [f"gcloud compute tpus tpu-vm scp pod1:stepsearch_jax/logs/train.log "
                 f"{tmp_path}/L/worker-{i}.log --zone=z --worker={i}" for i in range(3)]
  assert "kill $(cat logs/train.pid)" in cmds[-1] and "--worker=all" in cmds[-1]
  manifest = tmp_path / "m.json"
  manifest.write_text("{}")
  cmds = commands(sh("tpu_pod.sh", "--tpu", "pod1", "--zone", "z", "--steps", "stage",
                     "--manifest", str(manifest), "--stage-dest", "/mnt/d", "--dry-run"))
  assert cmds[0] == (f"gcloud compute tpus tpu-vm scp {manifest} "
                     "pod1:/tmp/stepsearch_manifest.json --zone=z --worker=all")
  assert "--manifest /tmp/stepsearch_manifest.json --dest /mnt/d" in cmds[1]
  proc = sh("tpu_pod.sh", "--tpu", "p", "--zone", "z", "--steps", "train,fly", "--dry-run")
  assert proc.returncode == 2 and "unknown step 'fly'" in proc.stderr


def test_tpu_pod_push_tarball_holds_the_checkout_without_ignored_files(tmp_path):
  cmds = commands(sh("tpu_pod.sh", "--tpu", "p", "--zone", "z", "--steps", "push", "--dry-run"))
  tar_line = cmds[0]
  tgz = tar_line.split("-czf ", 1)[1].split(" ", 1)[0]
  subprocess.run(["bash", "-c", tar_line], check=True, timeout=60)
  try:
    with tarfile.open(tgz) as t:
      names = set(t.getnames())
  finally:
    os.unlink(tgz)
  assert {"launch/install.sh", "launch/stage_data.py", "stepsearch_jax/distributed.py",
          "pyproject.toml"} <= names
  assert not any(n.startswith(".venv/") or "__pycache__" in n for n in names)


def test_gpu_node_dry_run_and_real_run(tmp_path):
  cmds = commands(sh("gpu_node.sh", "--config", "configs/qwen2_5_3b.py:8xh100", "--workdir",
                     str(tmp_path / "w"), "--manifest", "gs://b/m.json", "--gpus", "0,1,2,3",
                     "--install", "--dry-run", "--", "--config.seed=7"))
  assert cmds[0] == "bash launch/install.sh --cuda12"
  assert "launch/stage_data.py --manifest gs://b/m.json --dest /data" in cmds[1]
  assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in cmds[-1] and "STEPSEARCH_DISTRIBUTED=0" in cmds[-1]
  assert ("-m stepsearch_jax.train --config configs/qwen2_5_3b.py:8xh100 --workdir "
          f"{tmp_path}/w --config.seed=7 2>&1 | tee -a {tmp_path}/w/logs/train.log") in cmds[-1]
  proc = sh("gpu_node.sh", "--config", "configs/demo.py", "--workdir", str(tmp_path / "run"),
            "--module", "stepsearch_jax.distributed", timeout=120)
  assert proc.returncode == 0, proc.stderr
  (check,) = _checks(proc.stdout)
  assert check["process_count"] == 1 and check["allgather"] == [1]
  assert "DISTRIBUTED_CHECK" in (tmp_path / "run/logs/train.log").read_text()


def test_gpu_multinode_dry_runs():
  cmds = commands(sh("gpu_multinode.sh", "--coordinator", "n0:1234", "--num-processes", "2",
                     "--process-id", "1", "--config", "c.py", "--workdir", "/w", "--dry-run"))
  assert ("env JAX_COORDINATOR_ADDRESS=n0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 " in cmds[-1]
          and cmds[-1].endswith("| tee runs/logs/train-proc1.log"))
  # SLURM fills count and id; explicit JAX_* variables win over SLURM.
  cmds = commands(sh("gpu_multinode.sh", "--coordinator", "n0:1", "--config", "c", "--workdir",
                     "w", "--dry-run", env=_env(SLURM_NTASKS="4", SLURM_PROCID="2")))
  assert "JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=2" in cmds[-1]
  cmds = commands(sh("gpu_multinode.sh", "--config", "c", "--workdir", "w", "--dry-run",
                     env=_env(JAX_COORDINATOR_ADDRESS="h:9", JAX_NUM_PROCESSES="3",
                              JAX_PROCESS_ID="0", SLURM_NTASKS="4", SLURM_PROCID="2")))
  assert "JAX_COORDINATOR_ADDRESS=h:9 JAX_NUM_PROCESSES=3 JAX_PROCESS_ID=0" in cmds[-1]
  # Fan out: process i on host i, coordinator on the first host, logs back here.
  cmds = commands(sh("gpu_multinode.sh", "--hosts", "g0,g1,g2", "--port", "7000", "--config",
                     "configs/qwen2_5_7b.py:16xh100", "--workdir", "/shared/r", "--dry-run"))
  fan = [shlex.split(c.rsplit(" > ", 1)[0]) for c in cmds if c.startswith("ssh ")]
  assert [a[3] for a in fan] == ["g0", "g1", "g2"]
  for i, a in enumerate(fan):
    assert (f"--coordinator g0:7000 --num-processes 3 --process-id {i} "
            "--config configs/qwen2_5_7b.py:16xh100 --workdir /shared/r") in a[4]
  proc = sh("gpu_multinode.sh", "--coordinator", "a:1", "--num-processes", "2", "--process-id",
            "2", "--config", "c", "--workdir", "w", "--dry-run")
  assert proc.returncode == 2 and "must be < --num-processes 2" in proc.stderr
  proc = sh("gpu_multinode.sh", "--config", "c", "--workdir", "w", "--dry-run")
  assert proc.returncode == 2 and "no coordinator" in proc.stderr


def test_gpu_multinode_two_real_processes_on_loopback(tmp_path):
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      ["bash", str(ROOT / "launch/gpu_multinode.sh"), "--coordinator", f"127.0.0.1:{port}",
       "--num-processes", "2", "--process-id", str(i), "--module", "stepsearch_jax.distributed",
       "--logdir", str(tmp_path)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=180)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out
    (check,) = _checks((tmp_path / f"train-proc{i}.log").read_text())
    assert check["process_index"] == i and check["process_count"] == 2
    assert check["allgather"] == [1, 2]


def test_install_sh_rejects_unknown_options_before_touching_anything():
  proc = subprocess.run(["bash", str(ROOT / "launch/install.sh"), "--cuda11"], capture_output=True,
                        text=True, timeout=30)
  assert proc.returncode == 2 and "unknown option --cuda11" in proc.stderr


def test_readme_scale_out_commands_parse():
  """Every launcher command in launch/README-scale-out.md runs in --dry-run mode as written."""
  text = (ROOT / "launch/README-scale-out.md").read_text()
  blocks = "\n".join(b for b in text.split("```bash\n")[1:]).replace("\\\n", " ")
  lines = [l.split("```")[0] for l in blocks.splitlines()]
  runs = [shlex.split(l, comments=True) for l in lines if l.lstrip().startswith("launch/")]
  assert len(runs) >= 7
  for argv in runs:
    proc = sh(argv[0].removeprefix("launch/"), *argv[1:], "--dry-run")
    assert proc.returncode == 0, (argv, proc.stderr)
  assert "| v5e-16 | 16 (4) | 1/16/1 |" in text and "#### Qwen2.5-7B" in text
