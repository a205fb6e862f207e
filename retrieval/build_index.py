"""Build a retrieval index directory from a JSONL corpus (resumable).

  python -m retrieval.build_index --corpus corpus.jsonl --out DIR [--encoder DIR] \
      [--index flat|hnsw|ivf|bm25] [--dtype float32|bfloat16]

Passages are tokenised once to get their lengths, sorted by length (so batches carry little
padding) and cut into fixed chunks of that sorted order. Each chunk's embeddings go into a zarr
array (tensorstore) and the chunk number into `progress.json` only after the write completes, so a
killed build rerun with the same arguments skips finished chunks and gives the same bytes as an
uninterrupted one (chunk contents and padding are deterministic). `manifest.json` is written last:
its presence means the directory is complete.

Layout of DIR: manifest.json, offsets.npy (byte offset of each corpus row), order.npy (sorted
position -> row), embeddings.zarr (float32 [N, dim] in sorted order), index.faiss, or bm25/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np

from retrieval import corpus as corpus_lib

INDEX_TYPES = ("flat", "hnsw", "ivf", "bm25")
FORMAT_VERSION = 1


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def fingerprint(corpus_sha256: str, encoder: dict | None, index_type: str, dim: int) -> str:
  """Identity of what a search returns: corpus bytes, encoder weights+conventions, index, dim."""
  enc = None if encoder is None else {k: encoder[k] for k in ("weights_sha256", "conventions",
                                                               "dtype")}
  blob = json.dumps([corpus_sha256, enc, index_type, dim], sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_manifest(index_dir: str) -> dict:
  m = _read_json(os.path.join(index_dir, "manifest.json"))
  if m is None:
    raise FileNotFoundError(f"{index_dir}: no manifest.json (not an index, or its build did not "
                            "finish; rerun retrieval.build_index to resume it)")
  return m


def _zarr_spec(index_dir: str) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file",
                                        "path": os.path.join(index_dir, "embeddings.zarr")}}


def load_embeddings(index_dir: str) -> np.ndarray:
  """Stored passage embeddings [N, dim] float32, in corpus row order."""
  import tensorstore as ts
  arr = ts.open(_zarr_spec(index_dir), open=True).result()
  order = np.load(os.path.join(index_dir, "order.npy"))
  out = np.empty(arr.shape, np.float32)
  out[order] = arr.read().result()
  return out


def _make_faiss(emb: np.ndarray, index_type: str):
  import faiss
  n, dim = emb.shape
  if index_type == "flat":
    index = faiss.IndexFlatIP(dim)
  elif index_type == "hnsw":
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
  elif index_type == "ivf":
    nlist = max(1, min(65536, int(4 * np.sqrt(n))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    sample = emb if n <= 256 * nlist else emb[rng.choice(n, 256 * nlist, replace=False)]
    index.train(sample)
  else:
    raise ValueError(f"--index {index_type!r} is not one of {list(INDEX_TYPES)}")
  index.add(emb)
  return index


def _encode_chunks(texts, index_dir, enc, chunk_size, state_sig, progress):
  """Fill embeddings.zarr chunk by chunk, skipping chunks a previous run finished."""
  import tensorstore as ts
  from tqdm import tqdm
  n = len(texts)
  state_path = os.path.join(index_dir, "build_state.json")
  progress_path = os.path.join(index_dir, "progress.json")
  resume = _read_json(state_path) == state_sig and os.path.exists(os.path.join(index_dir, "order.npy"))
  if resume:
    order = np.load(os.path.join(index_dir, "order.npy"))
    arr = ts.open(_zarr_spec(index_dir), open=True).result()
    done = set((_read_json(progress_path) or {}).get("done", []))
  else:
    for stale in ("manifest.json", "progress.json", "index.faiss"):
      if os.path.exists(os.path.join(index_dir, stale)):
        os.remove(os.path.join(index_dir, stale))
    prefixed = [enc.conventions.passage_prefix + t for t in texts]
    lengths = np.fromiter((len(e.ids) for e in enc.tokenizer.encode_batch(prefixed)), np.int64, n)
    order = np.argsort(-lengths, kind="stable")   # longest first: memory trouble shows at once
    np.save(os.path.join(index_dir, "order.npy"), order)
    arr = ts.open({**_zarr_spec(index_dir), "metadata": {
        "shape": [n, enc.dim], "chunks": [chunk_size, enc.dim], "dtype": "<f4",
        "compressor": None}}, create=True, delete_existing=True).result()
    done = set()
    _write_json(state_path, state_sig)
  chunks = [c for c in range((n + chunk_size - 1) // chunk_size) if c not in done]
  bar = tqdm(total=n, initial=n - sum(len(order[c * chunk_size:(c + 1) * chunk_size])
                                      for c in chunks),
             unit="passage", desc="encoding", disable=not progress)
  encoded = 0
  for c in chunks:
    rows = order[c * chunk_size:(c + 1) * chunk_size]
    emb = enc.encode([texts[i] for i in rows], kind="passage")
    arr[c * chunk_size:c * chunk_size + len(rows)].write(emb).result()
    done.add(c)
    _write_json(progress_path, {"done": sorted(done)})
    encoded += 1
    bar.update(len(rows))
  bar.close()
  return encoded


def build(corpus: str, out: str, encoder: str | None = None, index_type: str = "flat",
          dtype: str = "float32", chunk_size: int = 1024, batch_size: int = 64,
          progress: bool = True) -> dict:
  """Build (or resume, or reuse) an index directory; returns the manifest with `chunks_encoded`."""
  if index_type not in INDEX_TYPES:
    raise ValueError(f"--index {index_type!r} is not one of {list(INDEX_TYPES)}")
  os.makedirs(out, exist_ok=True)
  texts, offsets, sha = corpus_lib.read_corpus(corpus)
  np.save(os.path.join(out, "offsets.npy"), offsets)
  manifest = {"format": FORMAT_VERSION, "corpus": os.path.abspath(corpus), "corpus_sha256": sha,
              "num_passages": len(texts), "index_type": index_type}
  encoded = 0
  if index_type == "bm25":
    import bm25s
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=progress),
                    show_progress=progress)
    if os.path.exists(os.path.join(out, "bm25")):
      shutil.rmtree(os.path.join(out, "bm25"))
    retriever.save(os.path.join(out, "bm25"), show_progress=False)
    manifest.update(encoder=None, dim=0)
  else:
    import faiss
    from retrieval.encoder import Encoder
    enc = Encoder(encoder, dtype=dtype, max_batch=batch_size)
    ident = enc.identity()
    state_sig = {"corpus_sha256": sha, "weights_sha256": ident["weights_sha256"],
                 "conventions": ident["conventions"], "dtype": dtype, "chunk_size": chunk_size,
                 "num_passages": len(texts), "format": FORMAT_VERSION}
    old = _read_json(os.path.join(out, "manifest.json"))
    if old and old.get("index_type") == index_type and _read_json(
        os.path.join(out, "build_state.json")) == state_sig:
      return {**old, "chunks_encoded": 0}   # already complete and identical
    encoded = _encode_chunks(texts, out, enc, chunk_size, state_sig, progress)
    emb = load_embeddings(out)
    faiss.write_index(_make_faiss(emb, index_type), os.path.join(out, "index.faiss"))
    manifest.update(encoder=ident, dim=enc.dim)
  manifest["fingerprint"] = fingerprint(sha, manifest["encoder"], index_type, manifest["dim"])
  manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
  _write_json(os.path.join(out, "manifest.json"), manifest)
  return {**manifest, "chunks_encoded": encoded}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--corpus", required=True, help="JSONL corpus ({id,contents} or {id,title,content})")
  p.add_argument("--out", required=True, help="index directory (resumed if a build was killed)")
  p.add_argument("--encoder", default=None, help="HF folder; default: bundled all-MiniLM-L6-v2")
  p.add_argument("--index", default="flat", choices=INDEX_TYPES)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--chunk_size", type=int, default=1024, help="passages per resumable chunk")
  p.add_argument("--batch_size", type=int, default=64, help="passages per encoder call")
  a = p.parse_args(argv)
  if a.index != "bm25":
    from retrieval.encoder import enable_compilation_cache
    enable_compilation_cache()
  try:
    m = build(a.corpus, a.out, a.encoder, a.index, a.dtype, a.chunk_size, a.batch_size)
  except (corpus_lib.CorpusError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({k: m[k] for k in ("fingerprint", "num_passages", "index_type", "dim",
                                      "chunks_encoded")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
