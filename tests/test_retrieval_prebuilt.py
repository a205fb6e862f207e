"""Serving a bare FAISS file (as Search-R1's index_builder.py writes) over a JSONL corpus read
through an offset table: results equal brute force, rows equal the file's lines, stale tables are
rebuilt, bad rows give a 500 that names the line."""

import json
import os
import shutil

import httpx
import numpy as np
import pytest

from retrieval import corpus as corpus_lib, server as server_lib
from retrieval.searcher import Searcher, prebuilt_fingerprint
from synthetic_corpus import write_corpus


def corpus_bytes(rows: list[dict]) -> bytes:
  """JSONL with the awkward bits real corpora have: blank and whitespace-only lines, CRLF
  endings, raw UTF-8 and \\u escapes, and no newline after the last row."""
  out = []
  for i, r in enumerate(rows):
    out.append(json.dumps(r, ensure_ascii=i % 3 != 0).encode() + (b"\r\n" if i % 4 == 1 else b"\n"))
    if i % 7 == 2:
      out.append(b"\n")
    if i % 7 == 4:
      out.append(b" \t \r\n")
  return b"".join(out).rstrip(b"\r\n")


def stored_lines(path: str) -> list[bytes]:
  """Non-blank lines read the plain way: what row i must be."""
  with open(path, "rb") as f:
    return [line.rstrip(b"\r\n") for line in f if line.strip()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  import faiss
  from retrieval.encoder import Encoder
  d = tmp_path_factory.mktemp("prebuilt")
  rows = write_corpus(str(d / "gen.jsonl"), 40, seed=5, max_words=25, formats="contents")
  rows[3]["contents"] = '"Zürich"\nZürich – “quoted” 東京 on the lake 🙂 with a harbour.'
  corpus = str(d / "wiki.jsonl")
  with open(corpus, "wb") as f:
    f.write(corpus_bytes(rows))
  encoder = Encoder(max_batch=16)
  vecs = encoder.encode([r["contents"] for r in rows], kind="passage")
  index = faiss.IndexFlatIP(vecs.shape[1])
  index.add(vecs)
  faiss.write_index(index, str(d / "e5_Flat.index"))
  args = ["--faiss_index", str(d / "e5_Flat.index"), "--corpus", corpus,
          "--encoder", encoder.path, "--warmup_batch", "4"]
  proc, url = server_lib.start_subprocess(None, extra_args=args, timeout_s=240)
  yield dict(dir=d, rows=rows, corpus=corpus, vecs=vecs, encoder=encoder, url=url,
             index=str(d / "e5_Flat.index"))
  proc.terminate()
  proc.wait(timeout=30)


def test_served_results_equal_bruteforce(world):
  queries = ["Zürich lake harbour", world["rows"][10]["contents"][:60], "old stone bridge river",
             "", "castle"]
  r = httpx.post(f"{world['url']}/retrieve", json={"queries": queries, "topk": 4}, timeout=60)
  assert r.status_code == 200, r.text
  result = r.json()["result"]
  sims = world["encoder"].encode(queries, kind="query") @ world["vecs"].T
  for i, hits in enumerate(result):
    if not queries[i]:
      assert hits == []
      continue
    want = np.argsort(-sims[i], kind="stable")[:4]
    assert [h["document"] for h in hits] == [world["rows"][j] for j in want], queries[i]
    np.testing.assert_allclose([h["score"] for h in hits], sims[i][want], atol=1e-4)
  assert result[0][0]["document"]["contents"].startswith('"Zürich"')
  lines = stored_lines(world["corpus"])
  assert all(lines[int(np.argmax(sims[i]))] in r.content for i in (0, 1, 2))   # bytes as stored


def test_health_describes_the_prebuilt_index(world):
  h = httpx.get(f"{world['url']}/health", timeout=10).json()
  assert (h["index_type"], h["faiss_class"], h["num_passages"], h["dim"]) == (
      "prebuilt", "IndexFlatIP", 40, 384)
  assert h["corpus"]["offsets_table"] == world["corpus"] + ".offsets.npy"
  assert h["corpus_errors"]["count"] == 0 and h["status"] == "ok"
  assert h["encoder"]["conventions"]["pooling"] == "mean"
  ident = world["encoder"].identity()
  assert h["fingerprint"] == prebuilt_fingerprint(world["index"], world["corpus"], ident, "")
  other = dict(ident, conventions=dict(ident["conventions"], query_prefix="query: "))
  assert prebuilt_fingerprint(world["index"], world["corpus"], other, "") != h["fingerprint"]


def test_offset_table_rows_equal_lines(world, tmp_path, monkeypatch):
  path = str(tmp_path / "c.jsonl")
  shutil.copy(world["corpus"], path)
  reader, info = corpus_lib.open_corpus(path)
  lines = stored_lines(path)
  assert info["built"] and info["table"] == path + ".offsets.npy" and len(reader) == len(lines)
  with monkeypatch.context() as m:       # serving a good row must not scan the file for its line
    m.setattr(corpus_lib, "_count_newlines", lambda *a: pytest.fail("scanned for a line number"))
    assert [reader.document(i) for i in range(len(reader))] == lines
  assert [reader.row(i) for i in range(len(reader))] == world["rows"]
  _, offsets, _ = corpus_lib.read_corpus(path)              # the index-dir builder's offsets
  np.testing.assert_array_equal(reader.offsets, offsets)
  raw = open(path, "rb").read()
  assert reader.line_number(5) == raw[:int(offsets[5])].count(b"\n") + 1


def test_stale_offset_table_is_rebuilt(world, tmp_path):
  path = str(tmp_path / "c.jsonl")
  shutil.copy(world["corpus"], path)
  assert corpus_lib.open_corpus(path)[1]["built"]
  reader, info = corpus_lib.open_corpus(path)
  assert not info["built"] and len(reader) == 40
  with open(path, "ab") as f:                               # grown: size differs
    f.write(b'\n{"id": "new", "contents": "\\"New\\"\\nappended row"}\n')
  reader, info = corpus_lib.open_corpus(path)
  assert info["built"] and len(reader) == 41 and reader.row(40)["id"] == "new"
  data = open(path, "rb").read()                            # same size, rewritten: mtime differs
  with open(path, "wb") as f:
    f.write(data.replace(b'"id": "new"', b'"id": "NEW"'))
  st = os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  reader, info = corpus_lib.open_corpus(path)
  assert info["built"] and reader.row(40)["id"] == "NEW"


def test_unwritable_corpus_dir_uses_cache_dir(world, tmp_path, capsys):
  path = str(tmp_path / "c.jsonl")
  shutil.copy(world["corpus"], path)
  os.mkdir(path + ".offsets.npy")        # cannot be written even by root: as a read-only dir
  cache = str(tmp_path / "cache")
  reader, info = corpus_lib.open_corpus(path, cache_dir=cache)
  assert info["built"] and info["table"].startswith(cache) and len(reader) == 40
  assert "cannot write" in capsys.readouterr().err
  assert not corpus_lib.open_corpus(path, cache_dir=cache)[1]["built"]


class StubSearcher:
  """Returns fixed row ids: enough for the app, with a real lazily validated corpus."""

  def __init__(self, corpus_path):
    self.corpus, info = corpus_lib.open_corpus(corpus_path)
    self.corpus_info = {"path": corpus_path, "rows": len(self.corpus)}
    self.encoder = None
    self.manifest = {"fingerprint": "stub", "index_type": "prebuilt", "num_passages": 3,
                     "dim": 0, "corpus_sha256": None}

  def search_many(self, queries, topks):
    return [(np.array([int(q)]), np.array([1.0], np.float32)) for q in queries]


def test_bad_row_is_a_500_naming_the_line(tmp_path):
  from fastapi.testclient import TestClient
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"id": "a", "contents": "ok"}\n\n{"id": "b", "contents": \n'
                   b'{"id": "c", "contents": "fine"}\n')
  client = TestClient(server_lib.create_app(StubSearcher(str(path)), cache_size=0))
  assert client.post("/retrieve", json={"queries": ["0"]}).json()["result"][0][0][
      "document"] == {"id": "a", "contents": "ok"}
  r = client.post("/retrieve", json={"queries": ["2", "1"]})
  assert r.status_code == 500 and f"{path}:3: invalid JSON" in r.json()["detail"], r.text
  health = client.get("/health").json()
  assert health["status"] == "corpus_errors" and health["corpus_errors"]["count"] == 1
  assert f"{path}:3" in health["corpus_errors"]["recent"][0]
  assert client.post("/retrieve", json={"queries": ["2"]}).status_code == 200   # still serving


