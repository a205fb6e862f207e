"""SerperRetriever against a local server that speaks Serper's documented API.

The live API (google.serper.dev) was not reachable from the machine these tests were written on,
and needs a paid key: the server here, on loopback in a thread, answers POST /search like Serper
does (a `{"q", "num"}` body gets one response, a list body a list of responses, in order; each with
`organic: [{"title", "link", "snippet", "position"}]` and an `answerBox`) and checks X-API-KEY.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import portpicker
import pytest

from stepsearch_jax.rollout.retriever import RetrievalError, format_information
from stepsearch_jax.rollout.serper import SerperRetriever, map_response, normalise_query

KEY = "sk-test-0123456789abcdef"
ENV = "SERPER_KEY_FOR_TESTS"


def organic_for(query: str, num: int) -> list[dict]:
  slug = query.replace(" ", "-")
  return [{"title": f"{query} title {i}", "link": f"https://example.org/{slug}/{i}",
           "snippet": f"snippet {i} about {query}.", "position": i}
          for i in range(1, min(num, 10) + 1)]


class FakeSerper:
  """Serper's documented request/response shape; counts requests, can fail the next ones."""

  def __init__(self):
    self.requests = 0
    self.bodies: list = []
    self.fail_next: list[tuple[int, dict]] = []    # (status, headers) answered before any work
    self.lock = threading.Lock()
    fake = self

    class Handler(BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(n)
        with fake.lock:
          fake.requests += 1
          fail = fake.fail_next.pop(0) if fake.fail_next else None
        if self.path != "/search":
          return self._send(404, {"message": "Not found"})
        if fail is not None:
          return self._send(fail[0], {"message": "Service unavailable"}, fail[1])
        key = self.headers.get("X-API-KEY")
        if key != KEY:   # echoes the key, as a careless server might: the client must mask it
          return self._send(401, {"message": f"Unauthorized: invalid key {key}", "statusCode": 401})
        body = json.loads(raw)
        with fake.lock:
          fake.bodies.append(body)
        if isinstance(body, list):
          return self._send(200, [fake.answer(b) for b in body])
        return self._send(200, fake.answer(body))

      def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
          self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/search"
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
    self.thread.start()

  @staticmethod
  def answer(body: dict) -> dict:
    q, num = body["q"], int(body.get("num", 10))
    out = {"searchParameters": {"q": q, "type": "search", "num": num, "engine": "google"},
           "organic": organic_for(q, num)}
    if q.startswith("noresults"):
      out["organic"] = []
    if q.startswith("capital of france"):
      out["answerBox"] = {"title": "France / Capital", "answer": "Paris",
                          "link": "https://example.org/paris"}
      out["knowledgeGraph"] = {"title": "Paris", "type": "Capital of France"}
    return out

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = FakeSerper()
  yield s
  s.close()


@pytest.fixture
def key(monkeypatch):
  monkeypatch.setenv(ENV, KEY)


def make(server, tmp_path=None, **kw):
  kw.setdefault("retries", 3)
  kw.setdefault("backoff_s", 0.01)
  kw.setdefault("timeout_s", 5.0)
  return SerperRetriever(api_key_env=ENV, url=server.url,
                         cache_dir=str(tmp_path / "cache") if tmp_path else None, **kw)


def test_single_query_mapping_and_header(server, key):
  with make(server, topk=3) as r:
    [hits] = r.search(["Who  wrote Hamlet"])
    assert server.requests == 1
    assert server.bodies == [{"q": "who wrote hamlet", "num": 3}]    # a single body, normalised
    assert hits == [{"document": {"id": f"https://example.org/who-wrote-hamlet/{i}",
                                  "contents": f'"who wrote hamlet title {i}"\n'
                                              f"snippet {i} about who wrote hamlet."},
                     "score": 1.0 / i} for i in (1, 2, 3)]
    info = format_information(hits)
    assert ('Doc 1<## Title: "who wrote hamlet title 1" ##> '
            'snippet 1 about who wrote hamlet.') in info
    assert len(r.search(["x y"], topk=5)[0]) == 5 and server.bodies[-1] == {"q": "x y", "num": 5}
    assert r.search(["noresults here"]) == [[]]


def test_batches_in_order_and_sends_duplicates_once(server, key):
  with make(server, topk=2, batch_size=2) as r:
    queries = ["q one", "q two", "Q  one", "q three", "", "q four", "q five"]
    results = r.search(queries)
    # 5 distinct non-blank queries in chunks of 2: two list bodies and one single body
    assert server.requests == 3
    assert server.bodies == [[{"q": "q one", "num": 2}, {"q": "q two", "num": 2}],
                             [{"q": "q three", "num": 2}, {"q": "q four", "num": 2}],
                             {"q": "q five", "num": 2}]
    assert results[4] == []
    for q, hits in zip(queries, results):
      if q.strip():
        assert [h["document"]["id"] for h in hits] == [
            f"https://example.org/{normalise_query(q).replace(' ', '-')}/{i}" for i in (1, 2)]
    assert results[0] == results[2]
    assert r.stats() == {"hits": 0, "misses": 5, "requests": 3}


def test_blank_queries_send_nothing(server, key):
  with make(server) as r:
    assert r.search(["", "   ", "\n\t"]) == [[], [], []]
    assert r.search([]) == []
    assert server.requests == 0


def test_cache_hits_persist_across_instances(server, key, tmp_path):
  r = make(server, tmp_path, topk=3)
  first = r.search(["who wrote hamlet", "capital of france"])
  assert server.requests == 1 and r.stats() == {"hits": 0, "misses": 2, "requests": 1}
  assert r.search(["Who wrote  HAMLET", "capital of france"]) == first
  assert server.requests == 1 and r.hits == 2
  r.search(["who wrote hamlet"], topk=2)                 # another topk is another key
  assert server.requests == 2 and r.misses == 3
  r.close()

  again = make(server, tmp_path, topk=3)                 # a new process would see the same file
  assert again.search(["capital of france", "who wrote hamlet"]) == first[::-1]
  assert server.requests == 2 and again.stats() == {"hits": 2, "misses": 0, "requests": 0}
  assert again.cache_path == str(tmp_path / "cache" / "serper_cache.sqlite")
  again.close()

  other = make(server, tmp_path, topk=3, answer_box=True)    # another mapping: not shared
  assert other.fingerprint() != again.fingerprint()
  other.search(["who wrote hamlet"])
  assert server.requests == 3
  other.close()


def test_empty_answers_without_organic_are_not_cached(server, key, tmp_path):
  r = make(server, tmp_path)
  orig = FakeSerper.answer
  try:
    FakeSerper.answer = staticmethod(lambda body: {"searchParameters": {"q": body["q"]}})
    assert r.search(["anything"]) == [[]]
  finally:
    FakeSerper.answer = staticmethod(orig)
  assert len(r.search(["anything"])[0]) == 3 and server.requests == 2
  r.close()


def test_retries_503_then_succeeds(server, key):
  server.fail_next = [(503, {}), (503, {})]
  with make(server, retries=3) as r:
    [hits] = r.search(["who wrote hamlet"])
    assert len(hits) == 3 and server.requests == 3 and r.requests == 3


def test_retries_429_honouring_retry_after(server, key):
  server.fail_next = [(429, {"Retry-After": "0.2"})]
  with make(server, retries=2, max_backoff_s=1.0) as r:
    t0 = time.time()
    assert len(r.search(["q"])[0]) == 3
    assert time.time() - t0 >= 0.2 and server.requests == 2


def test_gives_up_after_retries_naming_the_url(server, key):
  server.fail_next = [(503, {})] * 10
  with make(server, retries=2) as r:
    with pytest.raises(RetrievalError) as info:
      r.search(["q"])
  msg = str(info.value)
  assert server.url in msg and "after 3 attempts" in msg and "HTTP 503" in msg
  assert KEY not in msg and server.requests == 3


def test_bad_key_is_rejected_at_once_without_leaking_it(server, monkeypatch):
  wrong = "sk-wrong-key-do-not-print"
  monkeypatch.setenv(ENV, wrong)
  r = make(server, retries=3)
  with pytest.raises(RetrievalError) as info:
    r.search(["who wrote hamlet"])
  assert info.value.status == 401 and server.requests == 1      # a 4xx is not retried
  msg = str(info.value)
  assert server.url in msg and "HTTP 401" in msg and "Unauthorized" in msg
  assert wrong not in msg and "***" in msg                        # the server's echo is masked
  assert wrong not in repr(r) and ENV in repr(r)
  r.close()


def test_missing_key_names_the_variable(monkeypatch):
  monkeypatch.delenv(ENV, raising=False)
  with pytest.raises(RetrievalError, match=ENV):
    SerperRetriever(api_key_env=ENV)
  monkeypatch.setenv(ENV, "  ")
  with pytest.raises(RetrievalError, match=f"{ENV}.*unset or empty"):
    SerperRetriever(api_key_env=ENV)


def test_transport_error_retried_then_raised(key):
  url = f"http://127.0.0.1:{portpicker.pick_unused_port()}/search"
  with SerperRetriever(api_key_env=ENV, url=url, retries=1, backoff_s=0.01, timeout_s=2.0) as r:
    with pytest.raises(RetrievalError) as info:
      r.search(["q"])
  assert url in str(info.value) and "after 2 attempts" in str(info.value)
  assert "ConnectError" in str(info.value) and KEY not in str(info.value)


def test_fingerprint_sends_nothing_and_names_the_backend(server, key):
  a, b = make(server), SerperRetriever(api_key_env=ENV)
  assert a.fingerprint().startswith("serper:") and a.fingerprint() == make(server).fingerprint()
  assert a.fingerprint() != b.fingerprint()                 # another URL
  assert server.requests == 0 and KEY not in a.fingerprint()
  assert a.where == f"serper {server.url}"
  a.close(), b.close()


def test_map_response_edge_cases():
  resp = {"answerBox": {"title": "France\nCapital", "answer": "Paris", "link": "https://p"},
          "organic": [{"title": "Two\nlines", "link": "https://a", "snippet": "s\nt"},
                      {"link": "https://b", "position": 4},
                      "not a dict",
                      {"title": "C", "link": "https://c", "snippet": "c", "position": 5}]}
  plain = map_response(resp, topk=3)
  assert plain == [
      {"document": {"id": "https://a", "contents": '"Two lines"\ns\nt'}, "score": 1.0},
      {"document": {"id": "https://b", "contents": '"https://b"\n'}, "score": 0.25},
      {"document": {"id": "https://c", "contents": '"C"\nc'}, "score": 0.2}]
  boxed = map_response(resp, topk=2, answer_box=True)
  assert boxed[0] == {"document": {"id": "answerBox:https://p",
                                   "contents": '"France Capital"\nParis'}, "score": 1.0}
  assert boxed[1] == plain[0] and len(boxed) == 2
  assert map_response({}, topk=3) == []


def test_answer_box_end_to_end(server, key):
  with make(server, topk=2, answer_box=True) as r:
    [hits] = r.search(["capital of france"])
  assert [h["document"]["id"] for h in hits] == ["answerBox:https://example.org/paris",
                                                 "https://example.org/capital-of-france/1"]


def test_from_config(server, key, tmp_path, monkeypatch):
  from stepsearch_jax import config as config_lib
  rcfg = config_lib.base_config().retrieval
  rcfg.update(backend="serper", topk=4, timeout_s=5.0, retries=1, backoff_s=0.01,
              max_backoff_s=0.1, serper_url=server.url, serper_api_key_env=ENV)
  r = SerperRetriever.from_config(rcfg, str(tmp_path))
  assert r.cache_path == str(tmp_path / "serper_cache" / "serper_cache.sqlite")
  assert len(r.search(["q"])[0]) == 4 and r.retries == 1
  r.close()
  rcfg.serper_cache_dir = "none"
  with SerperRetriever.from_config(rcfg, str(tmp_path)) as r:
    assert r.cache_path is None
  bare = config_lib.base_config().retrieval                       # the declared defaults
  monkeypatch.setenv("SERPER_API_KEY", KEY)
  with SerperRetriever.from_config(bare) as r:
    assert r.url == "https://google.serper.dev/search" and r.cache_path is None


def test_two_instances_share_one_cache_concurrently(server, key, tmp_path):
  retrievers = [make(server, tmp_path, batch_size=4) for _ in range(2)]
  queries = [f"shared query {i}" for i in range(16)]
  errors = []

  def work(r):
    try:
      for _ in range(3):
        r.search(queries)
    except Exception as e:   # noqa: BLE001 - reported below
      errors.append(e)
  threads = [threading.Thread(target=work, args=(r,)) for r in retrievers]
  [t.start() for t in threads]
  [t.join(30) for t in threads]
  assert not errors
  # each query reaches Serper at most twice (both instances may miss before either writes) and
  # every later round is a hit
  assert sum(r.misses for r in retrievers) <= 2 * len(queries)
  assert sum(r.hits for r in retrievers) >= 4 * len(queries)
  fresh = make(server, tmp_path)
  before = server.requests
  fresh.search(queries)
  assert server.requests == before and fresh.hits == len(queries)
  for r in [*retrievers, fresh]:
    r.close()


def test_cache_shared_by_processes(server, key, tmp_path):
  script = ("import sys; from stepsearch_jax.rollout.serper import SerperRetriever as S; "
            f"r = S(api_key_env={ENV!r}, url={server.url!r}, cache_dir={str(tmp_path)!r}, "
            "batch_size=3); [r.search([f'proc query {i}' for i in range(12)]) for _ in range(3)]; "
            "print(r.hits, r.misses); r.close()")
  procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
           for _ in range(2)]
  outs = [p.communicate(timeout=60) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
  counts = [tuple(map(int, o[0].split())) for o in outs]
  assert all(hits >= 24 for hits, _ in counts)         # rounds 2 and 3 hit in every process
  before = server.requests
  with SerperRetriever(api_key_env=ENV, url=server.url, cache_dir=str(tmp_path)) as r:
    r.search([f"proc query {i}" for i in range(12)])
    assert r.hits == 12 and server.requests == before
