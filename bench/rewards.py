"""Reward scoring cost on 512 synthetic trajectories (goal: < 1 s per 100 trajectories).

Builds a synthetic world, renders 512 demonstration trajectories of mixed quality (perfect,
flawed, some failing the format gate) with the world's lexical retriever, then times score() for
both presets and, side by side in the same run, the same TF-IDF cosines computed by refitting
sklearn's TfidfVectorizer per document (as the released code does). Writes
bench/results/rewards.json and prints it.

  .venv/bin/python bench/rewards.py [--n 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stepsearch_jax.data import synthetic  # noqa: E402
from stepsearch_jax.rewards import score, steps, text  # noqa: E402
from stepsearch_jax.rewards.tfidf import GoldSet  # noqa: E402


def make_trajectories(n: int, seed: int = 0):
  world = synthetic.build_world(seed=seed, num_people=200)
  records = synthetic.make_records(world, n, 2, 4, seed=seed)
  rng = random.Random(seed)
  out = []
  for rec in records:
    turns = synthetic.demonstration(rec, world, rng.choice([1.0, 0.7, 0.3]), rng)
    response, _ = synthetic.render_demonstration(turns, world.search)
    if rng.random() < 0.1:
      response += " and then"          # format failure
    out.append((response, rec.ground_truth, rec.support_docs))
  return out


def best_of(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "rewards.json"))
  args = ap.parse_args()
  trajs = make_trajectories(args.n)
  result = {"trajectories": len(trajs), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
  for preset in ("paper", "released"):
    t = best_of(lambda: [score(r, gt, sd, preset) for r, gt, sd in trajs], args.repeats)
    result[f"{preset}_seconds"] = round(t, 4)
    result[f"{preset}_seconds_per_100"] = round(t * 100 / len(trajs), 4)

  # Side by side: the TF-IDF part alone, ours vs refitting sklearn per document.
  from sklearn.feature_extraction.text import TfidfVectorizer
  from sklearn.metrics.pairwise import cosine_similarity
  pairs = []
  for r, _, sd in trajs[:128]:
    golds = [text.normalize(d["paragraph_text"]) for d in sd]
    docs = [text.normalize(d) for st in steps.parse_step_docs(r) for d in st]
    pairs.append((golds, docs))

  def ours():
    for golds, docs in pairs:
      gs = GoldSet(golds)
      for d in docs:
        gs.cosine(d)

  def sk():
    for golds, docs in pairs:
      for d in docs:
        m = TfidfVectorizer().fit_transform([d] + golds)
        cosine_similarity(m[0], m[1:])

  n_docs = sum(len(d) for _, d in pairs)
  t_ours, t_sk = best_of(ours, args.repeats), best_of(sk, 1)
  result.update(tfidf_docs=n_docs, tfidf_numpy_seconds=round(t_ours, 4),
                tfidf_sklearn_refit_seconds=round(t_sk, 4),
                tfidf_speedup_vs_sklearn=round(t_sk / t_ours, 1),
                goal_seconds_per_100=1.0,
                goal_met=max(result["paper_seconds_per_100"], result["released_seconds_per_100"]) < 1)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
