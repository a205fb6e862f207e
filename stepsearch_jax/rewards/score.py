"""The StepSearch reward of one trajectory and its token-level placement.

Two presets (method §3, §8):

``released`` reproduces ``qa_step.compute_score_f1_steps_plan_with_support_docs`` and the
RewardManager of the released code value for value, quirks included:
  1. effective step scale 1 + 0.6 = 1.6: the helper writes s_t into the reward row in place and
     returns that row, to which the caller adds 0.6 x row (computed here in float32 as torch does);
  2. every F1 (answer and search keys) rounded to 4 decimals;
  3. punctuation deleted, not replaced by a space, in the SQuAD normaliser;
  4. a key group's score is OVERWRITTEN by each later query credited to it (ties go to the earlier
     group; a query matching nothing writes 0 to a dummy group);
  5. the ``<search>`` / ``</search>`` written inside the environment's ``<warning>`` texts are read
     as queries (they count in the key reward);
  6. documents are compared as extracted text that still carries the next document's ``\\nDoc k+1``
     label, so a repeat is penalised only at the same rank (and the label words enter TF-IDF);
  7. a search-key group given as a bare string is split into characters (``list(arr)``).

``paper`` (the default) fixes each of these: step scale from the config (0.6) with no in-place
doubling; F1 unrounded; punctuation becomes a space; the best query per key group is kept;
queries are read only outside ``<warning>``/``<information>`` blocks; documents lose the rank
label, and redundancy compares document ids when ``step_doc_ids`` is given (suffix-free text
otherwise, or when the id list does not line up with the parsed steps, e.g. after an
``</information>`` was truncated away); a bare-string key group is one phrasing.
Shared by both: the format gate (-1, no step rewards, key score 0), answer F1 as the outcome,
F1 + 0.618 x key score as the final reward, no step scores without support docs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import numpy as np

from stepsearch_jax.rewards import steps as steps_lib
from stepsearch_jax.rewards import text as text_lib
from stepsearch_jax.rewards import terms as terms_lib
from stepsearch_jax.rewards.terms import Context, answer_f1_term, parse_terms


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Reward switches and weights; build with :meth:`preset` or :meth:`from_config`."""
  name: str = "paper"
  step_scale: float = 0.6            # nominal scale on step scores
  key_weight: float = 0.618
  format_penalty: float = -1.0
  terms: tuple[str, ...] = ("answer_f1", "key", "info_gain", "redundancy")   # rewards.terms.TERMS
  # Released-code quirks (all False for `paper`).
  inplace_step_scale: bool = False   # effective scale = 1 + step_scale
  round_f1: int | None = None
  delete_punct: bool = False
  key_overwrite: bool = False
  queries_in_inserted: bool = False
  docs_by_rank: bool = False
  chars_from_string_keys: bool = False

  @property
  def effective_step_scale(self) -> float:
    return 1.0 + self.step_scale if self.inplace_step_scale else self.step_scale

  @classmethod
  def preset(cls, name: str) -> "RewardConfig":
    if name not in PRESETS:
      raise ValueError(f"reward preset {name!r} is not one of {sorted(PRESETS)}")
    return cls(name=name, **PRESETS[name])

  @classmethod
  def from_config(cls, section: Mapping[str, Any]) -> "RewardConfig":
    """From the config section ``reward`` (preset, step_scale, key_weight, format_penalty, terms)."""
    base = cls.preset(section["preset"] if "preset" in section else "paper")
    overrides = {k: float(section[k]) for k in ("step_scale", "key_weight", "format_penalty")
                 if k in section}
    if "terms" in section:
      overrides["terms"] = parse_terms(section["terms"])
    return dataclasses.replace(base, **overrides)

  def has(self, term: str) -> bool:
    return term in self.terms


# config.reward.preset -> the RewardConfig fields it sets (module docstring: what each quirk is).
PRESETS = {
    "paper": {},
    "released": dict(inplace_step_scale=True, round_f1=4, delete_punct=True, key_overwrite=True,
                     queries_in_inserted=True, docs_by_rank=True, chars_from_string_keys=True),
}


@dataclasses.dataclass
class ScoreResult:
  format_ok: bool
  answer_f1: float
  search_key_score: float
  step_scores: list[float]          # unscaled sum of the enabled step terms (IG_t - P_t)
  info_gains: list[float]
  redundancies: list[float]
  final_score: float                # at the last response token
  step_rewards: list[float]         # the values placed at the search-turn end tokens
  answer: str | None = None
  terms: dict = dataclasses.field(default_factory=dict)   # raw value of every term

  def to_json(self) -> dict:
    return dict(format_ok=self.format_ok, answer_f1=self.answer_f1,
                search_key_score=self.search_key_score, step_scores=self.step_scores,
                final_score=self.final_score, step_rewards=self.step_rewards)


