"""Client for the retrieval sidecar, and the `<information>` block formatting (method §1.4).

Rollouts must not die on a transient hiccup of the sidecar (a restart, a full accept queue), nor
hang forever on a dead one: every call has a timeout, transport errors / 5xx / 429 are retried
with exponential backoff, and after the last retry a `RetrievalError` names the URL and the last
cause. 4xx answers other than 408/429 are the caller's bug and are raised at once.
"""

from __future__ import annotations

import time
from typing import Sequence

import httpx

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class RetrievalError(RuntimeError):
  """Retrieval failed for good (after retries, or on a request the server rejects)."""


class RetrieverClient:
  """Batched, retrying client for POST {url}/retrieve (Search-R1 schema)."""

  def __init__(self, url: str, topk: int = 3, timeout_s: float = 30.0, retries: int = 5,
               token: str | None = None, batch_size: int = 512, backoff_s: float = 0.5,
               max_backoff_s: float = 8.0):
    self.url = url.rstrip("/")
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
    cause = "no attempt made"
    for attempt in range(self.retries + 1):
      if attempt:
        time.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))
      try:
        r = self._http.request(method, target, json=payload)
      except httpx.HTTPError as e:
        cause = f"{type(e).__name__}: {e}"
        continue
      if r.status_code == 200:
        try:
          return r.json()
        except ValueError as e:
          cause = f"response is not JSON ({e})"
          continue
      detail = _detail(r)
      if r.status_code not in _RETRY_STATUS:
        raise RetrievalError(f"{method} {target} rejected with HTTP {r.status_code}: {detail}")
      cause = f"HTTP {r.status_code}: {detail}"
    raise RetrievalError(f"{method} {target} failed after {self.retries + 1} attempts "
                         f"(timeout {self.timeout_s}s each); last cause: {cause}")

  def search(self, queries: Sequence[str], topk: int | None = None) -> list[list[dict]]:
    """Top-k `{"document", "score"}` lists, one per query, in order.

    An empty or whitespace-only query (a policy can write `<search> </search>`) gets no documents
    without a request: the server rightly rejects it, and a rollout must not die of it.
    """
    k = self.topk if topk is None else topk
    asked = [i for i, q in enumerate(queries) if q.strip()]
    found = self._search([queries[i] for i in asked], k) if asked else []
    out: list[list[dict]] = [[] for _ in queries]
    for i, docs in zip(asked, found):
      out[i] = docs
    return out

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

  def health(self) -> dict:
    return self._call("GET", "/health")


def _detail(r: httpx.Response) -> str:
  try:
    return str(r.json().get("detail", r.text))[:500]
  except (ValueError, AttributeError):
    return r.text[:500]


def doc_title_text(document: dict) -> tuple[str, str]:
  """(title, text) of a corpus row as `_passages2string` reads it (method §1.4).

  `{"contents": '"Title"\\ntext'}`: title is the first line (quotes kept), text the other lines.
  `{"title", "content"}`: the fields as they are. A `{"document", "score"}` hit is unwrapped.
  """
  if "document" in document and isinstance(document["document"], dict):
    document = document["document"]
  if "contents" in document:
    lines = document["contents"].split("\n")
    return lines[0], "\n".join(lines[1:])
  if "title" in document and "content" in document:
    return document["title"], document["content"]
  raise KeyError(f"document has neither 'contents' nor 'title'+'content': keys {sorted(document)}")


def format_information(documents: Sequence[dict]) -> str:
  """The observation block appended after a `</search>` turn (method §1.3-1.4)."""
  lines = []
  for i, doc in enumerate(documents, 1):
    title, text = doc_title_text(doc)
    lines.append(f"Doc {i}<## Title: {title} ##> {text}\n")
  return "\n\n<information> " + "".join(lines).strip() + " </information>\n\n"
