"""Trajectories -> one PPO batch: padded (one trajectory per row) or packed (several per row).

Token columns (``T`` per row):
  tokens [B, T]: each trajectory's prompt then its response, contiguous.
  segment_ids [B, T]: which trajectory of the row a column holds (1, 2, ...; 0 = padding).
    Attention stays inside a segment and positions restart at each one (models.segment_positions).
Response slots (``R`` per row), the layout of every per-token PPO array:
  response_index [B, R]: the column whose logit predicts slot r's token (the token sits at
    response_index + 1); the policy's log-prob, the critic's value and every array below are read
    there, so only R columns go through the vocabulary projection.
  response_segment [B, R]: the slot's trajectory, as its index in the step's list + 1 (0 = empty
    slot). GAE restarts where it changes; GRPO sums a trajectory's reward over it.
  group_ids [B, R]: the slot's trajectory's group (GRPO); by default trajectories with identical
    prompt ids.
  response_mask [B, R]: 1 on non-pad response tokens (the released code's response attention_mask).
  loss_mask [B, R]: 1 on model-generated response tokens only (the released info_mask).
  rewards [B, R]: token scores from the reward code (step rewards, final reward), before KL.
  old_logprobs, ref_logprobs, values, advantages, returns [B, R]: zeros here, filled on device by the
    learner, so the pytree structure (hence every jit cache key) never changes.

`make_batch` (padded): row i holds trajectory i, its prompt LEFT-padded to P and its response
RIGHT-padded to R (T = P + R), so slot r is column P + r: the released code's layout.
`pack_batch`: the trajectories of each mini-batch are packed first-fit into rows, so a step
computes on far fewer padding columns when lengths differ; mini-batches keep exactly their padded
trajectories (hence the same losses and gradients, see tests/test_ppo_pack.py), and the host batch
comes out already stacked [rows // micro, micro, ...] with as many rows per micro-batch as needed.
Lengths are rounded up to buckets so that a handful of shapes cover a whole run; every new shape
recompiles the logprob pass and the update.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np



@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PPOBatch:
  """Arrays of one PPO batch; a pytree, so it can go through jit and device_put as a whole."""
  tokens: Any
  segment_ids: Any
  response_index: Any
  response_segment: Any
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
  def padding_share(self) -> float:
    """Share of the token columns that hold no trajectory token (host batches)."""
    seg = np.asarray(self.segment_ids)
    return float(1.0 - np.count_nonzero(seg) / max(seg.size, 1))

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


def row_count(n: int) -> int:
  """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5x them) >= n: rows per
  packed micro-batch. Powers of two alone left up to half the rows empty (9 rows -> 16: a
  wide length mix kept ~40% padding); 1.5x steps waste at most a third for ~2x the shapes,
  i.e. compiles, which the persistent compilation cache pays once."""
  m = 1
  while m < n:
    m = 2 if m == 1 else (m // 2 * 3 if m & (m - 1) == 0 else m // 3 * 4)
  return m


def _padded_lengths(trajectories, prompt_len=None, response_len=None, prompt_buckets=None,
                    response_buckets=None):
  """(longest prompt, longest response, P, R) of the padded layout: P / R as given, else the
  bucket of the longest prompt / response."""
  max_p = max(len(t.prompt_ids) for t in trajectories)
  max_r = max(max(len(t.response_ids) for t in trajectories), 1)
  P = prompt_len if prompt_len is not None else bucket_length(max_p, prompt_buckets)
  R = response_len if response_len is not None else bucket_length(max_r, response_buckets)
  return max_p, max_r, P, R


def _group_ids_from_prompts(prompts: Sequence[Sequence[int]]) -> np.ndarray:
  seen: dict[tuple, int] = {}
  return np.asarray([seen.setdefault(tuple(p), len(seen)) for p in prompts], np.int32)


def _check(trajectories, token_rewards, group_ids) -> np.ndarray:
  """Validate the inputs (naming the trajectory and field); returns the per-trajectory groups."""
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
  if group_ids is None:
    return _group_ids_from_prompts([t.prompt_ids for t in trajectories])
  if len(group_ids) != len(trajectories):
    raise ValueError(f"group_ids has {len(group_ids)} entries for {len(trajectories)} trajectories")
  return np.asarray(group_ids, np.int32)


def _empty(rows: int, T: int, R: int, pad_id: int) -> PPOBatch:
  zeros = lambda: np.zeros((rows, R), np.float32)  # noqa: E731
  return PPOBatch(tokens=np.full((rows, T), pad_id, np.int32),
                  segment_ids=np.zeros((rows, T), np.int32),
                  response_index=np.zeros((rows, R), np.int32),
                  response_segment=np.zeros((rows, R), np.int32),
                  group_ids=np.zeros((rows, R), np.int32), response_mask=zeros(),
                  loss_mask=zeros(), rewards=zeros(), old_logprobs=zeros(), ref_logprobs=zeros(),
                  values=zeros(), advantages=zeros(), returns=zeros())


def _place(b: PPOBatch, row: int, col: int, slot: int, seg: int, k: int, tr, rewards,
           group: int) -> None:
  """Write trajectory number k (0-based in the step) as segment `seg` of `row`: its prompt from
  column `col`, its response right after, its response slots from `slot`."""
  p, r = len(tr.prompt_ids), len(tr.response_ids)
  b.tokens[row, col:col + p] = tr.prompt_ids
  b.tokens[row, col + p:col + p + r] = tr.response_ids
  b.segment_ids[row, col:col + p + r] = seg
  b.response_index[row, slot:slot + r] = np.arange(col + p - 1, col + p + r - 1)
  b.response_segment[row, slot:slot + r] = k + 1
  b.group_ids[row, slot:slot + r] = group
  b.response_mask[row, slot:slot + r] = 1.0
  b.loss_mask[row, slot:slot + r] = np.asarray(tr.loss_mask, np.float32)
  b.rewards[row, slot:slot + r] = np.asarray(rewards, np.float32)


def make_batch(trajectories: Sequence[Any], token_rewards: Sequence[np.ndarray], *,
               pad_id: int = 0, prompt_len: int | None = None, response_len: int | None = None,
               prompt_buckets: Sequence[int] | None = None,
               response_buckets: Sequence[int] | None = None,
               group_ids: Sequence[int] | None = None) -> PPOBatch:
  """The padded host (numpy) PPOBatch [B, ...]: row i = trajectory i (see the module docstring).

  Args:
    trajectories: objects with prompt_ids, response_ids, loss_mask (the rollout Trajectory).
    token_rewards: one float array per trajectory, len == len(response_ids)
      (``rewards.token_rewards`` output).
    pad_id: token written into padded columns (masked everywhere, any valid id works).
    prompt_len / response_len: fixed P / R (e.g. the rollout caps, for a single compiled shape);
      None = bucket of the longest in the batch.
    group_ids: explicit GRPO groups; default = rows with identical prompt_ids share a group.
  """
  gids = _check(trajectories, token_rewards, group_ids)
  max_p, max_r, P, R = _padded_lengths(trajectories, prompt_len, response_len, prompt_buckets,
                                       response_buckets)
  if max_p > P or max_r > R:
    worst = max(range(len(trajectories)), key=lambda i: (len(trajectories[i].prompt_ids) > P,
                                                        len(trajectories[i].response_ids) > R))
    raise ValueError(f"trajectory {getattr(trajectories[worst], 'id', worst)!r} (row {worst}) does "
                     f"not fit prompt_len={P} / response_len={R} (longest prompt {max_p}, "
                     f"longest response {max_r})")
  b = _empty(len(trajectories), P + R, R, pad_id)
  b.response_index[:] = P - 1 + np.arange(R)      # empty slots too: any valid column will do
  for i, tr in enumerate(trajectories):
    _place(b, i, P - len(tr.prompt_ids), 0, 1, i, tr, token_rewards[i], int(gids[i]))
  return b


def _first_fit(lengths: Sequence[int], B: int, mini: int, T: int) -> list[list[list[int]]]:
  """Per mini-batch j (trajectories [j * mini, (j + 1) * mini)): its rows of `T` columns, each a
  list of trajectory indices, filled first-fit, longest first."""
  minis = []
  for j in range(B // mini):
    rows: list[list[int]] = []
    free: list[int] = []
    for k in sorted(range(j * mini, (j + 1) * mini), key=lambda k: -lengths[k]):
      row = next((i for i, f in enumerate(free) if f >= lengths[k]), None)
      if row is None:
        rows.append([])
        free.append(T)
        row = len(rows) - 1
      rows[row].append(k)
      free[row] -= lengths[k]
    minis.append([sorted(r) for r in rows])   # in-row order = step order (any order is valid)
  return minis


def _packed_layout(trajectories, lengths, mini: int, micro: int, shards: int, T: int):
  """(minis, rows per micro-batch m, response slots R) of the packed layout with rows of T."""
  minis = _first_fit(lengths, len(trajectories), mini, T)
  need = -(-max(len(rows) for rows in minis) // (mini // micro))     # rows per micro-batch
  m = -(-min(row_count(need), micro) // shards) * shards
  R = bucket_length(max(max(sum(len(trajectories[k].response_ids) for k in row), 1)
                        for rows in minis for row in rows))
  return minis, m, R


def pack_batch(trajectories: Sequence[Any], token_rewards: Sequence[np.ndarray], *, mini: int,
               micro: int, shards: int = 1, pad_id: int = 0, row_len: int | None = None,
               group_ids: Sequence[int] | None = None,
               row_cost: Callable[[int, int], float] | None = None) -> PPOBatch:
  """The packed host PPOBatch, stacked [N, m, ...] (see the module docstring).

  Mini-batch j is trajectories [j * mini, (j + 1) * mini), as in the padded batch; its
  trajectories go first-fit (longest first) into rows of `row_len` columns and fill the same
  k = mini // micro micro-batches as padded, with m <= micro rows each (the `row_count` step,
  multiple of `shards`, that holds the fullest mini-batch), so the update slices mini-batch j
  exactly as before.

  Default row length: the padded row's (prompt bucket + response bucket) where that is shorter than
  the bucket of the longest trajectory, else that bucket; with `row_cost(T, R)` (the relative cost
  of a row of T tokens and R response slots, models.decoder.row_cost) the cheapest layout among
  that length and the buckets up to twice the longest trajectory's. Longer rows hold more
  trajectories, but attention grows with the row length: rows of 1024 for a longest trajectory
  of 594 lost to the padded row of 640 at d=128 and won at the 20M model (bench/packing.py).
  """
  gids = _check(trajectories, token_rewards, group_ids)
  B = len(trajectories)
  if B % mini or mini % micro:
    raise ValueError(f"{B} trajectories, config.algo.mini_batch={mini} and micro_batch={micro} "
                     f"do not divide evenly")
  lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajectories]
  shards = max(int(shards), 1)
  longest = bucket_length(max(lengths))
  if row_len:
    candidates = [row_len]
  else:
    candidates = [min(longest, sum(_padded_lengths(trajectories)[2:]))]
    if row_cost is not None:
      t = longest
      while t <= bucket_length(2 * max(lengths)):
        candidates.append(t)
        t = bucket_length(t + 1)
  T = candidates[0]
  if max(lengths) > T:
    worst = int(np.argmax(lengths))
    raise ValueError(f"trajectory {getattr(trajectories[worst], 'id', worst)!r} (row {worst}) has "
                     f"{lengths[worst]} tokens, more than row_len={T}")
  layouts = {t: _packed_layout(trajectories, lengths, mini, micro, shards, t)
             for t in dict.fromkeys(candidates)}
  if len(layouts) > 1:
    T = min(layouts, key=lambda t: layouts[t][1] * row_cost(t, layouts[t][2]))
  minis, m, R = layouts[T]
  per_mini = (mini // micro) * m
  b = _empty(len(minis) * per_mini, T, R, pad_id)
  for j, rows in enumerate(minis):
    for i, row in enumerate(rows):
      r_global = j * per_mini + i
      col = slot = 0
      for seg, k in enumerate(row, start=1):
        tr = trajectories[k]
        _place(b, r_global, col, slot, seg, k, tr, token_rewards[k], int(gids[k]))
        col += lengths[k]
        slot += len(tr.response_ids)
  return stack_micro(b, m)


def stack_micro(batch: PPOBatch, micro: int) -> PPOBatch:
  """[B, ...] -> [B // micro, micro, ...] on every field (the device layout of the learner)."""
  B = batch.tokens.shape[0]
  if B % micro:
    raise ValueError(f"batch of {B} rows is not a multiple of algo.micro_batch={micro}")
  return jax.tree.map(lambda x: x.reshape((B // micro, micro) + x.shape[1:]), batch)
