"""In-process search over a built index directory: the one code path the server and bench share.

`Searcher.search(queries, topk)` returns row ids and scores for a batch of queries: dense indexes
encode the batch once and make one FAISS call; BM25 goes through bm25s. Row ids index the corpus,
whose stored rows `CorpusReader` returns byte-for-byte.
"""

from __future__ import annotations

import os

import numpy as np

from retrieval import build_index
from retrieval.corpus import CorpusReader

# faiss-cpu only uses BLAS (one GEMM) for exact search when nq >= this threshold (default 20);
# below it, it loops per query. Design §5: a low threshold made Flat search ~10x faster here with
# identical results, and micro-batches are often smaller than 20.
BLAS_THRESHOLD = 1


class Searcher:

  def __init__(self, index_dir: str, encoder: str | None = None, dtype: str | None = None,
               corpus: str | None = None, max_batch: int = 128, faiss_threads: int | None = None):
    self.index_dir = index_dir
    self.manifest = build_index.load_manifest(index_dir)
    self.index_type = self.manifest["index_type"]
    path = corpus or self.manifest["corpus"]
    self.corpus = CorpusReader(path, np.load(os.path.join(index_dir, "offsets.npy")))
    self.encoder = None
    self._faiss_threads = None
    if self.index_type == "bm25":
      import bm25s
      self._bm25 = bm25s.BM25.load(os.path.join(index_dir, "bm25"), load_vocab=True,
                                   show_progress=False)
      self._bm25_vocab = self._bm25.vocab_dict
    else:
      import faiss
      faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
      # On small shared machines faiss's OpenMP team (spinning barriers) fights XLA's thread pool
      # and other processes: measured here under load, 2 threads made Flat search 5-30x SLOWER
      # than 1. Default to 1 thread on <= 4 cores; pass faiss_threads on big hosts.
      if faiss_threads is None and (os.cpu_count() or 1) <= 4:
        faiss_threads = 1
      self._faiss_threads = faiss_threads
      self.index = faiss.read_index(os.path.join(index_dir, "index.faiss"))
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
    """Encode all queries in one call, then one index search per distinct topk over its rows.

    Searching each topk group with exactly its k keeps results identical to a lone request (an
    HNSW/IVF search with a larger k can change the first k). Returns (ids, scores) per query.
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
