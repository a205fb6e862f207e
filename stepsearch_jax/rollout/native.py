"""The native continuous-batching rollout driver: slots live across turns, retrieval overlaps decode.

Concurrency model (one main thread + one retrieval worker thread; no other threads):

1. The main thread owns the engine's decode state (the KV cache of `num_slots` rows) and every
   `Episode`. Episodes wait in an admission queue; whenever a slot is free the next episode is
   admitted and its prompt is queued for prefill into that slot.
2. Before each decode block the main thread flushes the prefill queue, normally as ONE batched
   `engine.append` call for all queued slots (split by token bucket only when that pads far
   less): prompts go in at position 0; tool results go in at the slot's current length, so only
   the new `<information>`/`<warning>` tokens are computed and the trajectory keeps its KV cache
   across turns. Prompts prefilled together share their common token prefix (the instruction
   template): it is prefilled once into one slot, copied into the others' caches
   (`engine.copy_prefix`), and each prompt appends only its own suffix.
3. A decode block (`engine.decode_block`) runs `decode_steps` to `max_decode_steps` generate steps
   in one device call (stop sequences are matched on device; a slot that stops goes idle for the
   rest of the block, and the block ends early once no slot is active; when every decoding slot
   holds the same copied prompt prefix, attention reads its keys/values once for all rows, not
   once per row). The host then reads the block's
   emitted tokens/logprobs/stop flags in one transfer. A slot that stopped ends its turn:
   - `</answer>`, the final turn or the response cap: the episode is done and the slot is freed
     (and refilled by admission at the next iteration: continuous batching);
   - an invalid action: the warning is queued for prefill at once;
   - `</search>`: the slot's query joins the pending-search list; the slot stays idle, its KV cache
     intact, while the other slots keep decoding.
4. Retrieval: when no request is in flight, ALL pending queries are sent as ONE batched
   `RetrieverClient.search` call on the worker thread (HTTP I/O releases the GIL, so decoding
   continues). The main thread polls the future once per block; when it completes, each slot's
   observation is formatted, tokenised once and queued for prefill (step 2). Queries that arrive
   while a request is in flight form the next batch.
5. If no slot is decoding and nothing is left to prefill, the main thread blocks on the in-flight
   retrieval (or exits when every episode is done).
6. Several processes (multi-controller): every process runs this loop over the same episodes and
   must issue the same device programs in the same order, so nothing may depend on timing. The
   decode outputs are replicated (every process reads the same tokens) and each process queries
   its own sidecar over the same index (the same results); the one timing-dependent choice, when
   an in-flight retrieval is taken in, is fixed: at the first loop iteration after it was sent
   (one decode block still overlaps it), waiting for it if need be.

Stats returned: decode_s (wall time of engine calls and host token handling), retrieval_s (time
the worker spent in retrieval requests), retrieval_wait_s (time the main thread was blocked on
retrieval with nothing to decode), steps, generated tokens, prefilled tokens, retrieval batches,
and a phase profile: decode_call_s / decode_calls (decode blocks incl. the token transfer),
prefill_s / prefill_calls (appends), host_s (per-block token bookkeeping and turn ends).
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from typing import Any, Sequence

import jax
import numpy as np

from stepsearch_jax.engine.engine import SamplingParams, StepSearchEngine
from stepsearch_jax.rollout import schedule
from stepsearch_jax.rollout.episode import Episode, LoopConfig


def _timed_search(retriever: Any, queries: list[str], topk: int):
  t0 = time.perf_counter()
  out = retriever.search(queries, topk=topk)
  return out, time.perf_counter() - t0


def run_native(engine: StepSearchEngine, episodes: Sequence[Episode], retriever: Any,
               sampling: SamplingParams, cfg: LoopConfig, params: Any = None,
               buckets: Sequence[int] = (), decode_steps: int = 8,
               max_decode_steps: int = 64, share_prefix: bool = True) -> dict:
  """Run every episode to completion; returns timing/throughput stats.

  decode_steps / max_decode_steps: generate steps per device call (`engine.decode_block`): the
  cache window is sized for `decode_steps` more tokens, and the block runs on while that window
  still has room, up to `max_decode_steps`. A slot that stops mid-block idles until the block
  ends, which it does early once every slot has stopped; turns of similar length then run in
  lockstep, so a turn is mostly one block: one host round trip and one cache-window copy, on
  the smallest window that holds it.
  share_prefix: prompts prefilled together compute their common token prefix once
  (`engine.copy_prefix`); off, every prompt is prefilled whole.
  """
  params = engine.params if params is None else params
  nslots = engine.num_slots
  stats = collections.Counter()
  waiting = collections.deque(episodes)
  slot_ep: list[Episode | None] = [None] * nslots
  turn_ids: list[list[int]] = [[] for _ in range(nslots)]
  turn_lps: list[list[float]] = [[] for _ in range(nslots)]
  to_prefill: list[int] = []
  pending_search: list[int] = []
  inflight = None                      # (future, [slots])
  decoding = np.zeros(nslots, bool)
  # (group id, length) of the prompt prefix a slot got through `shared_prefix`, else None: when
  # every decoding slot has the same one, decode blocks read that prefix once for all rows.
  slot_prefix: list[tuple[int, int] | None] = [None] * nslots
  state = engine.init_decode_state()
  lockstep = jax.process_count() > 1     # see 6. in the module docstring
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="retrieval")
  t_start = time.perf_counter()

  def flush_prefill():
    nonlocal state
    t0 = time.perf_counter()
    slots = list(to_prefill)
    eps = [slot_ep[s] for s in slots]
    toks, starts = map(list, zip(*[ep.next_prefill(engine.cache_len) for ep in eps]))
    caps = [max(1, min(cfg.max_tokens_per_turn, engine.cache_len - 1 - st - len(t)))
            for st, t in zip(starts, toks)]
    for s, st in zip(slots, starts):
      if st == 0:
        slot_prefix[s] = None
    if share_prefix:
      state = shared_prefix(state, slots, eps, toks, starts)
    # Prompts (at 0) and tool results (at each slot's length) of all slots go in together.
    for idx in schedule.plan_appends([len(t) for t in toks],
                             lambda ls: engine.append_shape(ls, buckets)):
      state = engine.append(state, [slots[i] for i in idx], [toks[i] for i in idx],
                            [starts[i] for i in idx], params=params,
                            max_new=[caps[i] for i in idx], sampling=sampling,
                            keys=[eps[i].key for i in idx], buckets=buckets)
      stats["prefill_tokens"] += sum(len(toks[i]) for i in idx)
      stats["prefill_calls"] += 1
    for s in slots:
      decoding[s] = True
      turn_ids[s], turn_lps[s] = [], []
    to_prefill.clear()
    # The next decode block waits for the appends anyway; waiting here times them honestly.
    jax.block_until_ready(state.tokens)
    stats["prefill_s"] += time.perf_counter() - t0

  def shared_prefix(state, slots, eps, toks, starts):
    """Prefill the prompt prefix common to the fresh rows once, then copy it to the others.

    RL prompts repeat one instruction template (and GRPO's n samples the whole prompt), so a
    batch of fresh prompts is mostly the same tokens. Rewrites those rows of `toks`/`starts` in
    place to append only their own suffix after the copied prefix.
    """
    fresh = [i for i, st in enumerate(starts) if st == 0]
    rows = [toks[i] for i in fresh]
    n = schedule.shared_prefix_len(rows)
    if not n:
      return state
    src = slots[fresh[0]]
    state = engine.append(state, [src], [rows[0][:n]], [0], params=params, sampling=sampling,
                          keys=[eps[fresh[0]].key], buckets=buckets)
    state = engine.copy_prefix(state, src, [slots[i] for i in fresh[1:]], n)
    for i in fresh:
      toks[i], starts[i] = toks[i][n:], n
      slot_prefix[slots[i]] = (stats["prefix_groups"], n)
    stats["prefix_groups"] += 1
    stats["prefill_tokens"] += n
    stats["prefill_calls"] += 1
    stats["shared_prefix_tokens"] += n * (len(fresh) - 1)
    return state

  def end_turn(s: int):
    ep = slot_ep[s]
    action = ep.finish_turn(turn_ids[s], turn_lps[s])
    decoding[s] = False
    if ep.done:
      slot_ep[s] = None
    elif action == "search":
      pending_search.append(s)
    else:
      to_prefill.append(s)

  try:
    while True:
      for s in range(nslots):                      # admission (continuous batching)
        if slot_ep[s] is None and waiting:
          slot_ep[s] = waiting.popleft()
          to_prefill.append(s)
      if inflight is not None and (lockstep or inflight[0].done()):
        results, dt = inflight[0].result()
        stats["retrieval_s"] += dt
        for s, res in zip(inflight[1], results):
          slot_ep[s].observe_search(res)
          if slot_ep[s].done:
            slot_ep[s] = None
          else:
            to_prefill.append(s)
        inflight = None
        continue                                   # re-run admission for freed slots
      if pending_search and inflight is None:
        queries = [slot_ep[s].query for s in pending_search]
        inflight = (pool.submit(_timed_search, retriever, queries, cfg.topk), list(pending_search))
        stats["retrieval_batches"] += 1
        stats["retrieval_queries"] += len(queries)
        pending_search.clear()
      if to_prefill:
        flush_prefill()
      if not decoding.any():
        if inflight is not None:
          t0 = time.perf_counter()
          concurrent.futures.wait([inflight[0]])
          stats["retrieval_wait_s"] += time.perf_counter() - t0
          continue
        if not waiting and all(e is None for e in slot_ep):
          break
        continue
      t0 = time.perf_counter()
      live = np.flatnonzero(decoding)
      groups = {slot_prefix[s] for s in live}
      shared = (int(live[0]), groups.pop()[1]) if len(groups) == 1 and None not in groups else None
      state, out = engine.decode_block(params, state, decode_steps, max_decode_steps, shared,
                                       rows=schedule.decode_rows(decoding))
      t1 = time.perf_counter()
      stats["decode_call_s"] += t1 - t0
      stats["steps"] += len(out["tokens"])
      stats["decode_calls"] += 1
      valid, stopped = out["valid"], out["stopped"]
      for s in np.nonzero(valid.any(axis=0))[0]:
        rows = valid[:, s]
        turn_ids[s].extend(out["tokens"][rows, s].tolist())
        turn_lps[s].extend(out["logprobs"][rows, s].tolist())
        stats["generated_tokens"] += int(rows.sum())
        if stopped[:, s].any():
          end_turn(s)
      stats["host_s"] += time.perf_counter() - t1
  finally:
    pool.shutdown(wait=True)
  engine.release_decode_state(state)
  total = time.perf_counter() - t_start
  stats["total_s"] = total
  stats["decode_s"] = total - stats["retrieval_wait_s"]
  return dict(stats)
