"""StePPO on Qwen2.5-3B with the paper's settings (method §4.2), one mesh per target.

`arg` names the target; the mesh, and nothing else, depends on it (data x fsdp x tensor = chips).
Paths point at folders staged by launch/stage_data.py under /data; override any of them with
--config.model.hf_path=... etc.

    # one node with 8 H100s (the paper's hardware class: 1 node x 8 GPUs)
    bash launch/gpu_node.sh --config configs/qwen2_5_3b.py:8xh100 --workdir runs/qwen2_5_3b \
        --manifest launch/manifest.json --stage-dest /data
    # a TPU v5e-16 slice (4 hosts x 4 chips)
    bash launch/tpu_pod.sh --tpu NAME --zone ZONE --config configs/qwen2_5_3b.py:v5e-16 \
        --workdir gs://BUCKET/runs/qwen2_5_3b --manifest launch/manifest.json --stage-dest /data
    # any host, directly
    python -m stepsearch_jax.train --config configs/qwen2_5_3b.py:v5p-32 --workdir DIR

Capacity per target (memory per chip, step time on paper): launch/CAPACITY.md.
"""

from stepsearch_jax.config import base_config

# Qwen2.5-3B (config.json of Qwen/Qwen2.5-3B); launch/capacity.py reads these.
MODEL = dict(name="Qwen2.5-3B", num_layers=36, hidden_size=2048, num_heads=16, num_kv_heads=2,
             head_dim=128, intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True)

# target: (chip, chips, hosts, data, fsdp, tensor). TPU v5e names count chips, v5p names count
# TensorCores (2 per chip, one JAX device per chip): v5p-32 is 16 chips on 4 hosts.
# data*fsdp must divide the micro-batch (16); tensor must divide the 2 KV heads.
TARGETS = {
    "v5e-16": ("v5e", 16, 4, 1, 16, 1),
    "v5e-32": ("v5e", 32, 8, 1, 16, 2),
    "v5p-16": ("v5p", 8, 2, 1, 8, 1),
    "v5p-32": ("v5p", 16, 4, 1, 16, 1),
    "8xh100": ("h100", 8, 1, 1, 8, 1),
    "16xh100": ("h100", 16, 2, 2, 8, 1),
}
DEFAULT_TARGET = "8xh100"
DATA = "/data"


def get_config(arg=None):
  target = arg or DEFAULT_TARGET
  if target not in TARGETS:
    raise ValueError(f"configs/qwen2_5_3b.py: unknown target {target!r}; one of {sorted(TARGETS)}")
  _, chips, _, data, fsdp, tensor = TARGETS[target]
  c = base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  assert data * fsdp * tensor == chips, target

  c.model.hf_path = f"{DATA}/models/Qwen2.5-3B"
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
