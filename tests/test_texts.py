"""Your own prompt and warning texts: template files and warning files, and the errors naming them."""

import pytest

from stepsearch_jax import config as config_lib
from stepsearch_jax.data import templates
from stepsearch_jax.rollout import episode

RELEASED_STYLE = ("Answer the given question. You must conduct reasoning inside <think> and "
                  "</think> first. If you need {something}, call <search> query </search>. "
                  "Question: {question}\n")


def test_template_file_renders_like_a_named_template(tmp_path):
  path = tmp_path / "prompt.txt"
  path.write_text(RELEASED_STYLE)
  got = templates.make_prompt("  who wrote hamlet ", str(path))
  assert got == RELEASED_STYLE.replace("{question}", "who wrote hamlet?")   # other braces kept
  assert templates.make_prompt("q", "think") == templates.THINK.format(question="q?")
  cfg = config_lib.base_config()
  cfg.data.template = str(path)
  config_lib.validate(cfg)


def test_bad_template_errors_name_the_key_and_file(tmp_path):
  cfg = config_lib.base_config()
  cfg.data.template = "thimk"
  with pytest.raises(ValueError, match=r"config.data.template: .*'thimk'.*neither"):
    config_lib.validate(cfg)
  bad = tmp_path / "no_placeholder.txt"
  bad.write_text("Answer: {q}")
  cfg.data.template = str(bad)
  with pytest.raises(ValueError, match=rf"config.data.template: .*{bad}.*exactly once"):
    config_lib.validate(cfg)


def test_warning_texts_from_files(tmp_path):
  invalid = tmp_path / "invalid.txt"
  invalid.write_text("\n<warning> My previous action is invalid. </warning>\n")
  rcfg = config_lib.base_config().rollout
  assert episode.LoopConfig.from_config(rcfg).invalid_action == episode.INVALID_ACTION
  rcfg.invalid_action_text = str(invalid)
  lc = episode.LoopConfig.from_config(rcfg)
  assert lc.invalid_action == invalid.read_text() and lc.last_turn == episode.LAST_TURN
  untagged = tmp_path / "untagged.txt"
  untagged.write_text("no tags here")
  cfg = config_lib.base_config()
  cfg.rollout.last_turn_text = str(untagged)
  with pytest.raises(ValueError, match=rf"config.rollout.last_turn_text: {untagged} must wrap"):
    config_lib.validate(cfg)
  cfg.rollout.last_turn_text = str(tmp_path / "missing.txt")
  with pytest.raises(ValueError, match="config.rollout.last_turn_text: .*is not a file"):
    config_lib.validate(cfg)


def test_episode_inserts_the_configured_warning(tmp_path):
  """An invalid action gets the file's warning, token for token."""
  from stepsearch_jax.data import wordlevel
  from stepsearch_jax.rollout.episode import Episode
  invalid = tmp_path / "invalid.txt"
  invalid.write_text("\n<warning> bad action , try again </warning>\n")
  tok = wordlevel.train_wordlevel(["question ? answer <think> bad action , try again",
                                   templates.BRIEF, invalid.read_text(), episode.LAST_TURN],
                                  str(tmp_path / "tok"))
  rcfg = config_lib.base_config().rollout
  rcfg.invalid_action_text = str(invalid)
  ep = Episode({"id": "0", "question": "question"}, tok, episode.LoopConfig.from_config(rcfg),
               key=None, template="brief")
  ids = tok.encode("<think> answer", add_special_tokens=False)
  assert ep.finish_turn(ids, [0.0] * len(ids)) == "invalid"
  assert ep.pending_ids == tok.encode(invalid.read_text(), add_special_tokens=False)
