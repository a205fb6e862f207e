"""The report page of a real training run, rendered by headless Chromium (Debian's `chromium`,
installed by `launch/install.sh --dev`): every trajectory, search, passage and reward is an element,
rewards sit on the tokens the update puts them on, and the outcome filter works in the browser."""

import json
import os
import re
import shutil
import subprocess

import pytest

from stepsearch_jax import metrics, report
from stepsearch_jax.rewards import score, token_rewards

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(page: str, fragment: str = "") -> str:
  if CHROMIUM is None:
    if os.environ.get("CI"):
      pytest.fail("chromium is not installed (launch/install.sh --dev installs Debian's chromium)")
    pytest.skip("chromium is not installed (launch/install.sh --dev installs it)")
  out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--virtual-time-budget=3000", "--dump-dom",
                        f"file://{os.path.abspath(page)}{fragment}"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout


@pytest.fixture(scope="module")
def run(train_runs, train_base, tmp_path_factory):
  """One StePPO step that keeps its training trajectories and validates before and after."""
  wd = tmp_path_factory.mktemp("report") / "run"
  train_runs.run(wd, ["--config.total_steps=1", "--config.trajectories_every=1",
                      "--config.eval_before_train=True"])
  return wd


def test_report_places_every_reward_on_its_token_in_a_real_browser(run):
  page = report.main(["--workdir", str(run), "--kind", "train", "--step", "1"])
  trajs = report.load_trajectories(metrics.trajectories_path(str(run), "train", 1))
  cfg = json.load(open(run / "config.json"))
  rcfg = report.reward_config(cfg)
  dom = dump_dom(page)
  cards = re.findall(r'<section class="trajectory" id="t(\d+)" data-outcome="(\w+)"', dom)
  assert len(cards) == len(trajs) == cfg["data"]["batch_size"]
  assert dom.count('class="search"') == sum(len(t.queries) for t in trajs)
  assert dom.count('class="tok inserted"') + dom.count('class="tok inserted rewarded"') >= sum(
      len(t.queries) for t in trajs)
  assert sum(len(t.queries) for t in trajs) > 0, "the warm start never searched"
  for k, t in enumerate(trajs):
    card = dom.split(f'id="t{k}"')[1].split("</section>")[0]
    res = score(t.response_text, t.ground_truth, t.support_docs, rcfg,
                          step_doc_ids=t.doc_ids)
    want = token_rewards(res, t.search_end_indices, len(t.response_ids))
    got = {int(i): float(v) for i, v in re.findall(
        r'class="reward \w+" data-index="(\d+)" data-value="([-0-9.]+)"', card)}
    nonzero = {i for i, v in enumerate(want) if v != 0} | {len(want) - 1}
    assert set(got) == nonzero, k
    assert all(abs(got[i] - want[i]) < 1e-4 for i in got), k
    golds = [d["paragraph_text"] for d in t.support_docs]
    found = sum(txt in golds for docs in t.doc_texts for txt in docs)
    assert card.count('class="passage gold"') == found, k


def test_report_of_a_validation_and_the_outcome_filter(run):
  page = report.main(["--workdir", str(run)])        # the latest validation: after the step
  assert page.endswith("val_step_1.html")
  dom_all = dump_dom(page)
  kinds = re.findall(r'<section class="trajectory" id="t\d+" data-outcome="(\w+)"', dom_all)
  assert len(kinds) == json.load(open(run / "config.json"))["data"]["val_limit"]
  assert 'style="display: none;"' not in dom_all
  target = kinds[0]
  dom = dump_dom(page, f"#outcome={target}")
  hidden = re.findall(r'data-outcome="(\w+)"[^>]*style="display: none;"', dom)
  assert sorted(hidden) == sorted(k for k in kinds if k != target)
  assert f'<span id="shown">{kinds.count(target)}</span>' in dom
  with pytest.raises(SystemExit, match="no val trajectories at step 7"):
    report.main(["--workdir", str(run), "--step", "7"])
