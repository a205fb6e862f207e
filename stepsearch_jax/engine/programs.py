"""The engine's device programs: pure functions of (Spec, params, DecodeState, a struct of rows).

Every program the engine runs is one function here; `engine.py` only places host values and calls
them. A program's static choices (cache window, loop length, shared-prefix offset, dense rows) are
fields of its argument struct marked ``pytree_node=False``, so they are part of the jit cache key
without ``static_argnums``; `Programs` compiles each function once per such key, with the decode
state's shardings as output shardings (see `placement.py`).

Decode state, per slot (row of the KV cache):
  ``tokens``  the PENDING token: sampled but not yet emitted nor written to the cache;
  ``pos``     the cache position where the pending token will be written (= context length);
  ``active``  the slot is decoding (inserted and not yet stopped).
A step EMITS each active slot's pending token (with its logprob), checks the stop rules on it (a
stop sequence ending here, an EOS id, or the slot's token cap), writes it into the cache at
``pos`` in one batched forward pass, and samples the next pending token from that pass's logits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from stepsearch_jax import models
from stepsearch_jax.engine import sampling as sampling_lib


@dataclasses.dataclass(frozen=True)
class Spec:
  """What every program is specialised on (hashable; fixed for an engine's life)."""
  config: models.ModelConfig
  num_slots: int
  cache_len: int
  eos_ids: tuple[int, ...]
  stops: tuple[tuple[int, ...], ...]     # right-aligned stop sequences, -1 = wildcard

  @property
  def stop_width(self) -> int:
    return len(self.stops[0]) if self.stops else 1


@flax.struct.dataclass
class Prefix:
  """A prefilled request (batch 1): its cache, first sampled token and true length."""
  cache: Any
  token: jax.Array        # [1] int32
  logprob: jax.Array      # [1] float32
  length: jax.Array       # [1] int32
  max_new: jax.Array      # [1] int32 token cap
  temperature: jax.Array  # [1]
  top_p: jax.Array
  top_k: jax.Array
  key: jax.Array          # [1, 2] uint32


@flax.struct.dataclass
class DecodeState:
  cache: Any
  tokens: jax.Array       # [B] pending token
  logprobs: jax.Array     # [B] its logprob
  pos: jax.Array          # [B] where it goes in the cache
  gen_len: jax.Array      # [B] tokens emitted since the last insert/append
  max_new: jax.Array      # [B] cap on gen_len
  active: jax.Array       # [B] bool
  tail: jax.Array         # [B, K] last K emitted tokens (stop-sequence window), -1 = none
  temperature: jax.Array  # [B]
  top_p: jax.Array        # [B]
  top_k: jax.Array        # [B] int32
  keys: jax.Array         # [B, 2] uint32


@flax.struct.dataclass
class Rows:
  """Rows to (re)start: `append` prefills `tokens` at `start` into slots `slots`, then decodes.

  dense: `tokens`/`start`/`lengths` have one row per slot (slots not appended to start at
  `window`, so their writes are dropped) and the cache window is sliced in place; otherwise
  they have one row per entry of `slots`, whose caches are gathered and scattered back.
  """
  slots: jax.Array        # [R] int32 (padding repeats row 0, which writes identical values)
  tokens: jax.Array       # [R or B, W] int32
  start: jax.Array        # [R or B] int32
  lengths: jax.Array      # [R or B] int32
  max_new: jax.Array      # [R] int32
  temperature: jax.Array  # [R] float32
  top_p: jax.Array        # [R] float32
  top_k: jax.Array        # [R] int32
  keys: jax.Array         # [R, 2] uint32
  window: int = flax.struct.field(pytree_node=False, default=0)
  dense: bool = flax.struct.field(pytree_node=False, default=False)


@flax.struct.dataclass
class Block:
  """One decode block: up to `n_steps` (<= `steps`) steps on the first `window` cache slots.

  rows: the slots to decode (gathered), or None for every slot. offset > 0: every active row
  holds the same first `offset` positions as slot `shared_src`, read once for all rows.
  """
  n_steps: jax.Array                      # [] int32
  rows: jax.Array | None = None           # [R] int32
  shared_src: jax.Array | None = None     # [] int32
  window: int = flax.struct.field(pytree_node=False, default=128)
  steps: int = flax.struct.field(pytree_node=False, default=8)
  offset: int = flax.struct.field(pytree_node=False, default=0)
  # the half-width straggler loop; off when slots are sharded (see Placement.slot_shards)
  compact: bool = flax.struct.field(pytree_node=False, default=True)


# ------------------------------------------------------------------------------- one decode step
def _stop_hit(spec: Spec, tail: jax.Array) -> jax.Array:
  if not spec.stops:
    return jnp.zeros(tail.shape[:1], bool)
  stops = jnp.asarray(spec.stops, jnp.int32)                # [S, K]
  match = (stops[None] == -1) | (tail[:, None, :] == stops[None])
  return jnp.any(jnp.all(match, axis=-1), axis=-1)


def step(spec: Spec, params, state: DecodeState, cache, limit: int, layers=None, shared=None):
  """One decode step over `cache` (the full cache or a window of its first `limit` slots; with
  `shared`, a prefix of P positions every active row has, the window starts at position P).

  Inactive rows write nothing (their write index is `limit`, which the scatter drops), so a
  window need only cover the active rows' positions.
  """
  offset = 0 if shared is None else shared["k"][0].shape[-1]
  emit, emit_lp, valid = state.tokens, state.logprobs, state.active
  gen_len = state.gen_len + valid.astype(jnp.int32)
  shifted = jnp.concatenate([state.tail[:, 1:], emit[:, None]], axis=1)
  tail = jnp.where(valid[:, None], shifted, state.tail)
  is_eos = jnp.isin(emit, jnp.asarray(spec.eos_ids, jnp.int32))
  stopped = valid & (_stop_hit(spec, tail) | is_eos | (gen_len >= state.max_new))
  write_pos = jnp.where(valid, jnp.minimum(state.pos - offset, limit - 1), limit)
  logits, cache = models.forward_cached(spec.config, params, emit[:, None], cache,
                                        write_pos, last_only=True, layers=layers, shared=shared)
  nxt, nxt_lp = sampling_lib.sample(logits, state.keys, state.pos + 1, state.temperature,
                                    state.top_p, state.top_k)
  active = valid & ~stopped
  new_state = state.replace(
      cache=None, tokens=jnp.where(active, nxt, emit),
      logprobs=jnp.where(active, nxt_lp, emit_lp),
      pos=state.pos + (valid & ~is_eos).astype(jnp.int32), gen_len=gen_len, active=active,
      tail=tail)
  return new_state, cache, (emit, valid, gen_len, emit_lp, stopped)


def generate(spec: Spec, params, state: DecodeState):
  """JetStream's generate: one step over the whole cache -> (state, [B, 3] data, logprobs, stopped)."""
  new_state, cache, (emit, valid, gen_len, emit_lp, stopped) = step(
      spec, params, state, state.cache, spec.cache_len)
  data = jnp.stack([emit, valid.astype(jnp.int32), gen_len], axis=1)
  return new_state.replace(cache=cache), data, emit_lp, stopped


def decode_block(spec: Spec, params, state: DecodeState, blk: Block):
  """Up to `blk.n_steps` decode steps in one program on a window of the first `blk.window` slots.

  Attention, the cache write and the softmax then cost O(window) instead of O(cache_len), and
  the host pays one dispatch and one small transfer per block instead of per token. The loop
  ends early once no row is active; once at most half the rows are (b >= 4), it goes on over
  those rows only (`narrow`). Outputs are [steps, B]; rows after a stop report valid=0.
  With `blk.rows`, only those rows are gathered and decoded (outputs [steps, len(rows)]);
  repeated rows compute and write back identical values.
  """
  full, rows, offset, steps = state, blk.rows, blk.offset, blk.steps
  if rows is not None:
    state = jax.tree_util.tree_map(lambda x: x[rows], state.replace(cache=None))
  win = models.cache_window(full.cache, blk.window, rows, start=offset)
  shared = models.cache_window(full.cache, offset, blk.shared_src) if offset else None
  b = state.tokens.shape[0]
  layers = models.split_layers(spec.config, params)   # once per block, not per step
  bufs = (jnp.zeros((steps, b), jnp.int32), jnp.zeros((steps, b), bool),
          jnp.zeros((steps, b), jnp.float32), jnp.zeros((steps, b), bool))
  compact = blk.compact and b >= 4

  def more(carry):
    i, st, _, _ = carry
    return (i < blk.n_steps) & jnp.any(st.active)

  def wide(carry):   # with compaction, the all-row loop ends once at most half the rows decode
    go = more(carry)
    return go & (jnp.sum(carry[1].active.astype(jnp.int32)) * 2 > b) if compact else go

  def body(cols):
    def run(carry):
      i, st, win, bufs = carry
      # The barrier keeps the weights' FSDP all-gathers inside the loop, one layer at a time:
      # hoisted out of it (they are loop-invariant), every layer's gathered weights would be live
      # at once (11 GB per chip for Qwen2.5-3B on fsdp=16).
      p, lay = jax.lax.optimization_barrier((params, layers))
      st, win, (emit, valid, _, lp, stopped) = step(spec, p, st, win, blk.window - offset,
                                                    lay, shared)
      bufs = tuple(buf.at[i, cols].set(x) for buf, x in zip(bufs, (emit, valid, lp, stopped)))
      return i + 1, st, win, bufs
    return run

  carry = jax.lax.while_loop(
      wide, body(slice(None)), (jnp.zeros((), jnp.int32), state.replace(cache=None), win, bufs))
  if compact:
    # The stragglers (<= b/2 rows; inactive rows pad, they neither write nor change) go on in a
    # half-width loop: a turn's tail of a few long answers stops costing a full batch per step.
    def narrow(carry):
      i, st, win, bufs = carry
      idx = jnp.argsort(~st.active, stable=True)[:b // 2]
      sub = jax.tree_util.tree_map(lambda x: x[idx], (st, win))
      i, sub_st, sub_win, bufs = jax.lax.while_loop(more, body(idx), (i, *sub, bufs))
      st, win = jax.tree_util.tree_map(lambda f, x: f.at[idx].set(x), (st, win),
                                       (sub_st, sub_win))
      return i, st, win, bufs
    carry = jax.lax.cond(more(carry), narrow, lambda c: c, carry)
  n, st, win, bufs = carry
  cache = models.cache_put_window(full.cache, win, rows, start=offset)
  if rows is not None:
    st = jax.tree_util.tree_map(lambda f, x: f.at[rows].set(x), full.replace(cache=None), st)
  return st.replace(cache=cache), n, bufs


# ------------------------------------------------------------------------------- prefill / rows
def prefill(spec: Spec, params, tokens, true_length, max_new, temperature, top_p, top_k, key):
  cache = models.init_cache(spec.config, 1, tokens.shape[1])
  logits, cache = models.forward_cached(spec.config, params, tokens, cache,
                                        jnp.zeros((1,), jnp.int32), last_only=True,
                                        last_index=true_length - 1)
  tok, lp = sampling_lib.sample(logits, key, true_length, temperature, top_p, top_k)
  return Prefix(cache=cache, token=tok, logprob=lp, length=true_length, max_new=max_new,
                temperature=temperature, top_p=top_p, top_k=top_k, key=key)


def _set_rows(state, cache, rows, tok, lp, pos, max_new, temperature, top_p, top_k, keys):
  return state.replace(
      cache=cache, tokens=state.tokens.at[rows].set(tok), logprobs=state.logprobs.at[rows].set(lp),
      pos=state.pos.at[rows].set(pos), gen_len=state.gen_len.at[rows].set(0),
      max_new=state.max_new.at[rows].set(max_new), active=state.active.at[rows].set(True),
      tail=state.tail.at[rows].set(-1), temperature=state.temperature.at[rows].set(temperature),
      top_p=state.top_p.at[rows].set(top_p), top_k=state.top_k.at[rows].set(top_k),
      keys=state.keys.at[rows].set(keys))


def insert(spec: Spec, prefix: Prefix, state: DecodeState, slot):
  del spec
  def put(big, small):
    return jax.lax.dynamic_update_slice(big, small.astype(big.dtype),
                                        (slot,) + (0,) * (big.ndim - 1))
  cache = jax.tree_util.tree_map(put, state.cache, prefix.cache)
  return _set_rows(state, cache, slot[None], prefix.token, prefix.logprob, prefix.length,
                   prefix.max_new, prefix.temperature, prefix.top_p, prefix.top_k, prefix.key)


def append(spec: Spec, params, state: DecodeState, r: Rows):
  """Prefill `r.tokens` into their slots at `r.start` (only the first `r.window` cache slots take
  part, so the cost follows the tokens written), then sample each row's next token."""
  gather = None if r.dense else r.slots
  sub = models.cache_window(state.cache, r.window, gather)
  logits, sub = models.forward_cached(spec.config, params, r.tokens, sub, r.start,
                                      last_only=True, last_index=r.lengths - 1)
  cache = models.cache_put_window(state.cache, sub, gather)
  start, lengths = r.start, r.lengths
  if r.dense:
    logits, start, lengths = logits[r.slots], start[r.slots], lengths[r.slots]
  end = start + lengths
  tok, lp = sampling_lib.sample(logits, r.keys, end, r.temperature, r.top_p, r.top_k)
  return _set_rows(state, cache, r.slots, tok, lp, end, r.max_new, r.temperature, r.top_p,
                   r.top_k, r.keys)


def copy_prefix(spec: Spec, state: DecodeState, src, dsts, window: int):
  """Slot `src`'s first `window` cache slots into rows `dsts` (memory only, in place)."""
  del spec
  win = models.cache_window(state.cache, window, jnp.broadcast_to(src, dsts.shape))
  return state.replace(cache=models.cache_put_window(state.cache, win, dsts))


def score(spec: Spec, params, tokens):
  """log p(tokens[t] | tokens[:t]) for t >= 1 of one row (batch 1)."""
  cache = models.init_cache(spec.config, 1, tokens.shape[1])
  logits, _ = models.forward_cached(spec.config, params, tokens, cache, jnp.zeros((1,), jnp.int32))
  logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0]


def init_state(spec: Spec, cache=None) -> DecodeState:
  """Empty slots (idle: their sampling fields are set when a slot is filled)."""
  b = spec.num_slots
  return DecodeState(
      cache=models.init_cache(spec.config, b, spec.cache_len) if cache is None else cache,
      tokens=jnp.zeros((b,), jnp.int32), logprobs=jnp.zeros((b,), jnp.float32),
      pos=jnp.zeros((b,), jnp.int32), gen_len=jnp.zeros((b,), jnp.int32),
      max_new=jnp.zeros((b,), jnp.int32), active=jnp.zeros((b,), bool),
      tail=jnp.full((b, spec.stop_width), -1, jnp.int32),
      temperature=jnp.zeros((b,), jnp.float32), top_p=jnp.ones((b,), jnp.float32),
      top_k=jnp.full((b,), -1, jnp.int32), keys=jnp.zeros((b, 2), jnp.uint32))


def reset_state(spec: Spec, state: DecodeState) -> DecodeState:
  """A released state's buffers as a fresh one (donated: on CPU no new 100+ MB cache)."""
  return init_state(spec, cache=state.cache)


def slot_view(spec: Spec, state: DecodeState):
  """(pos, active) for the host's block planning, replicated so every process can read it."""
  del spec
  return state.pos, state.active


class Programs:
  """The programs above compiled for one engine: decode-state outputs on the placement's
  shardings, everything the host reads replicated, traced under the mesh so the model's
  activation constraints apply. Each attribute is the raw `jax.jit` (its `_cache_size()` counts
  compiled programs); call them through `run`."""

  NAMES = ("generate", "decode_block", "prefill", "insert", "append", "score", "copy_prefix",
           "init", "reset", "slot_view")

  def __init__(self, spec: Spec, placement):
    st, rep, mesh = placement.state, placement.replicated, placement.mesh
    self.mesh = mesh
    p = functools.partial
    self.generate = jax.jit(p(generate, spec), donate_argnums=(1,),
                            out_shardings=(st, rep, rep, rep))
    self.decode_block = jax.jit(p(decode_block, spec), donate_argnums=(1,),
                                out_shardings=(st, rep, rep))
    self.prefill = jax.jit(p(prefill, spec), out_shardings=placement.prefix)
    self.insert = jax.jit(p(insert, spec), donate_argnums=(1,), out_shardings=st)
    self.append = jax.jit(p(append, spec), donate_argnums=(1,), out_shardings=st)
    self.copy_prefix = jax.jit(p(copy_prefix, spec), donate_argnums=(0,), static_argnums=(3,),
                               out_shardings=st)
    self.score = jax.jit(p(score, spec), out_shardings=rep)
    self.init = jax.jit(p(init_state, spec), out_shardings=st)
    self.reset = jax.jit(p(reset_state, spec), donate_argnums=(0,), out_shardings=st)
    self.slot_view = jax.jit(p(slot_view, spec), out_shardings=(rep, rep))

  def run(self, name: str, *args):
    with jax.set_mesh(self.mesh):
      return getattr(self, name)(*args)

  def lower(self, name: str, *args):
    """`jit.lower` under the mesh (the AOT report compiles these for a TPU topology)."""
    with jax.set_mesh(self.mesh):
      return getattr(self, name).lower(*args)

  def compile_counts(self) -> dict[str, int]:
    return {name: getattr(self, name)._cache_size() for name in self.NAMES}
