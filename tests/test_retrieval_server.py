"""The retrieval server started for real on a loopback port: results, errors, cache, batching."""

import asyncio
import concurrent.futures
import json
import os

import httpx
import numpy as np
import pytest

from retrieval import build_index, corpus as corpus_lib, server as server_lib
from stepsearch_jax.rollout.retriever import RetrievalError, RetrieverClient
from synthetic_corpus import write_corpus

LIMITS = ["--max_queries", "16", "--max_query_chars", "300", "--max_topk", "10",
          "--max_body_bytes", "20000", "--warmup_batch", "8"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  d = tmp_path_factory.mktemp("server")
  corpus = str(d / "corpus.jsonl")
  rows = write_corpus(corpus, 300, seed=3, max_words=30)
  index_dir = str(d / "idx")
  build_index.build(corpus, index_dir, chunk_size=128, batch_size=32, progress=False)
  proc, url = server_lib.start_subprocess(index_dir, extra_args=LIMITS, timeout_s=240)
  yield dict(corpus=corpus, rows=rows, index_dir=index_dir, url=url, proc=proc)
  proc.terminate()
  proc.wait(timeout=30)


@pytest.fixture(scope="module")
def encoder():
  from retrieval.encoder import Encoder
  return Encoder(max_batch=32)


def post(url, payload, **kw):
  return httpx.post(f"{url}/retrieve", json=payload, timeout=60, **kw)


def test_topk_equals_bruteforce_and_documents_as_stored(world, encoder):
  rng = np.random.default_rng(0)
  words = " ".join(json.dumps(r) for r in world["rows"][:50]).split()
  queries = [" ".join(rng.choice(words, rng.integers(2, 7))).strip('"{},:') or "x"
             for _ in range(12)]
  r = post(world["url"], {"queries": queries, "topk": 5, "return_scores": True})
  assert r.status_code == 200, r.text
  result = r.json()["result"]
  emb = build_index.load_embeddings(world["index_dir"])
  q = encoder.encode(queries, kind="query")
  sims = q @ emb.T
  stored = open(world["corpus"], "rb").read().splitlines()
  for i, hits in enumerate(result):
    want = np.argsort(-sims[i], kind="stable")[:5]
    got_rows = [h["document"] for h in hits]
    assert got_rows == [json.loads(stored[j]) for j in want], queries[i]
    np.testing.assert_allclose([h["score"] for h in hits], sims[i][want], atol=1e-4)
  # Raw bytes: the document JSON is the corpus line verbatim (key order, escapes).
  assert stored[int(want[0])] in r.content


def test_query_equal_to_passage_returns_it_first(world):
  picks = [0, 1, 150, 299]                                   # both corpus row formats
  texts = [corpus_lib.passage_text(world["rows"][i]) for i in picks]
  result = post(world["url"], {"queries": texts, "topk": 3}).json()["result"]
  for i, hits in zip(picks, result):
    assert hits[0]["document"] == world["rows"][i]
    assert hits[0]["score"] > 0.999


BAD = [
    (b"{bad", 400, "not valid JSON"),
    (b'\xff\xfe{"queries": ["a"]}', 400, "not valid UTF-8"),
    (b"[1, 2]", 422, "JSON object"),
    (b"null", 422, "JSON object"),
    (b"{}", 422, "'queries' is required"),
    (b'{"queries": "abc"}', 422, "list of strings"),
    (b'{"queries": [1]}', 422, "queries[0] must be a string"),
    (b'{"queries": ["a", null]}', 422, "queries[1] must be a string"),
    (b'{"queries": ["\\ud800x"]}', 422, "not valid UTF-8"),
    (b'{"queries": ["a"], "topk": "3"}', 422, "'topk' must be an integer"),
    (b'{"queries": ["a"], "topk": true}', 422, "'topk' must be an integer"),
    (b'{"queries": ["a"], "topk": 2.5}', 422, "'topk' must be an integer"),
    (b'{"queries": ["a"], "topk": 0}', 422, "between 1 and 10"),
    (b'{"queries": ["a"], "topk": -2}', 422, "between 1 and 10"),
    (b'{"queries": ["a"], "topk": 11}', 422, "between 1 and 10"),
    (b'{"queries": ["a"], "return_scores": "yes"}', 422, "'return_scores' must be a boolean"),
    (json.dumps({"queries": ["q"] * 17}).encode(), 413, "17 queries"),
    (json.dumps({"queries": ["x" * 301]}).encode(), 413, "301 characters"),
    (json.dumps({"queries": ["a"], "pad": "x" * 30000}).encode(), 413, "exceeds the limit"),
]


def test_bad_inputs_get_4xx_and_server_keeps_serving(world):
  url = world["url"]
  good = {"queries": ["river bank"], "topk": 2}
  for body, status, message in BAD:
    r = httpx.post(f"{url}/retrieve", content=body, timeout=60)
    assert r.status_code == status, (body[:60], r.status_code, r.text)
    assert message in r.json()["detail"], (body[:60], r.text)
    ok = post(url, good)
    assert ok.status_code == 200 and len(ok.json()["result"][0]) == 2
  # Chunked upload without Content-Length beyond the limit.
  chunks = (b'{"queries": ["a"], "pad": "' + b"x" * 4000 if i == 0 else b"x" * 4000
            for i in range(8))
  r = httpx.post(f"{url}/retrieve", content=chunks, timeout=60)
  assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]
  assert httpx.get(f"{url}/retrieve", timeout=10).status_code == 405
  assert post(url, good).status_code == 200


