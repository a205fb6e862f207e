"""Greedy evaluation: EM/F1 per data source with the released evaluation's rules.

    python -m stepsearch_jax.evaluate --config configs/demo.py --checkpoint DIR \
        --data a.parquet,nq/test.jsonl [--out DIR/eval] [--released_json]

`--checkpoint` is a Hugging Face folder (config.json + safetensors + tokenizer) or a training workdir
(the policy of its latest checkpoint). The retrieval server is `config.retrieval.url`, or started
over `config.retrieval.index_dir` when `config.retrieval.start_server` is true. `--data` takes
record files or FlashRAG QA jsonl (`{id, question, golden_answers}`, converted on load). Writes
`predictions.jsonl` (id, data_source, prompt, response, ground_truth: {target}, plus em/f1),
`results.json` and `results.md` (one EM/F1 row per data_source); `--released_json` adds
`predictions.json`, the released JSON array for the released scripts/eval.py. Both files can be
re-scored with `python -m stepsearch_jax.rewards eval [--preset released]`.
"""

from __future__ import annotations

import collections
import json
import os
import time

import jax
import numpy as np
from absl import flags

from stepsearch_jax import cli, metrics
from stepsearch_jax.rewards import predictions
from stepsearch_jax.rewards.predictions import score_predictions  # noqa: F401  (re-export)


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


def write_trajectories(trajs, path: str) -> str:
  """One Trajectory.to_json per line (token ids, masks, search ends, documents): what the report
  page reads to place every reward on its token."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for t in trajs:
      f.write(t.to_json() + "\n")
  os.replace(path + ".tmp", path)
  return path


def run_validation(engine, records, cfg, retriever, key, out_jsonl: str | None = None,
                   policy_version: int = 0, released_json: str | None = None,
                   trajectories_jsonl: str | None = None) -> dict:
  """Greedy rollouts over `records`; writes predictions jsonl (and the released JSON array when
  `released_json` is a path, the full trajectories for `stepsearch_jax.report` when
  `trajectories_jsonl` is); returns the summary."""
  from stepsearch_jax.rollout.driver import rollout
  t0 = time.time()
  trajs = rollout(engine, records, cfg.rollout, retriever, key, greedy=True,
                  policy_version=policy_version, template=cfg.data.template)
  rows = predictions.score_predictions(trajs)
  if out_jsonl:
    predictions.write_jsonl(rows, out_jsonl)
  if released_json:
    predictions.write_released_json(rows, released_json)
  if trajectories_jsonl:
    write_trajectories(trajs, trajectories_jsonl)
  summary = summarize(rows)
  summary["seconds"] = time.time() - t0
  return summary


_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF folder or training workdir.")
_DATA = flags.DEFINE_string("data", None, "Comma-separated parquet/jsonl record files.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default CHECKPOINT/eval).")
_RELEASED_JSON = flags.DEFINE_bool(
    "released_json", False, "Also write OUT/predictions.json, the released JSON array that the "
    "released scripts/eval.py reads.")


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
  records = load_records(_DATA.value, template=cfg.data.template)
  config, params, tok = workspace.load_policy(_CHECKPOINT.value, cfg.model.dtype)
  client, fingerprint, proc = workspace.checkpoint_retrieval(cfg, _CHECKPOINT.value, out)
  try:
    engine = workspace.engine_for(cfg, config, params, tok)
    released = os.path.join(out, "predictions.json") if _RELEASED_JSON.value else None
    summary = run_validation(engine, records, cfg, client, jax.random.PRNGKey(cfg.seed),
                             os.path.join(out, "predictions.jsonl"), released_json=released)
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
