"""A word-level tokenizer trained on a synthetic world's own text, for the CPU demo.

Why word-level: a tiny policy learns to copy an entity name from an ``<information>`` block into the
next ``<search>`` far faster when the name is one or two tokens than when it is a dozen characters.
Why ``Metaspace`` + punctuation splitting: decode(encode(text)) gives the text back exactly for the
vocabulary it was trained on, so rollouts stay token-in/token-out and rewards read the same text.
The tags the environment acts on are added tokens, so ``</search>`` is one id and stop sequences
are a single token. The result is saved as a Hugging Face folder (tokenizer.json + config with a
small chat template) so every other part loads it like any other tokenizer.
"""

from __future__ import annotations

import os
from typing import Iterable

TAGS = ("<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>", "<information>",
        "</information>", "<warning>", "</warning>", "<##", "##>")
SPECIALS = ("<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>")
# A one-turn chat template in ChatML's spirit; the prompt ends where the assistant starts.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def train_wordlevel(texts: Iterable[str], out_dir: str, min_frequency: int = 1):
  """Train on `texts`, save a Hugging Face tokenizer folder to `out_dir`, return the loaded tokenizer."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split("\n", behavior="isolated"),
      pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never"),
      pre_tokenizers.Punctuation()])
  tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
  trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIALS), min_frequency=min_frequency)
  tok.train_from_iterator(texts, trainer)
  tok.add_tokens([AddedToken(t, normalized=False) for t in TAGS])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                 eos_token="<eos>", bos_token=None)
  fast.chat_template = CHAT_TEMPLATE
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  from stepsearch_jax.models.hf import load_tokenizer   # the one tokenizer loader
  return load_tokenizer(out_dir)
