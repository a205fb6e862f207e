"""The text contract: every string the policy reads or writes that code also builds or parses.

The warm start's demonstrations, the rollouts' observations and the rewards' parser must agree
token for token (a silent train/serve mismatch starts where two copies of a format drift), so each
piece lives here once: the action tags, the `<information>` block (method §1.4), the two warnings
(method §1.3), prompt rendering, and a demonstration turned into (ids, loss mask).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

SEARCH_END, ANSWER_END = "</search>", "</answer>"
ACTION_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# One retrieval step as the rewards read it (method §3.5): a search followed by its block.
STEP_RE = re.compile(r"<search>.*?</search>\s*<information>(.*?)</information>", re.DOTALL)
# Blocks the environment inserted: never the policy's queries (search-key reward).
INSERTED_RE = re.compile(r"<(warning|information)>.*?</\1>", re.DOTALL)

# The two StepSearch warnings, in our own words (method §1.3 paraphrases the released texts).
INVALID_ACTION = ("\n<warning> That action was not valid. To search, I have to write the query "
                  "between <search> and </search>. To give my final answer, I have to write it "
                  "between <answer> and </answer>. I will try again. </warning>\n")
LAST_TURN = ("<warning> I cannot use <search></search> any more. I have to reason with the "
             "information I already have and now write a final thought and the answer. "
             "</warning>\n\n")


def inserted_texts(rollout_cfg: Any) -> dict:
  """{invalid_action, last_turn}: ours, or the files config.rollout.*_text name."""
  from stepsearch_jax.data.templates import load_text
  return dict(invalid_action=load_text(rollout_cfg.invalid_action_text, INVALID_ACTION,
                                       "config.rollout.invalid_action_text"),
              last_turn=load_text(rollout_cfg.last_turn_text, LAST_TURN,
                                  "config.rollout.last_turn_text"))


def doc_title_text(document: dict) -> tuple[str, str]:
  """(title, text) of a corpus row as `_passages2string` reads it (method §1.4).

  `{"contents": '"Title"\\ntext'}`: title is the first line (quotes kept), text the other lines.
  `{"title", "content"}`: the fields as they are. A `{"document", "score"}` hit is unwrapped.
  """
  if "document" in document and isinstance(document["document"], dict):
    document = document["document"]
  if "contents" in document:
    lines = document["contents"].split("\n")
    return lines[0], "\n".join(lines[1:])
  if "title" in document and "content" in document:
    return document["title"], document["content"]
  raise KeyError(f"document has neither 'contents' nor 'title'+'content': keys {sorted(document)}")


def format_information(documents: Sequence[dict]) -> str:
  """The observation block appended after a `</search>` turn (method §1.3-1.4).

  Rows or `{"document", "score"}` hits. `rewards.steps.parse_step_docs` splits it on `##>`.
  """
  lines = []
  for i, doc in enumerate(documents, 1):
    title, text = doc_title_text(doc)
    lines.append(f"Doc {i}<## Title: {title} ##> {text}\n")
  return "\n\n<information> " + "".join(lines).strip() + " </information>\n\n"


def record_field(record: Any, name: str, default: Any = None) -> Any:
  """A field of a record given as a dict or as an object (data.records.Record)."""
  if isinstance(record, dict):
    return record.get(name, default)
  return getattr(record, name, default)


def chat(messages: Sequence[Mapping[str, str]], tokenizer: Any) -> str:
  """Messages through the tokenizer's chat template (generation prompt added, as the released
  data code does), or their contents joined as they are when it has none."""
  messages = [dict(m) for m in messages]
  if tokenizer is not None and getattr(tokenizer, "chat_template", None):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return "".join(m["content"] for m in messages)


def prompt_text(record: Any, tokenizer: Any, template: str = "think") -> str:
  """The prompt string a rollout starts from: `prompt_text` as is, else the stored `prompt` chat
  messages, else `question` put into `template` (a name or a template file), then `chat`."""
  text = record_field(record, "prompt_text")
  if text:
    return str(text)
  messages = record_field(record, "prompt")
  if isinstance(messages, str):
    return messages
  if not messages:
    question = record_field(record, "question")
    if not question:
      raise ValueError(f"record {record_field(record, 'id')!r} has none of prompt_text, prompt, "
                       "question")
    from stepsearch_jax.data.templates import make_prompt
    messages = [{"role": "user", "content": make_prompt(question, template)}]
  return chat(messages, tokenizer)


def demonstration_ids(tokenizer: Any, prompt: str, turns: Sequence[dict],
                      results: Mapping[str, Sequence[dict]]) -> tuple[list[int], list[int]]:
  """(ids, loss_mask) of a warm-start example: the prompt and every inserted `<information>`
  block are context (mask 0), the model turns are targets (mask 1). `results[query]` are the
  retriever's hits for each search turn, so the block is exactly what a rollout would insert."""
  ids = list(tokenizer.encode(prompt, add_special_tokens=False))
  mask = [0] * len(ids)
  for turn in turns:
    if turn["kind"] == "model":
      piece, m = tokenizer.encode(turn["text"], add_special_tokens=False), 1
    else:
      piece = tokenizer.encode(format_information(results[turn["query"]]),
                               add_special_tokens=False)
      m = 0
    ids += piece
    mask += [m] * len(piece)
  return ids, mask