def _resolve(preset: RewardConfig | str) -> RewardConfig:
  return preset if isinstance(preset, RewardConfig) else RewardConfig.preset(preset)


def _scale(cfg: RewardConfig, s: float) -> float:
  if cfg.inplace_step_scale:
    # torch float32: row[pos] = s; row += scale * row.
    v = np.float32(s)
    return float(v + np.float32(cfg.step_scale) * v)
  return cfg.step_scale * s


def score(response_text: str, ground_truth: Mapping[str, Any],
          support_docs: Sequence[Mapping[str, Any]] | None, preset: RewardConfig | str = "paper",
          step_doc_ids: Sequence[Sequence[Any]] | None = None) -> ScoreResult:
  """Score one response (assistant text with the inserted <information>/<warning> blocks).

  `ground_truth` holds ``target`` (str or list of str) and optionally ``search_keys`` (list of
  groups); `support_docs` are dicts with ``paragraph_text``. `step_doc_ids` (one list of ids per
  retrieval step) lets the `paper` preset detect repeats by id. Every term in rewards.terms.TERMS
  is computed (the metrics read them all); only those in ``cfg.terms`` enter the reward.
  """
  cfg = _resolve(preset)
  if "target" not in ground_truth:
    raise KeyError("ground_truth has no 'target' field")
  punct = not cfg.delete_punct
  golds = []
  for i, doc in enumerate(support_docs if support_docs is not None else []):
    if "paragraph_text" not in doc:
      raise KeyError(f"support_docs[{i}] has no 'paragraph_text' field")
    golds.append(str(doc["paragraph_text"]))
  step_docs = steps_lib.parse_step_docs(response_text)
  if not cfg.docs_by_rank:
    step_docs = [[steps_lib.strip_doc_label(d) for d in docs] for docs in step_docs]
  ctx = Context(cfg, response_text, ground_truth, golds, step_docs, step_doc_ids,
                functools.partial(text_lib.f1, round_to=cfg.round_f1, punct_to_space=punct),
                functools.partial(text_lib.normalize, punct_to_space=punct))
  answer = text_lib.extract_answer(response_text)
  answer_f1 = answer_f1_term(ctx)
  if not text_lib.format_ok(response_text):   # the format gate: penalty, nothing else
    return ScoreResult(False, answer_f1, 0.0, [], [], [], float(cfg.format_penalty), [], answer,
                       {"answer_f1": answer_f1})

  values = {name: (answer_f1 if name == "answer_f1" else t.fn(ctx))
            for name, t in terms_lib.TERMS.items()}
  n_steps = len(step_docs) if golds else 0
  step_scores = [0.0] * n_steps
  final = 0.0
  for name in (n for n in terms_lib.TERMS if cfg.has(n)):
    term = terms_lib.TERMS[name]
    w = term.weight(cfg)
    if term.where == "final":
      final += w * values[name]
    else:
      if len(values[name]) != n_steps:
        raise ValueError(f"reward term {name!r} gave {len(values[name])} values for "
                         f"{n_steps} steps")
      step_scores = [s + w * v for s, v in zip(step_scores, values[name])]
  return ScoreResult(True, answer_f1, values["key"], step_scores, values["info_gain"],
                     values["redundancy"], final, [_scale(cfg, s) for s in step_scores], answer,
                     values)


def token_rewards(result: ScoreResult, search_end_indices: Sequence[int],
                  response_len: int) -> np.ndarray:
  """[response_len] float32: step rewards at the recorded search-turn end indices, final at the end.

  Step t goes to ``search_end_indices[t]`` for t < min(#steps, #indices); the final reward is then
  assigned (overwriting) at ``response_len - 1``. Indices come from the rollout, never from
  re-tokenising text.
  """
  r = np.zeros(response_len, np.float32)
  if response_len == 0:
    return r
  for t in range(min(len(result.step_rewards), len(search_end_indices))):
    idx = int(search_end_indices[t])
    if not 0 <= idx < response_len:
      raise IndexError(f"search_end_indices[{t}]={idx} is outside the response (length "
                       f"{response_len})")
    r[idx] = result.step_rewards[t]
  r[response_len - 1] = result.final_score
  return r
