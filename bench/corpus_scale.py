"""Serving a 1M-passage corpus beside a prebuilt FAISS file: start-up, memory, latency.

  .venv/bin/python bench/corpus_scale.py [--passages 1000000] [--words 100] [--keep]

Writes a synthetic wiki-18-style corpus (`{"id", "contents": "\\"Title\\"\\ntext"}`, ~100 words a
passage) and an IndexFlatIP of random unit float32 vectors (dim 384, faiss.write_index: the shape
Search-R1's index_builder.py leaves; nothing is encoded with the model, row i is just line i), then
starts `retrieval.server --faiss_index --corpus --encoder` (bundled MiniLM) three times:
  1. fresh: the corpus offset table is built (one numpy newline scan) and saved beside the corpus;
  2. again: the table is reused;
  3. with --mmap_index: the flat vectors are mapped from the file rather than copied to RAM.
Records start-up wall time (process start to /health answering: includes JAX import, encoder load
and warm-up, so the offset time is also reported on its own), server RSS (anon/file split) after
start-up and after 1000 queries (10 requests of 100), single-query latencies, and, side by side,
a JSON-parsing pass over the same corpus (what a parse-every-line loader costs before serving).
Writes bench/results/corpus_scale.json and .md; deletes the corpus and index unless --keep.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.join(ROOT, "tests"))  # test-support modules (tests/synthetic_corpus.py)

from retrieval import corpus as corpus_lib, server as server_lib  # noqa: E402
from synthetic_corpus import _words  # noqa: E402


def write_corpus(path: str, n: int, words_per: int, seed: int = 0) -> float:
  """Vectorised-enough generator: vocabulary words need no JSON escaping, so rows are formatted
  directly. Returns seconds taken."""
  t0 = time.perf_counter()
  rng = np.random.default_rng(seed)
  vocab = np.asarray(_words())
  with open(path, "w", encoding="utf-8", buffering=1 << 24) as f:
    for lo in range(0, n, 20_000):
      m = min(20_000, n - lo)
      idx = rng.integers(0, len(vocab), (m, words_per + 2))
      lines = []
      for j in range(m):
        w = vocab[idx[j]]
        lines.append(f'{{"id": "{lo + j}", "contents": "\\"{w[0].title()} {w[1].title()}\\"\\n'
                     f'{" ".join(w[2:])}."}}\n')
      f.write("".join(lines))
  return time.perf_counter() - t0


def write_index(path: str, n: int, dim: int, seed: int = 1) -> float:
  import faiss
  t0 = time.perf_counter()
  rng = np.random.default_rng(seed)
  index = faiss.IndexFlatIP(dim)
  for lo in range(0, n, 100_000):
    x = rng.standard_normal((min(100_000, n - lo), dim), dtype=np.float32)
    index.add(x / np.linalg.norm(x, axis=1, keepdims=True))
  faiss.write_index(index, path)
  return time.perf_counter() - t0


def rss(pid: int) -> dict:
  """MiB from /proc/PID/status: total, anonymous (heap), file-backed (mmaps), peak."""
  fields = {}
  for line in open(f"/proc/{pid}/status"):
    key, _, val = line.partition(":")
    if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
      fields[key] = round(int(val.split()[0]) / 1024, 1)
  return fields


def queries(n: int, seed: int = 7) -> list[str]:
  rng = np.random.default_rng(seed)
  vocab = np.asarray(_words())
  return [" ".join(rng.choice(vocab, rng.integers(3, 9))) for _ in range(n)]


def serve_once(args: list[str], qs: list[str], singles: int) -> dict:
  import httpx
  t0 = time.perf_counter()
  proc, url = server_lib.start_subprocess(None, extra_args=args, timeout_s=1200)
  try:
    startup_s = time.perf_counter() - t0
    health = httpx.get(f"{url}/health", timeout=30).json()
    out = {"startup_s": round(startup_s, 2), "corpus": health["corpus"],
           "rss_after_startup_mib": rss(proc.pid)}
    t = time.perf_counter()
    for lo in range(0, len(qs), 100):
      r = httpx.post(f"{url}/retrieve", json={"queries": qs[lo:lo + 100], "topk": 3}, timeout=600)
      r.raise_for_status()
    out["batched_qps"] = round(len(qs) / (time.perf_counter() - t), 1)
    lat = []
    for q in qs[:singles]:
      t = time.perf_counter()
      httpx.post(f"{url}/retrieve", json={"queries": [q + " once"], "topk": 3},
                 timeout=60).raise_for_status()
      lat.append(round((time.perf_counter() - t) * 1000, 1))
    out["single_query_ms"] = lat
    out["rss_after_queries_mib"] = rss(proc.pid)
    out["fingerprint"] = health["fingerprint"]
    return out
  finally:
    proc.terminate()
    proc.wait(timeout=60)


def parse_pass(path: str) -> float:
  """Seconds for a json.loads-every-line pass (offsets only kept), as the index builder does."""
  t0 = time.perf_counter()
  n = sum(1 for _ in corpus_lib.iter_corpus(path))
  assert n > 0
  return time.perf_counter() - t0


def markdown(r: dict) -> str:
  s1, s2, s3 = r["starts"]["fresh"], r["starts"]["table_reused"], r["starts"]["mmap_index"]
  rows = [("start-up wall time (s)", s1["startup_s"], s2["startup_s"], s3["startup_s"]),
          ("offset table (s)", f"{s1['corpus']['offsets_seconds']} built",
           f"{s2['corpus']['offsets_seconds']} read", f"{s3['corpus']['offsets_seconds']} read"),
          ("RSS after start-up (MiB)", s1["rss_after_startup_mib"]["VmRSS"],
           s2["rss_after_startup_mib"]["VmRSS"], s3["rss_after_startup_mib"]["VmRSS"]),
          (f"RSS after {r['queries']} queries (MiB)", s1["rss_after_queries_mib"]["VmRSS"],
           s2["rss_after_queries_mib"]["VmRSS"], s3["rss_after_queries_mib"]["VmRSS"]),
          ("  of which anon / file", *(f"{s['rss_after_queries_mib']['RssAnon']} / "
                                       f"{s['rss_after_queries_mib']['RssFile']}"
                                       for s in (s1, s2, s3))),
          (f"{r['queries']} queries, 100/request (q/s)", s1["batched_qps"], s2["batched_qps"],
           s3["batched_qps"]),
          ("single-query latency (ms)", *(", ".join(map(str, s["single_query_ms"]))
                                          for s in (s1, s2, s3)))]
  c = r["corpus"]
  lines = [f"# Corpus scale: {c['passages']:,} passages, prebuilt Flat index", "",
           f"Corpus {c['bytes'] / 2**20:.0f} MiB ({c['words_per_passage']} words/passage), index "
           f"{r['index']['bytes'] / 2**20:.0f} MiB (IndexFlatIP, dim {r['index']['dim']}), "
           f"encoder all-MiniLM-L6-v2, {r['cpus']} CPUs, load average {r['load_average']}.",
           "", "| | fresh start | table reused | --mmap_index |", "|---|---|---|---|"]
  lines += [f"| {a} | {b} | {c_} | {d} |" for a, b, c_, d in rows]
  lines += ["", f"Offset table: {s1['corpus']['offsets_seconds']} s numpy newline scan vs "
            f"{r['json_parse_pass_s']} s to json-parse every line "
            f"({r['json_parse_pass_s'] / max(s1['corpus']['offsets_seconds'], 1e-9):.0f}x); "
            f"table file {r['offsets_table_bytes'] / 2**20:.1f} MiB.", ""]
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--passages", type=int, default=1_000_000)
  p.add_argument("--words", type=int, default=100)
  p.add_argument("--dim", type=int, default=384)
  p.add_argument("--dir", default="/tmp/stepsearch_corpus_scale")
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--singles", type=int, default=5)
  p.add_argument("--keep", action="store_true", help="keep the corpus and index afterwards")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "corpus_scale.json"))
  a = p.parse_args()
  from retrieval.encoder import default_encoder_path
  os.makedirs(a.dir, exist_ok=True)
  corpus, index = os.path.join(a.dir, "wiki.jsonl"), os.path.join(a.dir, "flat.index")
  try:
    for stale in (corpus + ".offsets.npy",):
      if os.path.exists(stale):
        os.remove(stale)
    gen_s = write_corpus(corpus, a.passages, a.words)
    idx_s = write_index(index, a.passages, a.dim)
    print(f"corpus {os.path.getsize(corpus) / 2**20:.0f} MiB in {gen_s:.0f}s, index "
          f"{os.path.getsize(index) / 2**20:.0f} MiB in {idx_s:.0f}s", file=sys.stderr)
    args = ["--faiss_index", index, "--corpus", corpus, "--encoder", default_encoder_path(),
            "--warmup_batch", "8", "--cache_size", "0"]
    qs = queries(a.queries)
    starts = {"fresh": serve_once(args, qs, a.singles)}
    starts["table_reused"] = serve_once(args, qs, a.singles)
    starts["mmap_index"] = serve_once(args + ["--mmap_index"], qs, a.singles)
    report = {
        "bench": "corpus_scale", "cpus": os.cpu_count(), "queries": a.queries,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "corpus": {"passages": a.passages, "words_per_passage": a.words,
                   "bytes": os.path.getsize(corpus), "generate_s": round(gen_s, 1)},
        "index": {"type": "IndexFlatIP", "dim": a.dim, "bytes": os.path.getsize(index),
                  "write_s": round(idx_s, 1)},
        "offsets_table_bytes": os.path.getsize(corpus + ".offsets.npy"),
        "json_parse_pass_s": round(parse_pass(corpus), 2),
        "starts": starts,
        "table_reused": not starts["table_reused"]["corpus"]["offsets_built"],
    }
  finally:
    if not a.keep:
      for path in (corpus, corpus + ".offsets.npy", index):
        if os.path.exists(path):
          os.remove(path)
      try:
        os.rmdir(a.dir)                  # only if we left it empty: never a user's files
      except OSError:
        pass
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
    f.write(markdown(report))
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
