"""Rollouts through JetStream's own orchestrator: one Decode request per turn, history re-prefilled.

This is how a JetStream server is used by an agent: every turn sends the whole context (prompt +
everything so far) as a `DecodeRequest` with token content (client-side tokenisation, so the
tokens we get back are exactly the sampled ones) to `orchestrator.LLMOrchestrator.Decode`, in
process (no gRPC hop); JetStream's prefill/transfer/generate/detokenize threads interleave the
requests of all episodes over the engine's slots. Each episode is an asyncio task: after its turn
it calls the retriever on a worker thread (`asyncio.to_thread`, one query per request) and sends
its next turn. `session_cache` is set on every request: JetStream then treats the content as a
continuation and does not prepend a BOS token (our prompt ids already are the full sequence).

JetStream streams token ids only; when `score_logprobs` is set, the sampler logprobs are recomputed
by one scoring forward over the turn (`engine.score`), since the trajectory must carry them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Sequence


from stepsearch_jax.engine.engine import SamplingParams, StepSearchEngine  # compat.install()
from jetstream.core import orchestrator  # pylint: disable=g-bad-import-order
from jetstream.core.proto import jetstream_pb2
from stepsearch_jax.rollout.episode import Episode, LoopConfig

_OFFLINE_WARNING = "LLM orchestrator is being used in offline test mode"


class _DropOfflineWarning(logging.Filter):
  """The in-process orchestrator warns on every request that it has no gRPC context."""

  def filter(self, record: logging.LogRecord) -> bool:
    return _OFFLINE_WARNING not in str(record.msg)


def run_jetstream(engine: StepSearchEngine, episodes: Sequence[Episode], retriever: Any,
                  sampling: SamplingParams, cfg: LoopConfig, params: Any = None,
                  score_logprobs: bool = True) -> dict:
  params = engine.params if params is None else params
  stats = collections.Counter()
  old_sampling, old_max = engine.default_sampling, engine.max_tokens
  engine.default_sampling, engine.max_tokens = sampling, cfg.max_tokens_per_turn
  root = logging.getLogger()
  quiet = _DropOfflineWarning()
  root.addFilter(quiet)
  driver = orchestrator.Driver(prefill_engines=[engine], generate_engines=[engine],
                               prefill_params=[params], generate_params=[params],
                               interleaved_mode=True)
  orch = orchestrator.LLMOrchestrator(driver=driver)
  t_start = time.perf_counter()

  async def turn(ep: Episode) -> list[int]:
    cap = max(1, min(cfg.max_tokens_per_turn, engine.cache_len - 1 - len(ep.context)))
    request = jetstream_pb2.DecodeRequest(
        session_cache="stepsearch-rollout", max_tokens=cap,
        token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=ep.context))
    ids: list[int] = []
    async for response in orch.Decode(request):
      ids.extend(response.stream_content.samples[0].token_ids)
    return ids

  async def run_episode(ep: Episode) -> None:
    while not ep.done:
      ids = await turn(ep)
      stats["generated_tokens"] += len(ids)
      stats["prefill_tokens"] += len(ep.context)
      if score_logprobs and ids:
        lps = list(engine.score(ep.context + ids, params=params)[-len(ids):])
      else:
        lps = [0.0] * len(ids)
      action = ep.finish_turn(ids, lps)
      if action == "search" and not ep.done:
        t0 = time.perf_counter()
        results = await asyncio.to_thread(retriever.search, [ep.query], cfg.topk)
        stats["retrieval_s"] += time.perf_counter() - t0
        stats["retrieval_batches"] += 1
        stats["retrieval_queries"] += 1
        ep.observe_search(results[0])

  async def main() -> None:
    try:
      await asyncio.gather(*(run_episode(ep) for ep in episodes))
    finally:
      # Stop JetStream's threads while this event loop still runs: its detokenize thread closes
      # a request's stream with two `call_soon_threadsafe` calls, and the last episode can end
      # between them; after `asyncio.run` closed the loop the second one raises and JetStream
      # SIGKILLs the whole process (seen about once in a few rollouts on 2 cores).
      driver.stop()

  try:
    asyncio.run(main())
  finally:
    driver.stop()   # no-op after main's; stops the threads if the loop never started
    root.removeFilter(quiet)
    engine.default_sampling, engine.max_tokens = old_sampling, old_max
  stats["total_s"] = time.perf_counter() - t_start
  # Retrieval overlaps other episodes' decoding here, so decode_s is the wall time.
  stats["decode_s"] = stats["total_s"]
  return dict(stats)