def test_search_r1_client_shapes_are_answered(world):
  """Search-R1's rollout client sends [] when no slot searched, "" for `<search></search>`, and
  may omit topk or send null: answered (no hits for blanks), never refused."""
  url = world["url"]
  r = post(url, {"queries": []})
  assert r.status_code == 200 and r.json() == {"result": []}
  alone = post(url, {"queries": ["harbour lights"], "topk": 2}).json()["result"][0]
  r = post(url, {"queries": ["", "harbour lights", " \n\t ", "harbour lights"], "topk": 2})
  assert r.status_code == 200, r.text
  assert r.json()["result"] == [[], alone, [], alone]
  for payload in ({"queries": ["harbour lights"]}, {"queries": ["harbour lights"], "topk": None,
                                                    "return_scores": False}):
    got = post(url, payload).json()["result"][0]
    assert len(got) == 3 and got[:2] == alone                  # server default topk (3)


def test_cache_respects_topk(world):
  url = world["url"]
  q = "orchestra harbour festival"
  before = httpx.get(f"{url}/health").json()["cache"]
  two = post(url, {"queries": [q], "topk": 2}).json()["result"][0]
  four = post(url, {"queries": [q], "topk": 4}).json()["result"][0]
  assert len(two) == 2 and len(four) == 4 and four[:2] == two
  again = post(url, {"queries": [f"  {q}\n"], "topk": 2}).json()["result"][0]   # normalised hit
  assert again == two
  after = httpx.get(f"{url}/health").json()["cache"]
  assert after["hits"] - before["hits"] == 1 and after["misses"] - before["misses"] == 2


def test_concurrent_single_query_clients(world):
  url = world["url"]
  queries = [f"winter castle {w}" for w in ("north", "south", "east", "west", "king", "queen",
                                              "river", "stone", "glass", "fire", "ice", "sun")]
  batch = post(url, {"queries": queries, "topk": 3}).json()["result"]
  with concurrent.futures.ThreadPoolExecutor(12) as pool:
    lone = list(pool.map(lambda q: post(url, {"queries": [q + " "], "topk": 3}).json(), queries))
  assert [r["result"][0] for r in lone] == batch


def test_batcher_merges_queued_requests(world, encoder):
  from retrieval.searcher import Searcher
  searcher = Searcher(world["index_dir"], max_batch=32)
  batcher = server_lib.Batcher(searcher, max_batch=64, start=False)
  reqs = [(["apple orchard"], 3), (["mountain pass", "old bridge"], 5), (["apple orchard"], 1)]

  async def go():
    tasks = [asyncio.ensure_future(batcher.submit(q, k)) for q, k in reqs]
    await asyncio.sleep(0.05)           # all three are queued before the worker starts
    batcher.start()
    return await asyncio.gather(*tasks)

  out = asyncio.run(go())
  assert batcher.batches == 1 and batcher.batched_queries == 4
  for (qs, k), rows in zip(reqs, out):
    ids, scores = searcher.search(qs, k)
    for (got_ids, got_scores), want_ids, want_scores in zip(rows, ids, scores):
      np.testing.assert_array_equal(got_ids, want_ids)
      np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)


