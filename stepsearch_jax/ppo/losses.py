"""PPO clip policy loss, entropy bonus and clipped value loss (verl 0.1 core_algos, method §4.1).

Every loss is a masked token *sum divided by `denom`*. The update passes the token count of the whole
mini-batch as `denom`, so summing the micro-batch losses gives exactly the token-mean over the
mini-batch: gradient accumulation is then invariant to the micro-batch size. (The released code takes
a token-mean per micro-batch and divides by the number of micro-batches, which weights tokens of short
micro-batches more; the two agree when micro-batches hold equal token counts.) With `denom=None` each
function is a plain masked mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _reduce(x: jax.Array, mask: jax.Array, denom) -> jax.Array:
  mask = mask.astype(jnp.float32)
  if denom is None:
    denom = jnp.maximum(mask.sum(), 1.0)
  return (x * mask).sum() / denom


def logprobs_and_entropy(logits: jax.Array, targets: jax.Array,
                         temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Per-token log p(target) and entropy of softmax(logits / temperature), float32 [..., T]."""
  logits = logits.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  probs = jnp.exp(logits - lse[..., None])
  entropy = lse - (probs * logits).sum(-1)
  return target_logit - lse, entropy


def policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                mask: jax.Array, clip_ratio: float, denom=None) -> tuple[jax.Array, dict]:
  """PPO clip: mean(max(-A * r, -A * clip(r, 1 - c, 1 + c))) over mask.

  Returns (pg_loss, metrics) with metrics pg_clipfrac (fraction where the clipped branch wins) and
  approx_kl (mean of logp_old - logp, verl's ppo_kl), both reduced like the loss.
  """
  neg_kl = logprobs - old_logprobs
  ratio = jnp.exp(neg_kl)
  loss1 = -advantages * ratio
  loss2 = -advantages * jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
  pg_loss = _reduce(jnp.maximum(loss1, loss2), mask, denom)
  clipfrac = _reduce((loss2 > loss1).astype(jnp.float32), mask, denom)
  approx_kl = _reduce(-neg_kl, mask, denom)
  return pg_loss, dict(pg_clipfrac=clipfrac, approx_kl=approx_kl)


def entropy_bonus(entropy: jax.Array, mask: jax.Array, denom=None) -> jax.Array:
  """Masked mean entropy; the policy objective is pg_loss - entropy_coef * this."""
  return _reduce(entropy, mask, denom)


def value_loss(vpreds: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               value_clip: float, denom=None) -> tuple[jax.Array, dict]:
  """0.5 * mean(max((V - R)^2, (clip(V, V_old +- c) - R)^2)) over mask.

  Returns (vf_loss, metrics) with vf_clipfrac and value_error (mean (V - R)^2 of the new values).
  """
  vclipped = jnp.clip(vpreds, old_values - value_clip, old_values + value_clip)
  l1 = jnp.square(vpreds - returns)
  l2 = jnp.square(vclipped - returns)
  vf_loss = 0.5 * _reduce(jnp.maximum(l1, l2), mask, denom)
  clipfrac = _reduce((l2 > l1).astype(jnp.float32), mask, denom)
  return vf_loss, dict(vf_clipfrac=clipfrac, value_error=_reduce(l1, mask, denom))
