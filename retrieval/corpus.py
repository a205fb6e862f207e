"""Corpus files: JSONL, one passage per line, in either of the two formats StepSearch accepts.

- wiki-18 style `{"id", "contents": "\\"Title\\"\\ntext"}`
- MuSiQue style `{"id", "title", "content"}`

The server returns rows exactly as stored, so we keep each line's byte offset and read the raw
JSON back by offset (pread) instead of holding a parsed copy of a (possibly 14 GB) corpus in RAM.

For corpora served beside a prebuilt FAISS index (no index directory), `offsets_table` finds the
row offsets with one numpy pass over the file's bytes (no JSON parsing: wiki-18 has 21M lines) and
keeps them in `FILE.offsets.npy` beside the corpus, keyed by its size and mtime. Rows are then
validated lazily, the first time each is served.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import time
from typing import Callable, Iterator

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
      yield start, lineno, check_line(raw, f"{path}:{lineno}")


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
  """Random access to stored rows by index, as raw JSON bytes (exactly as in the file) or dicts,
  read with one pread each: nothing of the corpus is held in Python objects or mapped into RSS.

  `offsets[i]` is where row i starts; its line ends at the next newline (blank lines are skipped
  when offsets are made, so a row never spans to offsets[i+1] blindly). `validated=False` (corpora
  nobody parsed up front) makes `document` parse each row once before it is served.
  """

  def __init__(self, path: str, offsets: np.ndarray, validated: bool = True):
    self.path = path
    self.offsets = offsets
    size = os.path.getsize(path)
    if size != int(offsets[-1]):
      raise ValueError(f"corpus {path} has {size} bytes but the index was built on "
                       f"{int(offsets[-1])}: rebuild the index or pass the original corpus")
    self._file = open(path, "rb")
    self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)   # for line numbers
    self._ok = None if validated else np.zeros(len(self), bool)   # 1 byte/row: 21 MB for wiki-18

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def raw(self, i: int) -> bytes:
    # pread, not a slice of the mmap: a page fault maps its cached neighbours too (fault-around),
    # so 3000 random rows put a whole 200 MB corpus into the server's RSS; pread adds nothing.
    start = int(self.offsets[i])
    data = os.pread(self._file.fileno(), int(self.offsets[i + 1]) - start, start)
    end = data.find(b"\n")
    return (data if end < 0 else data[:end]).rstrip(b"\r")

  def row(self, i: int) -> dict:
    return json.loads(self.raw(i))

  def document(self, i: int) -> bytes:
    """raw(i), checked to be a valid row the first time; a bad one raises CorpusError naming
    the file and line (the server turns it into a 500 instead of sending broken JSON)."""
    raw = self.raw(i)
    if self._ok is not None and not self._ok[i]:
      try:
        check_line(raw, "")
      except CorpusError as e:     # the line number costs a scan of the file up to the row
        raise CorpusError(f"{self.path}:{self.line_number(i)}{e}") from None
      self._ok[i] = True
    return raw

  def line_number(self, i: int) -> int:
    """1-based line of row i (rows skip blank lines): counts newlines before it, for errors."""
    return _count_newlines(self._mm, int(self.offsets[i])) + 1

  def close(self) -> None:
    self._mm.close()
    self._file.close()


def check_line(raw: bytes, where: str) -> dict:
  try:
    row = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise CorpusError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise CorpusError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
  return check_row(row, where)


# ---- Offset tables for big corpora (no JSON parsing, one pass, cached beside the corpus) ----

_BLOCK = 1 << 26                       # 64 MiB of the mmap compared per numpy call
_WS = np.frombuffer(b" \t\n\r\x0b\x0c", np.uint8)   # what bytes.strip() strips
TABLE_MAGIC, TABLE_VERSION, TABLE_HEADER = 0x53544A4F46465331, 1, 5


def _count_newlines(mm, end: int) -> int:
  buf = np.frombuffer(mm, np.uint8, count=end)
  try:
    return sum(int(np.count_nonzero(buf[lo:lo + _BLOCK] == 10)) for lo in range(0, end, _BLOCK))
  finally:
    del buf                            # release the export, or mm.close() raises BufferError


def scan_offsets(path: str) -> np.ndarray:
  """Offsets [N+1] int64 of the non-blank lines (+ file size), as read_corpus would give.

  Newlines are found with numpy on a memory map; only lines starting with a whitespace byte (rare:
  blank lines, CRLF blank lines) are looked at in Python to see whether they are blank.
  """
  size = os.path.getsize(path)
  if size == 0:
    raise CorpusError(f"{path}: corpus has no passages")
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
    buf = np.frombuffer(mm, np.uint8)
    try:
      parts = [np.zeros(1, np.int64)]
      for lo in range(0, size, _BLOCK):
        parts.append(np.flatnonzero(buf[lo:lo + _BLOCK] == 10).astype(np.int64) + (lo + 1))
      starts = np.concatenate(parts)
      starts = starts[starts < size]
      ends = np.append(starts[1:], size)
      keep = np.ones(len(starts), bool)
      for j in np.flatnonzero(np.isin(buf[starts], _WS)):
        keep[j] = bool(mm[int(starts[j]):int(ends[j])].strip())
    finally:
      del buf
  if not keep.any():
    raise CorpusError(f"{path}: corpus has no passages")
  return np.append(starts[keep], size)


def _cache_table_path(corpus: str, cache_dir: str | None) -> str:
  base = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                   os.path.join(os.path.expanduser("~"), ".cache"),
                                   "stepsearch_jax", "corpus_offsets")
  key = hashlib.sha1(os.path.abspath(corpus).encode()).hexdigest()[:12]
  return os.path.join(base, f"{os.path.basename(corpus)}-{key}.offsets.npy")


def _load_table(table: str, size: int, mtime_ns: int) -> np.ndarray | None:
  """The offsets in `table` if it was made from a corpus of this size and mtime, else None."""
  try:
    arr = np.load(table, mmap_mode="r")
  except (OSError, ValueError):
    return None
  head = [int(x) for x in arr[:TABLE_HEADER]] if arr.ndim == 1 and len(arr) > TABLE_HEADER else []
  if head != [TABLE_MAGIC, TABLE_VERSION, size, mtime_ns, len(arr) - TABLE_HEADER - 1]:
    return None
  offsets = arr[TABLE_HEADER:]
  return offsets if int(offsets[-1]) == size else None


def _save_table(table: str, offsets: np.ndarray, size: int, mtime_ns: int) -> None:
  os.makedirs(os.path.dirname(table) or ".", exist_ok=True)
  tmp = f"{table}.tmp{os.getpid()}.npy"
  head = np.array([TABLE_MAGIC, TABLE_VERSION, size, mtime_ns, len(offsets) - 1], np.int64)
  try:
    np.save(tmp, np.concatenate([head, offsets]))
    os.replace(tmp, table)             # atomic: a reader sees the old table or the new one
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def offsets_table(path: str, cache_dir: str | None = None,
                  log: Callable[[str], None] | None = None) -> tuple[np.ndarray, dict]:
  """(offsets [N+1] int64, info) for `path`, from its saved table when the corpus is unchanged.

  The table is `PATH.offsets.npy` (header: magic, version, corpus size, mtime_ns, N); a changed
  corpus (size or mtime) rebuilds it. If the corpus's directory is not writable the table goes to
  a cache dir instead (said through `log`). info: table path, whether it was built, seconds.
  """
  log = log or (lambda m: print(m, file=sys.stderr, flush=True))
  if not os.path.exists(path):
    raise FileNotFoundError(f"corpus {path} does not exist")
  st = os.stat(path)
  beside, cached = path + ".offsets.npy", _cache_table_path(path, cache_dir)
  t0 = time.perf_counter()
  for table in (beside, cached):
    offsets = _load_table(table, st.st_size, st.st_mtime_ns)
    if offsets is not None:
      return offsets, {"table": table, "built": False, "seconds": time.perf_counter() - t0}
  offsets = scan_offsets(path)
  built_s = time.perf_counter() - t0
  try:
    _save_table(beside, offsets, st.st_size, st.st_mtime_ns)
    table = beside
  except OSError as e:
    _save_table(cached, offsets, st.st_size, st.st_mtime_ns)
    table = cached
    log(f"corpus offsets: cannot write {beside} ({e.strerror or e}); saved the table in {cached}")
  return offsets, {"table": table, "built": True, "seconds": built_s}


def open_corpus(path: str, cache_dir: str | None = None) -> tuple[CorpusReader, dict]:
  """A lazily validated CorpusReader over `path` via its offset table (see offsets_table)."""
  offsets, info = offsets_table(path, cache_dir)
  return CorpusReader(path, offsets, validated=False), info
