"""The Flax NNX decoder (Qwen2 / Llama family) and the value model built on its trunk.

One module graph serves both paths: ``Decoder.__call__`` without a cache is the full-sequence forward
(training, log-probs), and with a cache it writes the new keys/values into their slots and attends
over the cache (prefill, decode, appending tool output). Sampler and trainer therefore share every
op except the key/value source, so their log-probabilities agree by construction.

Layers are stored stacked (leading ``layers`` axis, created with ``nnx.vmap``) and run with
``jax.lax.scan`` in the full-sequence forward, which keeps training compile time flat in depth.
The cached forward runs the same blocks unrolled over layers on a per-layer KV cache
(``{'k': L arrays [B, Hkv, Dh, S], 'v': L arrays [B, Hkv, S, Dh]}``) updated in place (donate it): attention then
reads each layer's cache where it lies, in the layout its matmuls consume.

Numerics: matmuls in ``config.dtype``, RMSNorm statistics, RoPE, attention softmax and logits in
float32.

Every parameter's shape, dtype, logical axes and initialiser come from the tables in params.py
(which sharding, checkpoint loading and AOT compilation read without building the model).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from stepsearch_jax.models import params as params_lib
from stepsearch_jax.models.config import ModelConfig
from stepsearch_jax.models.sharding import constrain

_F32 = jnp.float32
_NEG = -1e30  # finite, so fully masked rows (left padding) give a uniform softmax, not NaN


def _param(rngs: nnx.Rngs | None, spec: params_lib.ParamSpec) -> nnx.Param:
  if spec.init == "normal":
    value = 0.02 * jax.random.normal(rngs.params(), spec.shape, _F32)
  elif spec.init == "ones":
    value = jnp.ones(spec.shape, _F32)
  else:
    value = jnp.zeros(spec.shape, _F32)
  # A private metadata key (not flax's out_sharding): flax would otherwise try to resolve the
  # logical names against whatever mesh is active when the model is built.
  return nnx.Param(value.astype(spec.dtype), logical_axes=spec.axes)


def _set_params(module: nnx.Module, rngs: nnx.Rngs | None, specs: dict) -> None:
  for name, spec in specs.items():   # in table order: the order of the rng draws
    setattr(module, name, _param(rngs, spec))


class RMSNorm(nnx.Module):
  def __init__(self, cfg: ModelConfig):
    self.eps = cfg.rms_norm_eps
    _set_params(self, None, params_lib.norm_params(cfg))

  def __call__(self, x):
    x32 = x.astype(_F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rope(x, positions, theta: float):
  """Rotate-half RoPE (HF convention) on [B, T, H, Dh] at integer positions [B, T]."""
  dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=_F32) / dim))
  freqs = positions.astype(_F32)[..., None] * inv_freq           # [B, T, Dh/2]
  cos, sin = jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(_F32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _scores(q, keys, q_idx, scale):
  """float32 scores [B, Hkv, G, T, S] of q over a row's cached keys, slots > q_idx masked."""
  s = keys.shape[3]
  scores = jnp.einsum("bkgtd,bkds->bkgts", q, keys, preferred_element_type=_F32) * scale
  allowed = jnp.arange(s)[None, None, :] <= q_idx[:, :, None]
  return jnp.where(allowed[:, None, None], scores, _NEG)


def _attend(q, keys, values, q_idx, scale):
  """q [B, Hkv, G, T, Dh] over keys [B, Hkv, Dh, S], values [B, Hkv, S, Dh]; query t sees
  slots <= q_idx[b, t]."""
  scores = _scores(q, keys, q_idx, scale)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("bkgts,bksd->bkgtd", probs, values)


_SCORES_CHUNK_BYTES = 2 << 20


