"""StepSearch records: the schema, parquet/jsonl loading with precise errors, and prompt rendering.

On disk a record has the released data script's shape (method §6)::

  {id, question, data_source, prompt: [{role, content}], ability,
   reward_model: {style, ground_truth: {target: [str], search_keys: [[str]]}},
   extra_info: {split, index, support_docs: [{title, paragraph_text}]}, extra: <json str>}

``id``, ``question`` and ``extra`` are ours and optional on input (the question is recovered from
the prompt, the id is built from data_source/split/index). A row that does not fit raises
:class:`RecordError` naming the file, the row index and the field, so a bad line in a 20k-row file
is found at once instead of as a KeyError deep in the reward code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from stepsearch_jax.data import templates


class RecordError(ValueError):
  """A row that does not match the record schema; the message names file, row and field."""


@dataclasses.dataclass
class Record:
  id: str
  data_source: str
  question: str
  prompt: list[dict]
  targets: list[str]
  search_keys: list[list[str]]
  support_docs: list[dict]
  split: str = ""
  index: int = 0
  extra: dict = dataclasses.field(default_factory=dict)

  @property
  def ground_truth(self) -> dict:
    """The reward's ground truth dict (method §3)."""
    return {"target": list(self.targets), "search_keys": [list(g) for g in self.search_keys]}

  def to_row(self) -> dict:
    return {
        "id": self.id, "question": self.question, "data_source": self.data_source,
        "prompt": [dict(role=m["role"], content=m["content"]) for m in self.prompt],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": self.ground_truth},
        "extra_info": {"split": self.split, "index": int(self.index),
                       "support_docs": [dict(title=d.get("title", ""),
                                             paragraph_text=d["paragraph_text"])
                                        for d in self.support_docs]},
        "extra": json.dumps(self.extra, ensure_ascii=False),
    }


def _schema():
  import pyarrow as pa
  doc = pa.struct([("title", pa.string()), ("paragraph_text", pa.string())])
  return pa.schema([
      ("id", pa.string()), ("question", pa.string()), ("data_source", pa.string()),
      ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
      ("ability", pa.string()),
      ("reward_model", pa.struct([
          ("style", pa.string()),
          ("ground_truth", pa.struct([("target", pa.list_(pa.string())),
                                      ("search_keys", pa.list_(pa.list_(pa.string())))]))])),
      ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64()),
                                ("support_docs", pa.list_(doc))])),
      ("extra", pa.string()),
  ])


