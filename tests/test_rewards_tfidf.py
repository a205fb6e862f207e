"""TF-IDF cosine: numpy reimplementation against sklearn's TfidfVectorizer (the oracle)."""

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity

from stepsearch_jax.rewards.tfidf import GoldSet, tfidf_cosine, tokenize


def sklearn_cos(x, golds):
  if x == "":
    return np.zeros(len(golds))
  m = TfidfVectorizer().fit_transform([x] + list(golds))
  return np.maximum(cosine_similarity(m[0], m[1:]).flatten(), 0)


WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa", "x",
         "Lambda", "MU", "nu", "café", "straße", "東京", "42", "a1", "b_2", "é"]


def rand_text(rng, n):
  return " ".join(rng.choice(WORDS) for _ in range(n)) + rng.choice(["", ".", "!", " ,"])


def test_matches_sklearn_on_random_texts():
  rng = np.random.default_rng(0)
  for _ in range(300):
    golds = [rand_text(rng, int(rng.integers(1, 30))) for _ in range(int(rng.integers(1, 5)))]
    x = rand_text(rng, int(rng.integers(1, 40)))
    try:
      want = sklearn_cos(x, golds)
    except ValueError:  # sklearn: empty vocabulary
      want = np.zeros(len(golds))
    got = tfidf_cosine(x, golds)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_goldset_reuse_equals_fresh_fit_and_identity():
  golds = ["the red house stood on the hill", "a blue boat sailed the bay", "nothing shared here"]
  gs = GoldSet(golds)
  for x in ["red house hill", "blue boat", "zzz qqq", golds[0]]:
    np.testing.assert_allclose(gs.cosine(x), sklearn_cos(x, golds), atol=1e-12)
  assert gs.cosine(golds[1])[1] == pytest.approx(1.0)


def test_edge_cases():
  assert tokenize("I a Be, ok!") == ["be", "ok"]          # single characters are dropped
  assert tfidf_cosine("", ["abc def"]).tolist() == [0.0]
  assert tfidf_cosine("x y z", ["abc def"]).tolist() == [0.0]  # no 2+ char token in x
  assert tfidf_cosine("abc", ["x", "abc"]).tolist() == pytest.approx([0.0, 1.0])
  assert tfidf_cosine("abc", []).shape == (0,)


def test_long_passage_matches_sklearn():
  rng = np.random.default_rng(1)
  golds = [rand_text(rng, 3000), rand_text(rng, 50)]
  x = rand_text(rng, 5000)
  np.testing.assert_allclose(tfidf_cosine(x, golds), sklearn_cos(x, golds), atol=1e-12)
