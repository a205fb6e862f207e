"""StePPO core: batch layout, bridged GAE, PPO losses, algorithm registry, the sharded update, checkpoints.

The training loop (train.py) uses it like this::

  from stepsearch_jax.ppo import make_learner, Checkpointer, is_finite, get_algorithm

  algo = get_algorithm(cfg.algo.name)                  # steppo | ppo | grpo
  reward_cfg = RewardConfig.from_config(algo.reward_config(cfg.reward))  # ppo/grpo: outcome only
  learner = make_learner(cfg, policy_params, critic_params_or_None, ref_params, mesh,
                         policy_config=model_config, critic_config=None)
  for step ...:
    trajs = rollout(...);  token_rewards = [rewards.token_rewards(score(...), ...) for ...]
    batch = learner.make_batch(trajs, token_rewards, pad_id=tok.pad_token_id)
    # host numpy, bucketed shapes; packed (several trajectories per row) when cfg.algo.pack
    batch = learner.prepare(batch)           # old/ref log-probs + values, one jit (device batch)
    batch, adv_metrics = learner.advantages(batch)   # KL-in-reward, GAE/GRPO, whitening
    metrics = learner.update(batch)          # ppo_epochs x mini-batches, one jit per mini-batch
    engine.set_params(learner.policy_params) # sharded policy params (a pytree like init_params)
    ckpt.save(step, learner.state, fingerprint=index_fp, finite=is_finite(learner.state),
              meta=dict(config=cfg.to_dict(), data_position=..., rng=rng_to_json(key)))
  # resume: restored = ckpt.restore(learner.abstract_state(), fingerprint=index_fp)
  #         if restored: state, meta = restored; learner.load_state(state)

Learner API (stepsearch_jax/ppo/learner.py):
  make_learner(cfg, policy_params, critic_params | None, ref_params | None, mesh, *,
               policy_config: ModelConfig, critic_config: ModelConfig | None = None) -> Learner
    params are copied onto `mesh` with the model's param_shardings; critic_params is required for
    algorithms with a critic and ignored for grpo; ref_params None = no KL (ref log-probs = old).
  Learner.make_batch(trajectories, token_rewards, pad_id=0, **make_batch_kwargs) -> PPOBatch
    (host): batch.pack_batch when cfg.algo.pack and no padded-layout kwargs are given, else
    batch.make_batch (one trajectory per row)
  Learner.prepare(batch) -> PPOBatch (device, [N, micro, ...], old_logprobs/ref_logprobs/values)
  Learner.advantages(batch) -> (PPOBatch with advantages/returns, dict of float metrics:
    kl_in_reward, score_sum, reward_sum, returns_mean, values_mean)
  Learner.update(batch) -> dict of float metrics (means over mini-batch updates): pg_loss, entropy,
    pg_clipfrac, approx_kl, actor_grad_norm, actor_lr, and with a critic vf_loss, vf_clipfrac,
    value_error, critic_grad_norm, critic_lr
  Learner.policy_params / .critic_params / .step (optimizer updates so far) / .state (the
    checkpointed pytree {'policy','policy_opt','critic','critic_opt','step'}) /
    .abstract_state() / .load_state(state)
Batch layout and masks: batch.py. Maths: gae.py, losses.py. Algorithms: algorithms.py.
Checkpoints: checkpoint.py (Checkpointer, FingerprintMismatchError, is_finite, rng_to_json,
rng_from_json).
"""

from stepsearch_jax.ppo.algorithms import ALGORITHMS, Algorithm, get_algorithm
from stepsearch_jax.ppo.batch import PPOBatch, bucket_length, make_batch, pack_batch
from stepsearch_jax.ppo.checkpoint import (Checkpointer, FingerprintMismatchError, is_finite,
                                           rng_from_json, rng_to_json)
from stepsearch_jax.ppo.learner import Learner, make_learner

__all__ = ["ALGORITHMS", "Algorithm", "get_algorithm", "PPOBatch", "bucket_length", "make_batch",
           "pack_batch",
           "Checkpointer", "FingerprintMismatchError", "is_finite", "rng_from_json", "rng_to_json",
           "Learner", "make_learner"]
