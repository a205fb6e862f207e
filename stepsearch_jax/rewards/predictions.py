"""Prediction files and their EM/F1, so ours and the released evaluation read each other's.

Three shapes are read (one row per example; ``data_source`` optional):

1. jsonl ``{"response", "targets": [str] | str}`` (the rewards CLI's own input);
2. jsonl from ``evaluate`` (``predictions.jsonl``): ``{id, data_source, prompt, response,
   ground_truth: {"target": [str]}, prediction, em, f1, searches}``;
3. the released JSON array (``predictions/<timestamp>.json``, written by the released trainer's
   ``_validate`` and read by ``scripts/eval.py``): ``[{id, data_source, prompt, response,
   ground_truth: [str] | str}, ...]``. ``evaluate --released_json`` writes it too.

Two presets. Both take the last ``<answer>...</answer>``, apply the braces rule, use SQuAD
normalisation (punctuation deleted), EM = any gold equal, F1 = max over golds of token F1, both
unrounded, and a per-source mean. ``released`` is exactly what ``scripts/eval.py`` computes; our
default ``ours`` differs only where the released script gives a surprising result or crashes:

- no ``<answer>`` block: released reads the answer as ``""``, which EM-matches a gold that
  normalises to nothing (``"the"``, ``"."``, ``""``); ours gives EM = F1 = 0. (F1 is 0 in both.)
- empty gold list: released crashes (``max()`` of nothing); ours gives 0. ``released`` raises an
  error naming the line.
- a non-string gold: released crashes (``.lower()``); ours scores ``str(gold)``.
- ``data_source`` on some rows only: released crashes (KeyError); ours puts those rows under
  ``all``. With no ``data_source`` anywhere both report one ``all`` group.
- released only reads a JSON array (a jsonl file decodes as nothing and it prints zeros); both
  presets here read all three shapes and fail loudly on a bad file.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Iterator

from stepsearch_jax.rewards import text as text_lib

PRESETS = ("ours", "released")
_WS = re.compile(r"[ \t\n\r]*")


class PredictionError(ValueError):
  """A prediction row that cannot be scored; the message names file, line and field."""


def _fail(path, line, field, problem):
  raise PredictionError(f"{path}: line {line}: field '{field}': {problem}")


# --- writing (evaluate) -------------------------------------------------------------------------

def score_predictions(trajectories) -> list[dict]:
  """Per-example rows of ``predictions.jsonl`` (shape 2), scored with the ``ours`` preset."""
  out = []
  for t in trajectories:
    targets = list(t.ground_truth.get("target", []))
    pred = text_lib.eval_answer(t.response_text)
    e, f = em_f1(t.response_text, targets, "ours")
    out.append({"id": t.id, "data_source": t.data_source, "prompt": t.prompt_text,
                "response": t.response_text, "ground_truth": {"target": targets},
                "prediction": pred, "em": e, "f1": f, "searches": len(t.queries)})
  return out


def released_rows(rows: list[dict]) -> list[dict]:
  """Shape 3: the fields the released ``_validate`` writes, ground_truth as a plain list."""
  return [{"id": r["id"], "data_source": r["data_source"], "prompt": r["prompt"],
           "response": r["response"], "ground_truth": list(r["ground_truth"]["target"])}
          for r in rows]


def write_jsonl(rows: list[dict], path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  return path


def write_released_json(rows: list[dict], path: str) -> str:
  """The released file: one JSON array, ``indent=2``, non-ASCII kept, as ``_validate`` dumps it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(released_rows(rows), f, ensure_ascii=False, indent=2)
  return path


# --- reading ------------------------------------------------------------------------------------

def _array_items(text: str, path: str) -> Iterator[tuple[int, object]]:
  """(line, item) for each element of a JSON array, so errors can name the item's line."""
  try:
    json.loads(text)
  except json.JSONDecodeError as e:
    raise PredictionError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from e
  dec, line, seen = json.JSONDecoder(), 1, 0
  i = _WS.match(text, text.index("[") + 1).end()
  while text[i] != "]":
    line += text.count("\n", seen, i)
    seen = i
    obj, end = dec.raw_decode(text, i)
    yield line, obj
    i = _WS.match(text, end).end()
    if text[i] == ",":
      i = _WS.match(text, i + 1).end()


