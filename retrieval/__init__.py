"""Retrieval sidecar: JAX/Flax BERT encoder, resumable FAISS/BM25 index builder, HTTP server.

  python -m retrieval.build_index --corpus corpus.jsonl --out DIR
  python -m retrieval.server --index DIR          # POST /retrieve, GET /health on 127.0.0.1:8000

Heavy modules (jax, faiss, fastapi) are imported by the submodules that need them, not here.
"""
