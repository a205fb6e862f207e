"""One jitted, sharded PPO update per mini-batch: policy (clip + entropy) and critic (value clip).

The train state is ``{'policy', 'policy_opt', 'critic', 'critic_opt', 'step'}`` (critic entries None
without a critic). The device batch is laid out [N, micro, ...] (batch.stack_micro) with the micro
axis sharded over ('data', 'fsdp'); the update takes the whole batch plus a mini-batch index and
slices the mini-batch's micro-batches off the unsharded leading axis, so selecting a mini-batch moves
no data between devices. Gradients are accumulated over the micro-batches with ``lax.scan`` inside
the jit, then clipped by global norm and applied with AdamW; the state is donated, so parameters and
optimizer moments are updated in place.

Losses are normalised by the token count of the whole mini-batch (see losses.py), so accumulating
k micro-batches gives the same gradient as one pass over the mini-batch.

Learning rate: linear warm-up from 0 then constant, indexed by *training step* (one PPO step = all
mini-batches of one rollout batch), as the released code steps its HF scheduler once per step:
lr(step s) = lr * min(1, s / warmup); the first step therefore runs at lr 0, like the original.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from stepsearch_jax.ppo import losses
from stepsearch_jax.ppo.batch import PPOBatch
from stepsearch_jax.ppo.logprobs import critic_values, policy_logprobs


@dataclasses.dataclass(frozen=True)
class UpdateParams:
  """Static loss settings (hashable), from cfg.algo / cfg.rollout."""
  clip_ratio: float = 0.2
  value_clip: float = 0.5
  entropy_coef: float = 0.001
  critic_mask: str = "all"
  temperature: float = 1.0

  @classmethod
  def from_config(cls, cfg) -> "UpdateParams":
    return cls(clip_ratio=float(cfg.algo.clip_ratio), value_clip=float(cfg.algo.value_clip),
               entropy_coef=float(cfg.algo.entropy_coef), critic_mask=str(cfg.algo.critic_mask),
               temperature=float(cfg.rollout.get("temperature", 1.0)))


def lr_schedule(lr: float, warmup: int, updates_per_step: int = 1) -> optax.Schedule:
  """Linear warm-up over `warmup` training steps, then constant; input = optimizer update count."""
  if warmup > 0:
    per_step = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  else:
    per_step = optax.constant_schedule(lr)
  k = max(int(updates_per_step), 1)
  return lambda count: per_step(count // k)


def make_optimizer(lr: float, warmup: int, optim_cfg, updates_per_step: int):
  """clip_by_global_norm -> AdamW (torch defaults: eps 1e-8, decoupled decay on every parameter)."""
  schedule = lr_schedule(lr, warmup, updates_per_step)
  tx = optax.chain(
      optax.clip_by_global_norm(float(optim_cfg.grad_clip)),
      optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=1e-8,
                  weight_decay=float(optim_cfg.weight_decay)))
  return tx, schedule


def opt_state_shardings(tx, opt_shapes, params_shardings, mesh):
  """Moments take their parameter's sharding; scalars (counts) are replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(tx, lambda _, s: s, opt_shapes, params_shardings,
                               transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def _accumulate(acc, grads):
  return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)


def _update(state, batch: PPOBatch, index, *, policy_config, critic_config, hp: UpdateParams,
            actor_tx, critic_tx, actor_schedule, critic_schedule, n_micro: int, grad_shardings):
  mb = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, index * n_micro, n_micro, 0), batch)
  use_critic = state["critic"] is not None
  cmask_all = mb.response_mask if hp.critic_mask == "all" else mb.loss_mask
  actor_denom = jnp.maximum(mb.loss_mask.sum(), 1.0)
  critic_denom = jnp.maximum(cmask_all.sum(), 1.0)

  def actor_loss(params, micro):
    lp, ent = policy_logprobs(policy_config, params, micro.tokens, micro.segment_ids,
                              micro.response_index, hp.temperature)
    pg, m = losses.policy_loss(lp, micro.old_logprobs, micro.advantages, micro.loss_mask,
                               hp.clip_ratio, actor_denom)
    entropy = losses.entropy_bonus(ent, micro.loss_mask, actor_denom)
    return pg - hp.entropy_coef * entropy, dict(pg_loss=pg, entropy=entropy, **m)

  def critic_loss(vparams, micro):
    v = critic_values(critic_config, vparams, micro.tokens, micro.segment_ids,
                      micro.response_index)
    cmask = micro.response_mask if hp.critic_mask == "all" else micro.loss_mask
    vl, m = losses.value_loss(v, micro.values, micro.returns, cmask, hp.value_clip, critic_denom)
    return vl, dict(vf_loss=vl, **m)

  def zeros_like(tree, shardings):
    z = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), tree)
    return jax.lax.with_sharding_constraint(z, shardings)

  def body(carry, micro):
    g_pol, g_cri, metrics = carry
    (_, m), g = jax.value_and_grad(actor_loss, has_aux=True)(state["policy"], micro)
    g_pol = _accumulate(g_pol, g)
    if use_critic:
      (_, mc), gc = jax.value_and_grad(critic_loss, has_aux=True)(state["critic"], micro)
      g_cri = _accumulate(g_cri, gc)
      m = dict(m, **mc)
    metrics = jax.tree.map(jnp.add, metrics, m)
    return (g_pol, g_cri, metrics), None

  metric_names = ["pg_loss", "entropy", "pg_clipfrac", "approx_kl"]
  if use_critic:
    metric_names += ["vf_loss", "vf_clipfrac", "value_error"]
  init = (zeros_like(state["policy"], grad_shardings["policy"]),
          zeros_like(state["critic"], grad_shardings["critic"]) if use_critic else None,
          {k: jnp.zeros((), jnp.float32) for k in metric_names})
  (g_pol, g_cri, metrics), _ = jax.lax.scan(body, init, mb)

  new = dict(state)
  step = state["step"]
  metrics["actor_grad_norm"] = optax.global_norm(g_pol)
  metrics["actor_lr"] = jnp.asarray(actor_schedule(step), jnp.float32)
  updates, new["policy_opt"] = actor_tx.update(g_pol, state["policy_opt"], state["policy"])
  new["policy"] = optax.apply_updates(state["policy"], updates)
  if use_critic:
    metrics["critic_grad_norm"] = optax.global_norm(g_cri)
    metrics["critic_lr"] = jnp.asarray(critic_schedule(step), jnp.float32)
    updates, new["critic_opt"] = critic_tx.update(g_cri, state["critic_opt"], state["critic"])
    new["critic"] = optax.apply_updates(state["critic"], updates)
  new["step"] = step + 1
  return new, metrics


def make_update_fn(policy_config, critic_config, hp: UpdateParams, actor_tx, critic_tx,
                   actor_schedule, critic_schedule, n_micro: int, shardings: dict):
  """Jitted ``update(state, batch, mini_index) -> (state, metrics)``; the state is donated.

  shardings: 'state' (pytree of NamedSharding like the state), 'batch', 'replicated'.
  """
  state_sh = shardings["state"]
  fn = functools.partial(
      _update, policy_config=policy_config, critic_config=critic_config, hp=hp, actor_tx=actor_tx,
      critic_tx=critic_tx, actor_schedule=actor_schedule, critic_schedule=critic_schedule,
      n_micro=n_micro, grad_shardings={"policy": state_sh["policy"], "critic": state_sh["critic"]})
  rep = shardings["replicated"]
  return jax.jit(fn, in_shardings=(state_sh, shardings["batch"], rep),
                 out_shardings=(state_sh, rep), donate_argnums=(0,))
