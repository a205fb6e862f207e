"""The StepSearch agent loop (method §1.3-1.4) as a per-trajectory state machine: `Episode`.

`Episode` holds everything the method's `run_llm_loop` does for one sample, token-in/token-out:
  turn t < max_turns: generate <= max_tokens_per_turn tokens (stops: `</search>`, `</answer>`, EOS);
    keep the tokens up to the first `</search>` (else the first `</answer>`); act on the first
    `<search>..</search>` / `<answer>..</answer>`:
      answer  -> done, no observation;
      search  -> `format_information(top-k docs)` (+ the last-turn warning when t = max_turns-1);
      invalid -> the invalid-action warning (+ the last-turn warning when t = max_turns-1);
    the observation is tokenised once and cut to max_obs_tokens;
    context = (context + tokens + obs)[-max_context:]; response = response + tokens + obs, kept to
    its first max_response_tokens (the episode ends when that cap is reached).
  turn t = max_turns (only if still running): one final generation without search: a `<search>`
    there gets no observation and the episode ends (it has no answer, so it scores -1).
EOS is never kept in the response (the method's re-tokenised responses never contain it).
The drivers (`native.py`, `jetstream_driver.py`) only decide WHEN tokens are generated and
retrieval runs; both feed the same `Episode`s, so their greedy trajectories are identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from stepsearch_jax.rollout.trajectory import Trajectory

from stepsearch_jax.texts import (ACTION_RE, ANSWER_END, INVALID_ACTION, LAST_TURN,  # noqa: F401
                                  SEARCH_END, doc_title_text, format_information,
                                  inserted_texts, prompt_text)
from stepsearch_jax.texts import record_field as _field


@dataclasses.dataclass
class LoopConfig:
  max_turns: int = 5
  max_tokens_per_turn: int = 800
  max_obs_tokens: int = 800
  max_context: int = 4096
  max_start: int = 2048
  max_response_tokens: int = 4096
  topk: int = 3
  invalid_action: str = INVALID_ACTION
  last_turn: str = LAST_TURN

  @classmethod
  def from_config(cls, rollout_cfg: Any, topk: int = 3) -> "LoopConfig":
    """From config.rollout; `topk` is the retriever's (config.retrieval.topk)."""
    r = rollout_cfg
    return cls(max_turns=r.max_turns, max_tokens_per_turn=r.max_tokens_per_turn,
               max_obs_tokens=r.max_obs_tokens, max_context=r.max_context,
               max_start=r.max_start, topk=topk,
               max_response_tokens=r.max_context if r.max_response_tokens < 0
               else r.max_response_tokens,
               **inserted_texts(r))


def _ground_truth(record: Any) -> dict:
  gt = _field(record, "ground_truth")
  if callable(gt):
    gt = gt()
  if gt:
    return dict(gt)
  targets = _field(record, "targets", None) or _field(record, "golden_answers", None) or []
  return {"target": list(targets), "search_keys": list(_field(record, "search_keys", None) or [])}


