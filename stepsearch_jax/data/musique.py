"""Convert MuSiQue to StepSearch records plus a passage corpus.

Two inputs are accepted, row by row:

- raw MuSiQue (``question, answer, answer_aliases, question_decomposition, paragraphs``): search
  keys come from the decomposition's sub-questions with each ``#k`` replaced by sub-answer k (the
  ``"X >> relation"`` form also gets ``"X relation"`` and ``"relation of X"``); support docs are the
  ``is_supporting`` paragraphs in decomposition order; every paragraph goes into the corpus.
  Unanswerable rows (``answerable: false``) are skipped.
- the released ``musi_answerable_*.jsonl`` (``question, final_answer, answer_aliases,
  sub_searchs, sub_support_docs``): taken as they are (method §6); the corpus gets the support
  docs (the full ``musi.jsonl`` corpus is released separately).

As in the released data script, the test split has no search keys or support docs unless
``--keep_gold`` is given. CLI::

  python -m stepsearch_jax.data.musique --in raw.jsonl --out DIR [--split train|test]
"""

from __future__ import annotations

import argparse
import json
import os
import re

from stepsearch_jax.data import templates
from stepsearch_jax.data.records import Record, RecordError, write_records


def _fail(file, row, field, problem):
  raise RecordError(f"{file}: row {row}: field '{field}': {problem}")


def _need_str(row, field, file, idx):
  v = row.get(field)
  if not isinstance(v, str) or not v.strip():
    _fail(file, idx, field, "missing or not a non-empty string")
  return v


def _aliases(row, file, idx):
  aliases = row.get("answer_aliases") or []
  if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
    _fail(file, idx, "answer_aliases", "expected a list of strings")
  return aliases


def _dedupe(items):
  seen, out = set(), []
  for x in items:
    if x not in seen:
      seen.add(x)
      out.append(x)
  return out


def _substitute(question: str, answers: dict[int, str]) -> str:
  return re.sub(r"#(\d+)", lambda m: answers.get(int(m.group(1)), m.group(0)), question).strip()


def _key_group(subq: str) -> list[str]:
  if ">>" in subq:
    left, _, rel = subq.partition(">>")
    left, rel = left.strip(), rel.strip()
    return _dedupe([f"{left} {rel}", f"{rel} of {left}", subq])
  return [subq]


def convert_raw(row: dict, file: str, idx: int):
  """Raw MuSiQue row -> (question, targets, search_keys, support_docs, paragraphs)."""
  question = _need_str(row, "question", file, idx)
  answer = _need_str(row, "answer", file, idx)
  decomp = row.get("question_decomposition")
  if not isinstance(decomp, list) or not decomp:
    _fail(file, idx, "question_decomposition", "expected a non-empty list of sub-questions")
  paragraphs = row.get("paragraphs")
  if not isinstance(paragraphs, list) or not paragraphs:
    _fail(file, idx, "paragraphs", "expected a non-empty list")
  for k, p in enumerate(paragraphs):
    if not isinstance(p, dict) or not isinstance(p.get("paragraph_text"), str):
      _fail(file, idx, f"paragraphs[{k}].paragraph_text", "missing or not a string")
    if not isinstance(p.get("title", ""), str):
      _fail(file, idx, f"paragraphs[{k}].title", "expected a string")
  answers, keys, order = {}, [], []
  for k, step in enumerate(decomp, 1):
    if not isinstance(step, dict) or not isinstance(step.get("question"), str):
      _fail(file, idx, f"question_decomposition[{k - 1}].question", "missing or not a string")
    keys.append(_key_group(_substitute(step["question"], answers)))
    answers[k] = str(step.get("answer", f"#{k}"))
    support = step.get("paragraph_support_idx")
    if isinstance(support, int):
      order.append(support)
  by_idx = {p.get("idx", k): p for k, p in enumerate(paragraphs)}
  supporting = [by_idx[i] for i in order if i in by_idx and by_idx[i].get("is_supporting", True)]
  supporting += [p for p in paragraphs if p.get("is_supporting") and p not in supporting]
  docs = [{"title": p.get("title", ""), "paragraph_text": p["paragraph_text"]} for p in supporting]
  targets = _dedupe([answer] + _aliases(row, file, idx))
  return question, targets, keys, docs, paragraphs


