"""Retriever client without a server, and the <information> block formatting (method §1.4)."""

import time

import portpicker
import pytest

from stepsearch_jax.rollout.retriever import (RetrievalError, RetrieverClient, doc_title_text,
                                              format_information)


def test_retries_then_clear_error_when_nothing_listens():
  port = portpicker.pick_unused_port()
  url = f"http://127.0.0.1:{port}"
  client = RetrieverClient(url, retries=3, timeout_s=2.0, backoff_s=0.05)
  t0 = time.time()
  with pytest.raises(RetrievalError) as info:
    client.search(["who wrote hamlet"])
  elapsed = time.time() - t0
  msg = str(info.value)
  assert f"{url}/retrieve" in msg and "after 4 attempts" in msg and "ConnectError" in msg
  assert elapsed >= 0.05 + 0.1 + 0.2                 # exponential backoff between the 4 tries
  with pytest.raises(RetrievalError, match="/health failed after 4 attempts"):
    client.health()


def test_doc_title_text_both_formats():
  assert doc_title_text({"id": "1", "contents": '"Paris"\nCapital of France.\nSecond line.'}) == (
      '"Paris"', "Capital of France.\nSecond line.")
  assert doc_title_text({"id": "1", "contents": "no newline"}) == ("no newline", "")
  assert doc_title_text({"id": "2", "title": "Paris", "content": "Capital."}) == (
      "Paris", "Capital.")
  hit = {"document": {"id": "2", "title": "T", "content": "C"}, "score": 0.5}
  assert doc_title_text(hit) == ("T", "C")
  with pytest.raises(KeyError, match="neither"):
    doc_title_text({"id": "3", "text": "x"})


def test_format_information_exact():
  docs = [{"document": {"id": "1", "contents": '"A"\nalpha text'}, "score": 0.9},
          {"id": "2", "title": "B", "content": "beta text"}]
  assert format_information(docs) == (
      '\n\n<information> Doc 1<## Title: "A" ##> alpha text\n'
      "Doc 2<## Title: B ##> beta text </information>\n\n")
  assert format_information([]) == "\n\n<information>  </information>\n\n"


def test_empty_query_gets_no_documents_without_a_request():
  from stepsearch_jax.rollout.retriever import RetrieverClient, format_information
  # Nothing listens on this URL: a request would fail after the retries, so an empty query must
  # be answered locally.
  client = RetrieverClient("http://127.0.0.1:9", retries=0, timeout_s=1.0)
  assert client.search(["", "   "]) == [[], []]
  assert "<information>" in format_information([])
