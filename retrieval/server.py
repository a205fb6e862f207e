"""Search-R1/StepSearch-compatible retrieval server over a built index directory or a FAISS file.

  python -m retrieval.server --index DIR [--host 127.0.0.1] [--port 8000] [--token T]
  python -m retrieval.server --faiss_index e5_Flat.index --corpus wiki-18.jsonl --encoder DIR \
      [--pooling mean|cls|pooler] [--query_prefix "query: "] [--normalize | --no-normalize]

The second form serves an index written by Search-R1's index_builder.py (any FAISS type): row i is
non-blank line i of the corpus, whose line offsets are found once and kept in FILE.offsets.npy.

POST /retrieve `{"queries": [str], "topk": int, "return_scores": bool}` ->
`{"result": [[{"document": <corpus row as stored>, "score": float}]]}` (scores are always sent,
as in StepSearch's server). What Search-R1's rollout client sends is answered, not refused: an
empty `queries` list, blank queries (an empty list in their place), thousands of queries in one
request, `topk` null. GET /health returns the index fingerprint, sizes, limits, corpus errors.

Concurrency model: uvicorn's event loop parses and validates requests and answers cache hits
directly. Misses go onto a queue drained by ONE worker thread; each time the worker wakes it takes
everything queued (up to `max_batch` queries; a bigger request is queued as `max_batch` chunks, so
it neither holds more than a chunk in memory nor blocks small clients) and runs one encode +
search for all of it, so 32 clients sending one query each cost a few batched model calls, not 32
sequential ones. When the
previous batch merged several requests the worker lingers `linger_ms` for the clients it just
answered to come back (without it, 32 clients settle into two alternating half-size batches).
JAX, FAISS and the tokenizer release the GIL, so the loop keeps accepting requests meanwhile. The response
body is assembled from the corpus lines' raw bytes, so documents come back exactly as stored.

The LRU cache is keyed by (whitespace-normalised query, topk). Whitespace normalisation cannot
change results: BERT and bm25s tokenizers split on whitespace. (The released cache ignored topk.)
"""

import argparse
import asyncio
import collections
import dataclasses
import hmac
import ipaddress
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Sequence

LOOPBACK = "127.0.0.1"


class Limits:
  """Request limits; anything beyond them is refused with a 4xx that says which limit."""

  def __init__(self, max_queries: int = 8192, max_query_chars: int = 4096, max_topk: int = 100,
               max_body_bytes: int = 8 << 20):
    self.max_queries = max_queries
    self.max_query_chars = max_query_chars
    self.max_topk = max_topk
    self.max_body_bytes = max_body_bytes

  def as_dict(self) -> dict:
    return dict(vars(self))


class RequestError(Exception):

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


def normalize_query(q: str) -> str:
  return " ".join(q.split())


def parse_request(body: bytes, limits: Limits, default_topk: int) -> tuple[list[str], int]:
  """Validate a /retrieve body; returns (normalised queries, topk) or raises RequestError.

  A blank query comes back as "" (answered with no hits); `topk` missing or null is the default.
  """
  try:
    text = body.decode("utf-8")
  except UnicodeDecodeError as e:
    raise RequestError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
  try:
    req = json.loads(text)
  except json.JSONDecodeError as e:
    raise RequestError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} "
                            f"column {e.colno}") from None
  if not isinstance(req, dict):
    raise RequestError(422, f"request body must be a JSON object, got {type(req).__name__}")
  if "queries" not in req:
    raise RequestError(422, "field 'queries' is required (a list of strings)")
  queries = req["queries"]
  if not isinstance(queries, list):
    raise RequestError(422, f"field 'queries' must be a list of strings, got "
                            f"{type(queries).__name__}")
  if len(queries) > limits.max_queries:
    raise RequestError(413, f"{len(queries)} queries in one request; the limit is "
                            f"{limits.max_queries}")
  out = []
  for i, q in enumerate(queries):
    if not isinstance(q, str):
      raise RequestError(422, f"queries[{i}] must be a string, got {type(q).__name__}")
    try:
      q.encode("utf-8")
    except UnicodeEncodeError:
      raise RequestError(422, f"queries[{i}] is not valid UTF-8 (lone surrogate escape)") from None
    if len(q) > limits.max_query_chars:
      raise RequestError(413, f"queries[{i}] has {len(q)} characters; the limit is "
                              f"{limits.max_query_chars}")
    out.append(normalize_query(q))
  topk = req.get("topk")
  topk = default_topk if topk is None else topk
  if type(topk) is not int:
    raise RequestError(422, f"field 'topk' must be an integer, got {type(topk).__name__}")
  if not 1 <= topk <= limits.max_topk:
    raise RequestError(422, f"field 'topk'={topk} must be between 1 and {limits.max_topk}")
  if "return_scores" in req and not isinstance(req["return_scores"], bool):
    raise RequestError(422, "field 'return_scores' must be a boolean")
  return out, topk


