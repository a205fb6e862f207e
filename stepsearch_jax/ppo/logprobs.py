"""The pre-update pass: old log-probs (policy), reference log-probs and values, in one jit.

Alignment (batch.py layout, T = P + R): the policy's logit for response token t sits at column
P + t - 1, and so does the critic's value for it (verl reads ``values[:, -R-1:-1]``): the value of a
state is read from the hidden state of the last token before the action. Only the R response columns
go through the vocabulary projection, which is the largest activation of the whole step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from stepsearch_jax.models import api as model_api
from stepsearch_jax.ppo import losses
from stepsearch_jax.ppo.batch import PPOBatch


def policy_logprobs(config, params, tokens: jax.Array, attention_mask: jax.Array, response_len: int,
                    temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(log p(response token t), entropy at t), float32 [b, R]."""
  T = tokens.shape[-1]
  P = T - response_len
  hidden = model_api.hidden_states(config, params, tokens, attention_mask)
  logits = model_api.logits_from_hidden(config, params, hidden[:, P - 1:T - 1])
  return losses.logprobs_and_entropy(logits, tokens[:, P:], temperature)


def critic_values(config, vparams, tokens: jax.Array, attention_mask: jax.Array,
                  response_len: int) -> jax.Array:
  """V(response token t) read at column P + t - 1, float32 [b, R]."""
  T = tokens.shape[-1]
  P = T - response_len
  return model_api.apply_value(config, vparams, tokens, attention_mask)[:, P - 1:T - 1]


def _prepare(policy, ref, critic, batch: PPOBatch, *, policy_config, critic_config,
             temperature: float) -> PPOBatch:
  R = batch.response_len

  def one(micro):
    tokens, mask, resp = micro
    old, _ = policy_logprobs(policy_config, policy, tokens, mask, R, temperature)
    old = old * resp
    ref_lp = old if ref is None else policy_logprobs(policy_config, ref, tokens, mask, R,
                                                     temperature)[0] * resp
    values = (jnp.zeros_like(old) if critic is None else
              critic_values(critic_config, critic, tokens, mask, R) * resp)
    return old, ref_lp, values

  # lax.map over the leading (unsharded) micro-batch axis: one micro-batch's activations at a time.
  old, ref_lp, values = jax.lax.map(one, (batch.tokens, batch.attention_mask, batch.response_mask))
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
