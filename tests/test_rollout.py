"""The agent loop on hand-built turns (masks, search indices, warnings, caps) and both drivers on
the synthetic world with a real retrieval server (identical greedy trajectories)."""

import jax
import pytest

from stepsearch_jax import config as config_lib
from stepsearch_jax.engine import StepSearchEngine
from stepsearch_jax.rollout import episode
from stepsearch_jax.rollout.driver import rollout
from stepsearch_jax.rollout.retriever import RetrieverClient, format_information
from stepsearch_jax.rollout.trajectory import Trajectory
import toy_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return toy_world.build_world(str(tmp_path_factory.mktemp("world")), num_people=20,
                               num_train=24, num_test=8)


@pytest.fixture(scope="module")
def server(world):
  from retrieval.server import start_subprocess
  proc, url = start_subprocess(world["index_dir"], timeout_s=120)
  yield url
  proc.terminate()
  proc.wait(timeout=30)


def _rollout_cfg(**kw):
  c = config_lib.base_config().rollout
  c.update(dict(driver="native", max_turns=3, max_tokens_per_turn=80, max_obs_tokens=800,
                max_context=1024, max_start=2048, temperature=1.0, top_p=1.0, top_k=-1, n=1,
                num_slots=4, prefill_buckets=(64, 128, 256, 512, 1024)))
  c.update(kw)
  return c


def _docs(world):
  import json
  rows = [json.loads(line) for line in open(world["corpus"], encoding="utf-8")][:2]
  return [{"document": r, "score": 1.0 - i / 2} for i, r in enumerate(rows)]


def _episode(world, **cfg):
  tok = world["tokenizer"]
  c = episode.LoopConfig(**{**dict(max_turns=2, max_tokens_per_turn=40), **cfg})
  ep = episode.Episode(world["test_records"][0], tok, c, key=None)
  ep.eos_ids = {tok.eos_token_id, tok.pad_token_id}
  return tok, ep


def test_hand_built_trajectory_masks_and_search_indices(world):
  tok, ep = _episode(world, max_turns=1)
  docs = _docs(world)
  name = docs[0]["document"]["title"]
  enc = lambda s: tok.encode(s, add_special_tokens=False)
  turn1 = enc(f"<think> plan </think>\n<search> {name} </search>")
  # Generation ran past the stop (e.g. a non-canonical tag): the loop keeps tokens through it.
  assert ep.finish_turn(turn1 + enc(" the") + [tok.eos_token_id], [-0.5] * (len(turn1) + 2)) \
      == "search"
  assert ep.query == name
  ep.observe_search(docs)
  info = enc(format_information([d["document"] for d in docs]) + episode.LAST_TURN)
  assert ep.pending_ids == info and ep.append_start == len(ep.traj.prompt_ids) + len(turn1)
  turn2 = enc(f"<search> {name} country </search>")     # final turn: no search any more
  assert ep.finish_turn(turn2, [-1.0] * len(turn2)) == "done" and ep.done
  t = ep.traj
  assert t.response_ids == turn1 + info + turn2
  assert t.loss_mask == [1] * len(turn1) + [0] * len(info) + [1] * len(turn2)
  assert t.logprobs == [-0.5] * len(turn1) + [0.0] * len(info) + [-1.0] * len(turn2)
  assert t.search_end_indices == [len(turn1) - 1]
  assert tok.decode([t.response_ids[t.search_end_indices[0]]]).strip() == "</search>"
  assert t.queries == [name, f"{name} country"]
  assert t.doc_ids == [[d["document"]["id"] for d in docs]]
  assert t.doc_texts[0][0] == docs[0]["document"]["content"]
  assert f"<## Title: {name} ##>" in t.response_text and t.answer is None
  assert t.num_turns == 2
  t.check()
  assert Trajectory.from_json(t.to_json()) == t


