"""Index builder: corpus validation, resumable chunked encoding, FAISS/BM25 indexes, manifest."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from retrieval import build_index, corpus as corpus_lib
from synthetic_corpus import write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Killed(BaseException):
  """A kill -9 mid-build, in process: build() has no except or finally, so it leaves the index
  directory exactly as a killed process would."""


def build_killed_at_chunk(chunk: int, *args, **kw) -> None:
  """Run build_index.build and kill it while it encodes its `chunk`-th chunk (0-based) this run."""
  from retrieval.encoder import Encoder
  real, calls = Encoder.encode, []

  def encode(self, texts, kind="query"):
    if kind == "passage":
      if len(calls) == chunk:
        raise Killed
      calls.append(len(texts))
    return real(self, texts, kind)
  with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
    mp.setattr(Encoder, "encode", encode)
    build_index.build(*args, **kw)


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")
  write_corpus(path, 200, seed=1, max_words=30)
  return path


@pytest.fixture(scope="module")
def full_build(corpus_path, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("full"))
  m = build_index.build(corpus_path, out, chunk_size=48, batch_size=16, progress=False)
  return out, m


def test_corpus_both_formats_and_raw_rows(corpus_path):
  texts, offsets, sha = corpus_lib.read_corpus(corpus_path)
  lines = open(corpus_path, "rb").read().splitlines()
  assert len(texts) == len(lines) == 200 and len(offsets) == 201
  assert texts[0].startswith('"') and '"\n' in texts[0]          # {id, contents}
  row1 = json.loads(lines[1])
  assert texts[1] == f'"{row1["title"]}"\n{row1["content"]}'   # {id, title, content}
  reader = corpus_lib.CorpusReader(corpus_path, offsets)
  assert [reader.raw(i) for i in (0, 1, 199)] == [lines[0], lines[1], lines[199]]
  assert sha == corpus_lib.file_sha256(corpus_path)


@pytest.mark.parametrize("content,message", [
    ('{"id": "a", "contents": "x"}\n{"id": "b", "contents": \n', ":2: invalid JSON"),
    ('{"id": "a", "contents": "x"}\n\n[1, 2]\n', ":3: expected a JSON object"),
    ('{"contents": "x"}\n', ":1: missing field 'id'"),
    ('{"id": "a", "title": "t"}\n', ":1: needs 'contents' or both 'title' and 'content'"),
    ('{"id": "a", "contents": 5}\n', ":1: field 'contents' must be a string"),
])
def test_malformed_corpus_names_line(tmp_path, content, message):
  path = tmp_path / "bad.jsonl"
  path.write_text(content)
  with pytest.raises(corpus_lib.CorpusError, match=message):
    corpus_lib.read_corpus(str(path))


def test_non_utf8_line_and_cli_exit_code(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"id": "a", "contents": "ok"}\n{"id": "b", "contents": "\xff"}\n')
  with pytest.raises(corpus_lib.CorpusError, match=":2: not valid UTF-8"):
    corpus_lib.read_corpus(str(path))
  r = subprocess.run([sys.executable, "-m", "retrieval.build_index", "--corpus", str(path),
                      "--out", str(tmp_path / "idx"), "--index", "bm25"],
                     capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 2 and "bad.jsonl:2" in r.stderr


def test_manifest_and_exact_index(full_build, corpus_path):
  out, m = full_build
  on_disk = build_index.load_manifest(out)
  assert on_disk["fingerprint"] == m["fingerprint"]
  assert (m["num_passages"], m["dim"], m["index_type"]) == (200, 384, "flat")
  assert m["corpus_sha256"] == corpus_lib.file_sha256(corpus_path)
  assert m["encoder"]["name"] == "model" and len(m["encoder"]["weights_sha256"]) == 64
  emb = build_index.load_embeddings(out)
  assert emb.shape == (200, 384)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  # Stored embeddings are in corpus order: they equal a fresh encode of those passages.
  from retrieval.encoder import Encoder
  texts, _, _ = corpus_lib.read_corpus(corpus_path)
  fresh = Encoder(max_batch=16).encode([texts[i] for i in (0, 57, 199)], kind="passage")
  np.testing.assert_allclose(emb[[0, 57, 199]], fresh, atol=1e-5)
  # Rerunning a finished build encodes nothing and keeps the fingerprint.
  again = build_index.build(corpus_path, out, chunk_size=48, batch_size=16, progress=False)
  assert again["chunks_encoded"] == 0 and again["fingerprint"] == m["fingerprint"]


def test_resumed_build_equals_uninterrupted(full_build, corpus_path, tmp_path):
  out_full, m_full = full_build
  out = str(tmp_path / "resumed")
  build_killed_at_chunk(2, corpus_path, out, chunk_size=48, batch_size=16, progress=False)
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  assert json.load(open(os.path.join(out, "progress.json")))["done"] == [0, 1]
  m = build_index.build(corpus_path, out, chunk_size=48, batch_size=16, progress=False)
  assert m["chunks_encoded"] == 3                          # 200 rows / 48 = 5 chunks, 2 were done
  assert m["fingerprint"] == m_full["fingerprint"]
  np.testing.assert_array_equal(build_index.load_embeddings(out),
                                build_index.load_embeddings(out_full))
  import faiss
  q = build_index.load_embeddings(out_full)[:10]
  a = faiss.read_index(os.path.join(out, "index.faiss")).search(q, 5)
  b = faiss.read_index(os.path.join(out_full, "index.faiss")).search(q, 5)
  np.testing.assert_array_equal(a[1], b[1])


def test_changed_corpus_restarts_build(full_build, tmp_path):
  out_full, _ = full_build
  path = str(tmp_path / "other.jsonl")
  write_corpus(path, 60, seed=7, max_words=10)
  out = str(tmp_path / "idx")
  build_killed_at_chunk(1, path, out, chunk_size=48, progress=False)
  write_corpus(path, 60, seed=8, max_words=10)             # corpus changed under a killed build
  m = build_index.build(path, out, chunk_size=48, progress=False)
  assert m["chunks_encoded"] == 2                          # stale chunk was not reused


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_reuse_embeddings(full_build, corpus_path, tmp_path, kind):
  import shutil
  import faiss
  out_full, m_full = full_build
  out = str(tmp_path / kind)
  shutil.copytree(out_full, out)
  m = build_index.build(corpus_path, out, index_type=kind, chunk_size=48, batch_size=16,
                        progress=False)
  assert m["chunks_encoded"] == 0 and m["index_type"] == kind
  assert m["fingerprint"] != m_full["fingerprint"]
  index = faiss.read_index(os.path.join(out, "index.faiss"))
  if kind == "ivf":
    index.nprobe = index.nlist
  emb = build_index.load_embeddings(out)
  _, ids = index.search(emb[:20], 1)
  assert (ids[:, 0] == np.arange(20)).mean() >= 0.95      # each passage finds itself


def test_bm25_index(corpus_path, tmp_path):
  m = build_index.build(corpus_path, str(tmp_path / "bm"), index_type="bm25", progress=False)
  assert (m["index_type"], m["dim"], m["encoder"]) == ("bm25", 0, None)
  assert os.path.isdir(tmp_path / "bm" / "bm25")
