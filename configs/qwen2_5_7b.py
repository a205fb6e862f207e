"""StePPO on Qwen2.5-7B with the paper's settings (method §4.2), one mesh per target.

`arg` names the target; the mesh, and nothing else, depends on it (data x fsdp x tensor = chips).
Paths point at folders staged by launch/stage_data.py under /data; override any of them with
--config.model.hf_path=... etc.

    # one node with 8 H100s (the paper's hardware class: 1 node x 8 GPUs)
    bash launch/gpu_node.sh --config configs/qwen2_5_7b.py:8xh100 --workdir runs/qwen2_5_7b \
        --manifest launch/manifest.json --stage-dest /data
    # a TPU v5e-64 slice (16 hosts x 4 chips); 7B with critic and reference overflows v5e-16
    bash launch/tpu_pod.sh --tpu NAME --zone ZONE --config configs/qwen2_5_7b.py:v5e-64 \
        --workdir gs://BUCKET/runs/qwen2_5_7b --manifest launch/manifest.json --stage-dest /data
    # any host, directly
    python -m stepsearch_jax.train --config configs/qwen2_5_7b.py:v5p-32 --workdir DIR

Capacity per target (memory per chip, step time on paper): launch/CAPACITY.md.
"""

from stepsearch_jax.paper_config import DATA, DEFAULT_TARGET, paper_config  # noqa: F401

# Qwen2.5-7B (config.json of Qwen/Qwen2.5-7B); launch/capacity.py reads these.
MODEL = dict(name="Qwen2.5-7B", num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4,
             head_dim=128, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)

# target: (chip, chips, hosts, data, fsdp, tensor). TPU v5e names count chips, v5p names count
# TensorCores (2 per chip, one JAX device per chip): v5p-32 is 16 chips on 4 hosts.
# data*fsdp must divide the micro-batch (16); tensor must divide the 4 KV heads (and 28 heads).
TARGETS = {
    "v5e-32": ("v5e", 32, 8, 1, 16, 2),
    "v5e-64": ("v5e", 64, 16, 1, 16, 4),
    "v5p-16": ("v5p", 8, 2, 1, 8, 1),
    "v5p-32": ("v5p", 16, 4, 1, 16, 1),
    "8xh100": ("h100", 8, 1, 1, 8, 1),
    "16xh100": ("h100", 16, 2, 2, 8, 1),
}


def get_config(arg=None):
  return paper_config("configs/qwen2_5_7b.py", MODEL, TARGETS, arg)
