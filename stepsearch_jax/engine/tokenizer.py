"""JetStream `tokenizer_api.Tokenizer` over a Hugging Face tokenizer, plus stop-sequence ids.

JetStream's orchestrator builds its tokenizer through ``engine.build_tokenizer``; the default would
be a seqio SentencePiece vocabulary. Ours wraps whatever ``transformers`` tokenizer the policy uses.
"""

from __future__ import annotations

from typing import Any, Sequence

from jetstream.engine import token_utils
from jetstream.engine import tokenizer_api


class HFTokenizer(tokenizer_api.Tokenizer):
  """encode/decode/pad/eos/bos as JetStream expects them, backed by an HF tokenizer."""

  def __init__(self, hf_tokenizer: Any, eos_ids: Sequence[int] | None = None):
    self.hf = hf_tokenizer
    eos = list(eos_ids) if eos_ids else []
    if not eos and hf_tokenizer.eos_token_id is not None:
      eos = [int(hf_tokenizer.eos_token_id)]
    if not eos:
      raise ValueError("tokenizer has no eos_token_id and no eos_ids were given")
    self.eos_ids = tuple(eos)

  def encode(self, s: str, **kwargs):
    """Tokenise (no special tokens added) and pad to JetStream's prefill buckets."""
    ids = self.hf.encode(s, add_special_tokens=False)
    return token_utils.pad_tokens(
        ids, self.bos_id, self.pad_id, is_bos=kwargs.pop("is_bos", False),
        prefill_lengths=kwargs.pop("prefill_lengths", None),
        max_prefill_length=kwargs.pop("max_prefill_length", None),
        jax_padding=kwargs.pop("jax_padding", True))

  def decode(self, token_ids: list[int], **kwargs) -> str:
    return self.hf.decode(list(token_ids), skip_special_tokens=kwargs.get("skip_special_tokens",
                                                                         False))

  @property
  def pad_id(self) -> int:
    pad = self.hf.pad_token_id
    return int(pad) if pad is not None else self.eos_ids[0]

  @property
  def eos_id(self) -> int:
    return self.eos_ids[0]

  @property
  def bos_id(self) -> int:
    bos = self.hf.bos_token_id
    return int(bos) if bos is not None else self.pad_id

  @property
  def stop_tokens(self) -> set[int]:
    return set(self.eos_ids) | {self.pad_id}


def stop_sequences(hf_tokenizer: Any, strings: Sequence[str]) -> list[tuple[int, ...]]:
  """Token-id sequences that end each stop string: its own encoding and the one after a space.

  BPE vocabularies usually merge the space before ``</search>`` into the first piece, so the
  model emits the second form; word-level vocabularies with added tags give one id for both.
  """
  seqs: list[tuple[int, ...]] = []
  for s in strings:
    for variant in (s, " " + s):
      ids = tuple(hf_tokenizer.encode(variant, add_special_tokens=False))
      if not ids:
        raise ValueError(f"stop string {s!r} encodes to no tokens")
      if hf_tokenizer.decode(list(ids)).strip() == s.strip() and ids not in seqs:
        seqs.append(ids)
  return seqs
