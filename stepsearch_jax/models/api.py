"""The functional model API on pure-dict params: init, full-sequence forward, KV-cache forward, value.

Every function takes the (hashable) ModelConfig first and is wrapped in ``jax.jit`` with the config
static, so eager callers get compiled code and callers inside their own ``jax.jit`` simply inline it
(no per-call retrace: shapes and config are the cache key).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from stepsearch_jax.models import decoder
from stepsearch_jax.models.config import ModelConfig
from stepsearch_jax.models.params import param_shapes
from stepsearch_jax.models.sharding import constrain, param_shardings

Params = Any


def default_positions(attention_mask):
  """clip(cumsum(mask) - 1, 0): real tokens get 0, 1, 2, ... whatever the padding side."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def segment_positions(segment_ids):
  """Each token's position within its segment (a run of equal non-zero ids), 0 on padding.

  For a 0/1 mask with one run per row this equals `default_positions` on every real token; for a
  packed row (several trajectories, ids 1, 2, ...) each trajectory starts again at 0.
  """
  seg = segment_ids.astype(jnp.int32)
  col = jnp.broadcast_to(jnp.arange(seg.shape[-1], dtype=jnp.int32), seg.shape)
  prev = jnp.concatenate([jnp.full(seg.shape[:-1] + (1,), -1, jnp.int32), seg[..., :-1]], -1)
  start = jax.lax.cummax(jnp.where(seg != prev, col, 0), axis=seg.ndim - 1)
  return jnp.where(seg > 0, col - start, 0)


@functools.partial(jax.jit, static_argnames=("config", "value"))
def _init(config: ModelConfig, rng, value: bool):
  cls = decoder.ValueModel if value else decoder.Decoder
  return nnx.to_pure_dict(nnx.state(cls(config, nnx.Rngs(params=rng))))


def init_params(config: ModelConfig, rng: jax.Array, *, mesh: Mesh | None = None) -> Params:
  """Random init (normal 0.02, HF's initializer_range); sharded at creation when a mesh is given."""
  if mesh is None:
    return _init(config, rng, False)
  out = param_shardings(config, param_shapes(config), mesh)
  return jax.jit(_init, static_argnums=(0, 2), out_shardings=out)(config, rng, False)


def _hidden(config, params, tokens, attention_mask, positions):
  if positions is None:
    if attention_mask is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    else:
      positions = default_positions(attention_mask)
  model = decoder.merge(config, params)
  hidden, _ = model(tokens, positions, attention_mask)
  return hidden


@functools.partial(jax.jit, static_argnames=("config",))
def hidden_states(config: ModelConfig, params: Params, tokens: jax.Array,
                  attention_mask: jax.Array | None = None,
                  positions: jax.Array | None = None) -> jax.Array:
  """Final-normed hidden states [B, T, D] in the compute dtype."""
  return _hidden(config, params, tokens, attention_mask, positions)


@functools.partial(jax.jit, static_argnames=("config",))
def logits_from_hidden(config: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
  """float32 logits [..., V] from hidden states (lets the trainer chunk the vocab projection)."""
  logits = decoder.merge(config, params).logits(hidden)
  return constrain(logits, "batch", "length", "vocab") if logits.ndim == 3 else logits


@functools.partial(jax.jit, static_argnames=("config",))
def apply_lm(config: ModelConfig, params: Params, tokens: jax.Array,
             attention_mask: jax.Array | None = None,
             positions: jax.Array | None = None) -> jax.Array:
  """float32 logits [B, T, V]; causal attention that also masks padded keys (mask 0)."""
  hidden = _hidden(config, params, tokens, attention_mask, positions)
  return logits_from_hidden(config, params, hidden)


# Sequence axis of each per-layer cache array: keys are stored [B, Hkv, Dh, S] (transposed, so the
# decode step's q.k product is a plain matmul over a contiguous [Dh, S] block; stored [S, Dh] it
# was ~5x slower on CPU), values [B, Hkv, S, Dh] (the p.v product's natural layout).
CACHE_SEQ_AXIS = {"k": 3, "v": 2}


def init_cache(config: ModelConfig, batch: int, max_len: int) -> dict[str, tuple[jax.Array, ...]]:
  """Zeroed KV cache: {'k': per layer [B, Hkv, Dh, max_len], 'v': per layer [B, Hkv, max_len, Dh]}.

  Per-layer arrays in the attention's own layouts let the cached forward read and write each
  layer's keys/values in place (see decoder.Decoder); `CACHE_SEQ_AXIS` names the length axis.
  """
  b, h, d = batch, config.num_kv_heads, config.head_dim
  shapes = {"k": (b, h, d, max_len), "v": (b, h, max_len, d)}
  return {name: tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.num_layers))
          for name, shape in shapes.items()}


def _window_index(name: str, window: int, rows, start: int = 0):
  index = [slice(None)] * 4
  index[CACHE_SEQ_AXIS[name]] = slice(start, window)
  if rows is not None:
    index[0] = rows
  return tuple(index)


