"""Convert FlashRAG / Search-R1 QA jsonl (nq, triviaqa, popqa, hotpotqa, 2wiki, musique, bamboogle).

Each input line is ``{"id", "question", "golden_answers": [str, ...]}`` (other fields, e.g.
``metadata``, are ignored), the shape Search-R1's ``qa_search_*.py`` scripts read. A row becomes a
record as those scripts build it: the question stripped and ended with ``?``, the prompt rendered
with our template, the golden answers as ``ground_truth.target``; there are no search keys or
support docs (these sets carry no step supervision). The data source comes from the file name:
the parent folder for ``test.jsonl`` / ``dev.jsonl`` / ``train.jsonl`` (``nq/test.jsonl`` -> nq),
else the stem before its last ``_`` (``hotpotqa_dev.jsonl`` -> hotpotqa), else the whole stem.
The id is ``<data_source>_<row id>`` because FlashRAG ids (``test_0``) repeat across data sets.

``load_records`` (and so ``evaluate --data`` and training) reads these files directly through
:func:`record_from_row`, the one converter. CLI::

  python -m stepsearch_jax.data.flashrag --in nq/test.jsonl,hotpotqa_dev.jsonl --out DIR \
      [--data_source NAME] [--template think|plan|brief|FILE]
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

from stepsearch_jax.data import templates
from stepsearch_jax.data.records import Record, RecordError, _read_rows, write_records

SPLITS = ("train", "dev", "test", "val", "validation")
RECORD_FIELDS = ("prompt", "reward_model")


def is_flashrag_row(row) -> bool:
  """A FlashRAG QA row: has ``golden_answers`` and none of the record fields."""
  return isinstance(row, dict) and "golden_answers" in row and not any(
      f in row for f in RECORD_FIELDS)


def source_and_split(path: str) -> tuple[str, str]:
  """(data_source, split) from a file name: ``nq/test.jsonl`` or ``hotpotqa_dev.jsonl``."""
  stem = os.path.basename(path).split(".")[0]
  if stem in SPLITS:
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or stem, stem
  head, sep, tail = stem.rpartition("_")
  if sep and head:
    return head, tail if tail in SPLITS else "test"
  return stem, "test"


def _fail(file, line, field, problem):
  raise RecordError(f"{file}: line {line}: field '{field}': {problem}")


def record_from_row(row, file: str, line: int, index: int, data_source: str | None = None,
                    template: str = "think") -> Record:
  """One FlashRAG row -> Record; a bad row raises RecordError naming file, line and field."""
  if not isinstance(row, dict):
    _fail(file, line, "<row>", f"expected an object, got {type(row).__name__}")
  question = row.get("question")
  if not isinstance(question, str) or not question.strip():
    _fail(file, line, "question", "missing or not a non-empty string")
  golds = row.get("golden_answers")
  if isinstance(golds, str):
    golds = [golds]
  if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
    _fail(file, line, "golden_answers", f"expected a non-empty list of strings, got "
          f"{str(golds)[:80]}")
  raw_id = row.get("id")
  if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
    _fail(file, line, "id", f"expected a string or integer, got {type(raw_id).__name__}")
  guessed_source, split = source_and_split(file)
  source = data_source or guessed_source
  q = templates.clean_question(question)
  rid = f"{source}_{raw_id}" if raw_id not in (None, "") else f"{source}_{split}_{index}"
  return Record(id=rid, data_source=source, question=q,
                prompt=[{"role": "user", "content": templates.make_prompt(q, template)}],
                targets=list(golds), search_keys=[], support_docs=[], split=split, index=index,
                extra={"source_id": raw_id, "source_line": line})


def convert_file(path: str, data_source: str | None = None, template: str = "think"
                 ) -> list[Record]:
  """All rows of one FlashRAG jsonl file as Records (blank lines skipped)."""
  return [record_from_row(row, path, line, i, data_source, template)
          for i, line, row in _read_rows(path)]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description="FlashRAG QA jsonl -> StepSearch record files.")
  p.add_argument("--in", dest="inp", required=True, nargs="+",
                 help="jsonl files (space- or comma-separated)")
  p.add_argument("--out", required=True, help="folder for <data_source>_<split>.parquet")
  p.add_argument("--data_source", default=None, help="override the name from the file name")
  p.add_argument("--template", default="think",
                 help=f"one of {sorted(templates.TEMPLATES)} or a template file")
  a = p.parse_args(argv)
  try:
    templates.make_prompt("x", a.template)  # a bad name fails once here, not on every row
  except ValueError as e:
    raise SystemExit(f"FATAL --template: {e}")
  groups = defaultdict(list)
  for path in [x for arg in a.inp for x in arg.split(",") if x.strip()]:
    if not os.path.exists(path):
      raise SystemExit(f"FATAL --in file {path} does not exist")
    try:
      recs = convert_file(path, a.data_source, a.template)
    except RecordError as e:
      raise SystemExit(f"FATAL {e}")
    for r in recs:
      groups[(r.data_source, r.split)].append(r)
  written = {write_records(rs, os.path.join(a.out, f"{s}_{sp}.parquet")): len(rs)
             for (s, sp), rs in sorted(groups.items())}
  print(json.dumps({"records": written}))


if __name__ == "__main__":
  main()
