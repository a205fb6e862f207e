"""Packed batches (several trajectories per row) against padded ones (one per row): the layout,
GAE restarting at trajectory boundaries, and one whole learner step giving the same losses,
gradients and weights."""

import jax
import numpy as np
import pytest

from ppo_tiny import TINY, Traj, per_trajectory, random_trajectories, tiny_cfg, tiny_params
from stepsearch_jax.models import segment_positions
from stepsearch_jax.models.sharding import make_mesh
from stepsearch_jax.ppo import make_learner
from stepsearch_jax.ppo import batch as batch_lib
from stepsearch_jax.ppo import gae as gae_lib

MESH = make_mesh((1, 1, 1), jax.devices()[:1])


def test_pack_layout_keeps_every_token_and_each_minibatch():
  trajs, rewards = random_trajectories(16, seed=3)
  packed = batch_lib.pack_batch(trajs, rewards, mini=8, micro=4)
  padded = batch_lib.make_batch(trajs, rewards)
  assert packed.tokens.ndim == 3 and packed.tokens.shape[0] == 2 * (8 // 4)
  assert packed.padding_share < padded.padding_share
  tokens = packed.tokens.reshape(-1, packed.tokens.shape[-1])
  seg = packed.segment_ids.reshape(tokens.shape)
  pos = np.asarray(segment_positions(seg))
  rows_per_mini = tokens.shape[0] // 2
  for k, tr in enumerate(trajs):
    # the trajectory's slots hold its response, rewards and masks in order
    np.testing.assert_array_equal(per_trajectory(packed.loss_mask, packed, k), tr.loss_mask)
    np.testing.assert_array_equal(per_trajectory(packed.rewards, packed, k), rewards[k])
    index = per_trajectory(packed.response_index, packed, k)
    slot_rows = np.nonzero((packed.response_segment == k + 1).reshape(-1, packed.rewards.shape[-1])
                           .any(-1))[0]
    assert len(slot_rows) == 1                     # one row holds the whole trajectory
    row = int(slot_rows[0])
    assert row // rows_per_mini == k // 8          # ... inside its own mini-batch
    np.testing.assert_array_equal(tokens[row, index + 1], tr.response_ids)
    # its prompt sits right before the response, the segment starts at position 0
    start = index[0] + 1 - len(tr.prompt_ids)
    np.testing.assert_array_equal(tokens[row, start:index[0] + 1], tr.prompt_ids)
    np.testing.assert_array_equal(pos[row, start:index[-1] + 2],
                                  np.arange(index[-1] + 2 - start))
    assert len(np.unique(seg[row, start:index[-1] + 2])) == 1
  assert np.count_nonzero(seg) == sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs)


def test_pack_rejects_a_trajectory_longer_than_the_row():
  trajs, rewards = random_trajectories(4, seed=0)
  with pytest.raises(ValueError, match=r"trajectory 't\d' \(row \d\) has \d+ tokens, more than "
                                       r"row_len=8"):
    batch_lib.pack_batch(trajs, rewards, mini=4, micro=4, row_len=8)


def test_gae_restarts_at_trajectory_boundaries():
  """Two trajectories in one row (gamma, lam < 1, bridged tokens) == each in a row of its own."""
  rng = np.random.default_rng(0)
  a, b = 7, 5
  r, v = rng.normal(size=(2, a + b)).astype(np.float32)
  m = np.ones(a + b, np.float32)
  m[[2, 3, 9]] = 0.0
  seg = np.array([1] * a + [2] * b)
  adv, ret = gae_lib.gae(r[None], v[None], m[None], 0.9, 0.8, seg[None])
  for sl in (slice(0, a), slice(a, a + b)):
    want_adv, want_ret = gae_lib.gae(r[None, sl], v[None, sl], m[None, sl], 0.9, 0.8)
    np.testing.assert_allclose(np.asarray(adv)[0, sl], np.asarray(want_adv)[0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ret)[0, sl], np.asarray(want_ret)[0], rtol=1e-6)


