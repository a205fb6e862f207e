"""Shared builders for the PPO tests: a tiny real decoder, a config, random trajectories.

Not a test module (no test_ prefix); imported by tests/test_ppo_*.py and by the 8-device
subprocess in test_ppo_sharded.py.
"""

import dataclasses

import jax
import numpy as np

from stepsearch_jax.config import base_config
from stepsearch_jax.models import ModelConfig, init_params, init_value_params

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, dtype="float32", param_dtype="float32")


@dataclasses.dataclass
class Traj:
  prompt_ids: list
  response_ids: list
  loss_mask: list
  id: str = ""


def tiny_cfg(algo="steppo", rows=8, mini=8, micro=4, lr=1e-3, pack=True):
  cfg = base_config()
  cfg.algo.pack = pack
  cfg.algo.name = algo
  cfg.data.batch_size = rows
  cfg.rollout.n = 1
  cfg.algo.mini_batch = mini
  cfg.algo.micro_batch = micro
  cfg.algo.kl_coef = 0.05
  cfg.algo.entropy_coef = 0.01
  cfg.optim.actor_lr = lr
  cfg.optim.critic_lr = lr
  cfg.optim.actor_warmup = 0
  cfg.optim.critic_warmup = 0
  return cfg


def tiny_params(seed=0):
  policy = init_params(TINY, jax.random.key(seed))
  critic = init_value_params(TINY, jax.random.key(seed + 1), policy)
  ref = init_params(TINY, jax.random.key(seed + 2))
  return policy, critic, ref


def random_trajectories(rows=8, seed=0, groups=None):
  """Prompts of 3-6 tokens, responses of 4-20 tokens with an inserted span, reward at the end and
  a step reward in the middle."""
  rng = np.random.default_rng(seed)
  trajs, rewards = [], []
  prompts = [list(rng.integers(1, 64, size=rng.integers(3, 7))) for _ in range(groups or rows)]
  for i in range(rows):
    n = int(rng.integers(4, 21))
    mask = [1] * n
    if n > 8:
      mask[3:6] = [0, 0, 0]
    r = np.zeros(n, np.float32)
    r[-1] = float(rng.normal())
    r[1] = float(rng.normal()) * 0.3
    trajs.append(Traj(prompts[i % len(prompts)], list(rng.integers(1, 64, size=n)), mask, f"t{i}"))
    rewards.append(r)
  return trajs, rewards


def per_trajectory(x, batch, k):
  """Trajectory k's values of a [.., R] slot array, in response order (any layout: the slots of a
  trajectory are contiguous in one row)."""
  seg = np.asarray(batch.response_segment).reshape(-1)
  return np.asarray(x).reshape(-1)[seg == k + 1]