class Batcher:
  """One worker thread that turns whatever requests are queued into one search_many call."""

  def __init__(self, searcher, max_batch: int = 256, linger_ms: float = 3.0, start: bool = True):
    self.searcher = searcher
    self.max_batch = max_batch
    self.linger_s = linger_ms / 1000.0
    self.batches = 0
    self.batched_queries = 0
    self.busy_s = 0.0          # time spent in search_many: busy_s / wall time = worker load
    self._queue: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._run, name="retrieval-batcher", daemon=True)
    if start:
      self._thread.start()

  def start(self) -> None:
    self._thread.start()

  async def submit(self, queries: list[str], topk: int) -> list:
    """(ids, scores) per query; queued in chunks of max_batch queries."""
    loop = asyncio.get_running_loop()
    futs = []
    for lo in range(0, len(queries), self.max_batch):
      futs.append(loop.create_future())
      self._queue.put((queries[lo:lo + self.max_batch], topk, futs[-1], loop))
    parts = await asyncio.gather(*futs, return_exceptions=True)   # every chunk's error retrieved
    for part in parts:
      if isinstance(part, BaseException):
        raise part
    return [row for part in parts for row in part]

  def _run(self) -> None:
    last_requests = 1
    while True:
      items = [self._queue.get()]
      n = len(items[0][0])
      # Under concurrency (the last batch merged several requests) wait a few ms for the clients
      # just answered to send their next request, so batches stay large; a lone client never
      # waits.
      deadline = time.perf_counter() + (self.linger_s if last_requests > 1 else 0.0)
      while n < self.max_batch:
        try:
          items.append(self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                       if time.perf_counter() < deadline else self._queue.get_nowait())
        except queue.Empty:
          break
        n += len(items[-1][0])
      last_requests = len(items)
      queries = [q for it in items for q in it[0]]
      topks = [it[1] for it in items for _ in it[0]]
      t0 = time.perf_counter()
      try:
        rows = self.searcher.search_many(queries, topks)
        self.batches += 1
        self.batched_queries += len(queries)
        self.busy_s += time.perf_counter() - t0
      except Exception as e:  # noqa: BLE001  (reported to each waiting request as a 500)
        for _, _, fut, loop in items:
          loop.call_soon_threadsafe(_set, fut, None, e)
        continue
      start = 0
      for qs, _, fut, loop in items:
        loop.call_soon_threadsafe(_set, fut, rows[start:start + len(qs)], None)
        start += len(qs)


def _set(fut: asyncio.Future, result, exc) -> None:
  if fut.done():
    return
  if exc is not None:
    fut.set_exception(exc)
  else:
    fut.set_result(result)


class LRU:

  def __init__(self, capacity: int):
    self.capacity = capacity
    self.data: collections.OrderedDict = collections.OrderedDict()
    self.hits = self.misses = 0

  def get(self, key):
    v = self.data.get(key)
    if v is None:
      self.misses += 1
    else:
      self.hits += 1
      self.data.move_to_end(key)
    return v

  def put(self, key, value) -> None:
    if self.capacity <= 0:
      return
    self.data[key] = value
    self.data.move_to_end(key)
    while len(self.data) > self.capacity:
      self.data.popitem(last=False)


