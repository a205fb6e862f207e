"""The algorithm registry: the ablations of method §7.3 switch off exactly one reward term."""

import pytest

from stepsearch_jax import config as config_lib
from stepsearch_jax.ppo.algorithms import ALGORITHMS, get_algorithm
from stepsearch_jax.rewards.score import RewardConfig, score

TERMS = ("information_gain", "redundancy_penalty", "search_key_reward", "search_steps_reward")
INFO = ("\n\n<information> Doc 1<## Title: A ##> alice was born in paris .\n"
        "Doc 2<## Title: B ##> bob likes tea . </information>\n\n")
RESPONSE = ("<think> x </think> <search> alice birthplace </search>" + INFO +
            "<search> alice birthplace </search>" + INFO + "<answer> paris </answer>")
GT = {"target": ["paris"], "search_keys": [["alice birthplace"]]}
GOLD = [{"title": "A", "paragraph_text": "alice was born in paris ."}]


@pytest.mark.parametrize("name,off", [("steppo-no-info-gain", "information_gain"),
                                      ("steppo-no-redundancy", "redundancy_penalty"),
                                      ("steppo-no-key", "search_key_reward")])
def test_ablation_drops_one_term(name, off):
  cfg = config_lib.base_config()
  cfg.algo.name = name
  config_lib.validate(cfg)
  algo = get_algorithm(name)
  assert algo.uses_critic and not algo.outcome_only
  rc = RewardConfig.from_config(algo.reward_config(cfg.reward))
  assert {t: getattr(rc, t) for t in TERMS} == {t: t != off for t in TERMS}
  full = score(RESPONSE, GT, GOLD, RewardConfig.from_config(cfg.reward))
  got = score(RESPONSE, GT, GOLD, rc)
  gains, reds = full.info_gains, full.redundancies
  assert gains[0] > 0 and reds[1] > 0 and full.search_key_score > 0   # every term is live here
  want_steps = [(0.0 if off == "information_gain" else g) -
                (0.0 if off == "redundancy_penalty" else p) for g, p in zip(gains, reds)]
  assert got.step_scores == pytest.approx(want_steps)
  assert got.final_score == pytest.approx(
      full.answer_f1 + (0.0 if off == "search_key_reward" else rc.key_weight * full.search_key_score))


def test_every_registered_algorithm_validates():
  for name in ALGORITHMS:
    cfg = config_lib.base_config()
    cfg.algo.name = name
    cfg.rollout.n = 5
    config_lib.validate(cfg)
  cfg.algo.name = "stepppo"
  with pytest.raises(ValueError, match="config.algo.name='stepppo' is not one of"):
    config_lib.validate(cfg)
