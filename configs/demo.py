"""The CPU demo: StePPO teaches a small model to search a synthetic multi-hop world.

    python -m stepsearch_jax.train --config configs/demo.py --workdir runs/demo
    python -m stepsearch_jax.train --config configs/demo.py:smoke --workdir /tmp/smoke
"""

from stepsearch_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.data.synthetic.enabled = True
  c.model.dtype = "float32"
  c.model.remat = False
  c.mesh.fsdp = 1
  c.retrieval.start_server = True
  c.rollout.max_turns = 4
  c.rollout.max_tokens_per_turn = 24
  c.rollout.max_obs_tokens = 160
  c.rollout.max_context = 1024
  c.rollout.max_start = 256
  c.data.batch_size = 32
  c.algo.mini_batch = 16
  c.algo.micro_batch = 16
  c.optim.actor_lr = 1e-4
  c.optim.critic_lr = 1e-4
  c.optim.actor_warmup = 2
  c.optim.critic_warmup = 2
  c.total_steps = 60
  c.eval_every = 20
  c.save_every = 10
  if arg == "smoke":
    c.total_steps = 2
    c.data.batch_size = 8
    c.algo.mini_batch = 8
    c.algo.micro_batch = 8
    c.eval_every = 0
    c.save_every = 1
  return c
