"""`rollout(...)`: the trainer's and evaluator's entry point to multi-turn search rollouts.

Records accepted (each either a `stepsearch_jax.data.records.Record` or a dict / object with the
same attribute names): `id`, `data_source`, a prompt as `prompt_text` (used verbatim) or `prompt`
(chat messages, rendered with the tokenizer's chat template when it has one) or `question` (put
into the method's `think` template first), ground truth as `ground_truth` {target, search_keys} or
`targets` (alias `golden_answers`) + `search_keys`, and optional `support_docs`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from stepsearch_jax.engine.engine import SamplingParams, StepSearchEngine
from stepsearch_jax.rollout.episode import LoopConfig, make_episodes


def _native(engine, episodes, retriever, sampling, cfg, rollout_cfg, score_logprobs) -> dict:
  from stepsearch_jax.rollout.native import run_native
  del score_logprobs   # the native driver always returns the sampler's log-probabilities
  return run_native(engine, episodes, retriever, sampling, cfg,
                    buckets=tuple(rollout_cfg.prefill_buckets),
                    decode_steps=int(rollout_cfg.decode_steps_per_call),
                    max_decode_steps=int(rollout_cfg.max_decode_steps_per_call),
                    share_prefix=bool(rollout_cfg.share_prefix))


def _jetstream(engine, episodes, retriever, sampling, cfg, rollout_cfg, score_logprobs) -> dict:
  del rollout_cfg
  if jax.process_count() > 1:
    raise ValueError("config.rollout.driver='jetstream' runs on one process (its orchestrator "
                     "threads decide by timing); use driver='native' on several hosts")
  from stepsearch_jax.rollout.jetstream_driver import run_jetstream
  return run_jetstream(engine, episodes, retriever, sampling, cfg, score_logprobs=score_logprobs)


# config.rollout.driver -> runner(engine, episodes, retriever, sampling, loop cfg, config.rollout,
# score_logprobs) -> stats. Both feed the same Episodes, so greedy trajectories are identical.
DRIVERS = {"native": _native, "jetstream": _jetstream}


class RolloutResult(list):
  """A list of Trajectory with `.stats` (timings: decode_s, retrieval_s, ..., tokens_per_s)."""
  stats: dict


def sampling_from_config(rollout_cfg: Any, greedy: bool) -> SamplingParams:
  if greedy:   # validation decoding: do_sample=False -> temperature 0, top_p 1, top_k -1
    return SamplingParams.greedy()
  return SamplingParams(temperature=float(rollout_cfg.temperature),
                        top_p=float(rollout_cfg.top_p), top_k=int(rollout_cfg.top_k))


def rollout(engine: StepSearchEngine, records: Sequence[Any], rollout_cfg: Any, retriever: Any,
            rng: jax.Array, greedy: bool = False, policy_version: int = 0, *,
            driver: str | None = None, template: str = "think", n: int | None = None,
            score_logprobs: bool = True) -> RolloutResult:
  """Roll out `n` (default rollout_cfg.n; 1 when greedy) trajectories per record, record-major.

  rollout_cfg: `config.rollout` (every key declared in config.py). `retriever` is a
  rollout.retriever.Retriever; its `topk` is the documents per search.
  Uses the engine's current params (see `StepSearchEngine.swap_params`).
  """
  cfg = LoopConfig.from_config(rollout_cfg, topk=getattr(retriever, "topk", 3))
  driver = driver or rollout_cfg.driver
  if n is None:
    n = 1 if greedy else int(rollout_cfg.n)
  sampling = sampling_from_config(rollout_cfg, greedy)
  episodes = make_episodes(records, engine.hf_tokenizer, cfg, rng, n=n,
                           policy_version=policy_version, template=template,
                           eos_ids=engine.eos_ids)
  if driver not in DRIVERS:
    raise ValueError(f"config.rollout.driver={driver!r} is not one of {sorted(DRIVERS)}")
  stats = DRIVERS[driver](engine, episodes, retriever, sampling, cfg, rollout_cfg, score_logprobs)
  out = RolloutResult(ep.traj for ep in episodes)
  for t in out:
    t.check()
  stats["trajectories"] = len(out)
  stats["tokens_per_s"] = stats.get("generated_tokens", 0) / max(stats["total_s"], 1e-9)
  out.stats = stats
  return out
