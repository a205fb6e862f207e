"""Retrievers: the `Retriever` protocol and its backends (the `<information>` text is in texts.py).

A retriever answers a batch of queries with one `{"document", "score"}` list per query (the
Search-R1 shape), names what it searches with `fingerprint()` (pinned into checkpoints, so a resumed
run notices a changed index) and says `where` it searches for logs. Backends, chosen by
`config.retrieval.backend`, are registered in `BACKENDS`: `http` (any Search-R1-compatible
server), `inprocess` (our index searched in this process: no HTTP hop), `serper` (online search).

Rollouts must not die on a transient hiccup of the sidecar (a restart, a full accept queue), nor
hang forever on a dead one: every call has a timeout, transport errors / 5xx / 429 are retried
with exponential backoff, and after the last retry a `RetrievalError` names the URL and the last
cause. 4xx answers other than 408/429 are the caller's bug and are raised at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Callable, Protocol, Sequence

import httpx

from stepsearch_jax.texts import doc_title_text, format_information  # noqa: F401  (re-export)

def retryable(status: int) -> bool:
  """Timeouts, rate limits and server errors are retried; other 4xx mean the request is wrong."""
  return status in (408, 429) or status >= 500

# Queries whose answers identify an index served without /health (a released Search-R1 server):
# the same index answers them with the same documents, a rebuilt or different one almost surely not.
PROBE_QUERIES = ("who wrote hamlet", "capital of france", "when did the second world war end",
                 "largest planet in the solar system", "inventor of the telephone",
                 "river that flows through cairo", "first president of the united states",
                 "chemical symbol for gold")


class RetrievalError(RuntimeError):
  """Retrieval failed for good (after retries, or on a request the server rejects)."""

  def __init__(self, message: str, status: int | None = None):
    super().__init__(message)
    self.status = status


class Retriever(Protocol):
  where: str

  def search(self, queries: Sequence[str], topk: int | None = None) -> list[list[dict]]: ...

  def fingerprint(self) -> str: ...

  def close(self) -> None: ...


def answer_nonblank(queries: Sequence[str], search: Callable[[list[str]], list[list[dict]]]
                    ) -> list[list[dict]]:
  """`search` over the non-blank queries only; blank ones (`<search> </search>`) get no documents.

  Every backend answers a blank query the same way, locally, so no server's handling of it (a 422
  from ours before, a match-anything from some) can change a rollout.
  """
  asked = [i for i, q in enumerate(queries) if q.strip()]
  found = search([queries[i] for i in asked]) if asked else []
  out: list[list[dict]] = [[] for _ in queries]
  for i, docs in zip(asked, found):
    out[i] = docs
  return out


def base_url(url: str) -> str:
  """Search-R1 configs give `.../retrieve`; ours gave the server root. Both mean the same server."""
  url = url.rstrip("/")
  return url[:-len("/retrieve")] if url.endswith("/retrieve") else url


class RetrieverClient:
  """Batched, retrying client for POST {url}/retrieve (Search-R1 schema), any compatible server.

  `/health` (our server) gives the index fingerprint; a server without it (Search-R1's
  retrieval_server.py, rerank and online-search servers) is checked with a real `/retrieve` of
  `PROBE_QUERIES`, whose answers' hash becomes the fingerprint.
  """

  def __init__(self, url: str, topk: int = 3, timeout_s: float = 30.0, retries: int = 5,
               token: str | None = None, batch_size: int = 512, backoff_s: float = 0.5,
               max_backoff_s: float = 8.0):
    self.url = base_url(url)
    self.where = self.url
    self.topk = topk
    self.timeout_s = timeout_s
    self.retries = retries
    self.batch_size = batch_size
    self.backoff_s = backoff_s
    self.max_backoff_s = max_backoff_s
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    self._http = httpx.Client(timeout=timeout_s, headers=headers)

  def close(self) -> None:
    self._http.close()

  def __enter__(self) -> "RetrieverClient":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _call(self, method: str, path: str, payload: dict | None = None):
    """One logical call with retries; returns the decoded JSON body."""
    target = f"{self.url}{path}"
    return call_with_retries(lambda: self._http.request(method, target, json=payload),
                             f"{method} {target}", self)

  def search(self, queries: Sequence[str], topk: int | None = None) -> list[list[dict]]:
    """Top-k `{"document", "score"}` lists, one per query, in order.

    An empty or whitespace-only query (a policy can write `<search> </search>`) gets no documents
    without a request: the server rightly rejects it, and a rollout must not die of it.
    """
    k = self.topk if topk is None else topk
    return answer_nonblank(queries, lambda qs: self._search(qs, k))

  def _search(self, queries: Sequence[str], k: int) -> list[list[dict]]:
    out: list[list[dict]] = []
    for start in range(0, len(queries), self.batch_size):
      batch = list(queries[start:start + self.batch_size])
      body = self._call("POST", "/retrieve",
                        {"queries": batch, "topk": k, "return_scores": True})
      result = body.get("result") if isinstance(body, dict) else None
      if not isinstance(result, list) or len(result) != len(batch):
        raise RetrievalError(f"POST {self.url}/retrieve returned a malformed body for "
                             f"{len(batch)} queries: {str(body)[:200]}")
      out.extend(result)
    return out

  def health(self) -> dict | None:
    """Our server's /health body; None for a server that has no /health (404/405)."""
    try:
      return self._call("GET", "/health")
    except RetrievalError as e:
      if e.status in (404, 405):
        return None
      raise

  def fingerprint(self) -> str:
    """/health's fingerprint, else a hash of the probe queries' answers (a real request either
    way, so a dead or wrong URL fails here, at start, not at the first rollout)."""
    body = self.health()
    if body is not None and body.get("fingerprint"):
      return str(body["fingerprint"])
    return probe_fingerprint(self.search(PROBE_QUERIES, topk=self.topk))


