"""Hugging Face folders <-> pure-dict params: safetensors I/O, the HF key map, load/save.

Loading memory-maps each safetensors file and builds every parameter with
``jax.make_array_from_callback``: each device shard reads only its slice of the layers it needs
(one HF tensor at a time), so a sharded load never materialises a second full host copy. The
reader is our own (the format is an 8-byte header length, a JSON header, raw little-endian data)
because numpy has no bfloat16 and torch must stay out of this path.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from stepsearch_jax.models.config import ModelConfig
from stepsearch_jax.models.params import param_shapes
from stepsearch_jax.models.sharding import param_shardings

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# safetensors


class SafetensorsFile:
  """A memory-mapped safetensors file: ``names``, ``shape(name)``, ``get(name) -> np.ndarray``."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) != 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
      n = int.from_bytes(head, "little")
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    self._header, self._start = header, 8 + n
    self._map = np.memmap(path, dtype=np.uint8, mode="r") if header else None

  @property
  def names(self) -> list[str]:
    return list(self._header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    info = self._header[name]
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
    lo, hi = info["data_offsets"]
    raw = self._map[self._start + lo:self._start + hi]
    return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def save_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None):
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  arrays = []
  for name, arr in tensors.items():
    arr = np.ascontiguousarray(arr)
    if arr.dtype not in _NAMES:
      raise ValueError(f"tensor {name}: dtype {arr.dtype} cannot be written to safetensors")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for arr in arrays:
      f.write(arr.reshape(-1).view(np.uint8).data)
  os.replace(tmp, path)


class CheckpointFiles:
  """All tensors of an HF folder: single model.safetensors or sharded with an index json."""

  def __init__(self, folder: str):
    index_path = os.path.join(folder, INDEX_FILE)
    self.where: dict[str, str] = {}
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: no 'weight_map' object")
      self.where = {k: os.path.join(folder, v) for k, v in weight_map.items()}
    else:
      single = os.path.join(folder, "model.safetensors")
      if not os.path.exists(single):
        raise ValueError(f"{folder}: neither model.safetensors nor {INDEX_FILE} found")
      self.where = {k: single for k in SafetensorsFile(single).names}
    self._files: dict[str, SafetensorsFile] = {}
    for name, path in self.where.items():
      if path not in self._files:
        if not os.path.exists(path):
          raise ValueError(f"{index_path}: tensor {name} points to missing file {path}")
        self._files[path] = SafetensorsFile(path)
      if name not in self._files[path]._header:
        raise ValueError(f"{path}: tensor {name} listed in {INDEX_FILE} but not in the file")

  def describe(self) -> str:
    return ", ".join(sorted({os.path.basename(p) for p in self.where.values()}))

  def shape(self, name: str) -> tuple[int, ...]:
    return self._files[self.where[name]].shape(name)

  def get(self, name: str) -> np.ndarray:
    return self._files[self.where[name]].get(name)


# ---------------------------------------------------------------------------------------------
# key map: (our path, HF name template, to_ours, to_hf); "{i}" marks per-layer (stacked) tensors.


def key_map(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, Callable, Callable]]:
  d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  same = (lambda w: w, lambda w: w)
  tr = (lambda w: w.T, lambda w: w.T)

  def heads(n):  # HF [n*dh, d] <-> ours [d, n, dh]
    return (lambda w: w.T.reshape(d, n, dh), lambda w: w.reshape(d, n * dh).T)

  def bias(n):
    return (lambda w: w.reshape(n, dh), lambda w: w.reshape(n * dh))
  out = (lambda w: w.T.reshape(h, dh, d), lambda w: w.reshape(h * dh, d).T)
  p = "model.layers.{i}."
  rows = [
      (("embedding",), "model.embed_tokens.weight", *same),
      (("final_norm", "scale"), "model.norm.weight", *same),
      (("layers", "attn_norm", "scale"), p + "input_layernorm.weight", *same),
      (("layers", "mlp_norm", "scale"), p + "post_attention_layernorm.weight", *same),
      (("layers", "attn", "q_kernel"), p + "self_attn.q_proj.weight", *heads(h)),
      (("layers", "attn", "k_kernel"), p + "self_attn.k_proj.weight", *heads(k)),
      (("layers", "attn", "v_kernel"), p + "self_attn.v_proj.weight", *heads(k)),
      (("layers", "attn", "o_kernel"), p + "self_attn.o_proj.weight", *out),
      (("layers", "mlp", "gate_kernel"), p + "mlp.gate_proj.weight", *tr),
      (("layers", "mlp", "up_kernel"), p + "mlp.up_proj.weight", *tr),
      (("layers", "mlp", "down_kernel"), p + "mlp.down_proj.weight", *tr),
  ]
  if cfg.qkv_bias:
    rows += [(("layers", "attn", "q_bias"), p + "self_attn.q_proj.bias", *bias(h)),
             (("layers", "attn", "k_bias"), p + "self_attn.k_proj.bias", *bias(k)),
             (("layers", "attn", "v_bias"), p + "self_attn.v_proj.bias", *bias(k))]
  if cfg.o_bias:
    rows.append((("layers", "attn", "o_bias"), p + "self_attn.o_proj.bias", *same))
  if not cfg.tie_word_embeddings:
    rows.append((("lm_head",), "lm_head.weight", *tr))
  return rows


