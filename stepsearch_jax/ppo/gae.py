"""KL-in-reward, mask-aware GAE and masked whitening (method §3.8, §4.1).

All functions take [..., R] arrays over the response positions of the fixed batch layout (see
``batch.py``) and are pure jnp, so they run inside jit on any leading batch shape and sharding.

GAE "bridges" positions whose step mask is 0 (inserted ``<information>``/``<warning>`` tokens and
right padding): they are not time steps, so they neither discount nor reset the running advantage.
A reward sitting on a bridged position is folded into the preceding model step (undiscounted), so
nothing is ever dropped. Bridged positions get return = the lambda-return of the next model step plus
the rewards folded in between, and advantage = return - value. With gamma = lam = 1 this equals the
released verl 0.1 computation (which runs over every response position incl. info and pad, where the
intermediate values telescope away) at every non-pad position, for advantages and returns alike; with
gamma, lam < 1 it is the multi-turn GAE of later verl (observation tokens skipped) plus the fold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kl_in_reward(scores: jax.Array, old_logprobs: jax.Array, ref_logprobs: jax.Array,
                 loss_mask: jax.Array, kl_coef: float) -> tuple[jax.Array, jax.Array]:
  """token_level_rewards = scores - kl_coef * (logp_old - logp_ref) * loss_mask (k1 estimate).

  Only model tokens (loss_mask = 1) carry the penalty: inserted text was not sampled by the policy.
  Returns (rewards, per-token kl) where kl is already masked.
  """
  kl = (old_logprobs - ref_logprobs) * loss_mask
  return scores - kl_coef * kl, kl


def gae(rewards: jax.Array, values: jax.Array, step_mask: jax.Array, gamma: float,
        lam: float, segments: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation over the last axis, bridging step_mask == 0 positions.

  Args:
    rewards: [..., R] token-level rewards (scores with the KL penalty applied).
    values: [..., R] critic values V(s_t) of the old critic.
    step_mask: [..., R] 1 where the position is a decision step (a model token), else 0.
    gamma, lam: discount and GAE lambda (python floats or scalars).
    segments: [..., R] trajectory id per position (packed rows): the recursion restarts where the
      id changes, so one trajectory's returns never leak into the one before it.
  Returns:
    (advantages, returns), both [..., R] float32, not whitened.
  """
  rewards = rewards.astype(jnp.float32)
  values = values.astype(jnp.float32)
  m = step_mask.astype(jnp.float32)
  lead = rewards.shape[:-1]
  zeros = jnp.zeros(lead, jnp.float32)

  if segments is None:
    segments = jnp.zeros(rewards.shape, jnp.int32)
  seg = segments.astype(jnp.int32)
  # restart[t]: position t + 1 belongs to another trajectory (the last position always does)
  restart = jnp.concatenate([seg[..., 1:] != seg[..., :-1],
                             jnp.ones(seg.shape[:-1] + (1,), bool)], axis=-1)

  def body(carry, x):
    r, v, mk, new = x
    last_adv, next_value, pending, last_ret = (jnp.where(new, 0.0, c) for c in carry)
    # Model step: fold the rewards of the bridged positions that follow it.
    delta = r + pending + gamma * next_value - v
    adv_step = delta + gamma * lam * last_adv
    ret_step = adv_step + v
    # Bridged position: carry everything, accumulate its reward for the previous model step.
    pending_skip = pending + r
    ret_skip = last_ret + pending_skip
    is_step = mk > 0
    adv = jnp.where(is_step, adv_step, ret_skip - v)
    ret = jnp.where(is_step, ret_step, ret_skip)
    carry = (jnp.where(is_step, adv_step, last_adv), jnp.where(is_step, v, next_value),
             jnp.where(is_step, 0.0, pending_skip), jnp.where(is_step, ret_step, last_ret))
    return carry, (adv, ret)

  xs = tuple(jnp.moveaxis(a, -1, 0) for a in (rewards, values, m, restart))
  _, (adv, ret) = jax.lax.scan(body, (zeros, zeros, zeros, zeros), xs, reverse=True)
  return jnp.moveaxis(adv, 0, -1), jnp.moveaxis(ret, 0, -1)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / sqrt(var + eps) with mean and unbiased variance over mask (verl masked_whiten).

  Every position is transformed (masked ones too); callers mask the result where it matters.
  """
  mask = mask.astype(jnp.float32)
  n = mask.sum()
  mean = (x * mask).sum() / jnp.maximum(n, 1.0)
  var = (jnp.square(x - mean) * mask).sum() / jnp.maximum(n, 1.0)
  var = var * n / jnp.maximum(n - 1.0, 1.0)  # Bessel's correction, as torch.var / verl
  return (x - mean) * jax.lax.rsqrt(var + eps)


def group_normalise(scores: jax.Array, group_ids: jax.Array, eps: float,
                    valid: jax.Array | None = None) -> jax.Array:
  """GRPO outcome normalisation: (s - group mean) / (group std + eps), std unbiased.

  scores, group_ids, valid: [N] (one entry per trajectory; `valid` False = not a trajectory, left
  out of every group). A group with a single member gets mean 0 and std 1, as verl's
  compute_grpo_outcome_advantage does. Group sums are segment sums (no [N, N] matrix), so N may be
  the step's slot count.
  """
  scores = scores.astype(jnp.float32)
  n = scores.shape[0]
  w = jnp.ones((n,), jnp.float32) if valid is None else valid.astype(jnp.float32)
  g = jnp.clip(group_ids.astype(jnp.int32), 0, n - 1)
  count = jax.ops.segment_sum(w, g, n)[g]
  mean = (jax.ops.segment_sum(w * scores, g, n) / jnp.maximum(jax.ops.segment_sum(w, g, n), 1.0))[g]
  var = jax.ops.segment_sum(w * jnp.square(scores - mean), g, n)[g] / jnp.maximum(count - 1, 1.0)
  single = count <= 1
  mean = jnp.where(single, 0.0, mean)
  std = jnp.where(single, 1.0, jnp.sqrt(var))
  return (scores - mean) / (std + eps)
