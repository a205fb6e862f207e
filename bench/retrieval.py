"""Retrieval sidecar throughput and latency, side by side with in-process encode+search.

  .venv/bin/python bench/retrieval.py [--passages 20000] [--dtype float32] [--rounds 2]
      [--search_r1 PATH/TO/Search-R1]

Builds (once, cached under --cache_dir) a generated corpus of >= 20k passages and its Flat-IP
index with the bundled all-MiniLM-L6-v2, starts `retrieval.server` as a subprocess on a loopback
port with its cache disabled, and measures queries/s and p50/p99 request latency for
  - 1, 8 and 32 concurrent clients sending single-query requests (asyncio + httpx), and
  - one client sending 128-query requests,
each next to the same queries through `Searcher.search` in this process in batches of the same
size (1, 8, 32, 128: the largest batch the server could form). ratio = server q/s / in-process
q/s; overhead = 1 - ratio. With `--search_r1` (a Search-R1 checkout, or its
`search_r1/search/retrieval_server.py`), Search-R1's own server is a third contender, run with its
file unchanged (bench/search_r1_cpu.py makes its `.cuda()` calls CPU-safe) on the same corpus,
`index.faiss` and MiniLM folder, in the same alternation (`--search_r1_dtype float32` skips the
fp16 cast its file hard-codes, which is slow on a CPU); `ours_over_search_r1` is our server's
q/s over theirs, and `search_r1_top3_agreement` the share of queries whose top-3 ids match ours.
The interpreter that runs it (`--search_r1_python`, default this one) needs `datasets`. The two sides alternate over slices of the query set (pooled totals)
because this machine is shared and its load swings within seconds. The load generator shares the CPU with the server, so overhead includes
the clients' own HTTP cost. Writes bench/results/retrieval.json and prints it.
"""

import argparse
import asyncio
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.join(ROOT, "tests"))  # test-support modules (tests/synthetic_corpus.py)

from retrieval import build_index  # noqa: E402
from retrieval.encoder import enable_compilation_cache  # noqa: E402
from synthetic_corpus import _words, write_corpus  # noqa: E402

TOPK = 3


def make_queries(n: int, seed: int = 123) -> list[str]:
  rng = np.random.default_rng(seed)
  words = np.asarray(_words())
  out = {" ".join(rng.choice(words, rng.integers(3, 10))) for _ in range(n * 2)}
  return sorted(out)[:n]


def pct(lat: list[float], q: float) -> float:
  return float(np.percentile(np.asarray(lat) * 1000.0, q))


def inprocess(searcher, queries: list[str], batch: int) -> dict:
  lat = []
  t0 = time.perf_counter()
  for i in range(0, len(queries), batch):
    t = time.perf_counter()
    searcher.search(queries[i:i + batch], TOPK)
    lat.append(time.perf_counter() - t)
  dt = time.perf_counter() - t0
  return {"qps": len(queries) / dt, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
          "queries": len(queries), "batch": batch}