def convert_released(row: dict, file: str, idx: int):
  """musi_answerable_*.jsonl row -> (question, targets, search_keys, support_docs, paragraphs)."""
  question = _need_str(row, "question", file, idx)
  answer = _need_str(row, "final_answer", file, idx)
  subs = row.get("sub_searchs") or []
  if not isinstance(subs, list) or not all(
      isinstance(g, list) and all(isinstance(s, str) for s in g) for g in subs):
    _fail(file, idx, "sub_searchs", "expected a list of lists of query strings")
  docs = row.get("sub_support_docs") or []
  if not isinstance(docs, list):
    _fail(file, idx, "sub_support_docs", "expected a list")
  for k, d in enumerate(docs):
    if not isinstance(d, dict) or not isinstance(d.get("paragraph_text"), str):
      _fail(file, idx, f"sub_support_docs[{k}].paragraph_text", "missing or not a string")
  docs = [{"title": d.get("title") or "", "paragraph_text": d["paragraph_text"]} for d in docs]
  targets = _dedupe([answer] + _aliases(row, file, idx))
  return question, targets, [list(g) for g in subs], docs, docs


def convert_file(path: str, split: str = "train", keep_gold: bool = False, template: str = "think",
                 data_source: str | None = None) -> tuple[list[Record], list[dict]]:
  """Read one jsonl file; return (records, corpus rows {id, title, content})."""
  records, corpus, seen = [], [], {}
  skipped = 0
  with open(path, encoding="utf-8") as f:
    lines = [l for l in f if l.strip()]
  for idx, line in enumerate(lines):
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise RecordError(f"{path}: row {idx}: not valid JSON ({e.msg})") from e
    if not isinstance(row, dict):
      raise RecordError(f"{path}: row {idx}: expected a JSON object")
    if "final_answer" in row or "sub_searchs" in row:
      q, targets, keys, docs, paragraphs = convert_released(row, path, idx)
      source = data_source or "musi"
    elif "question_decomposition" in row or "paragraphs" in row:
      if row.get("answerable") is False:
        skipped += 1
        continue
      q, targets, keys, docs, paragraphs = convert_raw(row, path, idx)
      source = data_source or "musique"
    else:
      raise RecordError(f"{path}: row {idx}: field 'question_decomposition' or 'sub_searchs': "
                        "neither raw MuSiQue nor released musi_answerable fields")
    for p in paragraphs:
      key = (p.get("title", ""), p["paragraph_text"])
      if key not in seen:
        seen[key] = len(corpus)
        corpus.append({"id": f"musique-{len(corpus)}", "title": key[0], "content": key[1]})
    if split == "test" and not keep_gold:
      keys, docs = [], []
    n = len(records)
    q = templates.clean_question(q)
    records.append(Record(
        id=str(row.get("id") or f"{source}_{split}_{n}"), data_source=source, question=q,
        prompt=[{"role": "user", "content": templates.make_prompt(q, template)}], targets=targets,
        search_keys=keys, support_docs=docs, split=split, index=n,
        extra={"source_row": idx}))
  return records, corpus


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description="MuSiQue jsonl -> StepSearch records + corpus.")
  p.add_argument("--in", dest="inp", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--split", default="train", choices=["train", "test"])
  p.add_argument("--keep_gold", action="store_true", help="keep search keys/support docs in test")
  p.add_argument("--template", default="think", choices=sorted(templates.TEMPLATES))
  p.add_argument("--data_source", default=None)
  a = p.parse_args(argv)
  records, corpus = convert_file(a.inp, a.split, a.keep_gold, a.template, a.data_source)
  os.makedirs(a.out, exist_ok=True)
  path = write_records(records, os.path.join(a.out, f"{a.split}.parquet"))
  corpus_path = os.path.join(a.out, "corpus.jsonl")
  with open(corpus_path, "w", encoding="utf-8") as f:
    for row in corpus:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  print(json.dumps({"records": path, "num_records": len(records), "corpus": corpus_path,
                    "passages": len(corpus)}))


if __name__ == "__main__":
  main()
