"""The training loop end to end on `configs/demo.py:test` (real retrieval server, engine, learner).

Runs are subprocesses of `python -m stepsearch_jax.train` that share one compilation cache and
one built world (fixtures in conftest.py): the smoke run and its resume, one 3-step run of each
algorithm, and the equivalence of a resumed run with an uninterrupted one.
"""

import json

import numpy as np
import pytest

# Metrics that are a pure function of the step's rollouts and update: equal across two runs
# exactly when the rollouts (incl. retrieval) and the parameters are.
STEP_METRICS = ("reward/final", "reward/answer_f1", "reward/key", "reward/info_gain",
                "rollout/searches", "rollout/response_len", "rollout/model_tokens", "pg_loss",
                "entropy", "approx_kl", "actor_grad_norm", "data/position")


@pytest.fixture(scope="module")
def resumed(train_runs, train_base):
  """The smoke run's DIR run again with total_steps=4 (resumes after step 2)."""
  proc = train_runs.run(train_base["workdir"], ["--config.total_steps=4"], reuse=False)
  return dict(proc=proc, metrics=train_runs.read_metrics(train_base["workdir"]))


def assert_same_state(a: dict, b: dict, what: str):
  assert a.keys() == b.keys(), what
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: {k}")


def assert_same_step(row_a: dict, row_b: dict):
  assert row_a["step"] == row_b["step"]
  for k in STEP_METRICS:
    assert row_a[k] == row_b[k], (row_a["step"], k, row_a[k], row_b[k])


@pytest.mark.slow
def test_smoke_leaves_checkpoints_and_metrics_then_resumes_at_step_2(train_runs, train_base,
                                                                     resumed):
  wd = train_base["workdir"]
  assert train_base["steps"] == [1, 2]
  rows = train_base["metrics"]
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r[k]) for r in rows for k in ("pg_loss", "vf_loss", "reward/final"))
  # The warm-started policy searches, so the retrieval server is really on the rollout path.
  assert sum(r["rollout/searches"] for r in rows) > 0
  for name in ("config.json", "model_config.json", "warmstart/config.json",
               "tokenizer/tokenizer.json", "index/manifest.json"):
    assert (wd / name).exists(), name

  out = resumed["proc"].stdout
  assert "resumed from step 2" in out
  assert "warm start:" not in out                # the warm start is reused, not re-run
  steps = [r["step"] for r in resumed["metrics"]]
  assert steps == [1, 2, 3, 4], steps            # 3 and 4 appended, 1-2 not repeated
  assert resumed["metrics"][:2] == rows
  assert train_runs.committed_steps(wd) == [1, 2, 3, 4]
  assert json.loads((wd / "config.json").read_text())["total_steps"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["steppo", "ppo", "grpo"])
def test_each_algorithm_runs_three_steps(train_runs, train_reference, algo):
  if algo == "steppo":
    wd, rows = train_reference["workdir"], train_reference["metrics"]
  else:
    wd = train_runs.root / algo
    extra = ["--config.rollout.n=2"] if algo == "grpo" else []
    train_runs.run(wd, ["--config.total_steps=3", f"--config.algo.name={algo}", *extra])
    rows = train_runs.read_metrics(wd)
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert train_runs.committed_steps(wd) == [1, 2, 3]
  for r in rows:
    assert np.isfinite(r["pg_loss"]) and np.isfinite(r["entropy"]), r
    assert ("vf_loss" in r) == (algo != "grpo")  # grpo trains no critic
  state = train_runs.load_state(wd, 3)
  assert any(k.startswith("['critic']") for k in state) == (algo != "grpo")
  assert all(np.isfinite(v).all() for v in state.values())
  # The policy moved: step 3's weights differ from step 1's (lr is 0 during step 1's warm-up).
  first = train_runs.load_state(wd, 1)
  assert any(not np.array_equal(first[k], state[k]) for k in state if k.startswith("['policy']"))
  assert json.loads((wd / "config.json").read_text())["algo"]["name"] == algo


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run(train_runs, train_base, train_reference, resumed):
  """Stopped after step 2 and restarted == one uninterrupted run, at steps 2 and 3.

  The smoke run did its warm start in process and ran steps 1-2; the reference loaded the same
  warm start from disk (model.hf_path) and ran steps 1-3 in one process. Equal step-1/2 rollouts
  show that data order, rollout keys, retrieval and the warm start are reproduced; equal
  parameters after the resumed step 3 show the restored state (optimizer, step count) is whole.
  """
  base, ref = train_base["workdir"], train_reference["workdir"]
  for a, b in zip(resumed["metrics"][:3], train_reference["metrics"]):
    assert_same_step(a, b)
  for step in (2, 3):
    assert_same_state(train_runs.load_state(base, step), train_runs.load_state(ref, step),
                      f"step {step}")


def test_drop_lost_metrics_and_logged_validation(tmp_path):
  """On resume at step k the log keeps rows <= k (incl. the step-0 validation), drops later and
  torn rows; from scratch it keeps nothing. The step-0 validation is read back for results.json."""
  from stepsearch_jax import train
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": 0, "val/em": 0.25, "val/f1": 0.5, "val/searches": 1.5}, {"step": 1, "a": 1},
          {"step": 2, "a": 2}, {"step": 3, "a": 3}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "a"')
  assert train.drop_lost_metrics(str(path), 2) == 2
  assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:3]
  assert train.logged_validation(str(path), 0) == {"em": 0.25, "f1": 0.5, "searches": 1.5}
  assert train.logged_validation(str(path), 1) == {}
  assert train.drop_lost_metrics(str(path), 0) == 3 and path.read_text() == ""
  assert train.drop_lost_metrics(str(tmp_path / "absent.jsonl"), 3) == 0


@pytest.mark.slow
def test_evaluate_cli_on_a_training_workdir_given_as_a_relative_path(train_runs, train_base):
  """The README's evaluate command: a workdir reuses its own index; a relative path works (orbax
  wants absolute paths) and the table, JSON and predictions land in WORKDIR/eval."""
  import subprocess
  import sys
  from conftest import ROOT
  wd = train_base["workdir"]
  cmd = [sys.executable, "-m", "stepsearch_jax.evaluate", "--config",
         str(ROOT / "configs" / "demo.py") + ":test", "--checkpoint", wd.name,
         "--data", f"{wd.name}/world/test.parquet"]
  p = subprocess.run(cmd, cwd=wd.parent, env=train_runs.env(), capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  summary = json.loads((wd / "eval" / "results.json").read_text())
  assert summary["n"] == 4 and 0.0 <= summary["em"] <= 1.0
  assert summary["index_fingerprint"] == json.loads(
      (wd / "index" / "manifest.json").read_text())["fingerprint"]
  rows = [json.loads(l) for l in (wd / "eval" / "predictions.jsonl").read_text().splitlines()]
  assert len(rows) == 4 and {"prediction", "em", "f1", "ground_truth"} <= rows[0].keys()
  assert "| synthetic | 4 |" in p.stdout
