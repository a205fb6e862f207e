"""score() and token_rewards(): hand-worked rules, each released quirk, the paper fixes, §3.9."""

import numpy as np
import pytest

from stepsearch_jax.rewards import RewardConfig, score, token_rewards
from stepsearch_jax.rewards import keys as keys_lib
from stepsearch_jax.rewards import steps as steps_lib
from stepsearch_jax.rewards.text import f1

WARNING = ("\n<warning> My previous action is invalid. If I want to search, I should put the query "
           "between <search> and </search>. If I want to give the final answer, I should put the "
           "answer between <answer> and </answer>. Let me try again. </warning>\n")


def info(*docs):
  body = "".join(f"Doc {i}<## Title: {t} ##> {c}\n" for i, (t, c) in enumerate(docs, 1))
  return "\n\n<information> " + body.strip() + " </information>\n\n"


G1 = "The birthplace of Vorna Kelthis is Drumlow."
G2 = "The country of Drumlow is Velmar."
X1 = "The mentor of Dask Morrel is Ivel Tormont."
X2 = "The founder of Ostrel Guild is Bri Halley."
SUPPORT = [{"title": "Vorna Kelthis", "paragraph_text": G1}, {"title": "Drumlow", "paragraph_text": G2}]


def test_format_gate_returns_penalty_and_no_steps():
  text = "<search> q </search>" + info(("Vorna Kelthis", G1)) + "<answer> Velmar </answer> more"
  for preset in ("paper", "released"):
    r = score(text, {"target": ["Velmar"], "search_keys": [["q"]]}, SUPPORT, preset)
    assert (r.format_ok, r.final_score, r.step_scores, r.search_key_score) == (False, -1.0, [], 0.0)
    assert r.answer_f1 == 1.0  # computed anyway, as the released code does
    assert token_rewards(r, [3], 6).tolist() == [0, 0, 0, 0, 0, -1]
  assert score("no answer at all", {"target": "x"}, [], "paper").final_score == -1.0
  assert score("<answer> x </answer>\n \n", {"target": "x"}, [], "paper").format_ok


def test_answer_f1_last_answer_and_key_weight():
  text = "<answer> wrong </answer> <answer> the Velmar republic </answer>"
  r = score(text, {"target": ["Velmar", "x"], "search_keys": []}, [], "paper")
  assert r.answer == "the Velmar republic"
  assert r.answer_f1 == pytest.approx(2 * 0.5 * 1 / 1.5)
  assert r.step_scores == [] and r.search_key_score == 0.0  # empty keys and empty support docs
  assert r.final_score == pytest.approx(r.answer_f1)


def test_released_f1_rounded_to_4_places():
  # pred 3 tokens, gold 1 token, overlap 1: F1 = 2*(1/3)/(4/3) = 0.5; use 7 tokens for 0.25; 6 -> 2/7
  text = "<answer> Velmar b c d e f </answer>"
  assert score(text, {"target": "Velmar"}, [], "released").answer_f1 == 0.2857
  assert score(text, {"target": "Velmar"}, [], "paper").answer_f1 == pytest.approx(2 / 7, abs=1e-15)


def test_released_deletes_punctuation_paper_spaces_it():
  text = "<answer> Jean-Luc </answer>"
  assert score(text, {"target": "Jean Luc"}, [], "released").answer_f1 == 0.0  # "jeanluc"
  assert score(text, {"target": "Jean Luc"}, [], "paper").answer_f1 == 1.0
  assert score(text, {"target": "jeanluc"}, [], "released").answer_f1 == 1.0


def test_key_group_overwrite_vs_max_and_ties():
  keys = [["vorna kelthis birthplace"], ["drumlow country"]]
  f = lambda q, g: f1(q, g, round_to=4)
  # second query is a weaker match to group 0 and overwrites its 1.0 in the released preset
  queries = ["vorna kelthis birthplace", "vorna birthplace of someone else entirely"]
  weak = f(queries[1], keys[0])
  assert 0 < weak < 1
  assert keys_lib.search_key_score(queries, keys, f, overwrite=True) == pytest.approx(weak / 2)
  assert keys_lib.search_key_score(queries, keys, f, overwrite=False) == pytest.approx(0.5)
  # a tie between groups goes to the earlier one
  tie_keys = [["alpha beta"], ["alpha gamma"]]
  assert keys_lib.search_key_score(["alpha"], tie_keys, f) == pytest.approx(f("alpha", ["alpha beta"]) / 2)
  # a query matching nothing writes 0 to a dummy group and leaves the others alone
  assert keys_lib.search_key_score(["alpha beta", "zzz"], tie_keys, f) == pytest.approx(0.5)
  assert keys_lib.search_key_score([], tie_keys, f) == 0.0
  assert keys_lib.search_key_score(["alpha"], [], f) == 0.0