def create_app(searcher, limits: Limits | None = None, token: str | None = None,
               cache_size: int = 50_000, default_topk: int = 3, max_batch: int = 256,
               linger_ms: float = 3.0):
  """The FastAPI app; `searcher` is a retrieval.searcher.Searcher (already warmed up)."""
  from fastapi import FastAPI, Request
  from fastapi.responses import JSONResponse, Response
  from retrieval.corpus import CorpusError

  limits = limits or Limits()
  app = FastAPI(title="stepsearch_jax retrieval", docs_url=None, redoc_url=None)
  batcher = Batcher(searcher, max_batch, linger_ms)
  cache = LRU(cache_size)
  corpus = searcher.corpus
  corpus_errors = {"count": 0, "recent": collections.deque(maxlen=10)}
  expected_auth = f"Bearer {token}".encode() if token else None
  app.state.batcher, app.state.cache, app.state.searcher = batcher, cache, searcher

  def error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": message}, status_code=status, headers=headers)

  def authorised(request: Request) -> bool:
    if expected_auth is None:
      return True
    got = request.headers.get("authorization", "").encode()
    return hmac.compare_digest(got, expected_auth)

  async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
      if not declared.isdigit():
        raise RequestError(400, "invalid Content-Length header")
      if int(declared) > limits.max_body_bytes:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of "
                                f"{limits.max_body_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
      size += len(chunk)
      if size > limits.max_body_bytes:
        raise RequestError(413, f"request body exceeds the limit of {limits.max_body_bytes} bytes")
      chunks.append(chunk)
    return b"".join(chunks)

  def fragment(ids, scores) -> bytes:
    """One query's result list as JSON bytes, splicing in each stored corpus line verbatim."""
    parts = [b'{"document": ' + corpus.document(int(i)) + b', "score": ' +
             json.dumps(float(s)).encode() + b"}" for i, s in zip(ids, scores) if i >= 0]
    return b"[" + b", ".join(parts) + b"]"

  @app.post("/retrieve")
  async def retrieve(request: Request):
    if not authorised(request):
      return error(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')")
    try:
      queries, topk = parse_request(await read_body(request), limits, default_topk)
    except RequestError as e:
      return error(e.status, e.message)
    frags: list = [cache.get((q, topk)) if q else b"[]" for q in queries]
    missing = list(dict.fromkeys(q for q, f in zip(queries, frags) if f is None))
    if missing:
      try:
        rows = await batcher.submit(missing, topk)
      except Exception as e:  # noqa: BLE001
        return error(500, f"search failed: {type(e).__name__}: {e}")
      try:
        fresh = {q: fragment(ids, scores) for q, (ids, scores) in zip(missing, rows)}
      except CorpusError as e:
        corpus_errors["count"] += 1
        corpus_errors["recent"].append(str(e))
        return error(500, f"corpus row cannot be served: {e}")
      for q, f in fresh.items():
        cache.put((q, topk), f)
      frags = [f if f is not None else fresh[q] for q, f in zip(queries, frags)]
    return Response(b'{"result": [' + b", ".join(frags) + b"]}", media_type="application/json")

  @app.get("/health")
  async def health(request: Request):
    if not authorised(request):
      return error(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')")
    m = searcher.manifest
    return {"status": "corpus_errors" if corpus_errors["count"] else "ok",
            "fingerprint": m["fingerprint"], "index_type": m["index_type"],
            "faiss_class": m.get("faiss_class"),
            "num_passages": m["num_passages"], "dim": m["dim"],
            "corpus_sha256": m["corpus_sha256"], "corpus": searcher.corpus_info,
            "corpus_errors": {"count": corpus_errors["count"],
                              "recent": list(corpus_errors["recent"])},
            "encoder": None if searcher.encoder is None else {
                "name": m["encoder"]["name"], "dtype": searcher.encoder.dtype,
                "conventions": dataclasses.asdict(searcher.encoder.conventions)},
            "limits": limits.as_dict(), "default_topk": default_topk,
            "cache": {"entries": len(cache.data), "hits": cache.hits, "misses": cache.misses},
            "batches": batcher.batches, "batched_queries": batcher.batched_queries,
            "worker_busy_s": round(batcher.busy_s, 3)}

  return app


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description="Search-R1-compatible retrieval server.")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--index", help="index directory from retrieval.build_index")
  src.add_argument("--faiss_index", help="a FAISS file (faiss.write_index, e.g. Search-R1's "
                   "index_builder.py); needs --corpus (row i = non-blank line i) and --encoder")
  p.add_argument("--host", default=LOOPBACK)
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--token", default=os.environ.get("RETRIEVAL_TOKEN") or None,
                 help="require 'Authorization: Bearer TOKEN' (default: $RETRIEVAL_TOKEN)")
  p.add_argument("--corpus", default=None,
                 help="JSONL corpus: required with --faiss_index; with --index, if it moved")
  p.add_argument("--encoder", default=None,
                 help="HF encoder folder: required with --faiss_index; with --index, if it moved")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="query encoder dtype (default: the build's dtype; float32 for --faiss_index)")
  p.add_argument("--pooling", default=None, choices=("mean", "cls", "pooler"),
                 help="--faiss_index: pooling the passages were encoded with (default: by model)")
  p.add_argument("--query_prefix", default=None,
                 help='--faiss_index: text put before each query (e5: "query: "; default: by model)')
  p.add_argument("--normalize", default=None, action=argparse.BooleanOptionalAction,
                 help="--faiss_index: L2-normalise query embeddings (default: yes; DPR: no)")
  p.add_argument("--faiss_params", default="",
                 help='--faiss_index: faiss.ParameterSpace string, e.g. "nprobe=64,efSearch=128"')
  p.add_argument("--mmap_index", action="store_true",
                 help="--faiss_index: map flat vectors from the file instead of reading them to RAM")
  p.add_argument("--offsets_cache_dir", default=None,
                 help="where corpus offset tables go when the corpus folder is not writable")
  p.add_argument("--topk", type=int, default=3, help="topk when a request omits it")
  p.add_argument("--max_batch", type=int, default=256, help="queries per micro-batch")
  p.add_argument("--linger_ms", type=float, default=3.0,
                 help="under concurrency, wait this long for more requests to join a batch")
  p.add_argument("--cache_size", type=int, default=50_000, help="LRU entries; 0 disables")
  p.add_argument("--max_queries", type=int, default=8192)
  p.add_argument("--max_query_chars", type=int, default=4096)
  p.add_argument("--max_topk", type=int, default=100)
  p.add_argument("--max_body_bytes", type=int, default=8 << 20)
  p.add_argument("--faiss_threads", type=int, default=None,
                 help="OpenMP threads for FAISS (default: 1 on <= 4 cores, else faiss's own)")
  p.add_argument("--warmup_batch", type=int, default=64,
                 help="compile encoder batch shapes up to this size before serving (0: none)")
  p.add_argument("--log_level", default="warning")
  p.add_argument("--parent_pid", type=int, default=0,
                 help="exit when this process dies (start_subprocess passes the trainer's pid)")
  a = p.parse_args(argv)
  if a.faiss_index and not (a.corpus and a.encoder):
    p.error("--faiss_index needs --corpus and --encoder (the model that encoded the passages)")
  if a.index and (a.pooling or a.query_prefix is not None or a.normalize is not None
                  or a.faiss_params or a.mmap_index):
    p.error("--pooling/--query_prefix/--normalize/--faiss_params/--mmap_index apply to "
            "--faiss_index only (an index directory records its encoder's conventions)")
  return a


