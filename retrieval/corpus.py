"""Corpus files: JSONL, one passage per line, in either of the two formats StepSearch accepts.

- wiki-18 style `{"id", "contents": "\\"Title\\"\\ntext"}`
- MuSiQue style `{"id", "title", "content"}`

The server returns rows exactly as stored, so we keep each line's byte offset and read the raw
JSON back from a memory map instead of holding a parsed copy of a (possibly 14 GB) corpus in RAM.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from typing import Iterator

import numpy as np


class CorpusError(ValueError):
  """A malformed corpus line; the message names the file and the 1-based line number."""


def check_row(row, where: str) -> dict:
  if not isinstance(row, dict):
    raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
  if "id" not in row:
    raise CorpusError(f"{where}: missing field 'id'")
  if "contents" in row:
    if not isinstance(row["contents"], str):
      raise CorpusError(f"{where}: field 'contents' must be a string")
  elif "title" in row and "content" in row:
    for key in ("title", "content"):
      if not isinstance(row[key], str):
        raise CorpusError(f"{where}: field {key!r} must be a string")
  else:
    raise CorpusError(f"{where}: needs 'contents' or both 'title' and 'content' (has {sorted(row)})")
  return row


def passage_text(row: dict) -> str:
  """The text Search-R1's index builder encodes: `"Title"\\ntext` for both formats."""
  if "contents" in row:
    return row["contents"]
  return f'"{row["title"]}"\n{row["content"]}'


def iter_corpus(path: str) -> Iterator[tuple[int, int, dict]]:
  """Yields (byte offset, line number, row) per non-blank line; raises CorpusError on bad lines."""
  with open(path, "rb") as f:
    offset = 0
    for lineno, raw in enumerate(f, 1):
      start, offset = offset, offset + len(raw)
      if not raw.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        row = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise CorpusError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
      except json.JSONDecodeError as e:
        raise CorpusError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
      yield start, lineno, check_row(row, where)


def read_corpus(path: str) -> tuple[list[str], np.ndarray, str]:
  """Validate every line; returns (passage texts, line offsets [N+1] int64, sha256 of the file)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"corpus {path} does not exist")
  texts, offsets = [], []
  for off, _, row in iter_corpus(path):
    texts.append(passage_text(row))
    offsets.append(off)
  if not texts:
    raise CorpusError(f"{path}: corpus has no passages")
  offsets.append(os.path.getsize(path))
  return texts, np.asarray(offsets, np.int64), file_sha256(path)


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


class CorpusReader:
  """Random access to stored rows by index, as raw JSON bytes (exactly as in the file) or dicts.

  `offsets[i]` is where row i starts; its line ends at the next newline (blank lines are skipped
  at build time, so a row never spans to offsets[i+1] blindly).
  """

  def __init__(self, path: str, offsets: np.ndarray):
    self.path = path
    self.offsets = offsets
    size = os.path.getsize(path)
    if size != int(offsets[-1]):
      raise ValueError(f"corpus {path} has {size} bytes but the index was built on "
                       f"{int(offsets[-1])}: rebuild the index or pass the original corpus")
    self._file = open(path, "rb")
    self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def raw(self, i: int) -> bytes:
    start = int(self.offsets[i])
    end = self._mm.find(b"\n", start, int(self.offsets[i + 1]))
    return self._mm[start:end if end >= 0 else int(self.offsets[i + 1])].rstrip(b"\r")

  def row(self, i: int) -> dict:
    return json.loads(self.raw(i))

  def close(self) -> None:
    self._mm.close()
    self._file.close()