def test_batcher_chunks_big_requests(world):
  """A request bigger than max_batch is queued as chunks: bounded work per encode+search call."""
  from retrieval.searcher import Searcher
  searcher = Searcher(world["index_dir"], max_batch=4)
  batcher = server_lib.Batcher(searcher, max_batch=4)
  queries = [f"stone bridge {i}" for i in range(10)]
  rows = asyncio.run(batcher.submit(queries, 3))
  assert batcher.batches == 3 and batcher.batched_queries == 10
  ids, _ = searcher.search(queries, 3)
  np.testing.assert_array_equal(np.stack([r[0] for r in rows]), ids)


def test_client_batches_and_health(world):
  with RetrieverClient(world["url"], topk=2, batch_size=4, retries=1) as client:
    queries = [f"query number {i}" for i in range(10)]
    got = client.search(queries)
    assert len(got) == 10 and all(len(h) == 2 for h in got)
    # Same documents; scores equal up to float32 rounding: the server micro-batches concurrent
    # requests, and an encoder batch of another size rounds differently (seen: 3e-4 apart).
    def same(a, b):
      return a["document"] == b["document"] and abs(a["score"] - b["score"]) < 1e-3
    whole = post(world["url"], {"queries": queries, "topk": 2}).json()["result"]
    assert all(same(x, y) for hx, hy in zip(got, whole) for x, y in zip(hx, hy))
    assert same(client.search(queries[:3], topk=4)[0][0], got[0][0])
    health = client.health()
    assert health["fingerprint"] == build_index.load_manifest(world["index_dir"])["fingerprint"]
    with pytest.raises(RetrievalError, match="HTTP 422.*between 1 and 10"):
      client.search(["a"], topk=50)                # a 4xx is not retried


def test_bm25_backend_same_api_with_token(world, tmp_path):
  index_dir = str(tmp_path / "bm25")
  build_index.build(world["corpus"], index_dir, index_type="bm25", progress=False)
  proc, url = server_lib.start_subprocess(index_dir, token="s3cret", timeout_s=120,
                                          extra_args=["--max_batch", "64"])
  try:
    assert httpx.post(f"{url}/retrieve", json={"queries": ["a"]}).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(f"{url}/health", headers=wrong).status_code == 401
    row = world["rows"][10]
    with RetrieverClient(url, topk=3, token="s3cret") as client:
      assert client.health()["index_type"] == "bm25"
      hits = client.search([corpus_lib.passage_text(row), "zzzzqqq xxyyzz"])
    assert hits[0][0]["document"] == row and hits[0][0]["score"] > 0
    assert hits[1] == []                             # no query term in the corpus: no hits
    # 4096 queries in one request (Search-R1 sends 2,560), queued as 64 chunks of 64.
    texts = [corpus_lib.passage_text(r) for r in world["rows"]]
    many = [texts[i % len(texts)] + f" q{i}" for i in range(4096)]
    auth = {"Authorization": "Bearer s3cret"}
    r = httpx.post(f"{url}/retrieve", json={"queries": many, "topk": 1}, headers=auth, timeout=120)
    assert r.status_code == 200, r.text[:300]
    result = r.json()["result"]
    assert len(result) == 4096
    assert [result[i][0]["document"] for i in (0, 1, 299)] == [world["rows"][i] for i in (0, 1, 299)]
    health = httpx.get(f"{url}/health", headers=auth).json()
    assert health["limits"]["max_queries"] == 8192 and health["batches"] >= 64
  finally:
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.skipif(not os.path.exists("/proc/self"), reason="reads /proc/PID/stat")
def test_server_subprocess_dies_with_a_killed_parent(world, tmp_path):
  """A SIGKILLed trainer must not leave its retrieval server running (port and index held)."""
  import signal
  import subprocess
  import sys
  import time
  index_dir = str(tmp_path / "bm25")
  build_index.build(world["corpus"], index_dir, index_type="bm25", progress=False)
  code = ("import sys, time; from retrieval import server as s; "
          f"p, url = s.start_subprocess({index_dir!r}, timeout_s=120); "
          "print(p.pid, flush=True); time.sleep(600)")
  parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  child = int(parent.stdout.readline())
  os.kill(parent.pid, signal.SIGKILL)
  parent.wait(timeout=30)
  deadline = time.time() + 30
  while time.time() < deadline and os.path.exists(f"/proc/{child}"):
    try:   # reaped by init once it exits; a zombie still has /proc/PID with state Z
      if open(f"/proc/{child}/stat").read().split()[2] == "Z":
        break
    except FileNotFoundError:
      break
    time.sleep(0.2)
  alive = os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z"
  if alive:
    os.kill(child, signal.SIGKILL)
  assert not alive, "retrieval server outlived its SIGKILLed parent"
