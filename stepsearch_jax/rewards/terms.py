"""The reward, term by term: each term is one function of a parsed response (a Context).

``config.reward.terms`` picks names from TERMS, the algorithms' variants (outcome-only PPO/GRPO,
the §7.3 ablations) are subsets of it, and train logs ``reward/<name>`` for every one. A new term
is one function and one entry in TERMS; ``rewards.score.score`` combines them (final terms at the
last token, step terms summed into each retrieval step's score at its search-turn end).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from stepsearch_jax.rewards import keys as keys_lib
from stepsearch_jax.rewards import steps as steps_lib
from stepsearch_jax.rewards import text as text_lib


@dataclasses.dataclass
class Context:
  """What the reward terms read, parsed once per response."""
  cfg: Any                          # rewards.score.RewardConfig
  response_text: str
  ground_truth: Any                 # mapping with target, optional search_keys
  golds: list[str]                  # support-doc texts
  step_docs: list[list[str]]        # documents of each retrieval step (rank label per preset)
  step_doc_ids: Sequence[Sequence[Any]] | None
  f1_fn: Any
  normalize_fn: Any


@dataclasses.dataclass(frozen=True)
class Term:
  """One reward term. ``where="final"``: a float added (times ``weight``) at the last token;
  ``where="step"``: one float per scored retrieval step, summed (times ``weight``) into that
  step's score, which lands at the step's search-turn end."""
  where: str
  weight: Any                       # RewardConfig -> float
  fn: Any                           # Context -> float | list[float]


def answer_f1_term(ctx: Context) -> float:
  """F1 of the ``<answer>`` against the best gold (method §3.2)."""
  return ctx.f1_fn(text_lib.extract_answer(ctx.response_text), ctx.ground_truth["target"])


def key_term(ctx: Context) -> float:
  """Search-key score: queries against the gold sub-question keywords (method §3.4)."""
  keys = ctx.ground_truth["search_keys"] if "search_keys" in ctx.ground_truth else None
  if keys is None:
    return 0.0
  queries = keys_lib.parse_queries(ctx.response_text, skip_inserted=not ctx.cfg.queries_in_inserted)
  return keys_lib.search_key_score(queries, keys, ctx.f1_fn, overwrite=ctx.cfg.key_overwrite,
                                   released_groups=ctx.cfg.chars_from_string_keys)


def info_gain_term(ctx: Context) -> list[float]:
  """IG_t against the gold paragraphs (method §3.5); [] without golds."""
  return steps_lib.information_gains(ctx.step_docs, ctx.golds, ctx.normalize_fn)


def redundancy_term(ctx: Context) -> list[float]:
  """P_t, the share of step t's documents seen before (method §3.6); [] without golds."""
  if not ctx.golds:
    return []
  keys: Sequence[Sequence[Any]] = ctx.step_docs
  if (not ctx.cfg.docs_by_rank and ctx.step_doc_ids is not None
      and len(ctx.step_doc_ids) == len(ctx.step_docs)):
    keys = [[str(i) for i in ids] for ids in ctx.step_doc_ids]
  return steps_lib.redundancies(keys)


TERMS: dict[str, Term] = {
    "answer_f1": Term("final", lambda cfg: 1.0, answer_f1_term),
    "key": Term("final", lambda cfg: cfg.key_weight, key_term),
    "info_gain": Term("step", lambda cfg: 1.0, info_gain_term),
    "redundancy": Term("step", lambda cfg: -1.0, redundancy_term),
}
STEP_TERMS = tuple(n for n, t in TERMS.items() if t.where == "step")


def parse_terms(terms: str | Sequence[str]) -> tuple[str, ...]:
  """``"answer_f1,key"`` or a sequence, checked against TERMS (registry order kept as given)."""
  names = [t.strip() for t in terms.split(",")] if isinstance(terms, str) else list(terms)
  names = [t for t in names if t]
  unknown = [t for t in names if t not in TERMS]
  if unknown:
    raise ValueError(f"config.reward.terms: {unknown} not in {list(TERMS)}")
  return tuple(names)