def cache_window(cache: dict, window: int, rows: jax.Array | None = None, start: int = 0) -> dict:
  """Slots start..window-1 of every row (or of rows `rows`; a scalar drops the row axis) of a
  cache (a copy)."""
  return {name: tuple(c[_window_index(name, window, rows, start)] for c in layers)
          for name, layers in cache.items()}


def cache_put_window(cache: dict, sub: dict, rows: jax.Array | None = None, start: int = 0) -> dict:
  """Write a `cache_window(..., start=start)` result back (in place when the cache is donated)."""
  def put(name, c, s):
    axis = CACHE_SEQ_AXIS[name]
    if rows is None:
      return jax.lax.dynamic_update_slice(c, s, tuple(start if i == axis else 0
                                                      for i in range(c.ndim)))
    return c.at[_window_index(name, start + s.shape[axis], rows, start)].set(s)
  return {name: tuple(put(name, c, s) for c, s in zip(cache[name], sub[name])) for name in cache}


def split_layers(config: ModelConfig, params: Params) -> tuple:
  """The stacked layer params as one pure dict per layer (pass to `forward_cached(layers=...)`).

  A loop of decode steps inside one program should split them once, outside the loop: XLA does
  not hoist the per-layer slices of loop-invariant weights (a full weight copy per step on CPU).
  """
  return tuple(jax.tree.map(lambda a, i=i: a[i], params["layers"])
               for i in range(config.num_layers))


@functools.partial(jax.jit, static_argnames=("config", "last_only"), donate_argnames=("cache",))
def forward_cached(config: ModelConfig, params: Params, tokens: jax.Array, cache: dict,
                   cache_index: jax.Array, *, last_only: bool = False,
                   last_index: jax.Array | None = None, layers: tuple | None = None,
                   shared: dict | None = None):
  """Write T tokens per row at slots cache_index[b].. and return (float32 logits, new cache).

  RoPE positions are the slot indices; a query at slot i attends to slots 0..i of its row (stale
  slots past i are masked, so padded prefill buckets are harmless). Writes past max_len are
  dropped (not clamped), so keep cache_index + T <= max_len for the tokens that matter.
  With last_only, logits are [B, V] at position last_index[b] (default T-1) of the T new tokens.
  layers: optional `split_layers(config, params)` (same values; saves per-call weight slicing).
  shared: optional {'k', 'v'} per-layer keys [Hkv, Dh, P] / values [Hkv, P, Dh] of a prefix that
  every row has at positions 0..P-1 (`cache_window(cache, P, rows=slot)` of one row holding it);
  `cache` then holds each row's slots from P on (cache slot i is position P + i), and attention
  reads the prefix once for all rows instead of once per row.
  """
  b, t = tokens.shape
  cache_index = cache_index.astype(jnp.int32)
  offset = 0 if shared is None else shared["k"][0].shape[-1]
  positions = offset + cache_index[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  model = decoder.merge(config, params)
  hidden, new_cache = model(tokens, positions, None, cache, cache_index, layer_params=layers,
                            shared=shared)
  if last_only:
    idx = jnp.full((b,), t - 1, jnp.int32) if last_index is None else last_index.astype(jnp.int32)
    hidden = hidden[jnp.arange(b), idx]
  return model.logits(hidden), new_cache


@functools.partial(jax.jit, static_argnames=("config",))
def _copy_trunk(config, vparams, policy_params):
  del config
  return {"trunk": jax.tree.map(lambda p, v: p.astype(v.dtype), policy_params, vparams["trunk"]),
          "head": vparams["head"]}


def init_value_params(config: ModelConfig, rng: jax.Array, policy_params: Params | None = None,
                      *, mesh: Mesh | None = None) -> Params:
  """{'trunk': policy-shaped params, 'head': {'kernel' [D], 'bias' []}}; trunk copied if given."""
  if mesh is None:
    vparams = _init(config, rng, True)
  else:
    out = param_shardings(config, param_shapes(config, value=True), mesh)
    vparams = jax.jit(_init, static_argnums=(0, 2), out_shardings=out)(config, rng, True)
  if policy_params is not None:
    got = jax.tree_util.tree_flatten_with_path(policy_params)[0]
    want = jax.tree_util.tree_flatten_with_path(vparams["trunk"])[0]
    if [k for k, _ in got] != [k for k, _ in want]:
      raise ValueError("policy_params do not have the structure of this config's policy params")
    for (path, p), (_, v) in zip(got, want):
      if p.shape != v.shape:
        raise ValueError(f"policy param {jax.tree_util.keystr(path)} has shape {p.shape}, "
                         f"expected {v.shape}")
    vparams = _copy_trunk(config, vparams, policy_params)
  return vparams


@functools.partial(jax.jit, static_argnames=("config",))
def apply_value(config: ModelConfig, vparams: Params, tokens: jax.Array,
                attention_mask: jax.Array | None = None,
                positions: jax.Array | None = None) -> jax.Array:
  """float32 values [B, T]: the scalar head on the hidden state at each position."""
  hidden = _hidden(config, vparams["trunk"], tokens, attention_mask, positions)
  model = decoder.merge(config, vparams, value=True)
  return model.head(hidden)
