"""The paper's StePPO settings (method §4.2) on a named target mesh, shared by the Qwen2.5 configs.

Each ``configs/qwen2_5_*.py`` keeps only what differs (MODEL, TARGETS) and calls
:func:`paper_config`; launch/capacity.py reads MODEL and TARGETS from those files.
"""

from stepsearch_jax.config import base_config

DATA = "/data"
DEFAULT_TARGET = "8xh100"


def paper_config(config_file: str, model: dict, targets: dict, arg=None):
  """base_config() (which already holds the paper's hyperparameters, method §4.2: batch 128, 5
  turns, lr 5e-7, warmups 319/56, 1120 steps, bf16 compute with fp32 master weights) on the
  staged data under DATA, with model.hf_path from MODEL and the target's mesh."""
  target = arg or DEFAULT_TARGET
  if target not in targets:
    raise ValueError(f"{config_file}: unknown target {target!r}; one of {sorted(targets)}")
  _, chips, _, data, fsdp, tensor = targets[target]
  if data * fsdp * tensor != chips:
    raise ValueError(f"{config_file}: TARGETS[{target!r}] mesh data*fsdp*tensor = "
                     f"{data}*{fsdp}*{tensor} = {data * fsdp * tensor}, but the target has "
                     f"{chips} chips")
  c = base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  c.model.hf_path = f"{DATA}/models/{model['name']}"
  c.data.train_files = f"{DATA}/datasets/musique/musi_answerable_train.parquet"
  c.data.val_files = f"{DATA}/datasets/musique/musi_answerable_test.parquet"
  c.retrieval.start_server = True   # one CPU sidecar per host, on 127.0.0.1
  c.retrieval.index_dir = f"{DATA}/indexes/musique_e5"
  c.retrieval.corpus = f"{DATA}/corpora/musique/corpus.jsonl"
  c.retrieval.encoder = f"{DATA}/models/e5-base-v2"
  return c