def _jsonl_items(text: str, path: str) -> Iterator[tuple[int, object]]:
  for line, chunk in enumerate(text.splitlines(), 1):
    if chunk.strip():
      try:
        yield line, json.loads(chunk)
      except json.JSONDecodeError as e:
        raise PredictionError(f"{path}: line {line}: not valid JSON ({e.msg})") from e


def read_predictions(path: str) -> Iterator[tuple[int, dict]]:
  """(line, row) from any of the three shapes (a file starting with ``[`` is a JSON array)."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  items = _array_items if text.lstrip().startswith("[") else _jsonl_items
  for line, row in items(text, path):
    if not isinstance(row, dict):
      _fail(path, line, "<row>", f"expected an object, got {type(row).__name__}")
    yield line, row


def golds_of(row: dict, path: str, line: int, preset: str = "ours") -> list:
  """The gold answers of a row in any shape; ``released`` rejects what would crash its script."""
  if "targets" in row:
    golds, field = row["targets"], "targets"
  elif isinstance(row.get("ground_truth"), dict):
    if "target" not in row["ground_truth"]:
      _fail(path, line, "ground_truth.target", "missing")
    golds, field = row["ground_truth"]["target"], "ground_truth.target"
  elif "ground_truth" in row:
    golds, field = row["ground_truth"], "ground_truth"
  else:
    _fail(path, line, "targets", "missing (need 'targets' or 'ground_truth')")
  if isinstance(golds, str):
    return [golds]
  if not isinstance(golds, list):
    _fail(path, line, field, f"must be a list or a string, got {type(golds).__name__}")
  if preset == "released" and not golds:
    _fail(path, line, field, "empty list (the released scripts/eval.py fails on it: max() of "
          "an empty sequence)")
  if preset == "released" and not all(isinstance(g, str) for g in golds):
    _fail(path, line, field, "non-string gold (the released scripts/eval.py fails on it)")
  return golds


# --- scoring ------------------------------------------------------------------------------------

_MISSING = object()


def em_f1(response: str, golds, preset: str = "ours") -> tuple[float, float]:
  """(EM, F1) of one response; the presets differ only for a response with no <answer> block."""
  if preset not in PRESETS:
    raise ValueError(f"preset {preset!r} is not one of {PRESETS}")
  pred = text_lib.eval_answer(response)
  if pred is None:
    if preset == "ours":
      return 0.0, 0.0
    pred = ""
  return text_lib.em(pred, golds), text_lib.f1(pred, golds)


def _sources(found: list[tuple[int, object]], path: str, preset: str) -> list[str]:
  """Group names; a missing data_source is ``all`` (``released``: only if missing everywhere)."""
  missing = [line for line, s in found if s is _MISSING]
  if preset == "released" and missing and len(missing) < len(found):
    _fail(path, missing[0], "data_source", "missing on this row but present on others (the "
          "released scripts/eval.py fails on such a file)")
  return ["all" if s is _MISSING else str(s) for _, s in found]


def eval_file(path: str, preset: str = "ours") -> tuple[list[dict], dict[str, dict]]:
  """Per-example ``{"em", "f1"}`` in file order and ``{source: {n, em, f1}}`` means."""
  scores, found = [], []
  for line, row in read_predictions(path):
    response = row.get("response")
    if not isinstance(response, str):
      _fail(path, line, "response", "missing or not a string")
    e, f = em_f1(response, golds_of(row, path, line, preset), preset)
    scores.append({"em": e, "f1": f})
    found.append((line, row.get("data_source", _MISSING)))
  sums = defaultdict(lambda: [0, 0.0, 0.0])
  for s, source in zip(scores, _sources(found, path, preset)):
    acc = sums[source]
    acc[0] += 1
    acc[1] += s["em"]
    acc[2] += s["f1"]
  return scores, {k: {"n": n, "em": e / n, "f1": f / n} for k, (n, e, f) in sorted(sums.items())}
