"""The warm start, the rollouts and the rewards read one text contract (stepsearch_jax/texts.py):
on the same trajectory they agree token for token."""

import random

import numpy as np
import pytest

from stepsearch_jax import config as config_lib
from stepsearch_jax import texts
from stepsearch_jax.data import synthetic, wordlevel
from stepsearch_jax.data.records import load_records
from stepsearch_jax.rewards import steps as steps_lib
from stepsearch_jax.rewards import text as text_lib
from stepsearch_jax.rollout import episode


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  out = tmp_path_factory.mktemp("contract")
  paths = synthetic.make_world(str(out), seed=3, num_people=40, num_train=24, num_test=8)
  train = load_records(paths["train"])
  rcfg = config_lib.base_config().rollout
  from stepsearch_jax.workspace import tokenizer_texts
  tok = wordlevel.train_wordlevel(
      tokenizer_texts(paths["world"], train, [], "think", rcfg), str(out / "tok"))
  return paths["world"], train, tok, rcfg


def _rollout_of(record, turns, w, tok, lcfg):
  """The rollout's Episode fed the demonstration's model turns and the world's hits."""
  results = {t["query"]: [{"document": d, "score": 1.0} for d in w.search(t["query"], 3)]
             for t in turns if t["kind"] == "search"}
  ep = episode.Episode(record, tok, lcfg, key=np.zeros(2, np.uint32), template="think")
  action = None
  for turn in turns:
    if turn["kind"] == "model":
      ids = tok.encode(turn["text"], add_special_tokens=False)
      action = ep.finish_turn(ids, [0.0] * len(ids))
    else:
      assert action == "search" and ep.query == turn["query"]
      ep.observe_search(results[turn["query"]])
  return ep.traj, results


@pytest.mark.parametrize("quality", [1.0, 0.0])
def test_demonstration_equals_rollout_and_rewards_read_it(world, quality):
  w, train, tok, rcfg = world
  rcfg = rcfg.copy_and_resolve_references()
  rcfg.max_turns, rcfg.max_context, rcfg.max_response_tokens = 10, 8192, 8192
  lcfg = episode.LoopConfig.from_config(rcfg, topk=3)
  rng = random.Random(0)
  for record in train[:6]:
    turns = synthetic.demonstration(record, w, quality=quality, rng=rng)
    t, results = _rollout_of(record, turns, w, tok, lcfg)
    prompt = texts.prompt_text(record, tok, "think")
    demo_ids, demo_mask = texts.demonstration_ids(tok, prompt, turns, results)
    assert t.prompt_ids + t.response_ids == demo_ids, record.id
    assert [0] * len(t.prompt_ids) + t.loss_mask == demo_mask, record.id

    # The rewards: each step's documents and the answer, parsed back from the response text.
    parsed = steps_lib.parse_step_docs(t.response_text)
    want = [[texts.doc_title_text(h)[1] for h in results[q]] for q in t.queries]
    assert [[steps_lib.strip_doc_label(d) for d in step] for step in parsed] == [
        [" ".join(x.split()) for x in step] for step in want], record.id
    assert text_lib.extract_answer(t.response_text) == t.answer


def test_steppo_token_rewards_differ_from_ppo_exactly_at_search_turn_ends(world):
  """The wiring: the same rollout trajectories scored for StePPO and for PPO differ only at each
  search turn's last token (by the step reward) and at the last token (by the key reward)."""
  from stepsearch_jax.ppo.algorithms import get_algorithm
  from stepsearch_jax.rewards import RewardConfig, score, token_rewards
  w, train, tok, rcfg = world
  rcfg = rcfg.copy_and_resolve_references()
  rcfg.max_turns, rcfg.max_context, rcfg.max_response_tokens = 10, 8192, 8192
  lcfg = episode.LoopConfig.from_config(rcfg, topk=3)
  base = config_lib.base_config().reward
  cfgs = {a: RewardConfig.from_config(get_algorithm(a).reward_config(base))
          for a in ("steppo", "ppo")}
  rng, differing_steps = random.Random(1), 0
  for record in train[:12]:
    turns = synthetic.demonstration(record, w, quality=0.3, rng=rng)
    t, _ = _rollout_of(record, turns, w, tok, lcfg)
    n = len(t.response_ids)
    r = {a: score(t.response_text, t.ground_truth, t.support_docs, c, step_doc_ids=t.doc_ids)
         for a, c in cfgs.items()}
    tr = {a: token_rewards(r[a], t.search_end_indices, n) for a in r}
    diff = tr["steppo"] - tr["ppo"]
    ends = set(t.search_end_indices)
    assert len(ends) == len(t.queries) == len(r["steppo"].step_rewards), record.id
    assert all(diff[i] == 0 for i in range(n - 1) if i not in ends), record.id
    for i, step_reward in zip(t.search_end_indices, r["steppo"].step_rewards):
      assert tok.decode([t.response_ids[i]]).strip() == "</search>"
      assert tr["ppo"][i] == 0 and diff[i] == pytest.approx(step_reward), record.id
      differing_steps += diff[i] != 0
    assert diff[n - 1] == pytest.approx(0.618 * r["steppo"].search_key_score), record.id
    assert tr["ppo"][n - 1] == pytest.approx(r["ppo"].answer_f1)
  assert differing_steps >= 6      # the step rewards are live on these trajectories