def test_released_splits_bare_string_key_groups_into_characters():
  text = "<search> ab cd </search><answer> x </answer>"
  gt = {"target": "x", "search_keys": ["ab cd"]}
  assert score(text, gt, [], "paper").search_key_score == 1.0
  # list("ab cd") = ['a','b',' ','c','d']: single letters; 'a' is an article -> no overlap
  assert score(text, gt, [], "released").search_key_score == 0.0


def test_warning_tags_are_queries_only_in_released():
  text = ("<search> drumlow country </search>" + info(("Drumlow", G2)) + "oops" + WARNING +
          "<answer> Velmar </answer>")
  gt = {"target": "Velmar", "search_keys": [["drumlow country"], ["and"]]}
  # released reads "<search> and </search>" inside the warning as a query matching group 1
  assert keys_lib.parse_queries(text) == ["drumlow country", "and"]
  assert keys_lib.parse_queries(text, skip_inserted=True) == ["drumlow country"]
  assert score(text, gt, [], "released").search_key_score == 1.0
  assert score(text, gt, [], "paper").search_key_score == 0.5


def test_doc_parsing_keeps_next_label_suffix():
  text = "<search> q </search>" + info(("A", "alpha text"), ("B", "beta text"), ("C", "gamma")) + "x"
  docs = steps_lib.parse_step_docs(text)
  assert docs == [["alpha text\nDoc 2", "beta text\nDoc 3", "gamma"]]
  assert [steps_lib.strip_doc_label(d) for d in docs[0]] == ["alpha text", "beta text", "gamma"]
  # a search whose results never came back is not a step
  assert steps_lib.parse_step_docs("<search> q </search> <answer> a </answer>") == []


def test_redundancy_same_rank_only_in_released_and_by_id_in_paper():
  step1 = "<search> q1 </search>" + info(("Vorna Kelthis", G1), ("Dask Morrel", X1), ("Ostrel Guild", X2))
  # step 2: G1 again at the same rank 1, X1 again but at rank 3, X2 at rank 2
  step2 = "<search> q2 </search>" + info(("Vorna Kelthis", G1), ("Ostrel Guild", X2), ("Dask Morrel", X1))
  text = step1 + step2 + "<answer> Drumlow </answer>"
  gt = {"target": "Drumlow", "search_keys": []}
  rel = score(text, gt, SUPPORT, "released")
  assert rel.redundancies == [0.0, pytest.approx(1 / 3)]   # only G1 at rank 1 repeats
  pap = score(text, gt, SUPPORT, "paper")
  assert pap.redundancies == [0.0, pytest.approx(1.0)]     # all three repeat, whatever the rank
  ids = [["d1", "d2", "d3"], ["d1", "d3", "d9"]]           # ids decide when given
  assert score(text, gt, SUPPORT, "paper", step_doc_ids=ids).redundancies == [0.0, pytest.approx(2 / 3)]
  # ids that do not line up with the parsed steps fall back to the suffix-free text
  assert score(text, gt, SUPPORT, "paper", step_doc_ids=[["d1"]]).redundancies == [0.0, pytest.approx(1.0)]
  # the last rank has no suffix, so it matches itself at the last rank
  assert steps_lib.redundancies([["a\nDoc 2", "b"], ["c\nDoc 2", "b"]]) == [0.0, 0.5]
  assert steps_lib.redundancies([["a", "a"], []]) == [0.5, 0.0]


