"""Everything a run needs before its first step: data, tokenizer, retrieval sidecar, models.

train.py, evaluate.py and bench/rl_compare.py share this so that "the same warm start, the same
index, the same data" is one function call, not three copies. Each step writes into the workdir and
is reused when it is already there (world files, tokenizer, index, warm-start weights), so a
restarted run reproduces the first one exactly and a fingerprint pins the index to the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from stepsearch_jax import models, texts
from stepsearch_jax.data import records as records_lib


@dataclasses.dataclass
class Workspace:
  cfg: Any
  workdir: str
  train_records: list
  val_records: list
  tokenizer: Any
  retriever: Any
  fingerprint: str
  world: Any = None                    # the synthetic World (demo) or None
  corpus: str = ""
  server: Any = None                   # the retrieval subprocess we started, if any
  timings: dict = dataclasses.field(default_factory=dict)

  def close(self) -> None:
    if self.retriever is not None:
      self.retriever.close()
    if self.server is not None and self.server.poll() is None:
      self.server.terminate()
      try:
        self.server.wait(timeout=10)
      except Exception:  # noqa: BLE001 - best effort shutdown
        self.server.kill()


def _check_files(key: str, value: str) -> list[str]:
  paths = [p for p in value.split(",") if p]
  for p in paths:
    if not os.path.exists(p):
      raise FileNotFoundError(f"config.{key}: data file {p} does not exist")
  return paths


def prepare_data(cfg, workdir: str):
  """(train_records, val_records, world, corpus) from the synthetic world or the configured files."""
  world, corpus = None, cfg.retrieval.corpus
  if cfg.data.synthetic.enabled:
    from stepsearch_jax.data import synthetic
    out = synthetic.world_from_config(cfg.data.synthetic, os.path.join(workdir, "world"),
                                       template=cfg.data.template)
    world, corpus = out["world"], out["corpus"]
    train_files, val_files = [out["train"]], [out["test"]]
  else:
    train_files = _check_files("data.train_files", cfg.data.train_files)
    val_files = _check_files("data.val_files", cfg.data.val_files)
    if not train_files:
      raise ValueError("config.data.train_files is empty and data.synthetic.enabled is False")
  train = records_lib.load_records(train_files)
  val = records_lib.load_records(val_files) if val_files else []
  if cfg.data.val_limit > 0:
    val = val[:cfg.data.val_limit]
  return train, val, world, corpus


def tokenizer_texts(world, train, val, template: str, rollout_cfg) -> list[str]:
  """Every text the demo tokenizer must encode losslessly: passages, prompts, demos, warnings."""
  from stepsearch_jax.data import synthetic
  warnings = texts.inserted_texts(rollout_cfg)
  out = [warnings["invalid_action"], warnings["last_turn"], "Doc 1 Doc 2 Doc 3 Doc 4 Doc 5 Title:"]
  out += [f"{r['title']} {r['content']}" for r in world.corpus]
  out += [records_lib.render_prompt(None, r, template) for r in train + val]
  rng = random.Random(0)
  for r in train[:300]:
    for quality in (1.0, 0.0):
      out += [t.get("text", "") + " " + t.get("query", "")
              for t in synthetic.demonstration(r, world, quality=quality, rng=rng)]
  return out


def resolve_model_path(path: str) -> str:
  """"smollm2" names the offline SmolLM2-135M-Instruct (converted once from its GGUF)."""
  return models.smollm2_path() if path == "smollm2" else path


def prepare_tokenizer(cfg, workdir: str, world, train, val):
  from stepsearch_jax.data import wordlevel
  path = resolve_model_path(cfg.tokenizer.path or cfg.model.hf_path)
  if path:
    tok = models.load_tokenizer(path)
    if tok.pad_token is None:   # as for Qwen base models: padding is masked, EOS is a safe id
      tok.pad_token = tok.eos_token
    # The workdir carries its tokenizer, so evaluate / infer / serve on it need nothing else.
    copy = os.path.join(workdir, "tokenizer")
    if jax.process_index() == 0 and not os.path.exists(os.path.join(copy, "tokenizer_config.json")):
      tok.save_pretrained(copy)
    return tok
  if world is None:
    raise ValueError("config.tokenizer.path and config.model.hf_path are empty: a word-level "
                     "tokenizer can only be trained for the synthetic world")
  out = os.path.join(workdir, "tokenizer")
  if os.path.exists(os.path.join(out, "tokenizer.json")):
    return models.load_tokenizer(out)
  return wordlevel.train_wordlevel(
      tokenizer_texts(world, train, val, cfg.data.template, cfg.rollout), out)


def start_retrieval(cfg, workdir: str, corpus: str):
  """(retriever, fingerprint, server subprocess or None) for config.retrieval.backend."""
  from stepsearch_jax.rollout.retriever import open_retriever
  return open_retriever(cfg.retrieval, workdir, corpus)


def load_policy(path: str, dtype: str | None = None):
  """(ModelConfig, params, tokenizer) from an HF folder or a training workdir's latest checkpoint."""
  if os.path.exists(os.path.join(path, "checkpoints")):
    from stepsearch_jax.ppo import Checkpointer
    cfg_hf = json.load(open(os.path.join(path, "model_config.json")))
    config = models.ModelConfig.from_hf(cfg_hf, **({"dtype": dtype} if dtype else {}))
    restored = Checkpointer(os.path.join(path, "checkpoints"), async_save=False).restore_as_saved()
    if restored is None:
      raise FileNotFoundError(f"--checkpoint {path}: no checkpoint under {path}/checkpoints")
    state, meta = restored
    step = int(meta["step"])
    params = jax.tree.map(np.asarray, state["policy"])
    tok_dir = os.path.join(path, "tokenizer")
    if not os.path.exists(tok_dir):
      raise FileNotFoundError(f"--checkpoint {path}: no tokenizer/ folder (training writes one "
                              "into every workdir; this one predates that: copy the run's "
                              "tokenizer folder there)")
    logging.info("policy from %s/checkpoints step %d", path, step)
    return config, params, models.load_tokenizer(tok_dir)
  if not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"--checkpoint {path}: neither a Hugging Face folder (config.json) "
                            "nor a training workdir (checkpoints/)")
  config, params = models.load_pretrained(path, dtype=dtype)
  return config, params, models.load_tokenizer(path)


