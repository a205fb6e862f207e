"""The `released` preset against an independent restatement of the released reward with sklearn.

The oracle below follows method §3 step by step with sklearn's TfidfVectorizer and torch's
in-place float32 row arithmetic; it is compared value for value with score(..., 'released') on
synthetic trajectories of every quality (perfect, flawed, format failures, warnings).
"""

import random
import re
import string
from collections import Counter

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity

from stepsearch_jax.data import synthetic
from stepsearch_jax.rewards import score, token_rewards


def o_norm(s):
  s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
  return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def o_f1(pred, golds):
  if pred is None:
    return 0.0
  golds = [golds] if isinstance(golds, str) else golds
  p = o_norm(pred).split()
  best = 0.0
  for g in golds:
    g = o_norm(g).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common:
      pr, rc = common / len(p), common / len(g)
      best = max(best, 2 * pr * rc / (pr + rc))
  return round(best, 4)


def o_cos(x, golds):
  if x == "":
    return [0.0] * len(golds)
  m = TfidfVectorizer().fit_transform([x] + golds)
  return np.maximum(cosine_similarity(m[0], m[1:]).flatten(), 0)


def oracle(text, gt, support):
  answers = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
  answer = answers[-1].strip() if answers else None
  a = o_f1(answer, gt["target"])
  last = list(re.finditer(r"<answer>.*?</answer>", text, re.DOTALL))
  if not last or text[last[-1].end():].strip():
    return -1, [], 0.0
  infos = [[p.split("<##")[0].strip() for p in m.group(1).strip().split("##>")[1:]]
           for m in re.finditer(r"<search>.*?</search>\s*<information>(.*?)</information>", text,
                                re.DOTALL)]
  steps = []
  if support:
    golds = [o_norm(d["paragraph_text"]) for d in support]
    prev = [0.0] * len(golds)
    gains = []
    for docs in infos:
      cur = [0.0] * len(golds)
      for d in docs:
        for i, s in enumerate(o_cos(o_norm(d), golds)):
          cur[i] = max(cur[i], s)
      gains.append(sum(max(cur[i] - prev[i], 0) for i in range(len(golds))) / len(golds))
      prev = [max(c, p) for c, p in zip(cur, prev)]
    pen, seen = [0.0] * len(infos), set()
    for t, docs in enumerate(infos):
      for d in docs:
        if d in seen:
          pen[t] += 1 / len(docs)
        else:
          seen.add(d)
    steps = [g - p for g, p in zip(gains, pen)]
  searches = [re.sub(r"</?search>", "", m).strip()
              for m in re.findall(r"<search>.*?</search>", text, re.DOTALL)]
  keys = [list(k) for k in gt.get("search_keys", [])]
  k = 0.0
  if searches and keys:
    matched = {i: 0 for i in range(len(keys))}
    for q in searches:
      best, g = 0, -1
      for i, group in enumerate(keys):
        s = o_f1(q, group)
        if s > best:
          best, g = s, i
      matched[g] = best
    k = sum(matched.values()) / len(keys)
  return a + 0.618 * k, steps, k


def trajectories(n=60):
  world = synthetic.build_world(seed=3, num_people=60)
  records = synthetic.make_records(world, n, 2, 4, seed=3)
  rng = random.Random(5)
  out = []
  for rec in records:
    quality = rng.choice([1.0, 0.6, 0.2])
    turns = synthetic.demonstration(rec, world, quality, rng)
    text, _ = synthetic.render_demonstration(turns, world.search)
    roll = rng.random()
    if roll < 0.15:
      text += " trailing text"                       # fails the gate
    elif roll < 0.3:
      text = text.replace("</search>", "</search>\n<warning> put the query between <search> and "
                          "</search> </warning>\n", 1)
    out.append((text, rec.ground_truth, rec.support_docs))
  return out


def test_released_preset_matches_oracle():
  torch = pytest.importorskip("torch")
  cases = trajectories()
  assert any(not t.rstrip().endswith("</answer>") for t, _, _ in cases)
  for text, gt, support in cases:
    want_final, want_steps, want_k = oracle(text, gt, support)
    r = score(text, gt, support, "released")
    assert r.final_score == pytest.approx(want_final, abs=1e-12)
    assert r.search_key_score == pytest.approx(want_k, abs=1e-12)
    assert r.step_scores == pytest.approx(want_steps, abs=1e-12)
    row = torch.zeros(len(want_steps) + 1, dtype=torch.float32)
    for i, s in enumerate(want_steps):
      row[i] = s
    row += 0.6 * row
    row[-1] = want_final
    got = token_rewards(r, list(range(len(r.step_scores))), len(want_steps) + 1)
    np.testing.assert_allclose(got, row.numpy(), rtol=0, atol=2e-7)
