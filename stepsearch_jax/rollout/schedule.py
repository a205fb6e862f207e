"""The native driver's scheduling policy: how appends are batched, which prompt prefix is shared,
which slots a decode block runs over. Pure functions of host-side lists, so every process of a
multi-controller run makes the same choice from the same (replicated) inputs.
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence

import numpy as np

# Shorter common prompt prefixes are not worth an extra prefill call and a cache copy.
MIN_SHARED_PREFIX = 32


def plan_appends(lengths: Sequence[int], shape: Callable[[list[int]], tuple[int, int]]
                 ) -> list[list[int]]:
  """Split append rows into calls: one batched call unless per-width calls pad far less.

  `shape(lengths)` is the engine's padded (rows, width) of one call (`engine.append_shape`); a
  call costs ~ rows x width. Most flushes are a handful of observations of similar length,
  which go in together.
  """
  def cost(idx: list[int]) -> int:
    rows, width = shape([lengths[i] for i in idx])
    return rows * width

  everything = list(range(len(lengths)))
  groups: dict[int, list[int]] = collections.defaultdict(list)
  for i, n in enumerate(lengths):
    groups[shape([n])[1]].append(i)
  split = list(groups.values())
  overhead = 64                       # per-call dispatch + cache window copy, in padded tokens
  if sum(cost(g) + overhead for g in split) < cost(everything) + overhead:
    return split
  return [everything]


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
  first = rows[0]
  n = min(len(r) for r in rows)
  for r in rows[1:]:
    i = 0
    while i < n and r[i] == first[i]:
      i += 1
    n = i
  return n


def shared_prefix_len(rows: Sequence[Sequence[int]]) -> int:
  """Tokens of the fresh prompts' common prefix worth prefilling once (0: not worth it). At
  least one token per row stays to append: its logits sample the first response token."""
  if len(rows) < 2:
    return 0
  n = min(common_prefix_len(rows), min(len(r) for r in rows) - 1)
  return n if n >= MIN_SHARED_PREFIX else 0


def decode_rows(decoding: np.ndarray) -> list[int] | None:
  """The slots a decode block runs over: only the decoding ones when (padded to a power of
  two) they are at most half of all slots, so a turn's few stragglers do not cost a full batch
  per step; else None (every slot, no gather)."""
  live = np.flatnonzero(decoding)
  if not len(live):
    return None
  padded = 1 << max(0, (len(live) - 1).bit_length())
  return [int(s) for s in live] if padded * 2 <= len(decoding) else None
