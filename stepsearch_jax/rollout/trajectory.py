"""Trajectory: one finished rollout, token-in/token-out, as the trainer and the evaluator read it.

`response_ids` are the model's tokens exactly as sampled plus the environment's inserted
tokens (tokenised once); nothing is ever re-tokenised. `loss_mask` is 1 on model tokens and 0 on
inserted ones; `search_end_indices` point at the last token of every search turn that got an
`<information>` block (where the step reward goes, method §3.7 and §8 item 12).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class Trajectory:
  id: str
  data_source: str
  prompt_text: str
  prompt_ids: list[int]
  response_ids: list[int] = dataclasses.field(default_factory=list)
  loss_mask: list[int] = dataclasses.field(default_factory=list)
  search_end_indices: list[int] = dataclasses.field(default_factory=list)
  queries: list[str] = dataclasses.field(default_factory=list)
  doc_ids: list[list[str]] = dataclasses.field(default_factory=list)
  doc_texts: list[list[str]] = dataclasses.field(default_factory=list)
  response_text: str = ""
  answer: str | None = None
  logprobs: list[float] = dataclasses.field(default_factory=list)
  policy_version: int = 0
  ground_truth: dict = dataclasses.field(default_factory=dict)
  support_docs: list[dict] = dataclasses.field(default_factory=list)
  num_turns: int = 0                  # generation calls made (<= max_turns + 1)
  truncated: bool = False             # the response hit the response-length cap

  def add_model_tokens(self, ids: list[int], logprobs: list[float]) -> None:
    if len(ids) != len(logprobs):
      raise ValueError(f"trajectory {self.id}: {len(ids)} tokens but {len(logprobs)} logprobs")
    self.response_ids.extend(int(t) for t in ids)
    self.loss_mask.extend([1] * len(ids))
    self.logprobs.extend(float(x) for x in logprobs)

  def add_inserted_tokens(self, ids: list[int]) -> None:
    self.response_ids.extend(int(t) for t in ids)
    self.loss_mask.extend([0] * len(ids))
    self.logprobs.extend([0.0] * len(ids))

  def check(self) -> None:
    """Raise if the parallel per-token lists or the search indices are inconsistent."""
    n = len(self.response_ids)
    if len(self.loss_mask) != n or len(self.logprobs) != n:
      raise ValueError(f"trajectory {self.id}: response_ids {n}, loss_mask {len(self.loss_mask)}, "
                       f"logprobs {len(self.logprobs)} differ in length")
    for i in self.search_end_indices:
      if not 0 <= i < n or self.loss_mask[i] != 1:
        raise ValueError(f"trajectory {self.id}: search end index {i} is not a model token")
    if len(self.doc_ids) != len(self.search_end_indices):
      raise ValueError(f"trajectory {self.id}: {len(self.doc_ids)} retrieval steps but "
                       f"{len(self.search_end_indices)} search end indices")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str | dict[str, Any]) -> "Trajectory":
    data = json.loads(text) if isinstance(text, str) else dict(text)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
      raise ValueError(f"Trajectory.from_json: unknown keys {sorted(unknown)}")
    return cls(**data)
