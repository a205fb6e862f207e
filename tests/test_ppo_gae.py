"""GAE, KL-in-reward, whitening, losses and GRPO advantages against plain numpy oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepsearch_jax.ppo import algorithms, batch as batch_lib, gae as gae_lib, losses


def np_gae_bridged(r, v, m, gamma, lam):
  """Oracle, written differently from the scan: compress the model steps, run textbook GAE on them
  (rewards of bridged positions folded into the preceding step), scatter back."""
  B, R = r.shape
  adv = np.zeros((B, R))
  ret = np.zeros((B, R))
  for b in range(B):
    steps = [t for t in range(R) if m[b, t]]
    rr = []
    for i, t in enumerate(steps):
      end = steps[i + 1] if i + 1 < len(steps) else R
      rr.append(r[b, t:end].sum())
    a_s = np.zeros(len(steps))
    last = 0.0
    for i in reversed(range(len(steps))):
      nv = v[b, steps[i + 1]] if i + 1 < len(steps) else 0.0
      delta = rr[i] + gamma * nv - v[b, steps[i]]
      last = delta + gamma * lam * last
      a_s[i] = last
    for i, t in enumerate(steps):
      adv[b, t] = a_s[i]
      ret[b, t] = a_s[i] + v[b, t]
    for t in range(R):
      if m[b, t]:
        continue
      nxt = [s for s in steps if s > t]
      end = nxt[0] if nxt else R
      ret[b, t] = r[b, t:end].sum() + (ret[b, nxt[0]] if nxt else 0.0)
      adv[b, t] = ret[b, t] - v[b, t]
  return adv, ret


def np_gae_verl(r, v, gamma, lam):
  """verl 0.1 compute_gae_advantage_return (no mask; every position is a step)."""
  B, R = r.shape
  adv = np.zeros((B, R))
  last = np.zeros(B)
  for t in reversed(range(R)):
    nv = v[:, t + 1] if t < R - 1 else 0.0
    delta = r[:, t] + gamma * nv - v[:, t]
    last = delta + gamma * lam * last
    adv[:, t] = last
  return adv, adv + v


def np_whiten(x, m):
  sel = x[m > 0]
  return (x - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_numpy_random_gamma_lam_masks(seed):
  rng = np.random.default_rng(seed)
  B, R = 4, 13
  r = rng.normal(size=(B, R)).astype(np.float32)
  v = rng.normal(size=(B, R)).astype(np.float32)
  m = (rng.random((B, R)) > 0.35).astype(np.float32)
  m[0, :] = 1.0
  m[1, -4:] = 0.0  # right padding
  gamma, lam = rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)
  adv, ret = gae_lib.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma, lam)
  adv_np, ret_np = np_gae_bridged(r, v, m, gamma, lam)
  np.testing.assert_allclose(adv, adv_np, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, ret_np, rtol=1e-5, atol=1e-5)
  # With every position a step, it is textbook (verl) GAE.
  adv1, ret1 = gae_lib.gae(jnp.asarray(r), jnp.asarray(v), jnp.ones_like(r), gamma, lam)
  adv_v, ret_v = np_gae_verl(r, v, gamma, lam)
  np.testing.assert_allclose(adv1, adv_v, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret1, ret_v, rtol=1e-5, atol=1e-5)


def test_gae_gamma_lam_one_equals_released_over_all_positions():
  """gamma = lam = 1: bridging info tokens equals the released run over every position."""
  rng = np.random.default_rng(3)
  B, R = 3, 11
  r = rng.normal(size=(B, R)).astype(np.float32)
  v = rng.normal(size=(B, R)).astype(np.float32)
  resp = np.ones((B, R), np.float32)
  resp[2, -3:] = 0.0
  r[2, -3:] = 0.0   # no rewards on pads
  v[2, -3:] = 0.0   # released masks values outside the response
  model = resp * (rng.random((B, R)) > 0.4)
  adv, ret = gae_lib.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(model), 1.0, 1.0)
  adv_v, ret_v = np_gae_verl(r, v, 1.0, 1.0)
  np.testing.assert_allclose(np.asarray(adv) * resp, adv_v * resp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret) * resp, ret_v * resp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95)])
def test_inserted_tokens_are_bridged(gamma, lam):
  """[model, inserted, model] with the reward only at the end: the first model tokens get credit."""
  m = np.array([[1, 1, 0, 0, 0, 1, 1, 0, 0]], np.float32)  # last two columns: padding
  r = np.zeros_like(m)
  r[0, 6] = 1.0
  v = np.zeros_like(m)
  adv, ret = gae_lib.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma, lam)
  adv = np.asarray(adv)
  assert adv[0, 0] > 0 and adv[0, 1] > 0
  # Bridged positions do not discount: the first model token is 3 model steps from the reward.
  np.testing.assert_allclose(adv[0, 0], (gamma * lam) ** 3, rtol=1e-6)
  np.testing.assert_allclose(adv[0, 1], (gamma * lam) ** 2, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ret)[0, 7:], 0.0)


def test_kl_in_reward_only_on_model_tokens():
  scores = jnp.array([[0.0, 0.5, 0.0, 1.0]])
  old = jnp.array([[-1.0, -2.0, -3.0, -0.5]])
  ref = jnp.array([[-1.5, -1.0, -1.0, -0.5]])
  lm = jnp.array([[1.0, 1.0, 0.0, 1.0]])
  rewards, kl = gae_lib.kl_in_reward(scores, old, ref, lm, 0.1)
  np.testing.assert_allclose(kl, [[0.5, -1.0, 0.0, 0.0]])
  np.testing.assert_allclose(rewards, [[-0.05, 0.6, 0.0, 1.0]], rtol=1e-6)


def test_whitening_matches_numpy():
  rng = np.random.default_rng(4)
  x = rng.normal(2.0, 3.0, size=(5, 9)).astype(np.float32)
  m = (rng.random((5, 9)) > 0.3).astype(np.float32)
  got = gae_lib.masked_whiten(jnp.asarray(x), jnp.asarray(m))
  np.testing.assert_allclose(got, np_whiten(x, m), rtol=1e-5, atol=1e-5)


def test_policy_loss_hand_computed():
  logp = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  old = jnp.log(jnp.array([[0.25, 0.3, 0.4]]))     # ratios 2.0, 1.0, 0.5
  adv = jnp.array([[1.0, -2.0, -1.0]])
  mask = jnp.array([[1.0, 1.0, 1.0]])
  loss, m = losses.policy_loss(logp, old, adv, mask, 0.2)
  # token 0: max(-2, -1.2) = -1.2 (clipped); token 1: 2; token 2: max(0.5, 0.8) = 0.8 (clipped)
  np.testing.assert_allclose(loss, (-1.2 + 2.0 + 0.8) / 3, rtol=1e-6)
  np.testing.assert_allclose(m["pg_clipfrac"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(m["approx_kl"], (np.log(0.5) + 0 + np.log(2.0)) / 3, atol=1e-6)
  # Masking a token removes it; denom turns the mean into sum / denom.
  loss2, _ = losses.policy_loss(logp, old, adv, jnp.array([[1.0, 0.0, 1.0]]), 0.2, denom=4.0)
  np.testing.assert_allclose(loss2, (-1.2 + 0.8) / 4, rtol=1e-6)


def test_value_loss_hand_computed():
  v_new = jnp.array([[1.0, 0.0, 2.0]])
  v_old = jnp.array([[0.0, 0.2, 1.8]])
  ret = jnp.array([[0.5, 1.0, 1.0]])
  mask = jnp.array([[1.0, 1.0, 0.0]])
  loss, m = losses.value_loss(v_new, v_old, ret, mask, 0.5)
  # token 0: clip(1, -0.5, 0.5) = 0.5 -> max(0.25, 0) = 0.25; token 1: clip(0, -0.3, 0.7) = 0
  # -> max(1, 1) = 1; token 2 masked.
  np.testing.assert_allclose(loss, 0.5 * (0.25 + 1.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["vf_clipfrac"], 0.0)
  np.testing.assert_allclose(m["value_error"], (0.25 + 1.0) / 2, rtol=1e-6)


def test_logprobs_and_entropy_match_numpy():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  tgt = rng.integers(0, 7, size=(2, 3))
  lp, ent = losses.logprobs_and_entropy(jnp.asarray(logits), jnp.asarray(tgt))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(lp, np.log(np.take_along_axis(p, tgt[..., None], -1))[..., 0],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ent, -(p * np.log(p)).sum(-1), rtol=1e-5, atol=1e-6)


class _Traj:
  def __init__(self, prompt, response, loss_mask):
    self.prompt_ids, self.response_ids, self.loss_mask = prompt, response, loss_mask


def test_make_batch_layout_and_grpo_hand_computed():
  trajs = [_Traj([5, 6, 7], [8, 9, 10], [1, 0, 1]), _Traj([5, 6, 7], [11], [1]),
           _Traj([5, 6, 7], [12, 13], [1, 1]), _Traj([3], [4, 4, 4, 4], [1, 1, 1, 0])]
  rewards = [np.array([0, 0, 1.0]), np.array([0.5]), np.array([0, -1.0]), np.array([0, 0, 0, 2.0])]
  b = batch_lib.make_batch(trajs, rewards, prompt_len=4, response_len=5)
  assert b.tokens.shape == (4, 9)
  np.testing.assert_array_equal(b.tokens[0], [0, 5, 6, 7, 8, 9, 10, 0, 0])
  np.testing.assert_array_equal(b.segment_ids[3], [0, 0, 0, 1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(b.response_index[0], [3, 4, 5, 6, 7])
  np.testing.assert_array_equal(b.response_segment[0], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(b.loss_mask[0], [1, 0, 1, 0, 0])
  np.testing.assert_array_equal(b.response_mask[1], [1, 0, 0, 0, 0])
  np.testing.assert_array_equal(b.group_ids[:, 0], [0, 0, 0, 1])
  hp = algorithms.AdvantageParams(kl_coef=0.0, grpo_eps=1e-6)
  adv, _, _ = algorithms.get_algorithm("grpo").advantages(jax.tree.map(jnp.asarray, b), hp)
  s = np.array([1.0, 0.5, -1.0])
  z = (s - s.mean()) / (s.std(ddof=1) + 1e-6)
  np.testing.assert_allclose(np.asarray(adv)[0], z[0] * b.loss_mask[0], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(adv)[2], z[2] * b.loss_mask[2], rtol=1e-5)
  # A group of one: mean 0, std 1 (verl) -> the raw score.
  np.testing.assert_allclose(np.asarray(adv)[3], 2.0 / (1 + 1e-6) * b.loss_mask[3], rtol=1e-5)
  with pytest.raises(ValueError, match="loss_mask"):
    batch_lib.make_batch([_Traj([1], [2, 3], [1])], [np.zeros(2)])
  with pytest.raises(ValueError, match="does not fit"):
    batch_lib.make_batch(trajs, rewards, prompt_len=2)


def test_outcome_only_algorithms_keep_the_answer_term_alone():
  from stepsearch_jax.config import base_config
  ppo, steppo = algorithms.get_algorithm("ppo"), algorithms.get_algorithm("steppo")
  assert ppo.outcome_only and algorithms.get_algorithm("grpo").outcome_only
  assert not steppo.outcome_only and not algorithms.get_algorithm("steppo-no-key").outcome_only
  assert ppo.reward_config(base_config().reward).terms == "answer_f1"
  assert steppo.reward_config(base_config().reward).terms == base_config().reward.terms
  with pytest.raises(ValueError, match="algo.name"):
    algorithms.get_algorithm("dpo")


def test_steppo_advantages_whiten_over_chosen_mask():
  rng = np.random.default_rng(6)
  trajs = [_Traj([1, 2], [3] * 6, [1, 1, 0, 0, 1, 1]), _Traj([1], [4] * 4, [1, 0, 1, 1])]
  rewards = [np.array([0, 0.4, 0, 0, 0, 1.0]), np.array([0, 0, 0, -1.0])]
  b = batch_lib.make_batch(trajs, rewards, prompt_len=2, response_len=8)
  b = b.replace(values=rng.normal(size=b.values.shape).astype(np.float32) * b.response_mask,
                old_logprobs=-rng.random(b.values.shape).astype(np.float32),
                ref_logprobs=-rng.random(b.values.shape).astype(np.float32))
  for which in ("all", "model"):
    hp = algorithms.AdvantageParams(gamma=1.0, lam=1.0, kl_coef=0.01, whiten_mask=which)
    adv, ret, _ = algorithms.get_algorithm("steppo").advantages(jax.tree.map(jnp.asarray, b), hp)
    r = b.rewards - 0.01 * (b.old_logprobs - b.ref_logprobs) * b.loss_mask
    a_np, ret_np = np_gae_verl(r, b.values, 1.0, 1.0)
    wm = b.response_mask if which == "all" else b.loss_mask
    np.testing.assert_allclose(np.asarray(ret), ret_np * b.response_mask, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(adv), np_whiten(a_np, wm) * b.response_mask, rtol=1e-4,
                               atol=1e-5)