def probe_fingerprint(results: list[list[dict]]) -> str:
  """Hash of the probe answers' documents (scores left out: batching moves them by ~1e-4)."""
  docs = [[hit.get("document", hit) if isinstance(hit, dict) else hit for hit in hits]
          for hits in results]
  return "probe:" + hashlib.sha256(json.dumps(docs, sort_keys=True).encode()).hexdigest()[:16]


class InProcessRetriever:
  """A built index searched in this process (retrieval.searcher.Searcher): no server, no HTTP hop.

  For tests and single-host runs. Answers equal the server's: the server runs the same Searcher
  and normalises whitespace the same way. The encoder runs on JAX's default device.
  """

  def __init__(self, searcher, topk: int = 3):
    self.searcher = searcher
    self.topk = topk
    self.where = f"in-process index {searcher.index_dir}"

  def search(self, queries: Sequence[str], topk: int | None = None) -> list[list[dict]]:
    k = self.topk if topk is None else topk

    def run(qs: list[str]) -> list[list[dict]]:
      rows = self.searcher.search_many([" ".join(q.split()) for q in qs], [k] * len(qs))
      return [[{"document": self.searcher.corpus.row(int(i)), "score": float(s)}
               for i, s in zip(ids, scores) if i >= 0] for ids, scores in rows]
    return answer_nonblank(queries, run)

  def fingerprint(self) -> str:
    return self.searcher.fingerprint

  def close(self) -> None:
    self.searcher.corpus.close()

  def __enter__(self) -> "InProcessRetriever":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def call_with_retries(send, what: str, policy, mask=lambda text: text):
  """The one retry loop of every HTTP retriever: ``send()`` -> httpx.Response, retried on
  transport errors, non-JSON 200s and `retryable` statuses with exponential backoff (a 429's
  Retry-After honoured, capped); other statuses raise at once. `policy` has retries, backoff_s,
  max_backoff_s, timeout_s; `mask` scrubs secrets from the messages. Returns the decoded JSON."""
  cause, delay = "no attempt made", 0.0
  for attempt in range(policy.retries + 1):
    if attempt:
      time.sleep(max(delay, min(policy.backoff_s * 2 ** (attempt - 1), policy.max_backoff_s)))
    delay = 0.0
    try:
      r = send()
    except httpx.HTTPError as e:
      cause = f"{type(e).__name__}: {mask(str(e))}"
      continue
    if r.status_code == 200:
      try:
        return r.json()
      except ValueError as e:
        cause = f"response is not JSON ({e})"
        continue
    detail = mask(_detail(r))
    if not retryable(r.status_code):
      raise RetrievalError(f"{what} rejected with HTTP {r.status_code}: {detail}",
                           status=r.status_code)
    cause = f"HTTP {r.status_code}: {detail}"
    if r.status_code == 429:
      try:
        delay = min(float(r.headers.get("retry-after", 0)), policy.max_backoff_s)
      except ValueError:
        delay = 0.0
  raise RetrievalError(f"{what} failed after {policy.retries + 1} attempts "
                       f"(timeout {policy.timeout_s}s each); last cause: {cause}")


def _detail(r: httpx.Response) -> str:
  try:
    return str(r.json().get("detail", r.text))[:500]
  except (ValueError, AttributeError):
    return r.text[:500]


def ensure_index(rcfg, workdir: str, corpus: str) -> str:
  """config.retrieval.index_dir (default WORKDIR/index), built from `corpus` first if missing."""
  import os
  from retrieval import build_index
  index_dir = rcfg.index_dir or os.path.join(workdir, "index")
  if not os.path.exists(os.path.join(index_dir, "manifest.json")):
    if not corpus:
      raise ValueError(f"config.retrieval: no built index at {index_dir} and no retrieval.corpus "
                       "to build one from")
    build_index.build(corpus, index_dir, encoder=rcfg.encoder or None,
                      index_type=rcfg.index_type, progress=False)
  return index_dir


def _http(rcfg, workdir: str, corpus: str):
  proc, url = None, rcfg.url
  if rcfg.start_server:
    from retrieval import server
    proc, url = server.start_subprocess(ensure_index(rcfg, workdir, corpus))
  return RetrieverClient(url, topk=rcfg.topk, timeout_s=rcfg.timeout_s, retries=rcfg.retries,
                         token=rcfg.token or None, backoff_s=rcfg.backoff_s,
                         max_backoff_s=rcfg.max_backoff_s), proc


def _inprocess(rcfg, workdir: str, corpus: str):
  from retrieval.searcher import Searcher
  searcher = Searcher(ensure_index(rcfg, workdir, corpus), encoder=rcfg.encoder or None)
  searcher.warmup(8)
  return InProcessRetriever(searcher, topk=rcfg.topk), None


def _serper(rcfg, workdir: str, corpus: str):
  from stepsearch_jax.rollout.serper import SerperRetriever
  return SerperRetriever.from_config(rcfg, workdir), None


# config.retrieval.backend -> factory(retrieval config, workdir, corpus) -> (Retriever, server
# subprocess or None). A new backend is one class plus one entry here.
BACKENDS = {"http": _http, "inprocess": _inprocess, "serper": _serper}


def open_retriever(rcfg, workdir: str, corpus: str):
  """(retriever, fingerprint, server subprocess or None) for config.retrieval."""
  retriever, proc = BACKENDS[rcfg.backend](rcfg, workdir, corpus)
  try:
    return retriever, retriever.fingerprint(), proc
  except Exception:
    retriever.close()
    if proc is not None:
      proc.terminate()
    raise
