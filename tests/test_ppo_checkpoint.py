"""Checkpointer: round trip of a learner state, fingerprint mismatch, NaN guard, failed writes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppo_tiny import TINY, tiny_cfg, tiny_params
from stepsearch_jax.models.sharding import make_mesh
from stepsearch_jax.ppo import (Checkpointer, FingerprintMismatchError, is_finite, make_learner,
                                rng_from_json, rng_to_json)

MESH = make_mesh((1, 1, 1), jax.devices()[:1])


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_round_trip_fingerprint_nan_guard_and_failed_write(tmp_path):
  policy, critic, ref = tiny_params()
  learner = make_learner(tiny_cfg(), policy, critic, ref, MESH, policy_config=TINY)
  # Non-trivial optimizer state / step so the round trip is meaningful.
  learner.state = jax.tree.map(lambda x: x + 1 if x is not None else None, learner.state)
  key = jax.random.key(7)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2)
  assert ckpt.restore(learner.abstract_state(), fingerprint="fp") is None
  meta = dict(config=tiny_cfg().to_dict(), data_position=17, rng=rng_to_json(key))
  assert ckpt.save(3, learner.state, fingerprint="fp-A", meta=meta, finite=is_finite(learner.state))
  ckpt.wait()

  fresh = make_learner(tiny_cfg(), policy, critic, ref, MESH, policy_config=TINY)
  state, got_meta = Checkpointer(str(tmp_path / "ckpt")).restore(fresh.abstract_state(),
                                                                 fingerprint="fp-A")
  _assert_tree_equal(jax.device_get(state), jax.device_get(learner.state))
  fresh.load_state(state)
  assert fresh.step == 1 and got_meta["data_position"] == 17 and got_meta["step"] == 3
  assert jnp.array_equal(jax.random.key_data(rng_from_json(got_meta["rng"])),
                         jax.random.key_data(key))
  assert got_meta["config"]["algo"]["name"] == "steppo"

  with pytest.raises(FingerprintMismatchError, match="fp-A.*fp-B"):
    ckpt.restore(fresh.abstract_state(), fingerprint="fp-B")

  # NaN guard: nothing written, the previous checkpoint stays the latest.
  bad = dict(learner.state, policy=jax.tree.map(lambda x: x * jnp.nan, learner.state["policy"]))
  assert not is_finite(bad) and is_finite(learner.state)
  assert not ckpt.save(4, bad, fingerprint="fp-A", meta=meta, finite=is_finite(bad))
  ckpt.wait()
  assert ckpt.latest_step() == 3

  # A write that fails (unserialisable metadata) leaves step 3 restorable.
  with pytest.raises(Exception):
    ckpt.save(5, learner.state, fingerprint="fp-A", meta=dict(meta, bad=object()))
    ckpt.wait()
  # A crash mid-write leaves a temporary directory, which is ignored.
  os.makedirs(tmp_path / "ckpt" / "6.orbax-checkpoint-tmp-123" / "state")
  again = Checkpointer(str(tmp_path / "ckpt"))
  assert again.latest_step() == 3
  state, _ = again.restore(fresh.abstract_state(), fingerprint="fp-A")
  _assert_tree_equal(jax.device_get(state), jax.device_get(learner.state))

  # keep=2: older steps are garbage-collected.
  for s in (7, 8, 9):
    assert ckpt.save(s, learner.state, fingerprint="fp-A", meta=meta)
  ckpt.close()
  assert Checkpointer(str(tmp_path / "ckpt")).all_steps() == [8, 9]


def test_grpo_state_without_critic_round_trips(tmp_path):
  policy, _, ref = tiny_params()
  learner = make_learner(tiny_cfg("grpo"), policy, None, ref, MESH, policy_config=TINY)
  ckpt = Checkpointer(str(tmp_path / "c"), async_save=False)
  assert ckpt.save(1, learner.state, fingerprint="x")
  state, meta = ckpt.restore(learner.abstract_state(), fingerprint="x")
  assert state["critic"] is None and state["critic_opt"] is None and meta["none_keys"]
  _assert_tree_equal(jax.device_get(state), jax.device_get(learner.state))
  steppo = make_learner(tiny_cfg(), policy, tiny_params()[1], ref, MESH, policy_config=TINY)
  with pytest.raises(ValueError, match="critic"):
    ckpt.restore(steppo.abstract_state(), fingerprint="x")
