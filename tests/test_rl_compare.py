"""bench/rl_compare.py's bookkeeping on hand-made runs: the runs list read back from run.json files,
95% t-intervals over seeds, the tables and one PNG per hop count (the training itself is the
benchmark run, not CI)."""

import json
import math
import os

import numpy as np
import pytest

from bench import rl_compare


def _run(root, hops, algo, seed, em, f1):
  d = root / f"h{hops}" / f"{algo}_seed{seed}"
  d.mkdir(parents=True)
  row = {"algo": algo, "hops": hops, "seed": seed, "em_after": em, "f1_after": f1,
         "searches_after": 3.0, "wall_s": 100.0 + seed, "steps": 4, "trajectories_per_step": 8,
         "curves": {k: [0.1 * s + seed * 0.01 for s in range(4)] for k, _ in rl_compare.CURVE_KEYS}}
  (d / "run.json").write_text(json.dumps(row))


def test_grid_summary_intervals_tables_and_plots(tmp_path):
  root = tmp_path / "rl_compare"
  ems = {"steppo": [0.5, 0.6, 0.55], "ppo": [0.2, 0.3, 0.25]}
  for algo, vals in ems.items():
    for seed, em in enumerate(vals):
      _run(root, 4, algo, seed, em, em + 0.05)
  _run(root, 2, "steppo", 0, 0.9, 0.9)
  base = root / "h4" / "base"
  base.mkdir(parents=True)
  (base / "results.json").write_text(json.dumps({"em_before": 0.1, "f1_before": 0.15,
                                                 "searches_before": 2.0}))
  out = rl_compare.write_outputs(str(tmp_path), str(root), "bench/rl_compare.py --hops 4",
                                 "configs/demo.py:credit")
  assert len(out["runs"]) == 7 and {r["hops"] for r in out["runs"]} == {2, 4}
  row = next(r for r in out["summary"] if r["hops"] == 4 and r["algo"] == "steppo")
  # mean 0.55, sd 0.05, t(0.975, 2) = 4.303: half-width 4.303 * 0.05 / sqrt(3)
  assert row["em_mean"] == pytest.approx(0.55)
  assert row["em_ci95"] == pytest.approx(4.3027 * 0.05 / math.sqrt(3), rel=1e-3)
  assert row["seeds"] == [0, 1, 2]
  single = next(r for r in out["summary"] if r["hops"] == 2)
  assert single["em_ci95"] is None
  md = (tmp_path / "rl_compare.md").read_text()
  assert "| 4 | warm start (no RL) | | 0.100 | 0.150 |" in md
  assert "| 4 | steppo | 3 | 0.550 ± 0.124 |" in md
  # StePPO minus PPO, paired by seed: 0.3 at every seed
  ppo = next(r for r in out["summary"] if r["hops"] == 4 and r["algo"] == "ppo")
  assert ppo["steppo_minus_em"] == pytest.approx(0.3) and ppo["steppo_minus_em_ci95"] < 1e-9
  assert "steppo_minus_em" not in row
  assert "| 4 | ppo | 3 | 0.250 ± 0.124 | 0.300 ± 0.124 | 0.300 ± 0.000 |" in md
  for hops in (2, 4):
    png = tmp_path / f"rl_compare_h{hops}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((tmp_path / "rl_compare.json").read_text())
  assert saved["runs"][0].keys() >= {"algo", "hops", "seed", "em_after", "f1_after", "wall_s"}
  assert np.isfinite(saved["summary"][0]["em_mean"])
  assert saved["task"] == "configs/demo.py:creditH"     # the task it ran is named


def test_unfinished_run_resumes_from_its_checkpoint_and_sums_its_wall_time(tmp_path):
  """--reuse keeps a finished run, resumes one that saved a checkpoint (the training entry point
  picks it up), and starts over one that saved none; the wall time counts every attempt,
  a killed one up to its log's last write."""
  wd = tmp_path / "steppo_seed0"
  assert rl_compare.run_state(str(wd), reuse=True) == "fresh"
  (wd / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)   # a save cut short
  assert rl_compare.run_state(str(wd), reuse=True) == "fresh"
  (wd / "checkpoints" / "4").mkdir()
  assert rl_compare.run_state(str(wd), reuse=True) == "resume"
  assert rl_compare.run_state(str(wd), reuse=False) == "fresh"
  (wd / "run.json").write_text("{}")
  assert rl_compare.run_state(str(wd), reuse=True) == "done"

  # the first attempt was killed 30 s in: its start is on record, its log's mtime is its end
  (wd / "train.log").write_text("killed")
  start = os.path.getmtime(wd / "train.log") - 30.0
  (wd / "attempts.json").write_text(json.dumps([{"log": "train.log", "start": start,
                                                 "wall_s": None}]))
  logs = []
  total = rl_compare.timed_attempt(str(wd), lambda log: logs.append(log) or 12.0)
  assert logs == [str(wd / "train.1.log")]          # the first attempt's log is kept
  assert total == pytest.approx(42.0, abs=0.5)
  saved = json.loads((wd / "attempts.json").read_text())
  assert [a["log"] for a in saved] == ["train.log", "train.1.log"] and saved[1]["wall_s"] == 12.0

  # an attempt that left no attempts.json: timed from its config.json to its log's last write
  old = tmp_path / "ppo_seed1"
  old.mkdir()
  (old / "config.json").write_text("{}")
  (old / "train.log").write_text("killed")
  begun = os.path.getmtime(old / "train.log") - 20.0
  os.utime(old / "config.json", (begun, begun))
  total = rl_compare.timed_attempt(str(old), lambda log: 5.0)
  assert total == pytest.approx(25.0, abs=0.5)
  assert (old / "train.0.log").read_text() == "killed"
  assert [a["log"] for a in json.loads((old / "attempts.json").read_text())] == ["train.0.log",
                                                                                "train.1.log"]
