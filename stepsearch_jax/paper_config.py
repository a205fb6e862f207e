"""The paper's StePPO settings (method §4.2) on a named target mesh, shared by the Qwen2.5 configs.

Each ``configs/qwen2_5_*.py`` keeps only what differs (MODEL, TARGETS) and calls
:func:`paper_config`; launch/capacity.py reads MODEL and TARGETS from those files.
"""

from stepsearch_jax.config import base_config

DATA = "/data"
DEFAULT_TARGET = "8xh100"


def paper_config(config_file: str, model: dict, targets: dict, arg=None):
  """base_config() with the paper's settings, model.hf_path from MODEL and the target's mesh."""
  target = arg or DEFAULT_TARGET
  if target not in targets:
    raise ValueError(f"{config_file}: unknown target {target!r}; one of {sorted(targets)}")
  _, chips, _, data, fsdp, tensor = targets[target]
  c = base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  assert data * fsdp * tensor == chips, target

  c.model.hf_path = f"{DATA}/models/{model['name']}"
  c.model.dtype = "bfloat16"        # compute; master weights and AdamW moments stay float32
  c.model.param_dtype = "float32"
  c.model.remat = True

  c.data.train_files = f"{DATA}/datasets/musique/musi_answerable_train.parquet"
  c.data.val_files = f"{DATA}/datasets/musique/musi_answerable_test.parquet"
  c.data.template = "think"
  c.data.batch_size = 128
  c.data.val_batch_size = 128

  c.retrieval.start_server = True   # one CPU sidecar per host, on 127.0.0.1
  c.retrieval.index_dir = f"{DATA}/indexes/musique_e5"
  c.retrieval.corpus = f"{DATA}/corpora/musique/corpus.jsonl"
  c.retrieval.encoder = f"{DATA}/models/e5-base-v2"
  c.retrieval.topk = 3

  c.rollout.max_turns = 5
  c.rollout.max_tokens_per_turn = 800
  c.rollout.max_obs_tokens = 800
  c.rollout.max_context = 4096
  c.rollout.max_start = 2048
  c.rollout.temperature = 1.0
  c.rollout.top_p = 0.95
  c.rollout.top_k = -1
  c.rollout.n = 1
  c.rollout.num_slots = 128

  c.algo.name = "steppo"
  c.algo.kl_coef = 0.001
  c.algo.clip_ratio = 0.2
  c.algo.value_clip = 0.5
  c.algo.entropy_coef = 0.001
  c.algo.gamma = 1.0
  c.algo.lam = 1.0
  c.algo.mini_batch = 32
  c.algo.micro_batch = 16

  c.optim.actor_lr = 5e-7
  c.optim.critic_lr = 5e-7
  c.optim.actor_warmup = 319
  c.optim.critic_warmup = 56

  c.total_steps = 1120
  c.save_every = 60
  c.eval_every = 60
  return c
