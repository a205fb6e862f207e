"""Learner: the PPO side of one training step behind four calls (see stepsearch_jax/ppo/__init__.py).

It owns the sharded train state (policy, critic, both optimizer states, update count), the frozen
reference params, and the three compiled functions (prepare, advantages, update). Everything between
`prepare` and `update` stays on device in the [N, micro, ...] layout; only metrics come back.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stepsearch_jax.models.decoder import row_cost
from stepsearch_jax.models.sharding import logical_sharding, param_shardings, put_global
from stepsearch_jax.ppo import algorithms, batch as batch_lib
from stepsearch_jax.ppo.logprobs import make_prepare_fn
from stepsearch_jax.ppo.update import (UpdateParams, make_optimizer, make_update_fn,
                                       opt_state_shardings)


class Learner:
  """See module docstring. Build with :func:`make_learner`."""

  def __init__(self, cfg, policy_config, policy_params, critic_params, ref_params, mesh: Mesh,
               critic_config=None):
    self.cfg = cfg
    self.mesh = mesh
    self.algorithm = algorithms.get_algorithm(cfg.algo.name)
    self.policy_config = policy_config
    self.critic_config = critic_config or policy_config
    if self.algorithm.uses_critic and critic_params is None:
      raise ValueError(f"config.algo.name={cfg.algo.name!r} trains a critic: pass critic_params")
    if not self.algorithm.uses_critic:
      critic_params = None
    self.adv_params = algorithms.AdvantageParams.from_config(cfg.algo)
    self.update_params = UpdateParams.from_config(cfg)
    self.micro = int(cfg.algo.micro_batch)
    self.mini = int(cfg.algo.mini_batch)
    if self.mini % self.micro:
      raise ValueError(f"config.algo.micro_batch={self.micro} must divide "
                       f"config.algo.mini_batch={self.mini}")
    rows = int(cfg.data.batch_size) * int(cfg.rollout.n)
    self.pack = bool(cfg.algo.pack)
    updates_per_step = max(rows // self.mini, 1) * int(cfg.algo.ppo_epochs)
    self.actor_tx, self.actor_schedule = make_optimizer(
        float(cfg.optim.actor_lr), int(cfg.optim.actor_warmup), cfg.optim, updates_per_step)
    self.critic_tx, self.critic_schedule = make_optimizer(
        float(cfg.optim.critic_lr), int(cfg.optim.critic_warmup), cfg.optim, updates_per_step)
    shards = max(int(mesh.shape["data"]) * int(mesh.shape["fsdp"]), 1)
    self.shards = shards
    if self.micro % shards:
      logging.warning("algo.micro_batch=%d is not a multiple of data*fsdp=%d: batch rows are not "
                      "sharded", self.micro, shards)

    self.replicated = NamedSharding(mesh, PartitionSpec())
    pol_sh = param_shardings(policy_config, policy_params, mesh)
    cri_sh = (param_shardings(self.critic_config, critic_params, mesh)
              if critic_params is not None else None)
    self.ref_params = put_global(ref_params, pol_sh) if ref_params is not None else None
    # Owned copies: the update donates its state, and the caller may still hold these params
    # (e.g. the rollout engine, or `ref_params` when they are the same weights).
    policy_params = _owned(policy_params, pol_sh)
    state = {"policy": policy_params,
             "policy_opt": self._init_opt(self.actor_tx, policy_params, pol_sh),
             "critic": None, "critic_opt": None,
             "step": put_global(np.zeros((), np.int32), self.replicated)}
    if critic_params is not None:
      critic_params = _owned(critic_params, cri_sh)
      state["critic"] = critic_params
      state["critic_opt"] = self._init_opt(self.critic_tx, critic_params, cri_sh)
    self.state_shardings = jax.tree.map(lambda x: x.sharding, state)
    self.state = state
    self._prepare_fns: dict = {}
    self._update_fns: dict = {}
    self._adv_fn = None

  # ----------------------------------------------------------------------------------- plumbing
  def _init_opt(self, tx, params, shardings):
    shapes = jax.eval_shape(tx.init, params)
    out = opt_state_shardings(tx, shapes, shardings, self.mesh)
    return jax.jit(tx.init, out_shardings=out)(params)

  def batch_shardings(self, batch: batch_lib.PPOBatch):
    """[N, micro, ...] arrays: micro axis over ('data', 'fsdp'), the rest unsharded."""
    def one(x):
      names = (None, "batch") + (None,) * (x.ndim - 2)
      return logical_sharding(self.mesh, *names, shape=x.shape)
    return jax.tree.map(one, batch)

  def to_device(self, batch: batch_lib.PPOBatch) -> batch_lib.PPOBatch:
    """Host PPOBatch -> sharded device batch [N, micro, ...] (idempotent).

    A padded host batch [B, ...] is stacked into micro-batches of algo.micro_batch rows; a packed
    one (batch.pack_batch) comes stacked already.
    """
    if isinstance(batch.tokens, jax.Array):
      return batch
    if batch.tokens.ndim == 2:
      B = batch.tokens.shape[0]
      if B % self.mini:
        raise ValueError(f"batch of {B} rows is not a multiple of config.algo.mini_batch="
                         f"{self.mini}")
      batch = batch_lib.stack_micro(jax.tree.map(np.asarray, batch), self.micro)
    if batch.tokens.shape[0] % (self.mini // self.micro):
      raise ValueError(f"{batch.tokens.shape[0]} micro-batches do not make whole mini-batches of "
                       f"{self.mini // self.micro}")
    return put_global(batch, self.batch_shardings(batch))

  # ----------------------------------------------------------------------------------- public API
  def make_batch(self, trajectories: Sequence[Any], token_rewards: Sequence[np.ndarray],
                 pad_id: int = 0, **kwargs) -> batch_lib.PPOBatch:
    """The step's host batch: packed (batch.pack_batch, which takes row_len; its row length is
    otherwise chosen by models.decoder.row_cost for this policy) when config.algo.pack, else
    padded (batch.make_batch, which takes the extra layout kwargs). The rewards already hold only
    the algorithm's terms."""
    if self.pack and not kwargs.keys() - {"group_ids", "row_len"}:
      return batch_lib.pack_batch(trajectories, token_rewards, mini=self.mini, micro=self.micro,
                                  shards=self.shards, pad_id=pad_id, **kwargs,
                                  row_cost=functools.partial(row_cost, self.policy_config))
    return batch_lib.make_batch(trajectories, token_rewards, pad_id=pad_id, **kwargs)

  def prepare(self, batch: batch_lib.PPOBatch) -> batch_lib.PPOBatch:
    """Old log-probs, reference log-probs and values in one jitted pass (device batch out).

    A device batch passed in is donated (use the returned one); a host batch is copied first.
    """
    batch = self.to_device(batch)
    key = jax.tree.map(lambda x: (x.shape, x.dtype), batch)
    key = tuple(jax.tree.leaves(key))
    if key not in self._prepare_fns:
      shardings = {"policy": self.state_shardings["policy"], "critic": self.state_shardings["critic"],
                   "ref": self.state_shardings["policy"] if self.ref_params is not None else None,
                   "batch": self.batch_shardings(batch)}
      self._prepare_fns[key] = make_prepare_fn(self.policy_config, self.critic_config,
                                               self.update_params.temperature, shardings)
    with jax.set_mesh(self.mesh):
      return self._prepare_fns[key](self.state["policy"], self.ref_params, self.state["critic"],
                                    batch)

  def advantages(self, batch: batch_lib.PPOBatch) -> tuple[batch_lib.PPOBatch, dict]:
    """KL-in-reward + the algorithm's advantage estimator; returns (batch, metrics as floats)."""
    batch = self.to_device(batch)
    if self._adv_fn is None:
      def fn(b):
        adv, ret, metrics = self.algorithm.advantages(b, self.adv_params)
        return b.replace(advantages=adv, returns=ret), metrics
      self._adv_fn = jax.jit(fn)
    with jax.set_mesh(self.mesh):
      batch, metrics = self._adv_fn(batch)
    return batch, {k: float(v) for k, v in metrics.items()}

  def update(self, batch: batch_lib.PPOBatch) -> dict:
    """ppo_epochs passes over the mini-batches in order (no shuffling, as released); returns the
    mean of each metric over all mini-batch updates."""
    batch = self.to_device(batch)
    n_micro = self.mini // self.micro
    n_mini = batch.tokens.shape[0] // n_micro
    key = (n_micro,) + tuple(x.shape for x in jax.tree.leaves(batch))
    if key not in self._update_fns:
      shardings = {"state": self.state_shardings, "batch": self.batch_shardings(batch),
                   "replicated": self.replicated}
      self._update_fns[key] = make_update_fn(
          self.policy_config, self.critic_config, self.update_params, self.actor_tx,
          self.critic_tx, self.actor_schedule, self.critic_schedule, n_micro, shardings)
    fn = self._update_fns[key]
    all_metrics = []
    with jax.set_mesh(self.mesh):
      for _ in range(int(self.cfg.algo.ppo_epochs)):
        for i in range(n_mini):
          self.state, m = fn(self.state, batch, np.int32(i))
          all_metrics.append(m)
    all_metrics = jax.device_get(all_metrics)
    return {k: float(np.mean([m[k] for m in all_metrics])) for k in all_metrics[0]}

  @property
  def policy_params(self):
    """The live policy params. The next update() DONATES them: holders (the engine) must either
    copy (jax.device_put(..., may_alias=False)) or re-fetch after every update."""
    return self.state["policy"]

  @property
  def critic_params(self):
    return self.state["critic"]

  @property
  def step(self) -> int:
    """Optimizer updates applied so far (mini-batch updates, all epochs)."""
    return int(self.state["step"])

  def abstract_state(self):
    """ShapeDtypeStruct tree with shardings: the restore target for checkpoint.restore."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        self.state)

  def load_state(self, state) -> None:
    """Install a restored state (same structure as .state), re-placed onto this learner's mesh."""
    if jax.tree.structure(state) != jax.tree.structure(self.state):
      raise ValueError("restored learner state does not match this learner's state structure "
                       "(different algorithm / critic?)")
    self.state = _owned(state, self.state_shardings)


def _owned(tree, shardings):
  """`tree` on `shardings` in buffers nobody else holds.

  `jax.device_put(..., may_alias=False)` is not enough: resharding a one-device array onto a
  mesh where a leaf is replicated (e.g. a bias on fsdp=2) kept device 0's buffer shared with
  the source, so a donating update deleted the reference model's copy (step 2 then crashed
  with "buffer has been deleted or donated"). A jitted copy's outputs never alias its inputs.
  """
  placed = put_global(tree, shardings)
  return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(placed)


def make_learner(cfg, policy_params, critic_params, ref_params, mesh: Mesh, *, policy_config,
                 critic_config=None) -> Learner:
  """Build a Learner; params may be host or device arrays (they are placed on `mesh`)."""
  return Learner(cfg, policy_config, policy_params, critic_params, ref_params, mesh, critic_config)