def _cached_attention(q, keys, values, q_idx, scale):
  """`_attend`, on CPU in batch chunks whose float32 scores stay cache-resident (~2 MiB).

  A prefill or tool-result append materialises [B, Hkv, G, T, S] scores; on CPU the passes over
  that tensor (mask, softmax) are memory-bound and cost ~3x more than chunks that stay in cache.
  Each row's arithmetic is unchanged. Accelerators (and T=1 decode steps) attend in one piece.
  """
  b, kh, g, t, _ = q.shape
  per_row = kh * g * t * keys.shape[3] * 4
  rows = 1
  while rows * 2 <= b and b % (rows * 2) == 0 and rows * 2 * per_row <= _SCORES_CHUNK_BYTES:
    rows *= 2
  if rows >= b:
    return _attend(q, keys, values, q_idx, scale)

  def chunked(q, keys, values, q_idx):
    def split(x):
      return x.reshape((b // rows, rows) + x.shape[1:])
    out = jax.lax.map(lambda a: _attend(*a, scale), (split(q), split(keys), split(values),
                                                      split(q_idx)))
    return out.reshape(q.shape[:-1] + values.shape[-1:])

  return jax.lax.platform_dependent(
      q, keys, values, q_idx, cpu=chunked,
      default=lambda q, keys, values, q_idx: _attend(q, keys, values, q_idx, scale))


def _attend_with_shared(q, keys, values, q_idx, shared_k, shared_v, scale):
  """`_attend` over [shared prefix ; each row's own slots]: one softmax across both parts.

  shared_k [Hkv, Dh, P] / shared_v [Hkv, P, Dh] are the same for every row, so their scores are
  one matmul with all rows' queries stacked (the prefix is read once, not once per row); every
  query sees the whole prefix. Own slots as in `_attend` (slot i <= q_idx).
  """
  own = _scores(q, keys, q_idx, scale)
  # The prefix part lives head-major, [Hkv, B, G, T, P]: each kv head is then one plain matmul
  # (all rows' queries against the prefix) for scores and for values, and only the small
  # per-query max/sum and outputs change layout, not the [.., P] probabilities.
  def hm(x):
    return jnp.moveaxis(x, 0, 1)    # [B, Hkv, ...] <-> [Hkv, B, ...]
  pre = jnp.einsum("kbgtd,kdp->kbgtp", hm(q), shared_k, preferred_element_type=_F32) * scale
  top = jnp.maximum(own.max(-1, keepdims=True), hm(pre.max(-1, keepdims=True)))
  own, pre = jnp.exp(own - top), jnp.exp(pre - hm(top))
  total = own.sum(-1, keepdims=True) + hm(pre.sum(-1, keepdims=True))
  out = (jnp.einsum("bkgts,bksd->bkgtd", (own / total).astype(q.dtype), values)
         + hm(jnp.einsum("kbgtp,kpd->kbgtd", (pre / hm(total)).astype(q.dtype), shared_v)))
  return out


# Query chunks per row in `_causal_attention` (1 = one dense block). bench/attention.py measures
# them against one dense block (bench/results/attention.md: 1.2-2.7x on the log-prob + gradient
# pass on XLA:CPU, more at longer rows, where smaller score blocks also stay in cache).
QUERY_CHUNKS = 16
_MIN_CHUNK = 64


def _chunk_count(t: int) -> int:
  """Query chunks for a row of t tokens: the most n <= QUERY_CHUNKS dividing t with chunks of at
  least _MIN_CHUNK tokens (smaller chunks cost more in per-op overhead than they skip)."""
  for n in range(min(QUERY_CHUNKS, t // _MIN_CHUNK), 1, -1):
    if t % n == 0:
      return n
  return 1


# One query-key pair of `_causal_attention` (its score and value multiply-adds over all heads,
# softmax and masks included) against the same count of weight-matmul multiply-adds, in the
# no-cache pass on XLA:CPU. Fitted to bench/packing.py's wide mix (bench/results/packing_wide):
# rows of 1024 against rows of 640 won at the 20M model and lost at the demo policy (d=128).
ATTENTION_PAIR_WEIGHT = 3.5


def row_cost(cfg, t: int, r: int) -> float:
  """Relative cost of the no-cache pass (log-probs, values and their gradients) over one row of t
  tokens with r response slots: the weight matmuls of t tokens, the vocabulary projection of the
  r slots read (models.api), and the query-key pairs `_causal_attention` computes (blocks above
  the diagonal skipped), weighted by ATTENTION_PAIR_WEIGHT. The packer chooses its row length
  with it (ppo/batch.pack_batch): longer rows pack tighter, but attention grows with their length."""
  d, hd = cfg.hidden_size, cfg.head_dim
  per_token = cfg.num_layers * (d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
                                + 3 * d * cfg.intermediate_size)
  n = _chunk_count(t)
  pairs = (t // n) ** 2 * n * (n + 1) // 2
  per_pair = 2 * cfg.num_layers * cfg.num_heads * hd
  return float(t * per_token + r * d * cfg.vocab_size + ATTENTION_PAIR_WEIGHT * pairs * per_pair)


def _causal_attention(qg, k, v, seg, scale):
  """Causal self-attention over a row's own tokens: qg [B, T, Hkv, G, Dh], k / v [B, T, Hkv, Dh],
  seg [B, T] segment ids (0 = padding; a 0/1 mask is one segment per row) or None.

  The queries go in n chunks (`_chunk_count`), chunk i against keys [0, end of chunk i) only: the
  blocks above the diagonal, all masked, are never computed, which skips (n - 1) / 2n of the
  score and value matmuls, of the float32 softmax passes over them and of their gradients (XLA
  computes a masked dense block in full, on every backend). A query sees the earlier
  keys of its own segment, so packed trajectories never see each other; padding queries (id 0)
  keep the plain key mask, so for 0/1 masks nothing changes.
  """
  b, t = qg.shape[:2]
  n = _chunk_count(t)
  c = t // n
  if seg is not None:
    seg = seg.astype(jnp.int32)
  outs = []
  for i in range(n):
    lo, hi = i * c, (i + 1) * c
    q_pos = jnp.arange(lo, hi)
    allowed = jnp.arange(hi)[None, None, :] <= q_pos[None, :, None]
    if seg is not None:
      sq, sk = seg[:, lo:hi, None], seg[:, None, :hi]
      allowed = allowed & (sk > 0) & ((sk == sq) | (sq == 0))
    scores = jnp.einsum("btkgd,bskd->bkgts", qg[:, lo:hi], k[:, :hi],
                        preferred_element_type=_F32) * scale
    scores = jnp.where(allowed[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(qg.dtype)
    outs.append(jnp.einsum("bkgts,bskd->btkgd", probs, v[:, :hi]))
  return outs[0] if n == 1 else jnp.concatenate(outs, axis=1)


class Attention(nnx.Module):
  """Grouped-query attention; q head h reads kv head h // (H / Hkv), as HF's repeat_kv."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    _set_params(self, rngs, params_lib.attention_params(cfg))

  def _proj(self, x, name):
    dt = x.dtype
    y = jnp.einsum("btd,dhk->bthk", x, getattr(self, name + "_kernel")[...].astype(dt))
    if self.cfg.qkv_bias:
      y = y + getattr(self, name + "_bias")[...].astype(dt)
    return y

  def __call__(self, x, positions, key_valid, cache):
    """x [B,T,D]. cache None: keys are these T tokens (causal + key_valid mask).

    cache (k, v, index), this layer's keys [B, Hkv, Dh, S] and values [B, Hkv, S, Dh]: write the T new keys at slots
    index[b]..index[b]+T-1 and attend over all S slots, query slot i seeing slots <= i.
    """
    cfg, dt = self.cfg, x.dtype
    b, t, _ = x.shape
    q = rope(self._proj(x, "q"), positions, cfg.rope_theta)
    k = rope(self._proj(x, "k"), positions, cfg.rope_theta)
    v = self._proj(x, "v")
    q = constrain(q, "batch", "length", "heads", "head_dim")
    groups = cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)
    if cache is None:
      out = _causal_attention(qg, k, v, key_valid, cfg.head_dim ** -0.5)
      out = out.reshape(b, t, cfg.num_heads, cfg.head_dim)
      new_cache = None
    else:
      k_cache, v_cache, index = cache[:3]
      # One scatter into this layer's cache (in place when donated). Writes past the cache end
      # are dropped, never clamped onto other slots.
      rows = jnp.arange(b)[:, None]
      cols = index[:, None] + jnp.arange(t)[None, :]
      k_cache = k_cache.at[rows, :, :, cols].set(k.astype(k_cache.dtype), mode="drop")
      v_cache = v_cache.at[rows, :, cols].set(v.astype(v_cache.dtype), mode="drop")
      # Keys [B, Hkv, Dh, S] and values [B, Hkv, S, Dh] are the layouts the two attention matmuls
      # consume with (B, Hkv) as batch dims, so the cache is read in place: no per-step transpose
      # or copy of it (only the small query/output tensors are transposed).
      q_idx = index[:, None] + jnp.arange(t)[None]
      if len(cache) == 5:     # a prefix shared by every row, read once (see forward_cached)
        out = _attend_with_shared(qg.transpose(0, 2, 3, 1, 4), k_cache.astype(dt),
                                  v_cache.astype(dt), q_idx, cache[3].astype(dt),
                                  cache[4].astype(dt), cfg.head_dim ** -0.5)
      else:
        out = _cached_attention(qg.transpose(0, 2, 3, 1, 4), k_cache.astype(dt),
                                v_cache.astype(dt), q_idx, cfg.head_dim ** -0.5)
      out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.num_heads, cfg.head_dim)
      new_cache = (k_cache, v_cache)
    y = jnp.einsum("bthk,hkd->btd", out, self.o_kernel[...].astype(dt))
    if cfg.o_bias:
      y = y + self.o_bias[...].astype(dt)
    return y, new_cache


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    _set_params(self, rngs, params_lib.mlp_params(cfg))

  def __call__(self, x):
    dt = x.dtype
    gate = x @ self.gate_kernel[...].astype(dt)
    up = x @ self.up_kernel[...].astype(dt)
    hidden = constrain(jax.nn.silu(gate) * up, "batch", "length", "mlp")
    return hidden @ self.down_kernel[...].astype(dt)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, key_valid, cache):
    y, cache = self.attn(self.attn_norm(x), positions, key_valid, cache)
    x = x + y
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, "batch", "length", "embed"), cache


class Decoder(nnx.Module):
  """Token embedding, stacked blocks, final norm, (tied or separate) LM head."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = _param(rngs, params_lib.embedding_param(cfg))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers",
                                                  "logical_axes": "layers"})
    def make_layers(rngs):
      return Block(cfg, rngs)
    self.layers = make_layers(rngs)
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, params_lib.lm_head_param(cfg))

  def __call__(self, tokens, positions, key_valid=None, cache=None, cache_index=None,
               layer_params=None, shared=None):
    """Returns (final-normed hidden [B,T,D], new cache or None).

    layer_params (cached path only): the layers' params already split per layer (pure dicts, see
    api.split_layers), so that a caller looping over decode steps slices them once, not per step.
    """
    cfg = self.cfg
    # Gather from a table whose vocab axis is whole on every device but whose embed axis stays
    # sharded over fsdp: each device gathers its D/fsdp columns of the looked-up rows (no
    # communication), then the result is resharded to batch. A vocab-sharded table has no
    # efficient SPMD gather; a fully replicated one (as before) cost every chip the whole table
    # in float32 plus a bf16 copy (1.9 GB for Qwen2.5-3B: the decode step's largest temporary).
    table = constrain(self.embedding[...], None, "embed")
    x = table.astype(cfg.compute_dtype)[tokens]
    x = constrain(x, "batch", "length", "embed")
    graphdef, layer_state = nnx.split(self.layers)
    if cache is None:
      def body(x, state):
        x, _ = nnx.merge(graphdef, state)(x, positions, key_valid, None)
        return x, None

      if cfg.remat:
        body = jax.checkpoint(body, prevent_cse=False)
      x, _ = jax.lax.scan(body, x, layer_state)
      return self.final_norm(x), None
    # Cached path: the same blocks, unrolled over layers, each with its own cache arrays. (A
    # stacked [L, ...] cache in a layer scan made XLA copy the layer's cache out of the stack,
    # and transpose it, on every step: most of the decode time on CPU.)
    if len(cache["k"]) != cfg.num_layers:
      raise ValueError(f"cache has {len(cache['k'])} layers, the model {cfg.num_layers}")
    ks, vs = list(cache["k"]), list(cache["v"])
    for layer in range(cfg.num_layers):
      if layer_params is not None:
        block = nnx.merge(graphdef, layer_params[layer])
      else:
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=layer: a[i], layer_state))
      layer_cache = (ks[layer], vs[layer], cache_index)
      if shared is not None:
        layer_cache += (shared["k"][layer], shared["v"][layer])
      x, (ks[layer], vs[layer]) = block(x, positions, key_valid, layer_cache)
    return self.final_norm(x), {"k": tuple(ks), "v": tuple(vs)}

  def logits(self, hidden):
    dt = hidden.dtype
    if self.cfg.tie_word_embeddings:
      out = jnp.einsum("...d,vd->...v", hidden, self.embedding[...].astype(dt),
                       preferred_element_type=_F32)
    else:
      out = jnp.einsum("...d,dv->...v", hidden, self.lm_head[...].astype(dt),
                       preferred_element_type=_F32)
    return out.astype(_F32)


class ValueHead(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    _set_params(self, rngs, params_lib.value_head_params(cfg))

  def __call__(self, hidden):
    return hidden.astype(_F32) @ self.kernel[...] + self.bias[...]


class ValueModel(nnx.Module):
  """The policy's trunk plus a scalar head (verl's critic: value of every position)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.trunk = Decoder(cfg, rngs)
    self.head = ValueHead(cfg, rngs)


# ----------------------------------------------------------------------------------------------
# Pure-dict plumbing: graph definitions are built once per config (abstractly, no FLOPs).


@functools.lru_cache(maxsize=None)
def graph(config: ModelConfig, value: bool = False):
  """(graphdef, abstract state) of the policy (or value) model for this config."""
  cls = ValueModel if value else Decoder
  abstract = nnx.eval_shape(lambda: cls(config, nnx.Rngs(0)))
  return nnx.split(abstract)


def merge(config: ModelConfig, params: Any, value: bool = False):
  """An NNX module view of a pure-dict params pytree (works on tracers inside jit)."""
  graphdef, _ = graph(config, value)
  return nnx.merge(graphdef, params)

