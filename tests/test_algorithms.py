"""The algorithm registry and the reward-term list: the ablations of method §7.3 switch off exactly
one term, and a new term is one function."""

import numpy as np
import pytest

from stepsearch_jax import config as config_lib
from stepsearch_jax.ppo.algorithms import ALGORITHMS, get_algorithm
from stepsearch_jax.rewards import terms as terms_lib
from stepsearch_jax.rewards.score import RewardConfig, score

INFO = ("\n\n<information> Doc 1<## Title: A ##> alice was born in paris .\n"
        "Doc 2<## Title: B ##> bob likes tea . </information>\n\n")
RESPONSE = ("<think> x </think> <search> alice birthplace </search>" + INFO +
            "<search> alice birthplace </search>" + INFO + "<answer> paris </answer>")
GT = {"target": ["paris"], "search_keys": [["alice birthplace"]]}
GOLD = [{"title": "A", "paragraph_text": "alice was born in paris ."}]


@pytest.mark.parametrize("name,off", [("steppo-no-info-gain", "info_gain"),
                                      ("steppo-no-redundancy", "redundancy"),
                                      ("steppo-no-key", "key")])
def test_ablation_drops_one_term(name, off):
  cfg = config_lib.base_config()
  cfg.algo.name = name
  config_lib.validate(cfg)
  algo = get_algorithm(name)
  assert algo.uses_critic and not algo.outcome_only
  rc = RewardConfig.from_config(algo.reward_config(cfg.reward))
  assert rc.terms == tuple(t for t in terms_lib.TERMS if t != off)
  full = score(RESPONSE, GT, GOLD, RewardConfig.from_config(cfg.reward))
  got = score(RESPONSE, GT, GOLD, rc)
  gains, reds = full.info_gains, full.redundancies
  assert gains[0] > 0 and reds[1] > 0 and full.search_key_score > 0   # every term is live here
  want_steps = [(0.0 if off == "info_gain" else g) -
                (0.0 if off == "redundancy" else p) for g, p in zip(gains, reds)]
  assert got.step_scores == pytest.approx(want_steps)
  assert got.final_score == pytest.approx(
      full.answer_f1 + (0.0 if off == "key" else rc.key_weight * full.search_key_score))


def test_every_registered_algorithm_validates():
  for name in ALGORITHMS:
    cfg = config_lib.base_config()
    cfg.algo.name = name
    cfg.rollout.n = 5
    config_lib.validate(cfg)
  cfg.algo.name = "stepppo"
  with pytest.raises(ValueError, match="config.algo.name='stepppo' is not one of"):
    config_lib.validate(cfg)


def test_a_new_reward_term_is_one_function(monkeypatch):
  """Register a toy step term (-0.1 per step whose query has one word) and a toy final term: the
  reward, the step placement, the algorithms' variants and the logged metrics all pick them up."""
  from stepsearch_jax import train
  from stepsearch_jax.rewards import keys as keys_lib
  def terse(ctx):
    queries = keys_lib.parse_queries(ctx.response_text, skip_inserted=True)
    return [1.0 if len(q.split()) == 1 else 0.0 for q in queries][:len(ctx.step_docs)]
  terms = dict(terms_lib.TERMS, terse=terms_lib.Term("step", lambda cfg: -0.1, terse),
               bonus=terms_lib.Term("final", lambda cfg: 2.0, lambda ctx: 0.25))
  monkeypatch.setattr(terms_lib, "TERMS", terms)
  monkeypatch.setattr(terms_lib, "STEP_TERMS", ("info_gain", "redundancy", "terse"))
  response = RESPONSE.replace("<search> alice birthplace </search>" + INFO + "<answer>",
                              "<search> alice </search>" + INFO + "<answer>")
  full = score(response, GT, GOLD, RewardConfig(terms=tuple(terms)))
  plain = score(response, GT, GOLD, RewardConfig())
  assert full.terms["terse"] == [0.0, 1.0]
  assert np.subtract(full.step_scores, plain.step_scores) == pytest.approx([0.0, -0.1])
  assert full.final_score == pytest.approx(plain.final_score + 0.5)
  cfg = config_lib.base_config()
  cfg.reward.terms = ",".join(terms)
  ppo = RewardConfig.from_config(get_algorithm("ppo").reward_config(cfg.reward))
  assert ppo.terms == ("answer_f1",)
  no_key = RewardConfig.from_config(get_algorithm("steppo-no-key").reward_config(cfg.reward))
  assert "terse" in no_key.terms and "key" not in no_key.terms
  stats = train.reward_stats([full, plain], [])
  assert stats["reward/terse"] == pytest.approx(1.0)
  assert stats["reward/bonus"] == pytest.approx(0.25)
