"""Ask a trained policy: its reasoning, each search with the titles it got back, and its answer.

    python -m stepsearch_jax.infer --config configs/demo.py --checkpoint DIR --question "..."
    python -m stepsearch_jax.infer --config configs/demo.py --checkpoint DIR     # questions on stdin

`--checkpoint` is a training workdir or a Hugging Face folder, loaded as `evaluate` loads it; the
retriever is the one `evaluate` would use (the workdir's own index, `config.retrieval.url`, or a
server started over `config.retrieval.index_dir`). Decoding is greedy, with the run's template and
rollout limits from the config, so the answer is the one validation would score.
"""

from __future__ import annotations

import re
import sys

import jax
from absl import flags

from stepsearch_jax import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF folder or training workdir.")
_QUESTION = flags.DEFINE_string("question", None, "One question; without it, read one per line "
                                "from stdin until EOF.")

_INFO = re.compile(r"<information>.*?</information>", re.DOTALL)


class Recorder:
  """A retriever that remembers what it returned, so the titles can be shown beside each search."""

  def __init__(self, retriever):
    self.retriever, self.topk, self.log = retriever, getattr(retriever, "topk", 3), []

  def search(self, queries, topk=None):
    out = self.retriever.search(queries, topk)
    self.log.extend(zip(queries, out))
    return out


def render(question: str, traj, searches) -> str:
  """The response as a reader wants it: model text, then `search: q` and its titles per block."""
  from stepsearch_jax.rollout.retriever import doc_title_text
  lines = [f"Q: {question}"]
  pieces = _INFO.split(traj.response_text)
  for i, text in enumerate(pieces):
    if text.strip():
      lines.append(text.strip())
    if i < len(pieces) - 1:
      query, hits = searches[i] if i < len(searches) else ("?", [])
      lines.append(f"  [search {i + 1}] {query}")
      lines += [f"    {j}. {doc_title_text(h)[0]}" for j, h in enumerate(hits, 1)]
  lines.append(f"A: {traj.answer if traj.answer is not None else '(no answer)'}")
  return "\n".join(lines)


def ask(engine, cfg, retriever, question: str) -> str:
  from stepsearch_jax.rollout.driver import rollout
  rec = Recorder(retriever)
  record = {"id": "q", "question": question, "data_source": "infer",
            "ground_truth": {"target": []}}
  traj = rollout(engine, [record], cfg.rollout, rec, jax.random.PRNGKey(cfg.seed), greedy=True,
                 template=cfg.data.template)[0]
  return render(question, traj, rec.log)


def main(argv):
  del argv
  from stepsearch_jax import workspace
  cfg = cli.load()
  if not _CHECKPOINT.value:
    raise SystemExit("FATAL --checkpoint is required")
  config, params, tok = workspace.load_policy(_CHECKPOINT.value, cfg.model.dtype)
  import os
  client, _, proc = workspace.checkpoint_retrieval(cfg, _CHECKPOINT.value,
                                                   os.path.join(_CHECKPOINT.value, "infer"))
  try:
    engine = workspace.engine_for(cfg, config, params, tok, num_slots=1)
    questions = [_QUESTION.value] if _QUESTION.value else (l.strip() for l in sys.stdin)
    for q in questions:
      if q:
        print(ask(engine, cfg, client, q) + "\n", flush=True)
  finally:
    client.close()
    if proc is not None:
      proc.terminate()


if __name__ == "__main__":
  cli.run(main)