def _lookup(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def read_config(path: str) -> dict:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise ValueError(f"{path}: config.json not found")
  with open(cfg_path) as f:
    return json.load(f)


def load_pretrained(path: str, *, mesh: Mesh | None = None, dtype: str | None = None,
                    param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """(config, params) from an HF folder; each tensor goes straight onto its sharding."""
  overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v}
  config = ModelConfig.from_hf(read_config(path), **overrides)
  files = CheckpointFiles(path)
  shapes = param_shapes(config)
  if mesh is None:
    shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), shapes)
  else:
    shardings = param_shardings(config, shapes, mesh)
  pdt = config.weight_dtype
  params: dict = {}
  for ours, template, to_ours, to_hf in key_map(config):
    target = _lookup(shapes, ours)
    stacked = "{i}" in template
    per_layer = target.shape[1:] if stacked else target.shape
    hf_shape = to_hf(np.empty(per_layer, np.uint8)).shape
    names = [template.format(i=i) for i in range(config.num_layers)] if stacked else [template]
    for name in names:
      if name not in files.where:
        raise ValueError(f"{path}: tensor {name} is missing (looked in {files.describe()})")
      if files.shape(name) != hf_shape:
        raise ValueError(f"{files.where[name]}: tensor {name} has shape {files.shape(name)}, "
                         f"expected {hf_shape} for config.json")

    def read(i, name=names[0], names=names, to_ours=to_ours):
      return to_ours(files.get(names[i] if stacked else name)).astype(pdt)

    def callback(index, read=read, stacked=stacked):
      if not stacked:
        return np.ascontiguousarray(read(0)[index])
      layers = range(*index[0].indices(config.num_layers))
      return np.stack([read(i)[index[1:]] for i in layers])

    arr = jax.make_array_from_callback(target.shape, _lookup(shardings, ours), callback)
    _set(params, ours, arr)
  return config, params


def save_pretrained(path: str, config: ModelConfig, params: dict, *,
                    max_shard_bytes: int = 4 << 30, extra_config: dict | None = None) -> None:
  """Write config.json, generation_config.json and safetensors (sharded + index when large).

  Old *.safetensors files and index in `path` are removed first so a reload cannot mix versions.
  Params are gathered to this host (single-process runs; multi-host would need a process gather).
  """
  os.makedirs(path, exist_ok=True)
  tensors: dict[str, np.ndarray] = {}
  for ours, template, _, to_hf in key_map(config):
    value = np.asarray(jax.device_get(_lookup(params, ours)))
    if "{i}" in template:
      for i in range(config.num_layers):
        tensors[template.format(i=i)] = to_hf(value[i])
    else:
      tensors[template] = to_hf(value)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, arr in tensors.items():
    if shards[-1] and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  for stale in os.listdir(path):
    if stale.endswith(".safetensors") or stale == INDEX_FILE:
      os.remove(os.path.join(path, stale))
  if len(shards) == 1:
    save_safetensors(os.path.join(path, "model.safetensors"), shards[0])
  else:
    weight_map = {}
    for n, shard in enumerate(shards, 1):
      fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
      save_safetensors(os.path.join(path, fname), shard)
      weight_map.update({name: fname for name in shard})
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  hf = config.to_hf()
  hf.update(extra_config or {})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump(gen, f, indent=2)


def load_tokenizer(path: str):
  """The tokenizer of an HF folder (ours, word-level, or a pretrained BPE one such as Qwen's or
  SmolLM2's) via transformers' AutoTokenizer: one loader for every tokenizer the project reads."""
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(path)
