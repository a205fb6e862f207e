"""Command line: score rollouts or evaluate predictions without any model.

  python -m stepsearch_jax.rewards score --preset released|paper --in rollouts.jsonl --out scores.jsonl
    input lines  {"response", "ground_truth": {"target", "search_keys"}, "support_docs": [...]}
                 (optional "step_doc_ids": [[id, ...], ...] for the paper preset)
    output lines {"format_ok", "answer_f1", "search_key_score", "step_scores", "final_score",
                  "step_rewards"} in input order
  python -m stepsearch_jax.rewards eval [--preset ours|released] --in PREDS --out per_example.jsonl
    input        jsonl {"response", "targets", "data_source"?}, evaluate's predictions.jsonl
                 (ground_truth: {"target"}), or the released JSON array (ground_truth: [...])
    output lines {"em", "f1"} in input order (last <answer>, braces rule, SQuAD normalisation,
                 unrounded); prints a markdown table of mean EM/F1 per data source.
    --preset released is exactly the released scripts/eval.py; `ours` (default) differs only on
    edge cases (no <answer> block, empty or non-string golds, partial data_source), listed in
    stepsearch_jax/rewards/predictions.py.
"""

from __future__ import annotations

import argparse
import json
import sys

from stepsearch_jax.rewards import predictions
from stepsearch_jax.rewards.score import RewardConfig, score


def _read_jsonl(path: str):
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: line {lineno}: not valid JSON ({e.msg})")


def _need(path, lineno, row, field, kind):
  if field not in row:
    raise SystemExit(f"{path}: line {lineno}: missing field '{field}'")
  if not isinstance(row[field], kind):
    raise SystemExit(f"{path}: line {lineno}: field '{field}' must be {kind.__name__}, got "
                     f"{type(row[field]).__name__}")
  return row[field]


def cmd_score(args) -> None:
  cfg = RewardConfig.preset(args.preset)
  with open(args.out, "w", encoding="utf-8") as out:
    for lineno, row in _read_jsonl(args.inp):
      response = _need(args.inp, lineno, row, "response", str)
      gt = _need(args.inp, lineno, row, "ground_truth", dict)
      if "target" not in gt:
        raise SystemExit(f"{args.inp}: line {lineno}: missing field 'ground_truth.target'")
      docs = row.get("support_docs") or []
      if not isinstance(docs, list) or any(not isinstance(d, dict) or "paragraph_text" not in d
                                           for d in docs):
        raise SystemExit(f"{args.inp}: line {lineno}: field 'support_docs' must be a list of "
                         "{title, paragraph_text} objects")
      result = score(response, gt, docs, cfg, step_doc_ids=row.get("step_doc_ids"))
      out.write(json.dumps(result.to_json()) + "\n")


def cmd_eval(args) -> None:
  try:
    scores, table = predictions.eval_file(args.inp, args.preset)
  except predictions.PredictionError as e:
    raise SystemExit(str(e))
  with open(args.out, "w", encoding="utf-8") as out:
    for s in scores:
      out.write(json.dumps(s) + "\n")
  print("| data_source | n | EM | F1 |\n| --- | --- | --- | --- |")
  for source, m in table.items():
    print(f"| {source} | {m['n']} | {m['em']:.4f} | {m['f1']:.4f} |")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m stepsearch_jax.rewards", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("score", help="score rollouts with a reward preset")
  s.add_argument("--preset", choices=["paper", "released"], default="paper")
  s.add_argument("--in", dest="inp", required=True)
  s.add_argument("--out", required=True)
  e = sub.add_parser("eval", help="EM/F1 of prediction files (ours, evaluate's, the released)")
  e.add_argument("--preset", choices=list(predictions.PRESETS), default="ours")
  e.add_argument("--in", dest="inp", required=True)
  e.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  {"score": cmd_score, "eval": cmd_eval}[args.cmd](args)


if __name__ == "__main__":
  main(sys.argv[1:])
