"""Synthetic world: determinism, answers hidden from questions, support docs verbatim, demos."""

import json
import random
import re
import subprocess
import sys

import pytest

from stepsearch_jax.data import synthetic
from stepsearch_jax.data.records import load_records
from stepsearch_jax.rewards import score


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("world")
  return synthetic.make_world(str(out), seed=7, num_people=80, num_train=120, num_test=40), out


def test_files_and_record_contract(world_dir):
  paths, _ = world_dir
  train, test = load_records(paths["train"]), load_records(paths["test"])
  assert len(train) == 120 and len(test) == 40
  assert not {r.question for r in train} & {r.question for r in test}
  corpus = [json.loads(l) for l in open(paths["corpus"])]
  assert all(set(c) == {"id", "title", "content"} for c in corpus)
  assert len({c["id"] for c in corpus}) == len(corpus)
  hops = {len(r.search_keys) for r in train}
  assert hops <= {2, 3, 4} and {2, 3} <= hops
  for r in train + test:
    assert r.data_source == "synthetic" and r.split in ("train", "test")
    assert len(r.search_keys) == len(r.support_docs) == len(r.extra["hops"])
    assert all(len(g) >= 3 for g in r.search_keys)
    assert "The Question you need to answer:" in r.prompt[0]["content"]


def test_answers_never_in_question_and_docs_verbatim(world_dir):
  paths, _ = world_dir
  corpus = {(c["title"], c["content"]) for c in map(json.loads, open(paths["corpus"]))}
  for r in load_records([paths["train"], paths["test"]]):
    for t in r.targets:
      assert t.lower() not in r.question.lower()
    for h in r.extra["hops"]:
      assert h["object"].lower() not in r.question.lower()
    for d in r.support_docs:
      assert (d["title"], d["paragraph_text"]) in corpus
    # the chain is consistent: the last hop's passage states the answer
    assert r.support_docs[-1]["paragraph_text"].endswith(f" is {r.targets[0]}.")


def test_deterministic_by_seed(tmp_path):
  a = synthetic.make_world(str(tmp_path / "a"), seed=1, num_people=40, num_train=20, num_test=5)
  b = synthetic.make_world(str(tmp_path / "b"), seed=1, num_people=40, num_train=20, num_test=5)
  c = synthetic.make_world(str(tmp_path / "c"), seed=2, num_people=40, num_train=20, num_test=5)
  for k in ("corpus",):
    assert open(a[k]).read() == open(b[k]).read() != open(c[k]).read()
  assert load_records(a["train"]) == load_records(b["train"]) != load_records(c["train"])


def test_search_finds_each_hop_with_best_key(world_dir):
  paths, _ = world_dir
  world = world_dir[0]["world"]
  for r in load_records(paths["train"])[:40]:
    for keys, doc in zip(r.search_keys, r.support_docs):
      hits = world.search(keys[0], topk=3)
      assert doc["paragraph_text"] in [h["content"] for h in hits]


def test_demonstrations_score_as_expected(world_dir):
  paths, _ = world_dir
  world = world_dir[0]["world"]
  recs = load_records(paths["train"])[:30]
  rng = random.Random(0)
  perfect, flawed = [], []
  for r in recs:
    turns = synthetic.demonstration(r, world, 1.0, rng)
    assert turns[-1]["kind"] == "model" and "<answer>" in turns[-1]["text"]
    assert [t["kind"] for t in turns[:-1]] == ["model", "search"] * len(r.search_keys)
    text, steps = synthetic.render_demonstration(turns, world.search)
    assert len(steps) == len(r.search_keys)
    perfect.append(score(text, r.ground_truth, r.support_docs, "paper"))
    text2, _ = synthetic.render_demonstration(synthetic.demonstration(r, world, 0.0, rng),
                                              world.search)
    flawed.append(score(text2, r.ground_truth, r.support_docs, "paper"))
  assert all(s.answer_f1 == 1.0 and s.search_key_score == 1.0 for s in perfect)
  assert all(sum(s.info_gains) == pytest.approx(1.0) for s in perfect)
  assert sum(s.final_score for s in flawed) < sum(s.final_score for s in perfect) - 10


def test_model_turns_use_only_tags_of_think_template(world_dir):
  world = world_dir[0]["world"]
  r = load_records(world_dir[0]["train"])[0]
  for t in synthetic.demonstration(r, world, 0.5, random.Random(1)):
    if t["kind"] == "model":
      assert set(re.findall(r"</?(\w+)>", t["text"])) <= {"think", "search", "answer"}


def test_cli_and_bad_sizes(tmp_path):
  p = subprocess.run([sys.executable, "-m", "stepsearch_jax.data.synthetic", "--out",
                      str(tmp_path), "--num_people", "30", "--num_train", "10", "--num_test", "4"],
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  assert len(load_records(str(tmp_path / "test.parquet"))) == 4
  with pytest.raises(ValueError, match="num_people"):
    synthetic.build_world(num_people=2)
  with pytest.raises(ValueError, match="min_hops"):
    synthetic.make_records(synthetic.build_world(num_people=10), 3, 3, 2)


def test_world_from_config(tmp_path):
  from stepsearch_jax.config import base_config
  cfg = base_config().data.synthetic
  cfg.num_people, cfg.num_train, cfg.num_test = 30, 8, 4
  out = synthetic.world_from_config(cfg, str(tmp_path), template="brief")
  rows = load_records(out["train"])
  assert len(rows) == 8
  # data.template reaches the stored prompts (it used to be dropped: every world said `think`)
  assert rows[0].prompt[0]["content"].startswith("Answer the question. Think inside")


def test_demonstration_flaws_are_drawn_from_the_given_kinds():
  world = synthetic.build_world(num_people=30)
  recs = synthetic.make_records(world, 40, 2, 2, "train", 0)
  rng = __import__("random").Random(0)
  demos = [synthetic.demonstration(r, world, quality=0.0, rng=rng, flaws=["early"]) for r in recs]
  # every 2-hop demonstration answers right after its first search, with the bridge entity
  for r, d in zip(recs, demos):
    assert [t["kind"] for t in d] == ["model", "search", "model"]
    assert f"<answer> {r.extra['hops'][0]['object']} </answer>" in d[-1]["text"]
  with pytest.raises(ValueError, match="flaws"):
    synthetic.demonstration(recs[0], world, quality=0.0, flaws=["sloppy"])


def test_world_and_rewards_import_without_jax():
  code = ("import sys; import stepsearch_jax.data.synthetic, stepsearch_jax.data.musique, "
          "stepsearch_jax.rewards; assert 'jax' not in sys.modules, 'jax imported'")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr


def test_information_block_matches_rollout_formatter(world_dir):
  retriever = pytest.importorskip("stepsearch_jax.rollout.retriever")
  docs = world_dir[0]["world"].search("Silver Ferry director", 3)
  assert synthetic.format_information(docs) == retriever.format_information(docs)


def test_demonstration_segments_mark_model_text(world_dir):
  world = world_dir[0]["world"]
  r = load_records(world_dir[0]["train"])[0]
  turns = synthetic.demonstration(r, world)
  segs, steps = synthetic.demonstration_segments(turns, world.search)
  assert [m for _, m in segs] == [True, False] * len(r.search_keys) + [True]
  assert all(t.startswith("\n\n<information>") for t, m in segs if not m)
  assert "".join(t for t, _ in segs) == synthetic.render_demonstration(turns, world.search)[0]
