"""Online search through Serper (google.serper.dev) as a `Retriever` backend.

Serper's documented API: POST https://google.serper.dev/search with header `X-API-KEY` and a JSON
body `{"q": query, "num": k}`; a JSON list of such objects is a batch and is answered with a list
of responses in order. A response carries `organic: [{"title", "link", "snippet", "position"}]`
and optionally `answerBox` / `knowledgeGraph`.

Mapping (MAPPING_VERSION 1) into the Search-R1 document shape, as Search-R1's online search servers
do it (title and snippet joined into `contents`, the title on the first line):

  organic[i] -> {"document": {"id": link, "contents": f'"{title}"\\n{snippet}'},
                 "score": 1 / position}

`position` is Serper's 1-based rank (the list index + 1 where it is missing), so the score is the
reciprocal rank: 1, 0.5, 0.33...; Google gives no relevance score. A title is made one line (the
`<information>` formatting reads the first line as the title); a missing title falls back to the
link, a missing snippet to "". Only the first `topk` organic results are kept. With
`answer_box=True` an `answerBox` that has a snippet or answer comes first (id "answerBox:" + its
link, score 1.0) and the list is still cut at `topk`; `knowledgeGraph` is not used.

Queries are normalised (whitespace collapsed, lower-cased) before they are sent and cached: Google
does not tell case apart, and a rollout's "Who  wrote Hamlet" and "who wrote hamlet" then cost one
request. Identical queries in one call are sent once.

The on-disk cache (sqlite3, `cache_dir/serper_cache.sqlite`, WAL, safe to share between processes
and hosts on one local filesystem) is keyed by (fingerprint, normalised query, topk), so repeated
rollouts, resumed runs and reruns do not pay for the same search twice; `hits`, `misses` and
`requests` count cache hits, cache misses and HTTP requests sent. `cache_ttl_s` (None = forever)
lets cached answers expire. Answers without an `organic` field are not cached.

Online results change over time: `fingerprint()` ("serper:" + hash of the URL and the mapping)
identifies the backend and mapping, not the results, so a resumed run notices a switch of backend
or mapping but not that Google's index moved. The cache is what makes a rerun see the same
documents. `fingerprint()` sends no request (it would cost a search credit); a bad key or URL
surfaces at the first search.

Retries: transport errors, 408, 429 and 5xx are retried with exponential backoff (a 429's
`Retry-After` is honoured up to `max_backoff_s`); after the last retry, or at once on another 4xx
(401 bad key, 400 bad body...), a `RetrievalError` names the URL and the cause. The API key is read
from the environment variable `api_key_env` and is never logged, kept in a repr, or put in an
error message (any echo of it in a server's answer is masked).

The live API was not reachable from the machine this was written on: tests/test_retrieval_serper.py
runs against a local HTTP server on loopback that speaks Serper's documented request and response
shape (single and batch bodies, the X-API-KEY header).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from typing import Sequence

import httpx

from stepsearch_jax.rollout.retriever import RetrievalError, answer_nonblank, call_with_retries

DEFAULT_URL = "https://google.serper.dev/search"
MAPPING_VERSION = 1
CACHE_FILE = "serper_cache.sqlite"


def normalise_query(query: str) -> str:
  """The query as sent and cached: whitespace collapsed, lower-cased."""
  return " ".join(query.split()).lower()


def map_response(response: dict, topk: int, answer_box: bool = False) -> list[dict]:
  """One Serper response -> at most `topk` Search-R1 `{"document", "score"}` hits (module doc)."""
  hits: list[dict] = []
  box = response.get("answerBox") if answer_box else None
  if isinstance(box, dict):
    text = box.get("snippet") or box.get("answer") or ""
    if text:
      title = _one_line(box.get("title") or box.get("link") or "Answer")
      hits.append({"document": {"id": "answerBox:" + str(box.get("link", "")),
                                "contents": f'"{title}"\n{text}'}, "score": 1.0})
  organic = response.get("organic") or []
  for i, item in enumerate(organic):
    if len(hits) >= topk:
      break
    if not isinstance(item, dict):
      continue
    link = str(item.get("link") or "")
    title = _one_line(item.get("title") or link)
    snippet = str(item.get("snippet") or "")
    try:
      position = float(item.get("position") or i + 1)
    except (TypeError, ValueError):
      position = float(i + 1)
    hits.append({"document": {"id": link, "contents": f'"{title}"\n{snippet}'},
                 "score": 1.0 / max(position, 1.0)})
  return hits[:topk]


def _one_line(text) -> str:
  return " ".join(str(text).split())


class _Cache:
  """sqlite3 answer cache shared by processes: (namespace, query, topk) -> JSON hits."""

  def __init__(self, cache_dir: str, ttl_s: float | None):
    os.makedirs(cache_dir, exist_ok=True)
    self.path = os.path.join(cache_dir, CACHE_FILE)
    self.ttl_s = ttl_s
    self._lock = threading.Lock()
    self._db = sqlite3.connect(self.path, timeout=60.0, check_same_thread=False,
                               isolation_level=None)
    try:
      self._db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError:
      pass                                     # a filesystem without WAL: rollback journal
    self._db.execute("CREATE TABLE IF NOT EXISTS answers (ns TEXT NOT NULL, query TEXT NOT NULL, "
                     "topk INTEGER NOT NULL, hits TEXT NOT NULL, created REAL NOT NULL, "
                     "PRIMARY KEY (ns, query, topk))")

  def get_many(self, ns: str, queries: Sequence[str], topk: int) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    oldest = time.time() - self.ttl_s if self.ttl_s is not None else float("-inf")
    with self._lock:
      for start in range(0, len(queries), 500):    # under sqlite's bound-parameter limit
        chunk = list(queries[start:start + 500])
        marks = ",".join("?" * len(chunk))
        rows = self._db.execute(
            f"SELECT query, hits, created FROM answers WHERE ns = ? AND topk = ? "
            f"AND query IN ({marks})", [ns, topk, *chunk]).fetchall()
        for query, hits, created in rows:
          if created >= oldest:
            found[query] = json.loads(hits)
    return found

  def put_many(self, ns: str, answers: dict[str, list[dict]], topk: int) -> None:
    if not answers:
      return
    now = time.time()
    with self._lock:
      with self._db:
        self._db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                             [(ns, q, topk, json.dumps(h), now) for q, h in answers.items()])

  def close(self) -> None:
    with self._lock:
      self._db.close()


class SerperRetriever:
  """`Retriever` over Serper's Google search API (see the module docstring for the mapping)."""

  def __init__(self, api_key_env: str = "SERPER_API_KEY", url: str = DEFAULT_URL, topk: int = 3,
               timeout_s: float = 30.0, retries: int = 5, backoff_s: float = 0.5,
               max_backoff_s: float = 8.0, batch_size: int = 32, cache_dir: str | None = None,
               cache_ttl_s: float | None = None, answer_box: bool = False):
    key = os.environ.get(api_key_env, "").strip()
    if not key:
      raise RetrievalError(f"Serper search needs an API key in the environment variable "
                           f"{api_key_env}, which is unset or empty")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.api_key_env = api_key_env
    self.url = url
    self.where = f"serper {url}"
    self.topk = topk
    self.timeout_s = timeout_s
    self.retries = retries
    self.backoff_s = backoff_s
    self.max_backoff_s = max_backoff_s
    self.batch_size = batch_size
    self.answer_box = answer_box
    self.hits = 0          # queries answered from the cache
    self.misses = 0        # queries sent to Serper
    self.requests = 0      # HTTP requests sent (attempts, retries included)
    self._key = key
    self._http = httpx.Client(timeout=timeout_s,
                              headers={"X-API-KEY": key, "Content-Type": "application/json"})
    self._cache = _Cache(cache_dir, cache_ttl_s) if cache_dir else None
    self._fingerprint = "serper:" + hashlib.sha256(json.dumps(
        {"url": url, "mapping": MAPPING_VERSION, "answer_box": answer_box},
        sort_keys=True).encode()).hexdigest()[:16]

  @classmethod
  def from_config(cls, rcfg, workdir: str | None = None) -> "SerperRetriever":
    """From config.retrieval: its serper_* keys plus the shared topk/timeout_s/retries/backoff.

    serper_cache_dir "" means `workdir/serper_cache` (no cache without a workdir); "none" means
    no cache.
    """
    cache_dir = rcfg.serper_cache_dir
    if cache_dir.lower() == "none":
      cache_dir = None
    elif not cache_dir:
      cache_dir = os.path.join(workdir, "serper_cache") if workdir else None
    return cls(api_key_env=rcfg.serper_api_key_env, url=rcfg.serper_url or DEFAULT_URL,
               topk=rcfg.topk, timeout_s=rcfg.timeout_s, retries=rcfg.retries,
               backoff_s=rcfg.backoff_s, max_backoff_s=rcfg.max_backoff_s,
               batch_size=rcfg.serper_batch_size, cache_dir=cache_dir,
               cache_ttl_s=rcfg.serper_cache_ttl_s or None, answer_box=rcfg.serper_answer_box)

  def __repr__(self) -> str:
    return (f"SerperRetriever(url={self.url!r}, api_key_env={self.api_key_env!r}, "
            f"topk={self.topk}, cache={self.cache_path!r})")

  @property
  def cache_path(self) -> str | None:
    return self._cache.path if self._cache else None

  def stats(self) -> dict:
    return {"hits": self.hits, "misses": self.misses, "requests": self.requests}

  def fingerprint(self) -> str:
    """"serper:" + hash of URL and mapping. Identifies the backend, not the (changing) results."""
    return self._fingerprint

  def close(self) -> None:
    self._http.close()
    if self._cache is not None:
      self._cache.close()

  def __enter__(self) -> "SerperRetriever":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def search(self, queries: Sequence[str], topk: int | None = None) -> list[list[dict]]:
    """Top-k hits per query, in order; a blank query gets [] without a request."""
    k = self.topk if topk is None else topk
    return answer_nonblank(queries, lambda qs: self._search(qs, k))

  def _search(self, queries: Sequence[str], k: int) -> list[list[dict]]:
    norm = [normalise_query(q) for q in queries]
    unique = list(dict.fromkeys(norm))
    answers = self._cache.get_many(self._fingerprint, unique, k) if self._cache else {}
    self.hits += len(answers)
    todo = [q for q in unique if q not in answers]
    self.misses += len(todo)
    for start in range(0, len(todo), self.batch_size):
      batch = todo[start:start + self.batch_size]
      responses = self._post(batch, k)
      fresh = {q: map_response(r, k, self.answer_box) for q, r in zip(batch, responses)}
      answers.update(fresh)
      if self._cache is not None:
        self._cache.put_many(self._fingerprint,
                             {q: fresh[q] for q, r in zip(batch, responses) if "organic" in r}, k)
    return [answers[q] for q in norm]

  def _post(self, batch: list[str], k: int) -> list[dict]:
    """One chunk: a single body for one query, a list body for more; the responses in order."""
    body = ({"q": batch[0], "num": k} if len(batch) == 1
            else [{"q": q, "num": k} for q in batch])
    decoded = self._call(body)
    if isinstance(decoded, dict) and len(batch) == 1:
      decoded = [decoded]
    if (not isinstance(decoded, list) or len(decoded) != len(batch)
        or not all(isinstance(r, dict) for r in decoded)):
      raise RetrievalError(f"POST {self.url} returned a malformed body for {len(batch)} "
                           f"queries: {self._mask(str(decoded)[:200])}")
    return decoded

  def _call(self, body):
    def send():
      self.requests += 1
      return self._http.post(self.url, json=body)
    return call_with_retries(send, f"POST {self.url}", self, self._mask)

  def _mask(self, text: str) -> str:
    return text.replace(self._key, "***") if self._key else text
