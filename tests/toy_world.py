"""A tiny policy that actually searches, on the synthetic world: for rollout tests and benchmarks.

A randomly initialised model never writes `<search>`, so a rollout test or benchmark on one would
exercise no retrieval at all. This builds, in a few seconds on CPU: a synthetic world, its BM25
index, a word-level tokenizer over the world's text (tags as single tokens), and a small decoder
warm-started (`stepsearch_jax.sft.warm_start`) on the world's ideal demonstrations rendered with
the real retrieval server, so that greedy rollouts issue multi-hop searches.

Test support, not part of the package: pytest puts tests/ on sys.path; bench/rollout.py adds it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from stepsearch_jax import models
from stepsearch_jax.rollout import episode


def build_world(out_dir: str, num_people: int = 30, num_train: int = 64, num_test: int = 16,
                seed: int = 0) -> dict:
  """World files, BM25 index and tokenizer under out_dir; returns dict(paths, world, tokenizer)."""
  from retrieval import build_index
  from stepsearch_jax.data import synthetic, wordlevel
  from stepsearch_jax.data.records import load_records, render_prompt
  w = synthetic.make_world(out_dir, seed=seed, num_people=num_people, num_train=num_train,
                           num_test=num_test)
  index_dir = os.path.join(out_dir, "index")
  build_index.build(w["corpus"], index_dir, index_type="bm25", progress=False)
  train, test = load_records(w["train"]), load_records(w["test"])
  rows = [json.loads(line) for line in open(w["corpus"], encoding="utf-8")]
  texts = [episode.INVALID_ACTION, episode.LAST_TURN, "Doc 1 Doc 2 Doc 3 Title:"]
  texts += [f"{r.get('title', '')} {r.get('content', r.get('contents', ''))}" for r in rows]
  texts += [render_prompt(None, r) for r in train + test]
  for r in train[:200]:
    texts += [t.get("text", "") + " " + t.get("query", "")
              for t in synthetic.demonstration(r, w["world"])]
  tok = wordlevel.train_wordlevel(texts, os.path.join(out_dir, "tokenizer"))
  return dict(w, index_dir=index_dir, train_records=train, test_records=test, tokenizer=tok)


def demo_examples(world: dict, retriever: Any, limit: int = 64) -> list[tuple[list[int], list[int]]]:
  """(ids, loss_mask) of prompt + ideal demonstration; retrieved blocks are masked out."""
  from stepsearch_jax.data import synthetic
  tok = world["tokenizer"]
  out = []
  for r in world["train_records"][:limit]:
    ids = list(tok.encode(episode.prompt_text(r, tok), add_special_tokens=False))
    mask = [0] * len(ids)
    for turn in synthetic.demonstration(r, world["world"]):
      if turn["kind"] == "model":
        piece, m = tok.encode(turn["text"], add_special_tokens=False), 1
      else:
        docs = [x["document"] for x in retriever.search([turn["query"]])[0]]
        piece, m = tok.encode(episode.format_information(docs), add_special_tokens=False), 0
      ids += piece
      mask += [m] * len(piece)
    out.append((ids, mask))
  return out


def train_policy(world: dict, retriever: Any, *, hidden: int = 64, layers: int = 2,
                 steps: int = 150, batch_size: int = 16, lr: float = 3e-3, limit: int = 64,
                 seed: int = 0, model_type: str = "qwen2",
                 **model_kw) -> tuple[models.ModelConfig, Any]:
  """A small decoder warm-started on the world's demonstrations; returns (config, params)."""
  from stepsearch_jax.sft import warm_start
  tok = world["tokenizer"]
  heads = max(2, hidden // 32)
  fields = dict(model_type=model_type, vocab_size=len(tok), hidden_size=hidden,
                intermediate_size=hidden * 3, num_layers=layers, num_heads=heads,
                num_kv_heads=max(1, heads // 2), head_dim=32, max_position_embeddings=4096)
  fields.update(model_kw)
  config = models.ModelConfig(**fields)
  params = models.init_params(config, jax.random.PRNGKey(seed))
  examples = demo_examples(world, retriever, limit)
  params, _ = warm_start(config, params, examples, steps=steps, batch_size=batch_size, lr=lr,
                         pad_id=tok.pad_token_id, seed=seed, log=lambda *a: None)
  return config, params