def test_pack_row_count_steps_by_half_powers_of_two():
  """Rows per micro-batch: 1, 2, 3, 4, 6, 8, 12, ... (not only powers of two), at most `micro`."""
  assert [batch_lib.row_count(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 17, 25)] == \
      [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
  # 10 trajectories of 16 tokens in rows of 32: 5 rows needed -> 6 rows (powers of two: 8)
  trajs = [Traj([1, 2, 3, 4], list(range(5, 17)), [1] * 12, f"t{i}") for i in range(10)]
  rewards = [np.zeros(12, np.float32) for _ in trajs]
  packed = batch_lib.pack_batch(trajs, rewards, mini=10, micro=10, row_len=32)
  assert packed.tokens.shape == (1, 6, 32)
  assert batch_lib.pack_batch(trajs, rewards, mini=10, micro=10, row_len=32,
                              shards=4).tokens.shape == (1, 8, 32)


def test_pack_row_length_is_the_cheapest_layout_by_row_cost():
  """594 + 120 tokens: padded rows are 128 + 512 = 640 long. Without a cost the packed rows are too;
  with one, the cheapest of rows of 640 (two rows) and of 1024 (one row, both trajectories) wins:
  a cost linear in the row length takes 1024, one quadratic in it (attention-bound) keeps 640."""
  trajs = [Traj([1] * 94, [2] * 500, [1] * 500, "long"), Traj([1] * 20, [2] * 100, [1] * 100, "s")]
  rewards = [np.zeros(len(t.response_ids), np.float32) for t in trajs]
  assert batch_lib.make_batch(trajs, rewards).tokens.shape == (2, 640)
  assert batch_lib.pack_batch(trajs, rewards, mini=2, micro=2).tokens.shape == (1, 2, 640)
  seen = []

  def linear(t, r):
    seen.append((t, r))
    return t

  packed = batch_lib.pack_batch(trajs, rewards, mini=2, micro=2, row_cost=linear)
  assert packed.tokens.shape == (1, 1, 1024) and packed.padding_share < 0.31
  assert seen == [(640, 512), (1024, 1024), (1536, 1024)]      # up to the bucket of 2 x 594
  assert batch_lib.pack_batch(trajs, rewards, mini=2, micro=2,
                              row_cost=lambda t, r: t * t).tokens.shape == (1, 2, 640)


def test_row_cost_prefers_long_rows_for_wide_models_only():
  """models.decoder.row_cost on the wide mix's layouts (16 rows of 640 vs 8 of 1024): the 20M
  model packs into 1024 (measured faster there), the d=128 demo policy does not (measured slower)."""
  from stepsearch_jax.models import ModelConfig
  from stepsearch_jax.models.decoder import row_cost
  demo = ModelConfig(model_type="qwen2", vocab_size=2048, hidden_size=128, intermediate_size=384,
                     num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32)
  wide = ModelConfig(model_type="qwen2", vocab_size=8192, hidden_size=512, intermediate_size=1408,
                     num_layers=6, num_heads=8, num_kv_heads=4, head_dim=64)
  assert 16 * row_cost(demo, 640, 512) < 8 * row_cost(demo, 1024, 1024)
  assert 16 * row_cost(wide, 640, 512) > 8 * row_cost(wide, 1024, 1024)


@pytest.mark.parametrize("algo,layout", [("steppo", "mixed"), ("grpo", "mixed"),
                                         ("steppo", "three_rows")])
def test_packed_step_equals_padded_step(algo, layout):
  """prepare -> advantages -> update (2 mini-batches of 2 micro-batches) on the same trajectories:
  per-trajectory advantages/returns, the update's metrics and the new weights agree. `three_rows`:
  each mini-batch needs 3 rows, so a micro-batch holds 3 (not a power of two)."""
  policy, critic, ref = tiny_params()
  trajs, rewards = random_trajectories(8, seed=5, groups=4 if algo == "grpo" else None)
  trajs[0] = Traj(trajs[0].prompt_ids, trajs[0].response_ids * 3, trajs[0].loss_mask * 3, "long")
  rewards[0] = np.tile(rewards[0], 3)
  if layout == "three_rows":      # 36, 36, 36, 20 tokens per mini-batch in rows of 64
    trajs = [Traj(t.prompt_ids[:4], (t.response_ids * 4)[:32 if k % 4 < 3 else 16],
                  (t.loss_mask * 4)[:32 if k % 4 < 3 else 16], t.id) for k, t in enumerate(trajs)]
    rewards = [np.resize(r, len(t.response_ids)) for r, t in zip(rewards, trajs)]
  out = {}
  for pack in (False, True):
    cfg = tiny_cfg(algo, mini=4, micro=4 if layout == "three_rows" else 2, pack=pack)
    cfg.algo.gamma, cfg.algo.lam = 0.95, 0.9       # GAE must restart at every boundary
    learner = make_learner(cfg, policy, critic if algo != "grpo" else None, ref, MESH,
                           policy_config=TINY)
    host = learner.make_batch(trajs, rewards)
    dev, adv_metrics = learner.advantages(learner.prepare(host))
    per = {f: [per_trajectory(getattr(dev, f), dev, k) for k in range(8)]
           for f in ("old_logprobs", "values", "advantages", "returns")}
    metrics = learner.update(dev)
    out[pack] = (np.asarray(host.segment_ids).size, per, adv_metrics, metrics,
                 jax.device_get(learner.state))
  (cols_pad, per_a, adv_a, m_a, s_a), (cols_pack, per_b, adv_b, m_b, s_b) = out[False], out[True]
  if layout == "three_rows":
    assert cols_pack == 2 * 3 * 64              # 2 mini-batches x 3 rows of 64
  else:
    assert cols_pack < cols_pad
  for f in per_a:
    for k in range(8):
      np.testing.assert_allclose(per_b[f][k], per_a[f][k], rtol=1e-4, atol=1e-5, err_msg=f)
  for k in adv_a:
    np.testing.assert_allclose(adv_b[k], adv_a[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for k in m_a:
    np.testing.assert_allclose(m_b[k], m_a[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # weights after 2 AdamW updates at lr 1e-3: Adam's per-entry normalisation turns rounding-level
  # gradient differences on near-zero entries into weight differences of up to ~1% of a step
  # (1e-5 seen with 3-row micro-batches); bound: 2% of one step, as in the sharded-step test
  jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-4, atol=2e-5), s_a, s_b)
