"""Trajectories -> one padded PPO batch with a fixed layout.

Layout (``P`` = prompt bucket, ``R`` = response bucket, ``T = P + R``):
  tokens [B, T]: the prompt LEFT-padded to P, the response RIGHT-padded to R, so response token t
    always sits at column P + t and the policy's logit for it at column P + t - 1 (one slice for the
    whole batch, no gathers).
  attention_mask [B, T]: 1 on every real token (prompt, model and inserted response tokens).
  response_mask [B, R]: 1 on non-pad response tokens (the released code's response attention_mask).
  loss_mask [B, R]: 1 on model-generated response tokens only (the released info_mask).
  rewards [B, R]: token scores from the reward code (step rewards, final reward), before KL.
  group_ids [B]: rows sharing a prompt (GRPO groups); by default rows with identical prompt ids.
  old_logprobs, ref_logprobs, values, advantages, returns [B, R]: zeros here, filled on device by the
    learner, so the pytree structure (hence every jit cache key) never changes.

Lengths are rounded up to buckets so that a handful of (P, R) shapes cover a whole run; every new
shape recompiles the logprob pass and the update.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

_ARRAY_FIELDS = ("tokens", "attention_mask", "response_mask", "loss_mask", "rewards", "group_ids",
                 "old_logprobs", "ref_logprobs", "values", "advantages", "returns")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PPOBatch:
  """Arrays of one PPO batch; a pytree, so it can go through jit and device_put as a whole."""
  tokens: Any
  attention_mask: Any
  response_mask: Any
  loss_mask: Any
  rewards: Any
  group_ids: Any
  old_logprobs: Any
  ref_logprobs: Any
  values: Any
  advantages: Any
  returns: Any

  @property
  def response_len(self) -> int:
    return self.rewards.shape[-1]

  @property
  def prompt_len(self) -> int:
    return self.tokens.shape[-1] - self.rewards.shape[-1]

  def replace(self, **kw) -> "PPOBatch":
    return dataclasses.replace(self, **kw)


def bucket_length(n: int, buckets: Sequence[int] | None = None, minimum: int = 16) -> int:
  """Smallest bucket >= n. Default buckets: powers of two from `minimum` up to 1024, then multiples
  of 512 (so long responses waste at most 512 columns)."""
  if buckets:
    for b in sorted(buckets):
      if b >= n:
        return int(b)
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")
  if n <= 1024:
    b = minimum
    while b < n:
      b *= 2
    return b
  return -(-n // 512) * 512


def _group_ids_from_prompts(prompts: Sequence[Sequence[int]]) -> np.ndarray:
  seen: dict[tuple, int] = {}
  return np.asarray([seen.setdefault(tuple(p), len(seen)) for p in prompts], np.int32)


def make_batch(trajectories: Sequence[Any], token_rewards: Sequence[np.ndarray], *,
               pad_id: int = 0, prompt_len: int | None = None, response_len: int | None = None,
               prompt_buckets: Sequence[int] | None = None,
               response_buckets: Sequence[int] | None = None,
               group_ids: Sequence[int] | None = None) -> PPOBatch:
  """Build a host (numpy) PPOBatch from Trajectory records and their per-token reward arrays.

  Args:
    trajectories: objects with prompt_ids, response_ids, loss_mask (the rollout Trajectory).
    token_rewards: one float array per trajectory, len == len(response_ids)
      (``rewards.token_rewards`` output).
    pad_id: token written into padded columns (masked everywhere, any valid id works).
    prompt_len / response_len: fixed P / R (e.g. the rollout caps, for a single compiled shape);
      None = bucket of the longest in the batch.
    group_ids: explicit GRPO groups; default = rows with identical prompt_ids share a group.
  """
  if len(trajectories) != len(token_rewards):
    raise ValueError(f"{len(trajectories)} trajectories but {len(token_rewards)} reward arrays")
  if not trajectories:
    raise ValueError("make_batch needs at least one trajectory")
  for i, tr in enumerate(trajectories):
    tid = getattr(tr, "id", i)
    n = len(tr.response_ids)
    if len(tr.loss_mask) != n:
      raise ValueError(f"trajectory {tid!r} (row {i}): loss_mask has {len(tr.loss_mask)} entries "
                       f"for {n} response_ids")
    if len(token_rewards[i]) != n:
      raise ValueError(f"trajectory {tid!r} (row {i}): token_rewards has {len(token_rewards[i])} "
                       f"entries for {n} response_ids")
    if not tr.prompt_ids:
      raise ValueError(f"trajectory {tid!r} (row {i}): empty prompt_ids")
  max_p = max(len(t.prompt_ids) for t in trajectories)
  max_r = max(max(len(t.response_ids) for t in trajectories), 1)
  P = prompt_len if prompt_len is not None else bucket_length(max_p, prompt_buckets)
  R = response_len if response_len is not None else bucket_length(max_r, response_buckets)
  if max_p > P or max_r > R:
    worst = max(range(len(trajectories)), key=lambda i: (len(trajectories[i].prompt_ids) > P,
                                                        len(trajectories[i].response_ids) > R))
    raise ValueError(f"trajectory {getattr(trajectories[worst], 'id', worst)!r} (row {worst}) does "
                     f"not fit prompt_len={P} / response_len={R} (longest prompt {max_p}, "
                     f"longest response {max_r})")
  B = len(trajectories)
  tokens = np.full((B, P + R), pad_id, np.int32)
  attn = np.zeros((B, P + R), np.int32)
  resp_mask = np.zeros((B, R), np.float32)
  loss_mask = np.zeros((B, R), np.float32)
  rewards = np.zeros((B, R), np.float32)
  for i, tr in enumerate(trajectories):
    p, r = len(tr.prompt_ids), len(tr.response_ids)
    tokens[i, P - p:P] = tr.prompt_ids
    tokens[i, P:P + r] = tr.response_ids
    attn[i, P - p:P + r] = 1
    resp_mask[i, :r] = 1.0
    loss_mask[i, :r] = np.asarray(tr.loss_mask, np.float32)
    rewards[i, :r] = np.asarray(token_rewards[i], np.float32)
  if group_ids is None:
    gids = _group_ids_from_prompts([t.prompt_ids for t in trajectories])
  else:
    if len(group_ids) != B:
      raise ValueError(f"group_ids has {len(group_ids)} entries for {B} trajectories")
    gids = np.asarray(group_ids, np.int32)
  zeros = np.zeros((B, R), np.float32)
  return PPOBatch(tokens=tokens, attention_mask=attn, response_mask=resp_mask, loss_mask=loss_mask,
                  rewards=rewards, group_ids=gids, old_logprobs=zeros, ref_logprobs=zeros.copy(),
                  values=zeros.copy(), advantages=zeros.copy(), returns=zeros.copy())


def stack_micro(batch: PPOBatch, micro: int) -> PPOBatch:
  """[B, ...] -> [B // micro, micro, ...] on every field (the device layout of the learner)."""
  B = batch.tokens.shape[0]
  if B % micro:
    raise ValueError(f"batch of {B} rows is not a multiple of algo.micro_batch={micro}")
  return jax.tree.map(lambda x: x.reshape((B // micro, micro) + x.shape[1:]), batch)
