"""Faults a long run must survive or report clearly (issue 8 part 3) and safe defaults (part 4).

Real components throughout: `python -m stepsearch_jax.train` subprocesses on `configs/demo.py:test`
(fixtures in conftest.py share one world and one compilation cache), a real retrieval server that
is really SIGKILLed, real orbax checkpoints.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import portpicker
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1] if lines else ""


def _assert_clean_fatal(proc: subprocess.CompletedProcess, *needles: str) -> str:
  """Exit code 1, one `FATAL ...` line containing every needle, no traceback."""
  assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
  line = _last_line(proc.stderr)
  assert line.startswith("FATAL "), proc.stderr[-4000:]
  for needle in needles:
    assert needle in line, (needle, line)
  return line


# ------------------------------------------------------------------------------ kills and resumes
@pytest.mark.slow
def test_sigkill_mid_step_resumes_from_last_checkpoint_and_matches(train_runs, train_reference):
  """SIGKILL during step 2 (after checkpoint 1 committed), with a torn write of checkpoint 2 left
  behind: the restart resumes from step 1 and its step 2 equals the uninterrupted run's."""
  wd = train_runs.root / "killed"
  proc = train_runs.spawn(wd, ["--config.total_steps=3"])
  try:
    train_runs.wait_for(lambda: 1 in train_runs.committed_steps(wd), 300,
                        "checkpoint 1 to commit", proc)
  finally:
    train_runs.kill_tree(proc)
  assert proc.returncode == -9
  assert train_runs.committed_steps(wd) == [1], "the kill did not land inside step 2"
  assert [r["step"] for r in train_runs.read_metrics(wd)] == [1]
  # What a checkpoint write killed half-way leaves: orbax's temporary directory, partly written.
  torn = wd / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000000000" / "state"
  torn.mkdir(parents=True)
  (torn / "manifest.ocdbt").write_bytes(b"\x00partial")
  # And what a kill after logging step 2 but before its checkpoint committed leaves in the log
  # (a row of the lost step, then a row torn mid-write): both must go on resume.
  with open(wd / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 2, "pg_loss": 123.0}) + "\n" + '{"step": 3, "pg_')

  again = train_runs.run(wd, ["--config.total_steps=2"])
  assert "resumed from step 1" in again.stdout
  assert [r["step"] for r in train_runs.read_metrics(wd)] == [1, 2]
  assert train_runs.committed_steps(wd) == [1, 2]
  ref = train_reference["workdir"]
  got, want = train_runs.load_state(wd, 2), train_runs.load_state(ref, 2)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  row = train_runs.read_metrics(wd)[1]
  want_row = train_reference["metrics"][1]
  for k in ("reward/final", "rollout/searches", "rollout/response_len", "pg_loss", "vf_loss"):
    assert row[k] == want_row[k], k


@pytest.mark.slow
def test_sigterm_mid_step_saves_the_last_finished_step_and_resumes(train_runs, train_reference):
  """Spot/preemptible VMs get SIGTERM ~30 s before they go. With no periodic checkpoint
  (save_every=100), SIGTERM during step 2 makes the trainer save step 1 (the last finished
  one) itself and exit 143 well within the deadline; the rerun resumes there and its step 2
  equals the uninterrupted run's."""
  import signal
  import time
  wd = train_runs.root / "sigterm"
  proc = train_runs.spawn(wd, ["--config.total_steps=3", "--config.save_every=100",
                               "--config.preempt_deadline_s=20"])
  try:
    train_runs.wait_for(lambda: 1 in [r["step"] for r in train_runs.read_metrics(wd)]
                        if (wd / "metrics.jsonl").exists() else False, 300,
                        "step 1 to finish", proc)
    assert train_runs.committed_steps(wd) == []
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    took = time.time() - t0
  finally:
    if proc.poll() is None:
      train_runs.kill_tree(proc)
  log = proc.log_path.read_text()
  assert proc.returncode == 143, log[-3000:]
  assert "Traceback" not in log, log[-3000:]
  assert took < 20, took
  assert train_runs.committed_steps(wd) == [1], log[-3000:]
  assert "preempted: step 1 is saved" in log
  again = train_runs.run(wd, ["--config.total_steps=2"])
  assert "resumed from step 1" in again.stdout
  got, want = train_runs.load_state(wd, 2), train_runs.load_state(train_reference["workdir"], 2)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.slow