def test_mismatched_rows_are_named(world, tmp_path):
  import faiss
  index = faiss.IndexFlatIP(384)
  index.add(world["vecs"][:39])
  faiss.write_index(index, str(tmp_path / "short.index"))
  with pytest.raises(ValueError, match="has 39 vectors but corpus .* has 40 non-blank lines"):
    Searcher.prebuilt(str(tmp_path / "short.index"), world["corpus"], world["encoder"].path)


def test_flags_reach_the_encoder_hnsw_and_pooler(world):
  """--pooling/--query_prefix/--no-normalize/--faiss_params flow into the Searcher, any FAISS
  type reads, and 'pooler' pooling equals transformers' BertModel pooler_output."""
  import faiss
  import torch
  from transformers import AutoModel, AutoTokenizer
  hnsw = faiss.index_factory(384, "HNSW16", faiss.METRIC_INNER_PRODUCT)
  hnsw.add(world["vecs"])
  faiss.write_index(hnsw, str(world["dir"] / "hnsw.index"))
  a = server_lib.parse_args(["--faiss_index", str(world["dir"] / "hnsw.index"), "--corpus",
                             world["corpus"], "--encoder", world["encoder"].path, "--pooling",
                             "pooler", "--query_prefix", "query: ", "--no-normalize",
                             "--faiss_params", "efSearch=77"])
  s = server_lib.make_searcher(a)
  c = s.encoder.conventions
  assert (c.pooling, c.query_prefix, c.normalize) == ("pooler", "query: ", False)
  assert s.index.hnsw.efSearch == 77 and s.manifest["faiss_class"] == "IndexHNSWFlat"
  texts = ["Zürich lake harbour", "a longer query about the old stone bridge"]
  tok = AutoTokenizer.from_pretrained(world["encoder"].path)
  model = AutoModel.from_pretrained(world["encoder"].path).eval()
  with torch.no_grad():
    ref = model(**tok(["query: " + t for t in texts], padding=True, return_tensors="pt"))
  np.testing.assert_allclose(s.encoder.encode(texts, kind="query"),
                             ref.pooler_output.numpy(), atol=2e-5)
  with pytest.raises(SystemExit):
    server_lib.parse_args(["--faiss_index", "x.index", "--corpus", world["corpus"]])