def test_invalid_action_warning_answer_and_caps(world):
  tok, ep = _episode(world, max_turns=3, max_obs_tokens=5)
  enc = lambda s: tok.encode(s, add_special_tokens=False)
  bad = enc("<think> hmm </think>")
  assert ep.finish_turn(bad, [0.0] * len(bad)) == "invalid"
  warn = enc(episode.INVALID_ACTION)[:5]                      # observation cut to max_obs_tokens
  assert ep.traj.response_ids == bad + warn and ep.traj.loss_mask == [1] * len(bad) + [0] * 5
  ans = enc("<answer> the </answer>")
  assert ep.finish_turn(ans, [0.0] * len(ans)) == "answer" and ep.done
  assert ep.traj.answer == "the" and ep.traj.search_end_indices == []
  # Context cap: the rolling context keeps the last max_context tokens and needs a re-prefill.
  tok, ep = _episode(world, max_context=40)
  ep.finish_turn(bad, [0.0] * len(bad))
  assert len(ep.context) == 40 and ep.truncated_context and ep.pending_ids == ep.context
  # Response cap: the episode ends once the stored response is full.
  tok, ep = _episode(world, max_response_tokens=len(bad) + 3)
  ep.finish_turn(bad, [0.0] * len(bad))
  assert ep.done and ep.traj.truncated and len(ep.traj.response_ids) == len(bad) + 3


@pytest.fixture(scope="module")
def engine(world, server):
  retriever = RetrieverClient(server, topk=3)
  config, params = toy_world.train_policy(world, retriever, steps=60, batch_size=8, lr=1e-2,
                                          limit=24)
  return StepSearchEngine(config, params, world["tokenizer"], num_slots=4, cache_len=1024 + 81,
                          max_prefill_length=1024)


def test_drivers_give_identical_greedy_trajectories(world, server, engine):
  retriever = RetrieverClient(server, topk=3)
  records = world["test_records"][:6]         # more records than slots: slots are refilled
  cfg = _rollout_cfg()
  native = rollout(engine, records, cfg, retriever, jax.random.PRNGKey(0), greedy=True)
  js = rollout(engine, records, cfg, retriever, jax.random.PRNGKey(0), greedy=True,
               driver="jetstream")
  assert [t.response_ids for t in native] == [t.response_ids for t in js]
  assert [t.search_end_indices for t in native] == [t.search_end_indices for t in js]
  assert [t.doc_ids for t in native] == [t.doc_ids for t in js]
  assert sum(len(t.search_end_indices) for t in native) > 0, "the policy never searched"
  assert native.stats["retrieval_batches"] <= native.stats["retrieval_queries"]
  for t in native:
    t.check()
    assert t.id and t.ground_truth["target"] and len(t.logprobs) == len(t.response_ids)
    assert all(lp < 0 for lp, m in zip(t.logprobs, t.loss_mask) if m)
  for a, b in zip(native, js):    # sampler logprobs vs the scoring pass: same model, same tokens
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-3


def test_native_sampled_trajectories_do_not_depend_on_the_block_size(world, server, engine):
  """Temperature sampling through decode blocks of 16 steps and of 1 step draws the same tokens
  (keys depend on trajectory and position only), records the sampler's logprob of each model
  token (checked against a scoring pass) and the policy version."""
  retriever = RetrieverClient(server, topk=3)
  records = world["test_records"][:6]
  runs = [rollout(engine, records, _rollout_cfg(temperature=1.0, decode_steps_per_call=k,
                                                max_decode_steps_per_call=k),
                  retriever, jax.random.PRNGKey(1), policy_version=3) for k in (16, 1)]
  assert [t.response_ids for t in runs[0]] == [t.response_ids for t in runs[1]]
  assert runs[0].stats["steps"] >= runs[1].stats["steps"] / 4
  assert runs[0].stats["decode_calls"] < runs[1].stats["decode_calls"]
  for a, b in zip(*runs):
    assert a.policy_version == 3
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    scored = engine.score(a.prompt_ids + a.response_ids)[len(a.prompt_ids) - 1:]
    model = [i for i, m in enumerate(a.loss_mask) if m]
    assert model and max(abs(a.logprobs[i] - scored[i]) for i in model) < 1e-3
    assert all(a.logprobs[i] == 0.0 for i, m in enumerate(a.loss_mask) if not m)