def make_searcher(a: argparse.Namespace):
  from retrieval.searcher import Searcher
  if a.index:
    return Searcher(a.index, encoder=a.encoder, dtype=a.dtype, corpus=a.corpus,
                    max_batch=a.max_batch, faiss_threads=a.faiss_threads)
  conv = {k: v for k, v in (("pooling", a.pooling), ("query_prefix", a.query_prefix),
                            ("normalize", a.normalize)) if v is not None}
  return Searcher.prebuilt(a.faiss_index, a.corpus, a.encoder, dtype=a.dtype or "float32",
                           conventions=conv, max_batch=a.max_batch,
                           faiss_threads=a.faiss_threads, faiss_params=a.faiss_params,
                           mmap_index=a.mmap_index, offsets_cache_dir=a.offsets_cache_dir)


def main(argv: Sequence[str] | None = None) -> int:
  a = parse_args(argv)
  if a.parent_pid:
    exit_with_parent(a.parent_pid)
  if not is_loopback(a.host) and not a.token:
    print(f"WARNING: serving on {a.host} without --token: anyone who can reach this port can "
          "query the index", file=sys.stderr)
  from retrieval.encoder import enable_compilation_cache
  import uvicorn
  enable_compilation_cache()
  t0 = time.time()
  from retrieval.corpus import CorpusError
  try:
    searcher = make_searcher(a)
  except (FileNotFoundError, ValueError, KeyError, CorpusError) as e:
    print(f"retrieval server: error: {e}", file=sys.stderr, flush=True)
    return 2
  searcher.warmup(a.warmup_batch)
  info = searcher.corpus_info
  table = (f"; offsets {'built' if info['offsets_built'] else 'read'} in "
           f"{info['offsets_seconds']:.2f}s ({info['offsets_table']})"
           if "offsets_table" in info else "")
  print(f"retrieval server: index {a.index or a.faiss_index} ({len(searcher.corpus)} passages, "
        f"{searcher.manifest.get('faiss_class', searcher.index_type)}, fingerprint "
        f"{searcher.fingerprint}{table}) ready in {time.time() - t0:.1f}s on "
        f"http://{a.host}:{a.port}", file=sys.stderr, flush=True)
  app = create_app(searcher, Limits(a.max_queries, a.max_query_chars, a.max_topk,
                                    a.max_body_bytes), a.token, a.cache_size, a.topk, a.max_batch,
                   a.linger_ms)
  uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False)
  return 0


def exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
  """SIGTERM this process once `parent_pid` is gone, even after a SIGKILL, so no orphan server keeps
  a port and a GiB of index after a killed training job. A watchdog thread polls the parent pid:
  prctl(PR_SET_PDEATHSIG) would fire when the *thread* that started us exits (a restart from a
  helper thread would kill its own server), and a fork-time preexec_fn is unsafe under JAX."""
  import signal
  import threading

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(poll_s)
    os.kill(os.getpid(), signal.SIGTERM)     # uvicorn shuts down cleanly; before it, the default
                                             # handler ends the process
  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


# What a trainer's environment says about ITS accelerator, which the sidecar must not inherit.
_ACCELERATOR_ENV = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                    "XLA_PYTHON_CLIENT_ALLOCATOR", "CUDA_VISIBLE_DEVICES", "TPU_VISIBLE_CHIPS",
                    "TPU_PROCESS_BOUNDS", "TPU_CHIPS_PER_PROCESS_BOUNDS")


def sidecar_env(env: dict) -> dict:
  """The sidecar's environment: JAX on the CPU (the encoder is small; the trainer's GPU or TPU
  memory stays the trainer's), and none of the trainer's accelerator settings."""
  out = {k: v for k, v in env.items() if k not in _ACCELERATOR_ENV}
  out["JAX_PLATFORMS"] = "cpu"
  return out


def start_subprocess(index_dir: str | None, port: int | None = None, host: str = LOOPBACK,
                     token: str | None = None, timeout_s: float = 300.0,
                     extra_args: Sequence[str] = (), env: dict | None = None
                     ) -> tuple[subprocess.Popen, str]:
  """Start `python -m retrieval.server` and wait until /health answers; returns (proc, url).

  `index_dir=None` serves what `extra_args` name instead (--faiss_index/--corpus/--encoder).
  Stop it with proc.terminate(); it also exits within a second or two when this process dies. The
  server's output goes to `proc.log_path`, whose tail is put into the error if the server dies or
  does not come up within `timeout_s`.
  """
  import httpx
  if port is None:
    import portpicker
    port = portpicker.pick_unused_port()
  url = f"http://{host}:{port}"
  cmd = [sys.executable, "-m", "retrieval.server", *(["--index", index_dir] if index_dir else []),
         "--host", host, "--port", str(port), "--parent_pid", str(os.getpid()), *extra_args]
  if token:
    cmd += ["--token", token]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc_env = sidecar_env({**os.environ, **(env or {})})
  proc_env["PYTHONPATH"] = root + os.pathsep + proc_env.get("PYTHONPATH", "")
  headers = {"Authorization": f"Bearer {token}"} if token else {}

  def healthy() -> bool:
    return httpx.get(f"{url}/health", headers=headers, timeout=2.0).status_code == 200

  proc = spawn_until_ready(cmd, healthy, f"retrieval server at {url}", timeout_s, env=proc_env,
                           log_prefix="retrieval_server_")
  return proc, url


def spawn_until_ready(cmd: Sequence[str], ready: Callable[[], bool], what: str, timeout_s: float,
                      env: dict | None = None, log_prefix: str = "server_",
                      poll_s: float = 0.2) -> subprocess.Popen:
  """Start `cmd` with its output in a log file (`proc.log_path`) and poll `ready()` (HTTP errors
  count as not ready) until it is true. If the process dies or `timeout_s` passes, it is killed
  and the error carries the log's tail, so a server that cannot start says why."""
  import httpx
  log = tempfile.NamedTemporaryFile("w+b", prefix=log_prefix, suffix=".log", delete=False)
  proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env)
  proc.log_path = log.name
  deadline = time.time() + timeout_s

  def tail() -> str:
    with open(log.name, "rb") as f:
      return f.read()[-3000:].decode("utf-8", "replace")

  while True:
    if proc.poll() is not None:
      raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready; log "
                         f"{log.name}:\n{tail()}")
    try:
      if ready():
        return proc
    except httpx.HTTPError:
      pass
    if time.time() > deadline:
      proc.kill()
      raise TimeoutError(f"{what} not ready after {timeout_s}s; log {log.name}:\n{tail()}")
    time.sleep(poll_s)


if __name__ == "__main__":
  sys.exit(main())