def test_nan_loss_stops_without_writing_a_poisoned_checkpoint(train_runs, train_base):
  """actor_lr=1e30: step 1 (lr 0 in warm-up) is fine, step 2's update blows the weights up and
  step 3's loss is NaN. The run must stop there with a clear message and no step-3 checkpoint;
  the last checkpoint must restore and be finite."""
  wd = train_runs.root / "nan"
  proc = train_runs.run(wd, ["--config.total_steps=3", "--config.optim.actor_lr=1e30"], ok=False)
  line = _assert_clean_fatal(proc, "FloatingPointError", "non-finite", "stopping without saving")
  steps = train_runs.committed_steps(wd)
  assert steps and max(steps) < 3, steps
  assert f"last good checkpoint is step {max(steps)}" in line
  state = train_runs.load_state(wd, max(steps))
  assert all(np.isfinite(v).all() for v in state.values())
  assert [r["step"] for r in train_runs.read_metrics(wd)] == steps   # the bad step is not logged


@pytest.mark.slow
def test_fingerprint_mismatch_on_resume_stops_with_clear_message(train_runs, train_reference,
                                                                 tmp_path):
  from retrieval import build_index
  corpus = train_runs.base / "world" / "corpus.jsonl"
  lines = corpus.read_text().splitlines(keepends=True)
  other = tmp_path / "corpus.jsonl"
  other.write_text("".join(lines[:-1]))          # one passage fewer: another index
  index = tmp_path / "index"
  new_fp = build_index.build(str(other), str(index), index_type="bm25",
                             progress=False)["fingerprint"]
  old_fp = json.loads((train_runs.base / "index" / "manifest.json").read_text())["fingerprint"]
  assert new_fp != old_fp

  wd = train_runs.root / "fingerprint"
  shutil.copytree(train_reference["workdir"] / "checkpoints", wd / "checkpoints")
  proc = train_runs.run(wd, ["--config.total_steps=4", f"--config.retrieval.index_dir={index}"],
                        ok=False)
  _assert_clean_fatal(proc, "FingerprintMismatchError", old_fp, new_fp, "retrieval.index_dir")
  assert train_runs.committed_steps(wd) == [1, 2, 3]
  assert not (wd / "metrics.jsonl").exists()
  # The server the trainer started was shut down, not orphaned.
  url = re.search(r"retrieval: (http://\S+)", proc.stdout).group(1)
  import httpx
  with pytest.raises(httpx.HTTPError):
    httpx.get(url + "/health", timeout=2.0)


