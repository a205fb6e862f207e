"""ModelConfig: the static description of a Qwen2/Llama decoder, and its mapping to HF config.json.

It is a frozen (hashable) dataclass so that it can be a static argument of ``jax.jit``: every apply
function takes it first, and a new config (not new weights) is what triggers a retrace.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

MODEL_TYPES = ("qwen2", "llama")
DTYPES = ("float32", "bfloat16")
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture + numerics. Field names follow ``config.model.init`` in stepsearch_jax/config.py."""
  model_type: str = "qwen2"
  vocab_size: int = 32000
  hidden_size: int = 256
  intermediate_size: int = 704
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 64
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  attention_bias: bool = True          # q/k/v bias (always on for qwen2; llama also biases o_proj)
  max_position_embeddings: int = 4096
  dtype: str = "float32"               # compute dtype
  param_dtype: str = "float32"
  remat: bool = False                  # jax.checkpoint each layer (training memory)

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"ModelConfig.model_type={self.model_type!r} is not one of {MODEL_TYPES}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is not one of {DTYPES}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be > 0")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def qkv_bias(self) -> bool:
    return self.model_type == "qwen2" or self.attention_bias

  @property
  def o_bias(self) -> bool:
    """Llama's attention_bias also puts a bias on o_proj; Qwen2 never has one."""
    return self.model_type == "llama" and self.attention_bias

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
    """Map a transformers config.json dict; unsupported features fail naming the key."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"config.json model_type={model_type!r}: only {MODEL_TYPES} are supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
    if hf.get("mlp_bias"):
      raise ValueError("config.json mlp_bias=true is not supported")
    if hf.get("use_sliding_window"):
      raise ValueError("config.json use_sliding_window=true is not supported")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for src, params in (("rope_parameters", rope), ("rope_scaling", scaling)):
      kind = params.get("rope_type", params.get("type", "default"))
      if kind != "default":
        raise ValueError(f"config.json {src}.rope_type={kind!r}: only default RoPE is supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
      if key not in hf:
        raise ValueError(f"config.json is missing {key!r}")
    heads = hf["num_attention_heads"]
    fields = dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
    )
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict[str, Any]:
    """A config.json dict that transformers' AutoConfig reads back into the same architecture."""
    hf = dict(
        architectures=[_ARCHITECTURES[self.model_type]],
        model_type=self.model_type,
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim,
        hidden_act="silu",
        rope_theta=self.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        rms_norm_eps=self.rms_norm_eps,
        tie_word_embeddings=self.tie_word_embeddings,
        max_position_embeddings=self.max_position_embeddings,
        initializer_range=0.02,
        use_cache=True,
        dtype=self.param_dtype,
    )
    if self.model_type == "llama":
      hf.update(attention_bias=self.attention_bias, mlp_bias=False)
    else:
      hf.update(use_sliding_window=False)
    return hf