class Episode:
  """One trajectory's host-side state (see module docstring). Drivers call, in order:
  `turn_tokens()` / `sampling_cap()` to generate, `finish_turn(ids, logprobs)` -> action, and for
  searches `observe_search(results)`; `pending_ids` then holds the tokens to prefill next."""

  def __init__(self, record: Any, tokenizer: Any, cfg: LoopConfig, key: np.ndarray,
               policy_version: int = 0, template: str = "think"):
    self.tok, self.cfg, self.key = tokenizer, cfg, key
    text = prompt_text(record, tokenizer, template)
    ids = list(tokenizer.encode(text, add_special_tokens=False))[-cfg.max_start:]
    self.traj = Trajectory(
        id=str(_field(record, "id", "")), data_source=str(_field(record, "data_source", "")),
        prompt_text=text, prompt_ids=ids, policy_version=int(policy_version),
        ground_truth=_ground_truth(record),
        support_docs=list(_field(record, "support_docs", None) or []))
    self.context: list[int] = list(ids)      # what the model sees (rolling, last max_context)
    self.turn = 0
    self.done = False
    self.pending_ids: list[int] = list(ids)  # tokens to prefill before the next generation
    self.truncated_context = True            # True: prefill `context` from position 0
    self.query: str | None = None

  def next_prefill(self, cache_len: int, margin: int = 16) -> tuple[list[int], int]:
    """(tokens, cache position) to prefill before the next turn: the new tokens at the slot's
    current length, or the whole (rolled) context from 0 when it was truncated or the append
    (plus `margin` tokens of generation) would not fit a slot of `cache_len`."""
    fresh = self.truncated_context or self.append_start + len(self.pending_ids) + margin > cache_len
    return (list(self.context), 0) if fresh else (list(self.pending_ids), self.append_start)

  @property
  def final_turn(self) -> bool:
    return self.turn >= self.cfg.max_turns

  def _cut(self, ids: list[int], logprobs: list[float]) -> tuple[list[int], list[float], str]:
    """Drop EOS, keep tokens through the first `</search>` (else `</answer>`)."""
    eos = self._eos
    keep = [i for i, t in enumerate(ids) if t not in eos]
    ids = [ids[i] for i in keep]
    logprobs = [logprobs[i] for i in keep]
    text = self.tok.decode(ids, skip_special_tokens=True)
    for tag in (SEARCH_END, ANSWER_END):
      if tag in text:
        end = text.index(tag) + len(tag)
        for n in range(1, len(ids) + 1):   # first prefix whose text contains the tag
          if len(self.tok.decode(ids[:n], skip_special_tokens=True)) >= end:
            ids, logprobs = ids[:n], logprobs[:n]
            break
        return ids, logprobs, self.tok.decode(ids, skip_special_tokens=True)
    return ids, logprobs, text

  @property
  def _eos(self) -> set[int]:
    return getattr(self, "eos_ids", set())

  def finish_turn(self, ids: Sequence[int], logprobs: Sequence[float]) -> str:
    """Record one generation; returns 'answer', 'search', 'invalid' or 'done'."""
    ids, logprobs, text = self._cut(list(ids), list(logprobs))
    t = self.traj
    room = self.cfg.max_response_tokens - len(t.response_ids)
    t.add_model_tokens(ids[:room], logprobs[:room])
    t.response_text += self.tok.decode(ids[:room], skip_special_tokens=True)
    t.num_turns += 1
    self._turn_ids = ids
    match = ACTION_RE.search(text)
    action = match.group(1) if match else "invalid"
    content = match.group(2).strip() if match else ""
    if action == "search":
      t.queries.append(content)
    if len(ids) > room:
      t.truncated = True
    if action == "answer":
      t.answer = content
    if action == "answer" or self.final_turn or t.truncated:
      self.done = True
      return "answer" if action == "answer" else "done"
    self.query = content if action == "search" else None
    if action == "invalid":
      self._observe(self.cfg.invalid_action)
    return action

  def observe_search(self, results: Sequence[dict]) -> None:
    """`results` = one query's list of {"document", "score"} from the retriever."""
    docs = [r["document"] for r in results]
    t = self.traj
    t.search_end_indices.append(len(t.response_ids) - 1)
    t.doc_ids.append([str(d.get("id", "")) for d in docs])
    t.doc_texts.append([doc_title_text(d)[1] for d in docs])
    self._observe(format_information(docs))

  def _observe(self, obs: str) -> None:
    if self.turn == self.cfg.max_turns - 1:
      obs += self.cfg.last_turn
    obs_ids = list(self.tok.encode(obs, add_special_tokens=False))[:self.cfg.max_obs_tokens]
    t = self.traj
    room = self.cfg.max_response_tokens - len(t.response_ids)
    t.add_inserted_tokens(obs_ids[:room])
    t.response_text += self.tok.decode(obs_ids[:room], skip_special_tokens=False)
    self.turn += 1
    if len(obs_ids) > room or len(t.response_ids) >= self.cfg.max_response_tokens:
      t.truncated = True
      self.done = True
      return
    start = len(self.context) + len(self._turn_ids)
    self.context = self.context + self._turn_ids + obs_ids
    if len(self.context) > self.cfg.max_context:
      self.context = self.context[-self.cfg.max_context:]
      self.pending_ids, self.truncated_context = list(self.context), True
    else:
      self.pending_ids, self.truncated_context = obs_ids, False
    self.append_start = start


def make_episodes(records: Sequence[Any], tokenizer: Any, cfg: LoopConfig, rng: jax.Array,
                  n: int = 1, policy_version: int = 0, template: str = "think",
                  eos_ids: Sequence[int] = ()) -> list[Episode]:
  """n episodes per record (record-major order); episode i samples with fold_in(rng, i)."""
  out = []
  for r in records:
    for _ in range(n):
      key = np.asarray(jax.random.fold_in(rng, len(out)), np.uint32)
      ep = Episode(r, tokenizer, cfg, key, policy_version, template)
      ep.eos_ids = set(int(e) for e in eos_ids)
      out.append(ep)
  return out
