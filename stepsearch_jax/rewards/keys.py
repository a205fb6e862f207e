"""Search-key reward (method §3.4): how well the issued queries cover the gold sub-question keys.

Each query is compared with every key group (bag-of-words F1, max over the group's phrasings) and
credited to the best group, ties going to the earlier group. The score is the mean over groups.

Released behaviour (``overwrite=True``): the group's entry is OVERWRITTEN by each query credited
to it, so a later, weaker query lowers a score already earned; a query matching nothing writes 0
to a dummy group. The `paper` preset keeps the best query per group instead.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from stepsearch_jax.texts import INSERTED_RE

_SEARCH = re.compile(r"<search>.*?</search>", re.DOTALL)


def parse_queries(text: str, skip_inserted: bool = False) -> list[str]:
  """Every ``<search>...</search>`` in the text, tags removed and stripped.

  The released code also reads the ``<search>`` / ``</search>`` the environment writes inside its
  ``<warning>`` texts as queries; `skip_inserted` blanks ``<warning>`` and ``<information>`` blocks
  first so only the model's own searches count.
  """
  if skip_inserted:
    text = INSERTED_RE.sub(" ", text)
  return [re.sub(r"</?search>", "", m).strip() for m in _SEARCH.findall(text)]


def search_key_score(queries: Sequence[str], keys, f1_fn: Callable[[str, list[str]], float],
                     overwrite: bool = True, released_groups: bool = False) -> float:
  """Mean over key groups of the credited query F1; 0 with no queries or no groups.

  `released_groups` reproduces ``[list(arr) for arr in keys]``: a group given as a bare string
  becomes a list of its characters (the released code expects lists); otherwise a bare string is
  one phrasing.
  """
  if released_groups:
    groups = [list(g) for g in keys]
  else:
    groups = [[g] if isinstance(g, str) else list(g) for g in keys]
  if not queries or not groups:
    return 0.0
  matched = {g: 0.0 for g in range(len(groups))}
  for q in queries:
    best, best_group = 0.0, -1
    for g, group in enumerate(groups):
      s = f1_fn(q, group)
      if s > best:
        best, best_group = s, g
    if overwrite:
      matched[best_group] = best
    elif best_group >= 0:
      matched[best_group] = max(matched[best_group], best)
  return sum(matched.values()) / len(groups)
