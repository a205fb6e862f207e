"""In-process search over an index: the one code path the server and bench share.

`Searcher(index_dir)` serves a directory from retrieval.build_index; `Searcher.prebuilt(...)`
serves a bare FAISS file (e.g. Search-R1's `e5_Flat.index`) whose row i is non-blank line i of a
JSONL corpus. `search(queries, topk)` returns row ids and scores: dense indexes encode and search
in chunks of `max_batch` queries (memory stays bounded for 4096-query requests); BM25 goes through
bm25s. Row ids index the corpus, whose stored rows `CorpusReader` returns byte-for-byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from retrieval import build_index
from retrieval.corpus import CorpusReader, open_corpus

# faiss-cpu only uses BLAS (one GEMM) for exact search when nq >= this threshold (default 20);
# below it, it loops per query. Design §5: a low threshold made Flat search ~10x faster here with
# identical results, and micro-batches are often smaller than 20.
BLAS_THRESHOLD = 1


class Searcher:

  def __init__(self, index_dir: str, encoder: str | None = None, dtype: str | None = None,
               corpus: str | None = None, max_batch: int = 128, faiss_threads: int | None = None):
    self.index_dir = index_dir
    self.max_batch = max_batch
    self.manifest = build_index.load_manifest(index_dir)
    self.index_type = self.manifest["index_type"]
    path = corpus or self.manifest["corpus"]
    self.corpus = CorpusReader(path, np.load(os.path.join(index_dir, "offsets.npy")))
    self.corpus_info = {"path": path, "rows": len(self.corpus), "validated": "at build"}
    self.encoder = None
    self._faiss_threads = None
    if self.index_type == "bm25":
      import bm25s
      self._bm25 = bm25s.BM25.load(os.path.join(index_dir, "bm25"), load_vocab=True,
                                   show_progress=False)
      self._bm25_vocab = self._bm25.vocab_dict
    else:
      self.index = self._read_faiss(os.path.join(index_dir, "index.faiss"), faiss_threads)
      if self.index_type == "hnsw":
        self.index.hnsw.efSearch = 128
      elif self.index_type == "ivf":
        self.index.nprobe = min(self.index.nlist, 32)
      from retrieval.encoder import Encoder
      enc = self.manifest["encoder"]
      self.encoder = Encoder(encoder or enc["path"], dtype=dtype or enc["dtype"],
                             max_batch=max_batch)
      if self.encoder.dim != self.manifest["dim"]:
        raise ValueError(f"encoder {self.encoder.path} has dim {self.encoder.dim} but index "
                         f"{index_dir} was built with dim {self.manifest['dim']}")

  @classmethod
  def prebuilt(cls, faiss_index: str, corpus: str, encoder: str, dtype: str = "float32",
               conventions: dict | None = None, max_batch: int = 128,
               faiss_threads: int | None = None, faiss_params: str = "",
               mmap_index: bool = False, offsets_cache_dir: str | None = None) -> "Searcher":
    """Serve a FAISS file written by faiss.write_index (any index type) over a JSONL corpus.

    No manifest: row i of the index is non-blank line i of `corpus` (as Search-R1's
    index_builder.py writes them). `conventions` overrides the encoder's name-based guess
    (pooling, query_prefix, normalize): it must match how the passages were encoded.
    `faiss_params` goes to faiss.ParameterSpace (e.g. "nprobe=64,efSearch=128").
    """
    from retrieval.encoder import Encoder, conventions_for
    self = cls.__new__(cls)
    self.index_dir, self.index_type, self.max_batch = None, "prebuilt", max_batch
    self.corpus, info = open_corpus(corpus, offsets_cache_dir)
    self.corpus_info = {"path": corpus, "rows": len(self.corpus), "validated": "lazily",
                        "offsets_table": info["table"], "offsets_built": info["built"],
                        "offsets_seconds": round(info["seconds"], 4)}
    self.index = self._read_faiss(faiss_index, faiss_threads, mmap_index)
    if faiss_params:
      import faiss
      faiss.ParameterSpace().set_index_parameters(self.index, faiss_params)
    if self.index.ntotal != len(self.corpus):
      raise ValueError(f"FAISS index {faiss_index} has {self.index.ntotal} vectors but corpus "
                       f"{corpus} has {len(self.corpus)} non-blank lines: row i must be line i")
    conv = dataclasses.replace(conventions_for(os.path.abspath(encoder)), **(conventions or {}))
    self.encoder = Encoder(encoder, dtype=dtype, conventions=conv, max_batch=max_batch)
    if self.encoder.dim != self.index.d:
      raise ValueError(f"encoder {self.encoder.path} has dim {self.encoder.dim} but FAISS index "
                       f"{faiss_index} has dim {self.index.d}")
    ident = self.encoder.identity()
    self.manifest = {
        "index_type": "prebuilt", "faiss_class": type(self.index).__name__,
        "faiss_index": os.path.abspath(faiss_index), "corpus": os.path.abspath(corpus),
        "corpus_sha256": None, "num_passages": len(self.corpus), "dim": self.index.d,
        "encoder": ident, "fingerprint": prebuilt_fingerprint(
            faiss_index, corpus, ident, faiss_params)}
    return self

  def _read_faiss(self, path: str, faiss_threads: int | None, mmap_index: bool = False):
    import faiss
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    # On small shared machines faiss's OpenMP team (spinning barriers) fights XLA's thread pool
    # and other processes: measured here under load, 2 threads made Flat search 5-30x SLOWER
    # than 1. Default to 1 thread on <= 4 cores; pass faiss_threads on big hosts.
    if faiss_threads is None and (os.cpu_count() or 1) <= 4:
      faiss_threads = 1
    self._faiss_threads = faiss_threads
    if not os.path.exists(path):
      raise FileNotFoundError(f"FAISS index {path} does not exist")
    # IO_FLAG_MMAP_IFC maps flat codes from the file instead of copying them into RAM.
    return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC if mmap_index else 0)

  def _omp(self) -> None:
    # OpenMP's thread count is per calling thread: the server searches from a worker thread, so
    # setting it once at load time (main thread) would not apply there.
    if self._faiss_threads:
      import faiss
      faiss.omp_set_num_threads(self._faiss_threads)

  @property
  def fingerprint(self) -> str:
    return self.manifest["fingerprint"]

  def warmup(self, max_batch: int = 64) -> None:
    if self.encoder is not None:
      self.encoder.warmup(max_batch=max_batch)
    self.search(["warm up"], 1)

  def search(self, queries: list[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
    """ids int64 [n, topk] (-1 where fewer hits exist) and float32 scores [n, topk]."""
    if not queries:
      return np.zeros((0, topk), np.int64), np.zeros((0, topk), np.float32)
    parts = [self._search_chunk(queries[lo:lo + self.max_batch], topk)
             for lo in range(0, len(queries), self.max_batch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

  def _search_chunk(self, queries: list[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
    if self.encoder is None:
      return self._search_bm25(queries, topk)
    emb = self.encoder.encode(queries, kind="query")
    self._omp()
    scores, ids = self.index.search(emb, topk)
    return ids, scores

  def _search_bm25(self, queries: list[str], topk: int):
    import bm25s
    n = len(queries)
    ids = np.full((n, topk), -1, np.int64)
    scores = np.zeros((n, topk), np.float32)
    toks = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    # Tokens the corpus never saw carry no BM25 weight; queries left empty match nothing.
    toks = [[t for t in q if t in self._bm25_vocab] for q in toks]
    live = [i for i, q in enumerate(toks) if q]
    if live:
      k = min(topk, len(self.corpus))
      docs, sc = self._bm25.retrieve([toks[i] for i in live], k=k, show_progress=False,
                                     n_threads=1)
      for j, i in enumerate(live):
        keep = sc[j] > 0      # zero score = no query term in the doc: not a hit
        ids[i, :keep.sum()] = docs[j][keep]
        scores[i, :keep.sum()] = sc[j][keep]
    return ids, scores

  def search_many(self, queries: list[str], topks: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, scores) per query, for queries with mixed topk; chunks of max_batch queries."""
    out: list = []
    for lo in range(0, len(queries), self.max_batch):
      out += self._search_many_chunk(queries[lo:lo + self.max_batch], topks[lo:lo + self.max_batch])
    return out

  def _search_many_chunk(self, queries: list[str], topks: list[int]) -> list:
    """Encode all queries in one call, then one index search per distinct topk over its rows.

    Searching each topk group with exactly its k keeps results identical to a lone request (an
    HNSW/IVF search with a larger k can change the first k).
    """
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(topks):
      groups.setdefault(k, []).append(i)
    out: list = [None] * len(queries)
    emb = None if self.encoder is None else self.encoder.encode(queries, kind="query")
    self._omp()
    for k, rows in groups.items():
      if emb is None:
        ids, scores = self._search_bm25([queries[i] for i in rows], k)
      else:
        scores, ids = self.index.search(emb[rows], k)
      for j, i in enumerate(rows):
        out[i] = (ids[j], scores[j])
    return out


def file_signature(path: str, span: int = 1 << 20) -> str:
  """sha256 of a file's size, first and last MiB: cheap on a 60 GB index, stable across copies
  (unlike mtime), and changes when the file is rebuilt, grown or truncated."""
  size = os.path.getsize(path)
  h = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    h.update(f.read(span))
    if size > span:
      f.seek(max(span, size - span))
      h.update(f.read(span))
  return h.hexdigest()


def prebuilt_fingerprint(faiss_index: str, corpus: str, encoder: dict, faiss_params: str) -> str:
  """Identity of a prebuilt index's answers: both files' signatures, encoder weights and
  conventions (prefix, pooling, normalisation), dtype and search parameters."""
  blob = json.dumps(["prebuilt", file_signature(faiss_index), file_signature(corpus),
                     encoder["weights_sha256"], encoder["conventions"], encoder["dtype"],
                     faiss_params], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]
