"""Greedy evaluation: EM/F1 per data source, as the released evaluation computes them.

    python -m stepsearch_jax.evaluate --config configs/demo.py --checkpoint DIR \
        --data a.parquet,b.parquet [--out DIR/eval]

`--checkpoint` is a Hugging Face folder (config.json + safetensors + tokenizer) or a training workdir
(the policy of its latest checkpoint). The retrieval server is `config.retrieval.url`, or started
over `config.retrieval.index_dir` when `config.retrieval.start_server` is true. Writes
`predictions.jsonl` (the released shape: id, data_source, prompt, response, ground_truth, plus em/f1),
`results.json` and `results.md`.
"""

from __future__ import annotations

import collections
import json
import os
import time

import jax
import numpy as np
from absl import flags, logging

from stepsearch_jax import cli, metrics, models
from stepsearch_jax.rewards import text as text_lib


def score_predictions(trajectories) -> list[dict]:
  """Per-example EM/F1 with the released evaluation rules (last <answer>, braces rule, unrounded)."""
  out = []
  for t in trajectories:
    pred = text_lib.eval_answer(t.response_text)
    targets = list(t.ground_truth.get("target", []))
    out.append({"id": t.id, "data_source": t.data_source, "prompt": t.prompt_text,
                "response": t.response_text, "ground_truth": {"target": targets},
                "prediction": pred, "em": text_lib.em(pred, targets) if pred is not None else 0.0,
                "f1": text_lib.f1(pred, targets) if pred is not None else 0.0,
                "searches": len(t.queries)})
  return out


def summarize(rows: list[dict]) -> dict:
  by = collections.defaultdict(list)
  for r in rows:
    by[r["data_source"]].append(r)
  table = [{"data_source": s, "n": len(rs), "em": float(np.mean([r["em"] for r in rs])),
            "f1": float(np.mean([r["f1"] for r in rs])),
            "searches": float(np.mean([r["searches"] for r in rs]))} for s, rs in sorted(by.items())]
  return {"em": float(np.mean([r["em"] for r in rows])) if rows else 0.0,
          "f1": float(np.mean([r["f1"] for r in rows])) if rows else 0.0,
          "searches": float(np.mean([r["searches"] for r in rows])) if rows else 0.0,
          "n": len(rows), "per_source": table}


def run_validation(engine, records, cfg, retriever, key, out_jsonl: str | None = None,
                   policy_version: int = 0) -> dict:
  """Greedy rollouts over `records`; writes predictions jsonl; returns the summary."""
  from stepsearch_jax.rollout.driver import rollout
  t0 = time.time()
  trajs = rollout(engine, records, cfg.rollout, retriever, key, greedy=True,
                  policy_version=policy_version, template=cfg.data.template)
  rows = score_predictions(trajs)
  if out_jsonl:
    os.makedirs(os.path.dirname(out_jsonl) or ".", exist_ok=True)
    with open(out_jsonl, "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
  summary = summarize(rows)
  summary["seconds"] = time.time() - t0
  return summary


def load_policy(path: str, dtype: str | None = None):
  """(ModelConfig, params, tokenizer) from an HF folder or a training workdir's latest checkpoint."""
  from stepsearch_jax.data import wordlevel
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
    logging.info("policy from %s/checkpoints step %d", path, step)
    return config, params, wordlevel.load(tok_dir if os.path.exists(tok_dir) else
                                          cfg_hf.get("_tokenizer_path", path))
  if not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"--checkpoint {path}: neither a Hugging Face folder (config.json) "
                            "nor a training workdir (checkpoints/)")
  config, params = models.load_pretrained(path, dtype=dtype)
  return config, params, wordlevel.load(path)


_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF folder or training workdir.")
_DATA = flags.DEFINE_string("data", None, "Comma-separated parquet/jsonl record files.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default CHECKPOINT/eval).")


def main(argv):
  del argv
  from stepsearch_jax import workspace
  from stepsearch_jax.data.records import load_records
  cfg = cli.load()
  if not _CHECKPOINT.value or not _DATA.value:
    raise SystemExit("FATAL --checkpoint and --data are required")
  out = _OUT.value or os.path.join(_CHECKPOINT.value, "eval")
  for p in _DATA.value.split(","):
    if not os.path.exists(p):
      raise SystemExit(f"FATAL --data file {p} does not exist")
  records = load_records(_DATA.value)
  config, params, tok = load_policy(_CHECKPOINT.value, cfg.model.dtype)
  # A training workdir carries its index (and a synthetic world its corpus): evaluate against
  # the same retrieval as training unless retrieval.index_dir / retrieval.corpus say otherwise.
  ckpt = _CHECKPOINT.value
  home = ckpt if os.path.exists(os.path.join(ckpt, "index", "manifest.json")) else out
  world_corpus = os.path.join(ckpt, "world", "corpus.jsonl")
  corpus = cfg.retrieval.corpus or (world_corpus if os.path.exists(world_corpus) else "")
  client, fingerprint, proc = workspace.start_retrieval(cfg, home, corpus)
  try:
    engine = workspace.engine_for(cfg, config, params, tok)
    summary = run_validation(engine, records, cfg, client, jax.random.PRNGKey(cfg.seed),
                             os.path.join(out, "predictions.jsonl"))
  finally:
    client.close()
    if proc is not None:
      proc.terminate()
  summary["index_fingerprint"] = fingerprint
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(summary, f, indent=2)
  table = metrics.markdown_table(summary["per_source"], ["data_source", "n", "em", "f1", "searches"])
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  cli.run(main)
