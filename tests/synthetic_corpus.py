"""Deterministic generated corpora for retrieval tests and benchmarks (no downloads).

Words come from the bundled MiniLM WordPiece vocabulary (whole alphabetic words), so passages
tokenise like English rather than like random character soup. Rows alternate between the two
corpus formats so both code paths are exercised.

Test support, not part of the package: pytest puts tests/ on sys.path; bench/retrieval.py and
bench/corpus_scale.py add it.
"""

import json
import os

import numpy as np


def _words() -> list[str]:
  from retrieval.encoder import default_encoder_path
  with open(os.path.join(default_encoder_path(), "vocab.txt"), encoding="utf-8") as f:
    return [w for w in (line.strip() for line in f) if w.isalpha() and w.isascii() and len(w) >= 3]


def write_corpus(path: str, n: int, seed: int = 0, min_words: int = 8, max_words: int = 40,
                 formats: str = "mixed") -> list[dict]:
  """Write n rows to `path` (JSONL) and return them. formats: 'mixed', 'contents' or 'title'."""
  rng = np.random.default_rng(seed)
  words = np.asarray(_words())
  rows = []
  for i in range(n):
    title = " ".join(words[rng.integers(0, len(words), 2)]).title()
    text = " ".join(words[rng.integers(0, len(words), rng.integers(min_words, max_words + 1))])
    use_contents = formats == "contents" or (formats == "mixed" and i % 2 == 0)
    if use_contents:
      rows.append({"id": str(i), "contents": f'"{title}"\n{text}.'})
    else:
      rows.append({"id": f"doc-{i}", "title": title, "content": text + "."})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return rows