def test_prefix_sharing_and_window_filling_blocks_change_nothing(world, server, engine):
  """The native driver's shortcuts do not change trajectories: prompts sharing their template
  prefix (prefilled once, copied) and blocks that run on while the cache window has room give
  the same sampled tokens and logprobs as whole-prompt prefills and fixed 4-step blocks; both
  run on decode states released by earlier rollouts, whose stale cache is never read."""
  retriever = RetrieverClient(server, topk=3)
  records = world["test_records"][:6]
  fast = rollout(engine, records, _rollout_cfg(temperature=1.0, decode_steps_per_call=4,
                                               max_decode_steps_per_call=64),
                 retriever, jax.random.PRNGKey(2))
  plain = rollout(engine, records, _rollout_cfg(temperature=1.0, decode_steps_per_call=4,
                                                max_decode_steps_per_call=4, share_prefix=False),
                  retriever, jax.random.PRNGKey(2))
  assert [t.response_ids for t in fast] == [t.response_ids for t in plain]
  for a, b in zip(fast, plain):
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
  assert fast.stats["shared_prefix_tokens"] > 0 and "shared_prefix_tokens" not in plain.stats
  assert fast.stats["prefill_tokens"] < plain.stats["prefill_tokens"]
  assert fast.stats["decode_calls"] < plain.stats["decode_calls"]
  assert engine.compile_counts()["reset"] == 1          # released states were reused


def test_jetstream_driver_survives_a_late_stream_close(world, server, engine, monkeypatch):
  """JetStream closes a stream with two thread-safe loop calls; the rollout can end in between.

  The gap is widened to 0.1 s here. Were the event loop closed before JetStream's threads stop,
  the second call would raise 'Event loop is closed' in the detokenize thread, which SIGKILLs the
  process; the patched call records it instead, so the test fails cleanly.
  """
  import time

  from jetstream.core.utils import async_multifuture

  late_errors = []

  def set_exception(self, exception):
    self._loop.call_soon_threadsafe(self._queue.put_nowait, async_multifuture._Exception(exception))
    time.sleep(0.1)
    try:
      self._loop.call_soon_threadsafe(self._done.set)
    except RuntimeError as e:
      late_errors.append(str(e))

  monkeypatch.setattr(async_multifuture.AsyncMultifuture, "set_exception", set_exception)
  retriever = RetrieverClient(server, topk=3)
  out = rollout(engine, world["test_records"][:2], _rollout_cfg(max_turns=2), retriever,
                jax.random.PRNGKey(0), greedy=True, driver="jetstream")
  assert len(out) == 2 and all(t.response_ids for t in out)
  assert late_errors == []


def test_bfloat16_sampler_and_trainer_logprobs_agree(world, server, engine):
  """The accelerator dtype (model.dtype=bfloat16: bf16 weights copy, KV cache and matmuls in the
  engine; bf16 compute in the trainer's pass): the sampler's logprob of each model token and the
  trainer's (`ppo.logprobs.policy_logprobs` on the packed layout) agree within 0.1 nats at every
  token and 0.02 on average; both stay within 0.15 of the float32 trainer."""
  import numpy as np
  from stepsearch_jax.ppo.batch import pack_batch
  from stepsearch_jax.ppo.logprobs import policy_logprobs
  config = engine.config.replace(dtype="bfloat16")
  bf16 = StepSearchEngine(config, engine.params, world["tokenizer"], num_slots=4,
                          cache_len=1024 + 81, max_prefill_length=1024)
  assert bf16.params["embedding"].dtype == np.dtype("bfloat16")
  trajs = rollout(bf16, world["test_records"][:4], _rollout_cfg(temperature=1.0),
                  RetrieverClient(server, topk=3), jax.random.PRNGKey(2))
  batch = pack_batch(trajs, [np.zeros(len(t.response_ids), np.float32) for t in trajs], mini=4,
                     micro=4)
  got = {}
  for name, cfg in (("bf16", config), ("f32", engine.config)):
    lp, _ = policy_logprobs(cfg, engine.params, batch.tokens[0], batch.segment_ids[0],
                            batch.response_index[0])
    got[name] = [np.asarray(lp)[np.asarray(batch.response_segment[0]) == k + 1]
                 for k in range(len(trajs))]
  diffs, vs_f32 = [], []
  for k, t in enumerate(trajs):
    model = np.asarray(t.loss_mask) > 0
    sampler = np.asarray(t.logprobs)[model]
    diffs.append(np.abs(sampler - got["bf16"][k][model]))
    vs_f32.append(np.abs(got["f32"][k][model] - sampler))
  diffs, vs_f32 = np.concatenate(diffs), np.concatenate(vs_f32)
  assert diffs.size > 20
  assert diffs.max() < 0.1 and diffs.mean() < 0.02, (diffs.max(), diffs.mean())
  assert vs_f32.max() < 0.15, vs_f32.max()