@pytest.mark.slow
def test_bad_data_or_unreachable_retrieval_stop_before_training(train_runs, train_base, tmp_path):
  """Missing / truncated dataset files and a dead retrieval URL: one FATAL line naming the file or
  URL, exit code 1, nothing trained. The three runs go in parallel (no compilation involved)."""
  train = train_runs.base / "world" / "train.parquet"
  corrupt = tmp_path / "train.parquet"
  data = train.read_bytes()
  corrupt.write_bytes(data[:len(data) // 2])
  missing = tmp_path / "nope" / "train.parquet"
  dead = f"http://127.0.0.1:{portpicker.pick_unused_port()}"
  no_synth = ["--config.data.synthetic.enabled=False", f"--config.data.val_files={train}"]
  cases = {
      "missing": (no_synth + [f"--config.data.train_files={missing}"], [str(missing)]),
      "corrupt": (no_synth + [f"--config.data.train_files={corrupt}"], [str(corrupt), "parquet"]),
      "dead_url": (["--config.retrieval.start_server=False", f"--config.retrieval.url={dead}",
                    "--config.retrieval.retries=1"], [dead + "/health", "failed after 2 attempts"]),
  }
  procs = {name: train_runs.spawn(tmp_path / name, args) for name, (args, _) in cases.items()}
  for name, proc in procs.items():
    proc.wait(timeout=300)
    log = proc.log_path.read_text()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, log, log)
    _assert_clean_fatal(result, *cases[name][1])
    assert not (tmp_path / name / "checkpoints").exists(), name
    assert not (tmp_path / name / "metrics.jsonl").exists(), name


# ------------------------------------------------------------------------------ retrieval outages
def _demo_config(**overrides):
  spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config("test")
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.mark.slow
def test_retrieval_server_killed_mid_rollout_is_retried_or_fails_clearly(train_runs, train_base):
  """The server is SIGKILLed as the rollout sends its first search and restarted on the same port:
  the client retries, the rollout completes and equals an undisturbed one. Killed for good, the
  rollout fails after the configured retries with an error naming the URL."""
  import jax
  from retrieval import server
  from stepsearch_jax import models, workspace
  from stepsearch_jax.data import records as records_lib
  from stepsearch_jax.rollout.driver import rollout
  from stepsearch_jax.rollout.retriever import RetrievalError, RetrieverClient
  jax.config.update("jax_compilation_cache_dir", train_runs.cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

  base = train_runs.base
  cfg = _demo_config(**{"model.hf_path": str(base / "warmstart")})
  tok = models.load_tokenizer(str(base / "tokenizer"))
  records = records_lib.load_records([str(base / "world" / "train.parquet")])[:cfg.data.batch_size]
  model_config, params = workspace.init_policy(cfg, tok, jax.random.PRNGKey(0))
  engine = workspace.engine_for(cfg, model_config, params, tok)
  index_dir, port = str(base / "index"), portpicker.pick_unused_port()
  live = {"proc": server.start_subprocess(index_dir, port=port)[0]}
  url = f"http://127.0.0.1:{port}"
  key = jax.random.PRNGKey(7)

  class KillOnFirstSearch(RetrieverClient):
    """The real client; its first search finds the server just SIGKILLed (a restart is begun)."""
    fired = False

    def search(self, queries, topk=None):
      if not self.fired:
        self.fired = True
        live["proc"].kill()
        live["proc"].wait()
        threading.Thread(target=restart, daemon=True).start()
      return super().search(queries, topk)

  restarted = threading.Event()

  def restart():
    live["proc"] = server.start_subprocess(index_dir, port=port)[0]
    restarted.set()

  try:
    with RetrieverClient(url, topk=cfg.retrieval.topk) as client:
      want = rollout(engine, records, cfg.rollout, client, key)
    assert sum(len(t.queries) for t in want) > 0, "the policy never searched"
    with KillOnFirstSearch(url, topk=cfg.retrieval.topk, retries=8, backoff_s=0.25) as client:
      got = rollout(engine, records, cfg.rollout, client, key)
    # The rollout's retry can reach the restarted server before start_subprocess (polling
    # /health) has returned in the restart thread: wait for it, so live["proc"] is the new server.
    assert client.fired and restarted.wait(timeout=120)
    assert got.stats["retrieval_s"] > want.stats["retrieval_s"] + 0.2   # it waited for the restart
    assert [t.response_ids for t in got] == [t.response_ids for t in want]
    assert [t.doc_ids for t in got] == [t.doc_ids for t in want]
    with RetrieverClient(url) as probe:
      assert probe.health()["cache"]["misses"] > 0     # the restarted server answered them

    live["proc"].kill()
    live["proc"].wait()
    with RetrieverClient(url, topk=cfg.retrieval.topk, retries=2, backoff_s=0.1,
                         timeout_s=5.0) as client:
      with pytest.raises(RetrievalError) as err:
        rollout(engine, records, cfg.rollout, client, key)
    msg = str(err.value)
    assert f"{url}/retrieve" in msg and "failed after 3 attempts" in msg, msg
  finally:
    restarted.wait(timeout=120)
    if live["proc"].poll() is None:
      live["proc"].kill()
      live["proc"].wait()


# ------------------------------------------------------------------------------ safe defaults
_SOURCES = [p for d in ("stepsearch_jax", "retrieval", "launch", "bench")
            for p in sorted((ROOT / d).rglob("*.py"))]


def test_no_pickle_on_any_data_path():
  """Nothing we ship deserialises pickles: data, indexes, checkpoints and weights are parquet /
  jsonl / npy (allow_pickle=False) / FAISS / orbax / safetensors."""
  banned = re.compile(r"\bimport (c?pickle|dill|joblib|cloudpickle)\b|\bpickle\.loads?\(|"
                      r"allow_pickle\s*=\s*True|torch\.load\(|pd\.read_pickle|np\.load\([^)]*pickle")
  hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in _SOURCES
          for i, line in enumerate(p.read_text().splitlines(), 1) if banned.search(line)]
  assert not hits, hits


def _default_of(path: Path, function: str, arg: str):
  """The default of `arg` in `function` of `path`, read from source: no import, so no absl
  flag definitions (serve.py and evaluate.py both define --checkpoint) enter this process."""
  import ast
  tree = ast.parse(path.read_text())
  consts = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
  fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
  args = fn.args.args + fn.args.kwonlyargs
  defaults = dict(zip([a.arg for a in fn.args.args][-len(fn.args.defaults):], fn.args.defaults))
  defaults.update({a.arg: d for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d})
  assert arg in [a.arg for a in args], (function, arg)
  node = defaults[arg]
  return consts[node.id] if isinstance(node, ast.Name) else node.value


def test_servers_bind_loopback_by_default():
  retrieval_server = ROOT / "retrieval" / "server.py"
  assert _default_of(retrieval_server, "start_subprocess", "host") == "127.0.0.1"
  assert _default_of(ROOT / "stepsearch_jax" / "serve.py", "start_server", "host") == "127.0.0.1"
  # The CLI: --host defaults to the loopback constant, and a non-loopback host without a token
  # is warned about.
  src = retrieval_server.read_text()
  assert re.search(r'add_argument\("--host", default=LOOPBACK\)', src)
  assert re.search(r'LOOPBACK = "127\.0\.0\.1"', src)
  from stepsearch_jax.config import base_config
  assert base_config().retrieval.url.startswith("http://127.0.0.1:")


def test_weights_load_only_from_safetensors(tmp_path):
  """A folder with only a PyTorch pickle checkpoint is refused, never unpickled."""
  from stepsearch_jax import models
  cfg = models.ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=4)
  (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not-to-be-unpickled")
  with pytest.raises(ValueError, match="safetensors"):
    models.load_pretrained(str(tmp_path))
  assert os.path.getsize(tmp_path / "pytorch_model.bin") > 0


def test_non_finite_weights_stop_the_trainer_before_any_checkpoint(tmp_path):
  """The update can blow the weights up while the loss it reports (computed before the update) is
  still finite: Trainer.check_finite must catch that too, naming the step and the last good
  checkpoint, before the step is logged or saved. Real learner and Checkpointer."""
  import jax
  import jax.numpy as jnp
  from ppo_tiny import TINY, tiny_cfg, tiny_params
  from stepsearch_jax import train
  from stepsearch_jax.models.sharding import make_mesh
  from stepsearch_jax.ppo import Checkpointer, make_learner
  policy, critic, ref = tiny_params()
  learner = make_learner(tiny_cfg(), policy, critic, ref, make_mesh((1, 1, 1), jax.devices()[:1]),
                         policy_config=TINY)
  trainer = train.Trainer.__new__(train.Trainer)     # only the parts check_finite uses
  trainer.learner = learner
  trainer.ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  assert trainer.ckpt.save(1, learner.state, fingerprint="fp")
  finite = {"pg_loss": 0.5, "vf_loss": 0.1, "actor_grad_norm": 2.0}
  trainer.check_finite(2, finite)                    # all finite: no error
  with pytest.raises(FloatingPointError, match=r"non-finite pg_loss=nan at step 2.*step 1"):
    trainer.check_finite(2, dict(finite, pg_loss=float("nan")))
  leaves, treedef = jax.tree.flatten(learner.state["policy"])
  leaves[0] = leaves[0].at[0].set(jnp.inf)          # one weight overflowed by the update
  learner.state = dict(learner.state, policy=jax.tree.unflatten(treedef, leaves))
  with pytest.raises(FloatingPointError, match=r"non-finite policy/critic weights.*step 3.*"
                                               r"last good checkpoint is step 1"):
    trainer.check_finite(3, finite)
  trainer.ckpt.close()