def test_information_gain_memory_and_step_scores():
  step1 = "<search> q1 </search>" + info(("Vorna Kelthis", G1), ("Dask Morrel", X1))
  step2 = "<search> q2 </search>" + info(("Drumlow", G2), ("Vorna Kelthis", G1))
  text = step1 + step2 + "<answer> Velmar </answer>"
  gt = {"target": "Velmar"}
  r = score(text, gt, SUPPORT, "paper")
  assert r.info_gains[0] > 0.5 and r.info_gains[0] < 0.7     # gold 1 found (cos 1), gold 2 partly
  assert sum(r.info_gains) == pytest.approx(1.0)              # IG telescopes to mean final memory
  assert r.redundancies == [0.0, 0.5]
  assert r.step_scores == pytest.approx([r.info_gains[0], r.info_gains[1] - 0.5])
  assert r.step_rewards == pytest.approx([0.6 * s for s in r.step_scores])
  rel = score(text, gt, SUPPORT, "released")
  assert rel.redundancies == [0.0, 0.0]   # G1 moved from rank 1 to rank 2: no repeat in released
  assert rel.step_rewards == pytest.approx([1.6 * s for s in rel.step_scores], rel=1e-6)
  # empty support docs -> no step scores
  assert score(text, gt, [], "released").step_scores == []
  # switches
  cfg = RewardConfig.from_config({"preset": "paper", "terms": "answer_f1,key,info_gain",
                                  "step_scale": 0.5})
  r2 = score(text, gt, SUPPORT, cfg)
  assert r2.step_scores == pytest.approx(r.info_gains) and r2.step_rewards == pytest.approx(
      [0.5 * g for g in r.info_gains])
  off = RewardConfig.from_config({"preset": "released", "terms": "answer_f1,key"})
  assert score(text, gt, SUPPORT, off).step_scores == [0.0, 0.0]
  with pytest.raises(ValueError, match="config.reward.terms: \\['info_gian'\\]"):
    RewardConfig.from_config({"terms": "answer_f1,info_gian"})


def test_released_scale_matches_torch_inplace_row():
  torch = pytest.importorskip("torch")
  step_scores = [0.5, -0.2, 0.123456789, -1.0 / 3]
  row = torch.zeros(12, dtype=torch.float32)
  positions = [1, 4, 7, 9]
  view = row
  for p, s in zip(positions, step_scores):
    view[p] = s
  row += 0.6 * view           # the RewardManager: reward_tensor[i] += 0.6 * helper(reward_tensor[i])
  row[11] = 1.5562
  cfg = RewardConfig.preset("released")
  from stepsearch_jax.rewards.score import ScoreResult, _scale
  res = ScoreResult(True, 1.0, 0.9, step_scores, [], [], 1.5562, [_scale(cfg, s) for s in step_scores])
  np.testing.assert_array_equal(token_rewards(res, positions, 12), row.numpy())
  assert row[1].item() == pytest.approx(0.8) and row[4].item() == pytest.approx(-0.32)


def test_token_rewards_placement_and_overwrite():
  res = score("<search> q </search>" + info(("Vorna Kelthis", G1)) + "<answer> Drumlow </answer>",
              {"target": "Drumlow"}, SUPPORT, "paper")
  r = token_rewards(res, [2], 10)
  assert r.dtype == np.float32 and r[2] == np.float32(res.step_rewards[0]) and r[9] == 1.0
  assert np.count_nonzero(r) == 2
  assert token_rewards(res, [9], 10)[9] == 1.0              # final overwrites a step at the end
  assert token_rewards(res, [], 4).tolist() == [0, 0, 0, 1.0]  # more steps than indices
  with pytest.raises(IndexError, match="search_end_indices"):
    token_rewards(res, [10], 10)
  assert token_rewards(res, [], 0).shape == (0,)