def write_records(records: Sequence[Record], path: str) -> str:
  """Write records as parquet (``.parquet``) or jsonl (anything else); returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  rows = [r.to_row() for r in records]
  if path.endswith(".parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), path)
  else:
    with open(path, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return path


def _fail(file, row, field, problem):
  raise RecordError(f"{file}: row {row}: field '{field}': {problem}")


def _str_list(value, file, row, field, allow_str=True) -> list[str]:
  if isinstance(value, str) and allow_str:
    return [value]
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
    _fail(file, row, field, f"expected a list of strings, got {type(value).__name__}: "
          f"{str(value)[:80]}")
  return list(value)


def record_from_row(row: Any, file: str = "<row>", index: int = 0) -> Record:
  """Validate one on-disk row and return a :class:`Record`."""
  if not isinstance(row, dict):
    _fail(file, index, "<row>", f"expected an object, got {type(row).__name__}")
  source = row.get("data_source")
  if not isinstance(source, str) or not source:
    _fail(file, index, "data_source", "missing or not a non-empty string")
  prompt = row.get("prompt")
  if (not isinstance(prompt, list) or not prompt or
      not all(isinstance(m, dict) and isinstance(m.get("role"), str) and
              isinstance(m.get("content"), str) for m in prompt)):
    _fail(file, index, "prompt", "expected a non-empty list of {role, content} messages")
  rm = row.get("reward_model")
  if not isinstance(rm, dict) or not isinstance(rm.get("ground_truth"), dict):
    _fail(file, index, "reward_model.ground_truth", "missing or not an object")
  gt = rm["ground_truth"]
  if "target" not in gt or gt["target"] is None:
    _fail(file, index, "reward_model.ground_truth.target", "missing")
  targets = _str_list(gt["target"], file, index, "reward_model.ground_truth.target")
  if not targets:
    _fail(file, index, "reward_model.ground_truth.target", "empty list of answers")
  raw_keys = gt.get("search_keys") or []
  if not isinstance(raw_keys, (list, tuple)):
    _fail(file, index, "reward_model.ground_truth.search_keys", "expected a list of key groups")
  keys = [_str_list(g, file, index, f"reward_model.ground_truth.search_keys[{k}]")
          for k, g in enumerate(raw_keys)]
  extra_info = row.get("extra_info") or {}
  if not isinstance(extra_info, dict):
    _fail(file, index, "extra_info", "expected an object")
  split = extra_info.get("split") or ""
  if not isinstance(split, str):
    _fail(file, index, "extra_info.split", "expected a string")
  rec_index = extra_info.get("index", index)
  if isinstance(rec_index, bool) or not isinstance(rec_index, int):
    _fail(file, index, "extra_info.index", f"expected an integer, got {rec_index!r}")
  docs = []
  for k, d in enumerate(extra_info.get("support_docs") or []):
    if not isinstance(d, dict) or not isinstance(d.get("paragraph_text"), str):
      _fail(file, index, f"extra_info.support_docs[{k}].paragraph_text", "missing or not a string")
    title = d.get("title") or ""
    if not isinstance(title, str):
      _fail(file, index, f"extra_info.support_docs[{k}].title", "expected a string")
    docs.append({"title": title, "paragraph_text": d["paragraph_text"]})
  question = row.get("question")
  if question is None:
    question = templates.question_from_prompt(prompt[-1]["content"]) or prompt[-1]["content"]
  if not isinstance(question, str):
    _fail(file, index, "question", "expected a string")
  extra = row.get("extra") or {}
  if isinstance(extra, str):
    try:
      extra = json.loads(extra)
    except json.JSONDecodeError as e:
      _fail(file, index, "extra", f"not valid JSON ({e.msg})")
  rid = row.get("id") or f"{source}_{split or 'data'}_{rec_index}"
  return Record(id=str(rid), data_source=source, question=question, prompt=prompt,
                targets=targets, search_keys=keys, support_docs=docs, split=split,
                index=rec_index, extra=extra if isinstance(extra, dict) else {"value": extra})


def _read_rows(path: str):
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq
    try:
      table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for bad files
      raise RecordError(f"{path}: cannot read parquet ({e})") from e
    for i, row in enumerate(table.to_pylist()):
      yield i, None, row
    return
  with open(path, encoding="utf-8") as f:
    row = 0
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise RecordError(f"{path}: row {row} (line {lineno}): not valid JSON ({e.msg})") from e
      yield row, lineno, obj
      row += 1


def load_records(paths: str | Sequence[str], template: str = "think") -> list[Record]:
  """Load parquet/jsonl files (a list, or one comma-separated string) into validated Records.

  A file whose first row is FlashRAG QA (``golden_answers``, no record fields) is converted by
  :func:`stepsearch_jax.data.flashrag.record_from_row` with `template`, so the released QA sets
  can be evaluated without a conversion step.
  """
  from stepsearch_jax.data import flashrag
  if isinstance(paths, str):
    paths = [p for p in paths.split(",") if p.strip()]
  out = []
  for path in paths:
    path = path.strip()
    if not os.path.exists(path):
      raise RecordError(f"{path}: no such file")
    flash = None  # the first row decides the file's kind, so a bad row gets the right error
    for i, lineno, row in _read_rows(path):
      flash = flashrag.is_flashrag_row(row) if flash is None else flash
      out.append(flashrag.record_from_row(row, path, lineno or i + 1, i, template=template)
                 if flash else record_from_row(row, path, i))
  return out


def render_prompt(tokenizer, record_or_question: Record | str, template: str | None = "think"
                  ) -> str:
  """Prompt text: the template (None = the record's stored prompt), then the chat template.

  As in the released dataset code the prompt is one user message with
  ``add_generation_prompt=True``; a tokenizer without a chat template gets the plain user text
  (`texts.chat`, the rollouts' rendering).
  """
  if isinstance(record_or_question, Record):
    if template is None:
      messages = [dict(m) for m in record_or_question.prompt]
    else:
      messages = [{"role": "user",
                   "content": templates.make_prompt(record_or_question.question, template)}]
  else:
    messages = [{"role": "user",
                 "content": templates.make_prompt(record_or_question, template or "think")}]
  from stepsearch_jax.texts import chat
  return chat(messages, tokenizer)
