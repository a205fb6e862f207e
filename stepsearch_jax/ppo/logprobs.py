"""The pre-update pass: old log-probs (policy), reference log-probs and values, in one jit.

Alignment (batch.py layout): slot r's token sits at column response_index[r] + 1 and the policy's
logit for it at column response_index[r]; so does the critic's value for it (verl reads
``values[:, -R-1:-1]``): the value of a state is read from the hidden state of the last token
before the action. Only the R slot columns go through the vocabulary projection, which is the
largest activation of the whole step. Attention and positions follow the batch's segment ids, so
a packed row's trajectories are computed exactly as if each had a row of its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from stepsearch_jax.models import api as model_api
from stepsearch_jax.ppo import losses
from stepsearch_jax.ppo.batch import PPOBatch


def _at(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [b, T, ...] read at columns index [b, R] -> [b, R, ...]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def policy_logprobs(config, params, tokens: jax.Array, segment_ids: jax.Array,
                    response_index: jax.Array, temperature: float = 1.0
                    ) -> tuple[jax.Array, jax.Array]:
  """(log p(slot token), entropy at the slot), float32 [b, R]."""
  hidden = model_api.hidden_states(config, params, tokens, segment_ids,
                                   model_api.segment_positions(segment_ids))
  logits = model_api.logits_from_hidden(config, params, _at(hidden, response_index))
  return losses.logprobs_and_entropy(logits, _at(tokens, response_index + 1), temperature)


def critic_values(config, vparams, tokens: jax.Array, segment_ids: jax.Array,
                  response_index: jax.Array) -> jax.Array:
  """V(slot) read at column response_index (the token before the slot's), float32 [b, R]."""
  values = model_api.apply_value(config, vparams, tokens, segment_ids,
                                 model_api.segment_positions(segment_ids))
  return _at(values, response_index)


def _prepare(policy, ref, critic, batch: PPOBatch, *, policy_config, critic_config,
             temperature: float) -> PPOBatch:
  def one(micro):
    tokens, seg, index, resp = micro
    old, _ = policy_logprobs(policy_config, policy, tokens, seg, index, temperature)
    old = old * resp
    ref_lp = old if ref is None else policy_logprobs(policy_config, ref, tokens, seg, index,
                                                     temperature)[0] * resp
    values = (jnp.zeros_like(old) if critic is None else
              critic_values(critic_config, critic, tokens, seg, index) * resp)
    return old, ref_lp, values

  # lax.map over the leading (unsharded) micro-batch axis: one micro-batch's activations at a time.
  old, ref_lp, values = jax.lax.map(one, (batch.tokens, batch.segment_ids, batch.response_index,
                                          batch.response_mask))
  return batch.replace(old_logprobs=old, ref_logprobs=ref_lp, values=values)


def make_prepare_fn(policy_config, critic_config, temperature: float, shardings: dict):
  """Jitted ``prepare(policy, ref|None, critic|None, batch) -> batch`` on [N, micro, ...] batches.

  `shardings` holds NamedSharding pytrees for 'policy', 'ref', 'critic' and 'batch'. The batch
  argument is donated (its filled copy replaces it).
  """
  fn = functools.partial(_prepare, policy_config=policy_config, critic_config=critic_config,
                         temperature=temperature)
  return jax.jit(fn, in_shardings=(shardings["policy"], shardings["ref"], shardings["critic"],
                                   shardings["batch"]),
                 out_shardings=shardings["batch"], donate_argnums=(3,))
