"""Prompt templates (method §1.1), written in our own words.

``think`` (default) follows the format of the paper's figures and case studies: reasoning in
``<think>``, one query per ``<search>``, results in ``<information>``, the final answer in
``<answer>``. ``plan`` follows the released MuSiQue data script: ``<plan>`` / ``<observation>``
around the same search and answer tags. Only ``<search>`` and ``<answer>`` drive the environment;
the other tags are never parsed or rewarded. ``brief`` is ``think`` in one sentence. The question is stripped and gets a ``?`` when it
lacks one, as the released script does.
"""

from __future__ import annotations

import os

THINK = (
    "Answer the question below. Think inside <think> and </think> before each step and whenever "
    "you receive new information. The question may need several searches, so begin by listing the "
    "sub-questions or keywords to look up. Search for one thing at a time by writing "
    "<search> query </search>; the top results will be returned between <information> and "
    "</information>. You may search as many times as you need and change your plan as you learn. "
    "When nothing more is needed, give only the final answer inside <answer> and </answer>, with "
    "no explanation, for example <think> plan: (Q1) ... (Q2) ... </think> <search> Q1 </search> "
    "<think> what the results show ... </think> <answer> Beijing </answer>. "
    "The Question you need to answer: {question}\n")

PLAN = (
    "## Background\nYou are a careful research assistant who can call a search engine. Before "
    "acting, decide on your research plan or on what to look up next.\n"
    "## Response format\n"
    "1. Write your plan inside <plan> and </plan>, at the start and after every observation.\n"
    "2. When knowledge is missing, search with <search> search keyword </search>; the results "
    "come back between <information> and </information>.\n"
    "3. For the retrieved documents, write what you learned inside <observation> and "
    "</observation>, e.g. Based on the retrieved information, Doc1 ...; Doc2 ...; Doc3 ...;\n"
    "4. When no more knowledge is needed, give the answer directly inside <answer> and </answer> "
    "with no explanation, e.g. <answer> Beijing </answer>.\n"
    "Repeat plan -> search -> information -> observation -> plan until you can answer. "
    "Question: {question}\n")

# ``brief``: the same tags and loop as ``think`` in one sentence, for tiny policies (the CPU demo),
# where a 180-token instruction would be half of every training sequence.
BRIEF = (
    "Answer the question. Think inside <think> </think>, search for one thing at a time with "
    "<search> query </search>, read the results between <information> and </information>, and give "
    "only the final answer inside <answer> </answer>. Question: {question}\n")

TEMPLATES = {"think": THINK, "plan": PLAN, "brief": BRIEF}


def clean_question(question: str) -> str:
  """Strip, and end with '?' (as the released data script does)."""
  q = question.strip()
  return q if q.endswith("?") else q + "?"


def load_template(template: str) -> str:
  """The text of a named template, or of a template file (a path) holding `{question}` once.

  A file lets a user supply the released wording verbatim to continue from a released
  checkpoint; only `{question}` is substituted, so other braces in it are kept as written.
  """
  if template in TEMPLATES:
    return TEMPLATES[template]
  if not os.path.isfile(template):
    raise ValueError(f"template {template!r} is neither one of {sorted(TEMPLATES)} nor a file")
  with open(template, encoding="utf-8") as f:
    text = f.read()
  if text.count("{question}") != 1:
    raise ValueError(f"template file {template} must contain '{{question}}' exactly once "
                     f"(found {text.count('{question}')})")
  return text


def make_prompt(question: str, template: str = "think") -> str:
  """The user-message text for `question` under the named template or template file."""
  return load_template(template).replace("{question}", clean_question(question))


def load_text(option: str, default: str, what: str) -> str:
  """An inserted text: `default` when `option` is "", else the file `option` verbatim.

  The reward parser hides `<warning>` blocks from the search-key reward, so a warning supplied by
  file must keep its `<warning> ... </warning>` tags.
  """
  if not option:
    return default
  if not os.path.isfile(option):
    raise ValueError(f"{what}: {option!r} is not a file")
  with open(option, encoding="utf-8") as f:
    text = f.read()
  if "<warning>" not in text or "</warning>" not in text:
    raise ValueError(f"{what}: {option} must wrap its text in <warning> ... </warning> (the "
                     "rewards skip those blocks when reading queries)")
  return text


def question_from_prompt(content: str) -> str | None:
  """Recover the question from a prompt written by either template (None if not found)."""
  for marker in ("The Question you need to answer:", "Question:"):
    at = content.rfind(marker)
    if at >= 0:
      return content[at + len(marker):].strip()
  return None
