"""Retriever backends: a Search-R1-style server (no /health, URL ending in /retrieve) and the
in-process searcher, against our own server over the same index; then training and evaluate on
them."""

import json
import subprocess
import sys
import threading
import time

import portpicker
import pytest

from retrieval import build_index, server as server_lib
from retrieval.searcher import Searcher
from stepsearch_jax.rollout.retriever import (InProcessRetriever, RetrieverClient, base_url,
                                              probe_fingerprint, PROBE_QUERIES)
from synthetic_corpus import write_corpus


def serve(index_dir: str, health: bool = True):
  """Our server app over `index_dir` on a real loopback port, in a thread. Without `health` its
  /health route is removed: to a client it then looks like Search-R1's retrieval_server.py."""
  import uvicorn
  searcher = Searcher(index_dir)
  app = server_lib.create_app(searcher)
  if not health:
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", "") != "/health"]
  port = portpicker.pick_unused_port()
  srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  threading.Thread(target=srv.run, daemon=True).start()
  deadline = time.time() + 60
  while not srv.started:
    assert time.time() < deadline, "server did not start"
    time.sleep(0.05)
  return srv, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
  d = tmp_path_factory.mktemp("backends")
  corpus = str(d / "corpus.jsonl")
  write_corpus(corpus, 200, seed=5, max_words=25)
  flat, bm25 = str(d / "flat"), str(d / "bm25")
  build_index.build(corpus, flat, chunk_size=128, batch_size=32, progress=False)
  build_index.build(corpus, bm25, index_type="bm25", progress=False)
  return dict(corpus=corpus, flat=flat, bm25=bm25)


def test_base_url_accepts_root_or_retrieve():
  assert base_url("http://h:8000/retrieve") == "http://h:8000"
  assert base_url("http://h:8000/retrieve/") == "http://h:8000"
  assert base_url("http://h:8000/") == "http://h:8000"


def test_server_without_health_given_as_retrieve_url(indexes):
  srv, url = serve(indexes["flat"], health=False)
  srv2, url2 = serve(indexes["bm25"], health=False)
  try:
    with RetrieverClient(url + "/retrieve", topk=3, retries=0) as client:
      assert client.health() is None
      fp = client.fingerprint()
      assert fp.startswith("probe:")
      hits = client.search(["alpha", "", "  "])
      assert len(hits) == 3 and len(hits[0]) == 3 and hits[1] == [] and hits[2] == []
    with RetrieverClient(url, topk=3, retries=0) as again:
      assert again.fingerprint() == fp            # same index, same probe answers
    with RetrieverClient(url2 + "/retrieve", topk=3, retries=0) as other:
      assert other.fingerprint() != fp            # another index over the same corpus
  finally:
    srv.should_exit = srv2.should_exit = True


def test_inprocess_equals_our_server(indexes):
  srv, url = serve(indexes["flat"], health=True)
  queries = ["who lived in paris", "", "river of the north", "the old king"] + list(PROBE_QUERIES)
  try:
    with RetrieverClient(url + "/retrieve", topk=4, retries=0) as http, \
        InProcessRetriever(Searcher(indexes["flat"]), topk=4) as local:
      manifest = build_index.load_manifest(indexes["flat"])
      assert http.fingerprint() == local.fingerprint() == manifest["fingerprint"]
      a, b = http.search(queries), local.search(queries)
      assert [[h["document"] for h in q] for q in a] == [[h["document"] for h in q] for q in b]
      for qa, qb in zip(a, b):
        for ha, hb in zip(qa, qb):
          assert abs(ha["score"] - hb["score"]) < 1e-3
      assert b[1] == [] and probe_fingerprint(a[4:]) == probe_fingerprint(b[4:])
  finally:
    srv.should_exit = True


@pytest.mark.slow
def test_train_and_evaluate_on_a_search_r1_style_server(train_runs, train_base, train_reference):
  """A released-style server (no /health) at .../retrieve: training runs and pins the probe
  fingerprint, evaluate runs against it; the in-process backend trains the same first step as
  the HTTP reference run (same index, same documents)."""
  from conftest import ROOT
  srv, url = serve(str(train_base["workdir"] / "index"), health=False)
  try:
    wd = train_runs.root / "search_r1_server"
    p = train_runs.run(wd, ["--config.retrieval.start_server=False",
                            f"--config.retrieval.url={url}/retrieve", "--config.total_steps=1"])
    assert "index fingerprint probe:" in p.stdout + p.stderr
    cmd = [sys.executable, "-m", "stepsearch_jax.evaluate", "--config",
           str(ROOT / "configs" / "demo.py") + ":test", "--checkpoint", str(wd),
           "--data", str(train_base["workdir"] / "world" / "test.parquet"),
           "--config.retrieval.start_server=False", f"--config.retrieval.url={url}/retrieve"]
    e = subprocess.run(cmd, cwd=ROOT, env=train_runs.env(), capture_output=True, text=True,
                       timeout=600)
    assert e.returncode == 0, e.stderr[-3000:]
    summary = json.loads((wd / "eval" / "results.json").read_text())
    assert summary["n"] == 4 and summary["index_fingerprint"].startswith("probe:")
    # infer: one question, its searches with the titles they got, and the answer.
    cmd[2] = "stepsearch_jax.infer"
    cmd[cmd.index("--data"):cmd.index("--data") + 2] = []
    q = subprocess.run(cmd + ["--question", "Who founded the order of the river?"], cwd=ROOT,
                       env=train_runs.env(), capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr[-3000:]
    out = q.stdout
    assert out.startswith("Q: Who founded the order of the river?") and "\nA: " in out, out
    if "[search 1]" in out:                     # the warm-started policy searches: titles shown
      assert "    1. " in out, out
  finally:
    srv.should_exit = True
  local = train_runs.root / "inprocess"
  train_runs.run(local, ["--config.retrieval.backend=inprocess", "--config.total_steps=1"])
  from conftest import read_metrics
  got = [m for m in read_metrics(local) if m.get("step") == 1]
  want = [m for m in train_reference["metrics"] if m.get("step") == 1]
  keys = ["reward/final", "reward/info_gain", "reward/redundancy", "reward/key",
          "rollout/searches", "rollout/response_len", "pg_loss", "vf_loss", "entropy"]
  for k in keys:
    assert got[0][k] == pytest.approx(want[0][k], rel=1e-4, abs=1e-6), k


def test_sidecar_runs_on_cpu_whatever_the_trainer_sets(indexes):
  """A GPU/TPU trainer's settings do not reach the sidecar: with JAX_PLATFORMS=cuda inherited it
  could not start on this machine (no CUDA), and a memory fraction would take accelerator memory."""
  env = server_lib.sidecar_env({"JAX_PLATFORMS": "cuda", "XLA_PYTHON_CLIENT_MEM_FRACTION": ".9",
                                "HOME": "/root"})
  assert env == {"JAX_PLATFORMS": "cpu", "HOME": "/root"}
  proc, url = server_lib.start_subprocess(
      indexes["flat"], env={"JAX_PLATFORMS": "cuda", "XLA_PYTHON_CLIENT_MEM_FRACTION": ".9"},
      extra_args=["--warmup_batch", "1"], timeout_s=240)
  try:
    with RetrieverClient(url, topk=2, retries=0) as client:
      assert len(client.search(["alpha"])[0]) == 2
  finally:
    proc.terminate()
    proc.wait(timeout=30)