def checkpoint_retrieval(cfg, checkpoint: str, home: str):
  """start_retrieval for a policy being evaluated or asked: a training workdir carries its index
  (and a synthetic world its corpus), so it is searched as in training unless
  retrieval.index_dir / retrieval.corpus say otherwise; an HF folder's index is built in `home`."""
  if os.path.exists(os.path.join(checkpoint, "index", "manifest.json")):
    home = checkpoint
  world_corpus = os.path.join(checkpoint, "world", "corpus.jsonl")
  corpus = cfg.retrieval.corpus or (world_corpus if os.path.exists(world_corpus) else "")
  return start_retrieval(cfg, home, corpus)


def model_config(cfg, tokenizer) -> models.ModelConfig:
  fields = dict(cfg.model.init)
  if not fields.get("vocab_size"):
    fields["vocab_size"] = len(tokenizer)
  return models.ModelConfig(**fields, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                            remat=cfg.model.remat)


def init_policy(cfg, tokenizer, key):
  """(ModelConfig, params): from model.hf_path, or a random init of model.init."""
  if cfg.model.hf_path:
    config, params = models.load_pretrained(resolve_model_path(cfg.model.hf_path),
                                            dtype=cfg.model.dtype,
                                            param_dtype=cfg.model.param_dtype)
    return dataclasses.replace(config, remat=cfg.model.remat), params
  config = model_config(cfg, tokenizer)
  return config, models.init_params(config, key)


