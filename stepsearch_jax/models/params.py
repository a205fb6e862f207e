"""Parameter layout of the policy and value models: every parameter's shape, dtype, logical axis
names and initialiser, from the ModelConfig alone.

decoder.py builds its NNX parameters from these tables; sharding, checkpoint loading and AOT
compilation read them without building (or importing) the model, so sharding.py, like MaxText's
sharding utilities, takes logical names and never imports the model. The nesting is that of the
pure-dict params (``nnx.to_pure_dict`` of the model state); tests/test_model_sharding.py checks it
against the built model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from stepsearch_jax.models.config import ModelConfig


class ParamSpec(NamedTuple):
  shape: tuple[int, ...]
  dtype: Any
  axes: tuple[str, ...]          # logical axis names (sharding.RULES), one per dimension
  init: str = "normal"           # normal(0.02) | ones | zeros


def norm_params(cfg: ModelConfig) -> dict[str, ParamSpec]:
  return {"scale": ParamSpec((cfg.hidden_size,), cfg.weight_dtype, ("embed",), "ones")}


def attention_params(cfg: ModelConfig) -> dict[str, ParamSpec]:
  """q/k/v/o kernels, then the biases the architecture has (creation order = rng draw order)."""
  d, h, k, dh, pd = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.weight_dtype)
  out = {"q_kernel": ParamSpec((d, h, dh), pd, ("embed", "heads", "head_dim")),
         "k_kernel": ParamSpec((d, k, dh), pd, ("embed", "kv_heads", "head_dim")),
         "v_kernel": ParamSpec((d, k, dh), pd, ("embed", "kv_heads", "head_dim")),
         "o_kernel": ParamSpec((h, dh, d), pd, ("heads", "head_dim", "embed"))}
  if cfg.qkv_bias:
    out.update(q_bias=ParamSpec((h, dh), pd, ("heads", "head_dim"), "zeros"),
               k_bias=ParamSpec((k, dh), pd, ("kv_heads", "head_dim"), "zeros"),
               v_bias=ParamSpec((k, dh), pd, ("kv_heads", "head_dim"), "zeros"))
  if cfg.o_bias:
    out["o_bias"] = ParamSpec((d,), pd, ("embed",), "zeros")
  return out


def mlp_params(cfg: ModelConfig) -> dict[str, ParamSpec]:
  d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.weight_dtype
  return {"gate_kernel": ParamSpec((d, f), pd, ("embed", "mlp")),
          "up_kernel": ParamSpec((d, f), pd, ("embed", "mlp")),
          "down_kernel": ParamSpec((f, d), pd, ("mlp", "embed"))}


def embedding_param(cfg: ModelConfig) -> ParamSpec:
  return ParamSpec((cfg.vocab_size, cfg.hidden_size), cfg.weight_dtype, ("vocab", "embed"))


def lm_head_param(cfg: ModelConfig) -> ParamSpec:
  return ParamSpec((cfg.hidden_size, cfg.vocab_size), cfg.weight_dtype, ("embed", "vocab"))


def value_head_params(cfg: ModelConfig) -> dict[str, ParamSpec]:
  return {"kernel": ParamSpec((cfg.hidden_size,), jnp.float32, ("embed",)),
          "bias": ParamSpec((), jnp.float32, (), "zeros")}


def _stacked(tree: Any, num_layers: int) -> Any:
  """The layer scan's stacking (nnx.vmap in decoder.Decoder): a leading 'layers' axis."""
  return jax.tree.map(
      lambda s: s._replace(shape=(num_layers,) + s.shape, axes=("layers",) + s.axes),
      tree, is_leaf=lambda x: isinstance(x, ParamSpec))


def layout(cfg: ModelConfig, value: bool = False) -> dict:
  """Pure-dict pytree of ParamSpec: the policy's params, or the value model's {'trunk', 'head'}."""
  block = {"attn_norm": norm_params(cfg), "attn": attention_params(cfg),
           "mlp_norm": norm_params(cfg), "mlp": mlp_params(cfg)}
  tree = {"embedding": embedding_param(cfg), "layers": _stacked(block, cfg.num_layers),
          "final_norm": norm_params(cfg)}
  if not cfg.tie_word_embeddings:
    tree["lm_head"] = lm_head_param(cfg)
  return {"trunk": tree, "head": value_head_params(cfg)} if value else tree


def _leaves(fn, cfg: ModelConfig, value: bool) -> dict:
  return jax.tree.map(fn, layout(cfg, value), is_leaf=lambda x: isinstance(x, ParamSpec))


def logical_axes(config: ModelConfig, value: bool = False) -> dict:
  """Pure-dict pytree (same structure as params) of logical axis-name tuples."""
  return _leaves(lambda s: s.axes, config, value)


def param_shapes(config: ModelConfig, value: bool = False) -> dict:
  """Pure-dict pytree of jax.ShapeDtypeStruct for the params."""
  return _leaves(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), config, value)