def test_worked_example_section_3_9():
  # Search 1: gold#1 verbatim (cos 1.0), best cos with gold#2 0.1; search 2: gold#1 again at the
  # same rank, gold#2 (cos 1.0) at another rank, and a third document.
  sims = [np.array([[1.0, 0.1], [0.0, 0.05], [0.02, 0.0]]),
          np.array([[1.0, 0.0], [0.0, 1.0], [0.3, 0.2]])]
  gains = steps_lib.gains_from_similarities(sims)
  assert gains == pytest.approx([0.55, 0.45])
  reds = steps_lib.redundancies([["g1\nDoc 2", "x\nDoc 3", "y"], ["g1\nDoc 2", "g2\nDoc 3", "z"]])
  assert reds == pytest.approx([0.0, 1 / 3])
  cfg = RewardConfig.preset("released")
  from stepsearch_jax.rewards.score import _scale
  rewards = [_scale(cfg, g - p) for g, p in zip(gains, reds)]
  assert rewards == pytest.approx([0.88, 0.18667], abs=1e-5)
  assert round(rewards[1], 3) == 0.187
  # keys: 2 of 2 groups matched with F1 0.8 and 1.0 -> K = 0.9; answer F1 1 -> 1 + 0.618 * 0.9
  text = ("<search> vorna kelthis birthplace </search>" + info(("Vorna Kelthis", G1)) +
          "<search> drumlow country </search>" + info(("Drumlow", G2)) + "<answer> Velmar </answer>")
  gt = {"target": ["Velmar"], "search_keys": [["kelthis birthplace"], ["drumlow country"]]}
  assert f1("vorna kelthis birthplace", ["kelthis birthplace"]) == pytest.approx(0.8)
  r = score(text, gt, SUPPORT, "released")
  assert r.search_key_score == pytest.approx(0.9)
  assert r.final_score == pytest.approx(1.5562)


def test_unicode_and_long_passages():
  long_doc = " ".join(["Zürich Straße 東京 café"] * 3000)
  text = ("<search> Zürich café </search>" + info(("Zürich", long_doc), ("東京", "東京 ist groß")) +
          "<answer> Zürich </answer>")
  support = [{"title": "Zürich", "paragraph_text": long_doc}]
  for preset in ("paper", "released"):
    r = score(text, {"target": "zürich", "search_keys": [["Zürich café"]]}, support, preset)
    assert r.answer_f1 == 1.0 and r.search_key_score == 1.0
    assert r.info_gains[0] == pytest.approx(1.0)


def test_preset_errors():
  with pytest.raises(ValueError, match="preset"):
    RewardConfig.preset("nope")
  with pytest.raises(KeyError, match="target"):
    score("<answer> a </answer>", {}, [])
  with pytest.raises(KeyError, match="paragraph_text"):
    score("<search> q </search>" + info(("A", "a")) + "<answer> a </answer>", {"target": "a"},
          [{"title": "t"}])
  assert RewardConfig.from_config({"preset": "released"}).effective_step_scale == pytest.approx(1.6)
  assert RewardConfig.from_config({"preset": "paper"}).effective_step_scale == pytest.approx(0.6)


def test_rank_label_enters_tfidf_only_in_released():
  # gold 1 comes back verbatim at rank 1 of 2: released compares "<text>\nDoc 2" (cos < 1)
  text = ("<search> q </search>" + info(("Vorna Kelthis", G1), ("Dask Morrel", X1)) +
          "<answer> Drumlow </answer>")
  support = SUPPORT[:1]
  assert score(text, {"target": "Drumlow"}, support, "paper").info_gains[0] == pytest.approx(1.0)
  rel = score(text, {"target": "Drumlow"}, support, "released").info_gains[0]
  assert 0.8 < rel < 0.999


def test_from_config_reads_the_config_section():
  from stepsearch_jax.config import base_config
  cfg = base_config()
  assert RewardConfig.from_config(cfg.reward) == RewardConfig.preset("paper")
  cfg.reward.preset = "released"
  cfg.reward.key_weight = 0.5
  rc = RewardConfig.from_config(cfg.reward)
  assert rc.name == "released" and rc.key_weight == 0.5 and rc.round_f1 == 4
  assert rc.effective_step_scale == pytest.approx(1.6)


def test_numpy_shaped_ground_truth_from_parquet():
  text = "<search> drumlow country </search>" + info(("Drumlow", G2)) + "<answer> Velmar </answer>"
  gt = {"target": np.array(["Velmar"], dtype=object),
        "search_keys": np.array([np.array(["drumlow country"], dtype=object)], dtype=object)}
  docs = np.array([{"title": "Drumlow", "paragraph_text": G2}], dtype=object)
  for preset in ("paper", "released"):
    r = score(text, gt, docs, preset)
    assert (r.answer_f1, r.search_key_score) == (1.0, 1.0) and r.info_gains == pytest.approx([1.0])