def demonstration_examples(cfg, ws: Workspace) -> list[tuple[list[int], list[int]]]:
  """(ids, loss_mask) warm-start examples: prompt + a demonstration with real retrieval results."""
  from stepsearch_jax.data import synthetic
  tok, rng = ws.tokenizer, random.Random(cfg.sft.seed)
  records = ws.train_records[:cfg.sft.num_examples]
  flaws = synthetic.parse_flaws(cfg.sft.flaws)
  demos = [synthetic.demonstration(r, ws.world, quality=cfg.sft.quality, rng=rng, flaws=flaws)
           for r in records]
  queries = sorted({t["query"] for d in demos for t in d if t["kind"] == "search"})
  results = dict(zip(queries, ws.retriever.search(queries))) if queries else {}
  return [texts.demonstration_ids(tok, texts.prompt_text(r, tok, cfg.data.template), demo,
                                  results) for r, demo in zip(records, demos)]


def warm_started_policy(cfg, ws: Workspace, config, params):
  """Run (or reuse from DIR/warmstart) the supervised warm start; returns params."""
  if cfg.sft.steps <= 0:
    return params
  path = os.path.join(ws.workdir, "warmstart")
  if os.path.exists(os.path.join(path, "config.json")):
    _, params = models.load_pretrained(path, dtype=cfg.model.dtype,
                                       param_dtype=cfg.model.param_dtype)
    logging.info("warm start reused from %s", path)
    return params
  if ws.world is None:
    raise ValueError("config.sft.steps > 0 needs the synthetic world (data.synthetic.enabled)")
  from stepsearch_jax.sft import warm_start
  t0 = time.time()
  examples = demonstration_examples(cfg, ws)
  params, losses = warm_start(config, params, examples, steps=cfg.sft.steps,
                              batch_size=cfg.sft.batch_size, lr=cfg.sft.lr,
                              pad_id=ws.tokenizer.pad_token_id, seed=cfg.sft.seed)
  models.save_pretrained(path, config, params)
  ws.tokenizer.save_pretrained(path)
  with open(os.path.join(path, "losses.json"), "w") as f:
    json.dump(losses, f)
  ws.timings["warm_start_s"] = time.time() - t0
  return params


def open_workspace(cfg, workdir: str) -> Workspace:
  t0 = time.time()
  train, val, world, corpus = prepare_data(cfg, workdir)
  tok = prepare_tokenizer(cfg, workdir, world, train, val)
  t1 = time.time()
  client, fingerprint, proc = start_retrieval(cfg, workdir, corpus)
  ws = Workspace(cfg=cfg, workdir=workdir, train_records=train, val_records=val, tokenizer=tok,
                 retriever=client, fingerprint=fingerprint, world=world, corpus=corpus, server=proc)
  ws.timings.update(data_s=t1 - t0, retrieval_start_s=time.time() - t1)
  return ws


def prefill_length(cfg) -> int:
  """The engine's longest prefill: a power of two >= 16 holding rollout.max_context."""
  n = 16
  while n < cfg.rollout.max_context:
    n *= 2
  return n


def engine_for(cfg, config, params, tokenizer, mesh=None, num_slots: int | None = None,
               **engine_kw):
  """A StepSearchEngine on `mesh` (default: config.mesh over every device) sized from
  config.rollout: the cache holds a context plus one turn; slots (default: what a training step
  or a validation batch needs, at most rollout.num_slots) are rounded up to a multiple of the
  mesh's data*fsdp size, over which they are sharded. `engine_kw` go to the engine (serving's
  default sampling and token cap)."""
  from stepsearch_jax.engine.engine import StepSearchEngine
  from stepsearch_jax.models import sharding
  mesh = sharding.make_mesh(dict(cfg.mesh)) if mesh is None else mesh
  r = cfg.rollout
  prefill = prefill_length(cfg)
  cache_len = prefill + r.max_tokens_per_turn + r.max_obs_tokens
  slots = num_slots or min(r.num_slots, max(cfg.data.batch_size * r.n, cfg.data.val_batch_size))
  shards = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
  slots = -(-slots // shards) * shards
  return StepSearchEngine(config, params, tokenizer, num_slots=slots, cache_len=cache_len,
                          max_prefill_length=prefill, seed=cfg.seed, mesh=mesh, **engine_kw)
