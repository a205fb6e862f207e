"""Per-search-step rewards: information gain against the gold paragraphs, and redundancy.

Parsing (method §3.5): every ``<search>.*?</search>\\s*<information>(.*?)</information>`` match
(DOTALL) is one retrieval step; its block is split on ``##>``, the first piece dropped, and each
other piece cut before the next ``<##`` and stripped. Because the label of the NEXT document sits
between one document's text and the next ``<##``, every document but the last keeps a trailing
``"\\nDoc k+1"``. The released code keeps that suffix (so its redundancy test only fires when a
passage comes back at the same rank); :func:`strip_doc_label` removes it for the `paper` preset.
"""

from __future__ import annotations

import re
from typing import Callable, Hashable, Sequence

import numpy as np

from stepsearch_jax.rewards.tfidf import GoldSet
from stepsearch_jax.texts import STEP_RE

_LABEL_SUFFIX = re.compile(r"\s*Doc \d+$")


def parse_step_docs(text: str) -> list[list[str]]:
  """Documents of each retrieval step, as the released reward extracts them (suffix kept)."""
  steps = []
  for m in STEP_RE.finditer(text):
    block = m.group(1).strip()
    steps.append([piece.split("<##")[0].strip() for piece in block.split("##>")[1:]])
  return steps


def strip_doc_label(doc: str) -> str:
  """Drop the trailing ``"\\nDoc k"`` label a parsed document carries from its successor."""
  return _LABEL_SUFFIX.sub("", doc) if "\n" in doc else doc


def information_gains(step_docs: Sequence[Sequence[str]], golds: Sequence[str],
                      normalize_fn: Callable[[str], str]) -> list[float]:
  """IG_t = mean_i max(c_i - m_i, 0), c = best cosine of this step's docs per gold, m = memory.

  Golds and docs are passed through `normalize_fn` first (the released code normalises both with
  the SQuAD normaliser before TF-IDF). Empty golds -> no steps are scored (returns []).
  """
  if not golds:
    return []
  gold_set = GoldSet([normalize_fn(g) for g in golds])
  sims = [np.stack([gold_set.cosine(normalize_fn(d)) for d in docs]) if docs else
          np.zeros((0, len(golds))) for docs in step_docs]
  return gains_from_similarities(sims)


def gains_from_similarities(sims_per_step: Sequence[np.ndarray]) -> list[float]:
  """The IG recursion of method §3.5 from per-step [docs, n_gold] cosine matrices."""
  gains = []
  memory = None
  for sims in sims_per_step:
    sims = np.asarray(sims, np.float64)
    n = sims.shape[1]
    if memory is None:
      memory = np.zeros(n)
    current = sims.max(0) if sims.shape[0] else np.zeros(n)
    current = np.maximum(current, 0.0)
    gains.append(float(np.sum(np.maximum(current - memory, 0.0)) / n))
    memory = np.maximum(memory, current)
  return gains


def redundancies(step_keys: Sequence[Sequence[Hashable]]) -> list[float]:
  """P_t = fraction of step t's documents already seen (earlier steps or earlier in this step).

  Keys are whatever identifies a document: the released preset passes the extracted strings (rank
  suffix included); the `paper` preset passes document ids or suffix-free texts.
  """
  seen: set = set()
  out = []
  for keys in step_keys:
    p = 0.0
    for k in keys:
      if k in seen:
        p += 1 / len(keys)
      else:
        seen.add(k)
    out.append(p)
  return out