async def _post_loop(host: str, port: int, bodies, next_req, lat: list) -> None:
  """One keep-alive connection sending requests in turn (minimal HTTP/1.1 over asyncio streams).

  A hand-rolled client because httpx costs ~3-4 ms of CPU per request here, as much as encoding a
  query: on 2 shared cores the load generator would otherwise eat the server's CPU share.
  """
  reader, writer = await asyncio.open_connection(host, port)
  try:
    for i in next_req:
      body, n = bodies[i]
      t = time.perf_counter()
      writer.write(b"POST /retrieve HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
      head = await reader.readuntil(b"\r\n\r\n")
      length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
      payload = await reader.readexactly(length)
      lat.append(time.perf_counter() - t)
      if not head.startswith(b"HTTP/1.1 200") or len(json.loads(payload)["result"]) != n:
        raise RuntimeError(f"bad response: {head[:40]!r} {payload[:200]!r}")
  finally:
    writer.close()


async def _server_run(url: str, queries: list[str], clients: int, per_request: int) -> dict:
  host, port = url.removeprefix("http://").split(":")
  bodies = [(json.dumps({"queries": queries[i:i + per_request], "topk": TOPK,
                         "return_scores": True}).encode(), len(queries[i:i + per_request]))
            for i in range(0, len(queries), per_request)]
  lat: list[float] = []
  next_req = iter(range(len(bodies)))
  t0 = time.perf_counter()
  await asyncio.gather(*(_post_loop(host, int(port), bodies, next_req, lat)
                         for _ in range(clients)))
  dt = time.perf_counter() - t0
  return {"qps": len(queries) / dt, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
          "queries": len(queries), "clients": clients, "queries_per_request": per_request}


def server_run(url, queries, clients, per_request, health: bool = True) -> dict:
  import httpx
  if not health:   # Search-R1's server has no /health counters
    return asyncio.run(_server_run(url, queries, clients, per_request))
  before = httpx.get(f"{url}/health").json()
  out = asyncio.run(_server_run(url, queries, clients, per_request))
  after = httpx.get(f"{url}/health").json()
  batches = after["batches"] - before["batches"]
  out["mean_micro_batch"] = (after["batched_queries"] - before["batched_queries"]) / max(batches, 1)
  # Fraction of the run the server's search worker was busy: near 1 means encode+search bound,
  # well below 1 means requests did not reach the worker fast enough (HTTP path / CPU share).
  out["worker_busy_fraction"] = (after["worker_busy_s"] - before["worker_busy_s"]) / (
      len(queries) / out["qps"])
  return out


def start_search_r1(path: str, python: str, index_dir: str, corpus: str, encoder: str,
                    fp32: bool, timeout_s: float = 600.0):
  """Search-R1's retrieval_server.py (unchanged, via bench/search_r1_cpu.py) on a free loopback
  port, serving our `index.faiss` and corpus with the same MiniLM folder; returns (proc, url)."""
  import httpx
  import portpicker

  from retrieval.server import spawn_until_ready
  server = path if path.endswith(".py") else os.path.join(path, "search_r1", "search",
                                                          "retrieval_server.py")
  if not os.path.isfile(server):
    raise SystemExit(f"--search_r1: no retrieval_server.py at {server}")
  port = portpicker.pick_unused_port()
  url = f"http://127.0.0.1:{port}"
  # retriever_name "minilm": no e5/bge query prefix, mean pooling and normalisation, as ours
  cmd = [python, os.path.join(ROOT, "bench", "search_r1_cpu.py"), server,
         "--port", str(port), "--index_path", os.path.join(index_dir, "index.faiss"),
         "--corpus_path", corpus, "--topk", str(TOPK), "--retriever_name", "minilm",
         "--retriever_model", encoder, *(["--fp32"] if fp32 else [])]
  body = {"queries": ["warm up"], "topk": TOPK, "return_scores": True}

  def answers() -> bool:  # it has no /health: the first real search is the readiness probe
    return httpx.post(f"{url}/retrieve", json=body, timeout=30.0).status_code == 200

  try:
    return spawn_until_ready(cmd, answers, "Search-R1's server", timeout_s,
                             log_prefix="search_r1_server_", poll_s=1.0), url
  except (RuntimeError, TimeoutError) as e:
    hint = " (that interpreter needs `datasets`)" if "datasets" in str(e) else ""
    raise SystemExit(f"{e}{hint}") from None


def top_ids(url: str, queries: list[str]) -> list[list[str]]:
  import httpx
  r = httpx.post(f"{url}/retrieve", json={"queries": queries, "topk": TOPK, "return_scores": True},
                 timeout=300.0).json()["result"]
  return [[str(hit["document"]["id"]) for hit in row] for row in r]


def pooled(runs: list[dict]) -> dict:
  """Total queries / total time over slices; p50 = median of slice p50s, p99 = worst slice p99."""
  total_q = sum(r["queries"] for r in runs)
  total_s = sum(r["queries"] / r["qps"] for r in runs)
  out = dict(runs[0], queries=total_q, qps=total_q / total_s,
             p50_ms=float(np.median([r["p50_ms"] for r in runs])),
             p99_ms=float(max(r["p99_ms"] for r in runs)), slices=len(runs))
  if "mean_micro_batch" in runs[0]:
    out["mean_micro_batch"] = float(np.mean([r["mean_micro_batch"] for r in runs]))
    out["worker_busy_fraction"] = float(np.mean([r["worker_busy_fraction"] for r in runs]))
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--passages", type=int, default=20000)
  p.add_argument("--queries", type=int, default=1024)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--slices", type=int, default=4, help="alternations per case and round")
  p.add_argument("--cache_dir", default="/tmp/stepsearch_bench_retrieval")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "retrieval.json"))
  p.add_argument("--search_r1", default=None,
                 help="a Search-R1 checkout (or its retrieval_server.py): add it as a contender")
  p.add_argument("--search_r1_python", default=sys.executable,
                 help="interpreter for Search-R1's server (needs torch, transformers, faiss, "
                      "fastapi, uvicorn, datasets)")
  p.add_argument("--search_r1_dtype", default="as_shipped", choices=("as_shipped", "float32"),
                 help="as_shipped: its hard-coded fp16 encoder; float32: .half() skipped "
                      "(bench/search_r1_cpu.py --fp32), the same dtype as ours")
  a = p.parse_args()
  if a.passages < 20000:
    print("note: the design's anchor figures use >= 20k passages", file=sys.stderr)
  enable_compilation_cache()
  corpus = os.path.join(a.cache_dir, f"corpus_{a.passages}.jsonl")
  index_dir = os.path.join(a.cache_dir, f"flat_{a.passages}")
  if not os.path.exists(corpus):
    write_corpus(corpus, a.passages, seed=0, min_words=20, max_words=60)
  t = time.time()
  manifest = build_index.build(corpus, index_dir, chunk_size=2048, batch_size=64)  # resumable
  build_s = time.time() - t

  from retrieval.searcher import Searcher
  from retrieval.server import start_subprocess
  queries = make_queries(a.queries)
  searcher = Searcher(index_dir, dtype=a.dtype, max_batch=128)
  searcher.warmup(max_batch=128)
  proc, url = start_subprocess(index_dir, extra_args=[
      "--cache_size", "0", "--dtype", a.dtype, "--warmup_batch", "128", "--max_batch", "256"])
  cases = [("clients_1", 1, 1, queries[:192]), ("clients_8", 8, 1, queries),
           ("clients_32", 32, 1, queries), ("requests_128", 1, 128, queries)]
  results = {}
  theirs = None
  try:
    if a.search_r1:
      from retrieval.encoder import default_encoder_path
      theirs, their_url = start_search_r1(a.search_r1, a.search_r1_python, index_dir, corpus,
                                          default_encoder_path(),
                                          a.search_r1_dtype == "float32")
      sample = queries[:256]
      same = [x == y for x, y in zip(top_ids(url, sample), top_ids(their_url, sample))]
      agreement = float(np.mean(same))
    for name, clients, per_req, qs in cases:   # one untimed pass so every side is warm
      server_run(url, qs[:64], clients, per_req)
      inprocess(searcher, qs[:64], max(clients, per_req))
      if theirs:
        server_run(their_url, qs[:64], clients, per_req, health=False)
    for name, clients, per_req, qs in cases:
      batch = max(clients, per_req)
      ins, srv, sr1 = [], [], []
      # Alternate small slices of the query set between the two sides, so that load from other
      # processes on this shared machine hits both about equally; totals are pooled.
      step = max(batch, len(qs) // a.slices)
      for _ in range(a.rounds):
        for j in range(0, len(qs), step):
          ins.append(inprocess(searcher, qs[j:j + step], batch))
          srv.append(server_run(url, qs[j:j + step], clients, per_req))
          if theirs:
            sr1.append(server_run(their_url, qs[j:j + step], clients, per_req, health=False))
      i, s = pooled(ins), pooled(srv)
      results[name] = {"server": s, "in_process": i, "ratio": s["qps"] / i["qps"],
                       "overhead": 1.0 - s["qps"] / i["qps"]}
      if theirs:
        results[name]["search_r1"] = pooled(sr1)
        results[name]["ours_over_search_r1"] = s["qps"] / results[name]["search_r1"]["qps"]
        print(f"{name}: Search-R1 server {results[name]['search_r1']['qps']:.1f} q/s (p99 "
              f"{results[name]['search_r1']['p99_ms']:.1f} ms) | ours / theirs "
              f"{results[name]['ours_over_search_r1']:.2f}", file=sys.stderr)
      print(f"{name}: server {s['qps']:.1f} q/s (p50 {s['p50_ms']:.1f} ms, p99 "
            f"{s['p99_ms']:.1f} ms, micro-batch {s['mean_micro_batch']:.1f}) | in-process "
            f"{i['qps']:.1f} q/s | ratio {results[name]['ratio']:.3f}", file=sys.stderr)
  finally:
    for pr in (proc, theirs):
      if pr is not None:
        pr.terminate()
        pr.wait(timeout=30)
  report = {
      "bench": "retrieval", "passages": manifest["num_passages"], "dim": manifest["dim"],
      "index": manifest["index_type"], "encoder": manifest["encoder"]["name"],
      "encoder_dtype": a.dtype, "topk": TOPK, "build_s": build_s,
      "chunks_encoded_this_run": manifest["chunks_encoded"], "rounds": a.rounds, "slices": a.slices,
      "load_average": os.getloadavg(), "cpus": os.cpu_count(), "results": results,
      "targets": {"overhead_at_32_clients": 0.15, "requests_128_qps": 400,
                  "clients_32_qps": 250, "clients_32_p99_ms": 250},
      "meets_overhead_target": results["clients_32"]["overhead"] <= 0.15,
      # passages this run encoded per second (a resumed build skips its first, finished chunks)
      "build_passages_per_s": (
          (manifest["num_passages"] - 2048 * (-(-manifest["num_passages"] // 2048)
                                              - manifest["chunks_encoded"])) / build_s
          if manifest["chunks_encoded"] else None),
  }
  if theirs:
    report["search_r1"] = {"server": a.search_r1, "dtype": a.search_r1_dtype,
                           "top3_agreement": agreement,
                           "targets": {"requests_128_ours_over_theirs": 2.0}}
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
