"""Text rules shared by the rewards and the evaluation: SQuAD normalisation, EM/F1, answer parsing.

The released reward and the released evaluation script use the same SQuAD normalisation
(lowercase, delete ASCII punctuation, drop the words a/an/the, collapse whitespace), but differ in
how they read the answer and whether F1 is rounded:

- training reward (method §3.1-3.3): the content of the LAST ``<answer>...</answer>``, stripped;
  F1 rounded to 4 decimals; a missing answer scores 0.
- evaluation (method §6, ``scripts/eval.py``): the same last answer, then the braces rule (if it
  contains ``{``, keep the text between the last ``{`` and the following ``}``); EM and F1 unrounded.

``punct_to_space`` is the `paper` preset's fix: deleting punctuation glues words ("Jean-Luc" ->
"jeanluc", "1,000-2,000" -> "10002000"), so the fixed normaliser replaces it with a space instead.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence

from stepsearch_jax.texts import ANSWER_RE

_PUNCT = frozenset(string.punctuation)
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(s: str, punct_to_space: bool = False) -> str:
  """SQuAD normalisation; `punct_to_space` spaces punctuation out instead of deleting it."""
  s = s.lower()
  if punct_to_space:
    s = s.translate(_PUNCT_TO_SPACE)
  else:
    s = "".join(ch for ch in s if ch not in _PUNCT)
  s = _ARTICLES.sub(" ", s)
  return " ".join(s.split())


def _as_list(golds: str | Iterable[str] | None) -> list[str]:
  if golds is None:
    return []
  if isinstance(golds, str):
    return [golds]
  return [str(g) for g in golds]


def f1(pred: str | None, golds: str | Sequence[str], *, round_to: int | None = None,
       punct_to_space: bool = False) -> float:
  """Max over golds of bag-of-words F1 after normalisation; None prediction gives 0.

  Golds with no overlap are skipped (as the released code does), so an empty prediction or an
  empty gold scores 0 rather than dividing by zero. `round_to=4` reproduces the released reward.
  """
  if pred is None:
    return 0.0
  pred_tokens = normalize(pred, punct_to_space).split()
  pred_counts = Counter(pred_tokens)
  best = 0.0
  for gold in _as_list(golds):
    gold_tokens = normalize(gold, punct_to_space).split()
    overlap = sum((pred_counts & Counter(gold_tokens)).values())
    if overlap == 0:
      continue
    p = overlap / len(pred_tokens)
    r = overlap / len(gold_tokens)
    best = max(best, 2 * p * r / (p + r))
  return round(best, round_to) if round_to is not None else best


def em(pred: str | None, golds: str | Sequence[str]) -> float:
  """1.0 if the normalised prediction equals any normalised gold, else 0.0 (None gives 0)."""
  if pred is None:
    return 0.0
  p = normalize(pred)
  return float(any(p == normalize(g) for g in _as_list(golds)))


def extract_answer(text: str) -> str | None:
  """Content of the last ``<answer>...</answer>`` (DOTALL), stripped; None when there is none."""
  matches = ANSWER_RE.findall(text)
  return matches[-1].strip() if matches else None


def eval_answer(text: str) -> str | None:
  """The evaluation script's answer: the last <answer>, then the braces rule.

  If the answer contains ``{`` the text between the last ``{`` and the next ``}`` is kept (to the
  end of the answer when no ``}`` follows), so ``\\boxed{Paris}`` or ``{Paris}`` reads as Paris.
  """
  answer = extract_answer(text)
  if answer is None or "{" not in answer:
    return answer
  tail = answer[answer.rfind("{") + 1:]
  close = tail.find("}")
  return (tail[:close] if close >= 0 else tail).strip()


def format_ok(text: str) -> bool:
  """The format gate (method §3.2): an <answer> block exists and only whitespace follows the last."""
  matches = list(re.finditer(r"<answer>.*?</answer>", text, re.DOTALL))
  return bool(matches) and not text[matches[-1].end():].strip()
