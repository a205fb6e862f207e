"""Supervised warm start: next-token cross-entropy on model tokens of demonstration trajectories.

The demo (and anyone starting from a base model that has never seen the tags) needs a policy that
already knows the format before RL can shape its search behaviour. Loss is taken only where
``loss_mask`` is 1 (the model's own tokens), exactly the tokens the PPO actor loss later trains, so
retrieved ``<information>`` text is context, never a target.
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from stepsearch_jax import models


def pack(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, multiple: int = 64):
  """Right-pad (ids, loss_mask) pairs to one length (a multiple of `multiple`); numpy arrays."""
  length = max(len(ids) for ids, _ in examples)
  length = -(-length // multiple) * multiple
  tokens = np.full((len(examples), length), pad_id, np.int32)
  attn = np.zeros((len(examples), length), np.int32)
  mask = np.zeros((len(examples), length), np.float32)
  for i, (ids, m) in enumerate(examples):
    if len(ids) != len(m):
      raise ValueError(f"example {i}: {len(ids)} token ids but {len(m)} loss-mask entries")
    tokens[i, :len(ids)] = ids
    attn[i, :len(ids)] = 1
    mask[i, :len(ids)] = m
  return tokens, attn, mask


def _loss(config, params, tokens, attn, mask):
  logits = models.apply_lm(config, params, tokens, attention_mask=attn)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  target_mask = mask[:, 1:]
  return jnp.sum(nll * target_mask) / jnp.maximum(jnp.sum(target_mask), 1.0)


def warm_start(config, params, examples, *, steps: int, batch_size: int, lr: float, pad_id: int,
               seed: int = 0, weight_decay: float = 0.0, bucket: int = 64, log=print):
  """Train `params` for `steps` AdamW steps on (ids, loss_mask) examples; returns (params, losses).

  Examples are grouped into length buckets (multiples of `bucket`) and each step draws one batch
  from one bucket, chosen in proportion to its size: attention cost grows with the square of the
  padded length, and a handful of fixed shapes compile once each.
  """
  groups: dict[int, list] = {}
  for ex in examples:
    groups.setdefault(-(-len(ex[0]) // bucket) * bucket, []).append(ex)
  packed = {length: pack(exs, pad_id, multiple=length) for length, exs in sorted(groups.items())}
  lengths = sorted(packed)
  weights = np.array([len(groups[n]) for n in lengths], np.float64)
  weights /= weights.sum()
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10),
                                                                    steps, lr * 0.1),
                                weight_decay=weight_decay))
  opt_state = opt.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, tokens, attn, mask):
    loss, grads = jax.value_and_grad(functools.partial(_loss, config))(params, tokens, attn, mask)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  losses = []
  t0 = time.time()
  bar = tqdm(range(steps), desc="warm start", unit="step", leave=False)
  for _ in bar:
    length = lengths[rng.choice(len(lengths), p=weights)]
    tokens, attn, mask = packed[length]
    idx = rng.choice(len(tokens), size=batch_size, replace=len(tokens) < batch_size)
    params, opt_state, loss = step(params, opt_state, tokens[idx], attn[idx], mask[idx])
    losses.append(float(loss))
    bar.set_postfix(loss=f"{losses[-1]:.3f}", len=length)
  log(f"warm start: {steps} steps in {time.time() - t0:.1f}s, loss {losses[0]:.3f} -> "
      f"{np.mean(losses[-10:]):.3f}")
  return params, losses
