"""TF-IDF cosine of one text against a fixed set of gold paragraphs, as sklearn computes it.

The released reward (``submodule.subm_tfidf_cosine``) fits a FRESH ``TfidfVectorizer()`` on
``[x] + golds`` for every retrieved document x and returns ``max(cos(x, g_i), 0)``. With sklearn's
defaults that is: lowercase, tokens ``(?u)\\b\\w\\w+\\b``, raw counts, smooth idf
``ln((1+N)/(1+df)) + 1`` with N = len(golds) + 1, L2-normalised rows.

Refitting sklearn per document costs ~1 ms of Python overhead each; here the golds are tokenised
and counted once (:class:`GoldSet`) and each query only adds its own terms' document frequency, so
the cost per document is a handful of small numpy operations. sklearn is the oracle in the tests
(agreement to 1e-12 on random texts). One deliberate difference: when no text has a token of two or
more characters sklearn raises "empty vocabulary"; this returns zeros.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import numpy as np

_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def tokenize(text: str) -> list[str]:
  """sklearn's default analyzer: lowercase, then words of 2+ word characters."""
  return _TOKEN.findall(text.lower())


class GoldSet:
  """Gold paragraphs pre-counted once; :meth:`cosine` scores one text against all of them."""

  def __init__(self, golds: Sequence[str]):
    self.n = len(golds)
    counts = [Counter(tokenize(g)) for g in golds]
    self.vocab: dict[str, int] = {}
    for c in counts:
      for term in c:
        self.vocab.setdefault(term, len(self.vocab))
    self.tf = np.zeros((self.n, len(self.vocab)), np.float64)
    for i, c in enumerate(counts):
      for term, k in c.items():
        self.tf[i, self.vocab[term]] = k
    self.df = (self.tf > 0).sum(0).astype(np.float64)

  def cosine(self, text: str) -> np.ndarray:
    """[n] float64: max(cos(tfidf(text), tfidf(gold_i)), 0) with the vectorizer fit on [text]+golds."""
    out = np.zeros(self.n, np.float64)
    if self.n == 0 or text == "":
      return out
    x_counts = Counter(tokenize(text))
    if not x_counts:
      return out
    n_docs = self.n + 1 + 1  # smooth_idf adds one document that contains every term
    shared_idx, shared_tf, own_tf = [], [], []
    for term, k in x_counts.items():
      j = self.vocab.get(term)
      if j is None:
        own_tf.append(k)
      else:
        shared_idx.append(j)
        shared_tf.append(k)
    df = self.df.copy()
    if shared_idx:
      df[shared_idx] += 1.0
    idf = np.log(n_docs / (df + 1.0)) + 1.0
    weights = self.tf * idf                                   # [n, V] gold rows
    gold_norm = np.sqrt(np.einsum("ij,ij->i", weights, weights))
    own_idf = np.log(n_docs / 2.0) + 1.0                      # df = 1: only x has the term
    x_shared = np.asarray(shared_tf, np.float64) * idf[shared_idx]
    x_norm = np.sqrt(np.sum(x_shared ** 2) + np.sum((np.asarray(own_tf, np.float64) * own_idf) ** 2))
    if not shared_idx or x_norm == 0.0:
      return out
    dots = weights[:, shared_idx] @ x_shared
    with np.errstate(invalid="ignore", divide="ignore"):
      cos = np.where(gold_norm > 0, dots / (gold_norm * x_norm), 0.0)
    return np.maximum(cos, 0.0)


def tfidf_cosine(text: str, golds: Sequence[str]) -> np.ndarray:
  """One-shot form of :meth:`GoldSet.cosine` (method §3.5's ``tfidf_cos(x, G)``)."""
  return GoldSet(golds).cosine(text)
