"""The algorithm registry: steppo, ppo, grpo as declarations over one training loop.

Each algorithm states three things and nothing else:
  * ``uses_critic``: whether a value model is trained and read (GAE) or not (GRPO);
  * which reward terms it keeps (``keep_terms``/``drop_terms``: names in ``rewards.score.TERMS``);
    with no step term left the reward sits on the last token alone (``outcome_only``);
  * ``advantage``: the name of an advantage estimator in ``ADVANTAGES``.

  steppo: step rewards (information gain - redundancy at each search turn's last token) + answer and
          key reward at the last token; KL in reward; critic + bridged GAE; whitening (method §4).
  ppo:    the paper's PPO baseline: outcome (answer) reward at the last token only, no step or key
          rewards; otherwise identical to steppo.
  grpo:   outcome reward, normalised within the n samples of each prompt (verl's grpo estimator:
          summed token rewards, KL-in-reward included when kl_coef > 0), broadcast over the
          response's model tokens; no critic.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from stepsearch_jax.ppo import gae as gae_lib
from stepsearch_jax.ppo.batch import PPOBatch
from stepsearch_jax.rewards import terms as terms_lib


@dataclasses.dataclass(frozen=True)
class AdvantageParams:
  """The static (hashable) settings the advantage estimators read, taken from cfg.algo."""
  gamma: float = 1.0
  lam: float = 1.0
  kl_coef: float = 0.001
  whiten_mask: str = "all"
  grpo_eps: float = 1e-6

  @classmethod
  def from_config(cls, algo_cfg) -> "AdvantageParams":
    return cls(gamma=float(algo_cfg.gamma), lam=float(algo_cfg.lam),
               kl_coef=float(algo_cfg.kl_coef), whiten_mask=str(algo_cfg.whiten_mask),
               grpo_eps=float(algo_cfg.grpo_eps))


def _mask(batch: PPOBatch, which: str):
  if which == "all":
    return batch.response_mask
  if which == "model":
    return batch.loss_mask
  raise ValueError(f"mask choice {which!r} is not one of ['all', 'model']")


def _trajectories(batch: PPOBatch):
  """(slot trajectory ids [S], number of segments M, trajectory-present flags [M]) over the
  flattened slots: per-trajectory sums are segment sums, whatever the packing."""
  seg = batch.response_segment.reshape(-1)
  m = seg.shape[0] + 1
  present = jax.ops.segment_sum(batch.response_mask.reshape(-1), seg, m) > 0
  return seg, m, present.at[0].set(False)


def _kl_rewards(batch: PPOBatch, hp: AdvantageParams):
  rewards, kl = gae_lib.kl_in_reward(batch.rewards, batch.old_logprobs, batch.ref_logprobs,
                                     batch.loss_mask, hp.kl_coef)
  _, _, present = _trajectories(batch)
  n = jnp.maximum(present.sum(), 1)
  metrics = dict(kl_in_reward=gae_lib.masked_mean(kl, batch.loss_mask),
                 score_sum=(batch.rewards * batch.response_mask).sum() / n,
                 reward_sum=(rewards * batch.response_mask).sum() / n)
  return rewards, metrics


def gae_advantages(batch: PPOBatch, hp: AdvantageParams):
  """KL-in-reward -> GAE over model tokens (inserted ones bridged) -> whitening over whiten_mask."""
  rewards, metrics = _kl_rewards(batch, hp)
  adv, ret = gae_lib.gae(rewards, batch.values, batch.loss_mask, hp.gamma, hp.lam,
                         batch.response_segment)
  adv = gae_lib.masked_whiten(adv, _mask(batch, hp.whiten_mask))
  metrics.update(returns_mean=gae_lib.masked_mean(ret, batch.response_mask),
                 values_mean=gae_lib.masked_mean(batch.values, batch.response_mask))
  return adv * batch.response_mask, ret * batch.response_mask, metrics


def grpo_advantages(batch: PPOBatch, hp: AdvantageParams):
  """Group-normalised summed reward per trajectory, broadcast over its model tokens;
  returns = advantages."""
  rewards, metrics = _kl_rewards(batch, hp)
  seg, m, present = _trajectories(batch)
  scores = jax.ops.segment_sum((rewards * batch.response_mask).reshape(-1), seg, m)
  groups = jax.ops.segment_max(batch.group_ids.reshape(-1), seg, m)
  norm = gae_lib.group_normalise(scores, groups, hp.grpo_eps, valid=present)
  adv = norm[seg].reshape(batch.loss_mask.shape) * batch.loss_mask
  return adv, adv, metrics


ADVANTAGES: dict[str, Callable] = {"gae": gae_advantages, "grpo": grpo_advantages}


@dataclasses.dataclass(frozen=True)
class Algorithm:
  name: str
  uses_critic: bool
  advantage: str
  keep_terms: tuple[str, ...] | None = None   # reward terms kept (None: all configured ones)
  drop_terms: tuple[str, ...] = ()            # reward terms removed (the ablations)

  def reward_config(self, reward_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """cfg.reward with this algorithm's terms (feed to RewardConfig.from_config)."""
    out = ml_collections.ConfigDict(reward_cfg.to_dict())
    terms = terms_lib.parse_terms(reward_cfg.terms)
    out.terms = ",".join(t for t in terms if t not in self.drop_terms
                         and (self.keep_terms is None or t in self.keep_terms))
    return out

  @property
  def outcome_only(self) -> bool:
    """No step term survives: the reward sits on the last token alone."""
    kept = self.keep_terms if self.keep_terms is not None else tuple(terms_lib.TERMS)
    return not any(t in terms_lib.STEP_TERMS for t in kept if t not in self.drop_terms)

  def advantages(self, batch: PPOBatch, hp: AdvantageParams):
    """(advantages, returns, metrics) as jnp arrays; jit-friendly (hp is static)."""
    return ADVANTAGES[self.advantage](batch, hp)


_OUTCOME = ("answer_f1",)     # the paper's PPO/GRPO baselines: answer F1 at the last token only


def _ablation(name: str, term: str) -> Algorithm:
  """StePPO without one reward term (method §7.3)."""
  return Algorithm(name, uses_critic=True, advantage="gae", drop_terms=(term,))


ALGORITHMS: dict[str, Algorithm] = {
    "steppo": Algorithm("steppo", uses_critic=True, advantage="gae"),
    "ppo": Algorithm("ppo", uses_critic=True, advantage="gae", keep_terms=_OUTCOME),
    "grpo": Algorithm("grpo", uses_critic=False, advantage="grpo", keep_terms=_OUTCOME),
    "steppo-no-info-gain": _ablation("steppo-no-info-gain", "info_gain"),
    "steppo-no-redundancy": _ablation("steppo-no-redundancy", "redundancy"),
    "steppo-no-key": _ablation("steppo-no-key", "key"),
}


def get_algorithm(name: str) -> Algorithm:
  try:
    return ALGORITHMS[name]
  except KeyError:
    raise ValueError(f"config.algo.name={name!r} is not one of {sorted(ALGORITHMS)}") from None
