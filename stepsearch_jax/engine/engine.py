"""StepSearchEngine: JetStream's Engine API over our Flax decoder, plus what RL rollouts need.

Decode state, per slot (row of the KV cache):
  ``tokens``  the PENDING token: sampled but not yet emitted nor written to the cache;
  ``pos``     the cache position where the pending token will be written (= context length);
  ``active``  the slot is decoding (inserted and not yet stopped).
A ``generate`` step EMITS each active slot's pending token (with its logprob), checks the stop
rules on it (a stop sequence ending here, an EOS id, or the slot's token cap), writes it into the
cache at ``pos`` in one batched forward pass, and samples the next pending token from that pass's
logits. Prefill therefore only samples the first token; the first ``generate`` after ``insert``
emits it. This keeps JetStream's contract (prefill returns a Prefix, tokens come out of generate)
and costs one wasted forward per request at its end.

Stops: the token that completes a stop sequence (``</search>``, ``</answer>``) is emitted as valid;
from the next step on the slot reports ``valid=0``, which JetStream's detokenizer treats as the end
of the request. An EOS token is emitted with ``valid=1`` too but is in the tokenizer's stop set, so
JetStream drops it; our drivers drop it as well (the method's responses never contain EOS), and the
slot's ``pos`` does not advance past it, so an append overwrites it.

RL extras: per-slot sampling (``sampling.py``), per-token logprobs, ``append`` (prefill the
tokens of a tool result into a live slot at its current length, batched over slots),
``decode_block`` (several generate steps per device call on a window of the cache), ``swap_params``
between steps (params are a jit argument, so same shapes/dtypes never recompile) and donation of
the decode state (the KV cache is updated in place).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from stepsearch_jax.engine import compat  # noqa: F401  (must precede jetstream imports)
from jetstream.engine import engine_api  # pylint: disable=g-bad-import-order
from jetstream.engine import tokenizer_pb2

from stepsearch_jax import models
from stepsearch_jax.engine import sampling as sampling_lib
from stepsearch_jax.engine.tokenizer import HFTokenizer, stop_sequences

SamplingParams = sampling_lib.SamplingParams
DEFAULT_STOPS = ("</search>", "</answer>")
# decode_block(shared=...) reads a shared prompt prefix rounded down to this many positions: one
# program per multiple met (a fixed template meets one), and at most 31 prefix slots per row are
# still read per row. 128 left ~1/4 of a template's slots per row (measured 8% slower decode).
SHARED_PREFIX_STEP = 32


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


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


class StepSearchEngine(engine_api.Engine):
  """JetStream Engine for a `stepsearch_jax.models` decoder (qwen2/llama).

  Args:
    config: the model's ModelConfig. params: its params pytree. tokenizer: an HF tokenizer.
    num_slots: decode batch (JetStream's max_concurrent_decodes).
    cache_len: KV cache length per slot; must hold a context plus one turn of generation.
    max_prefill_length: longest JetStream prefill (a power of two >= 16, as JetStream's padding
      helper requires).
    stop_strings: strings whose token ids stop a slot (see `tokenizer.stop_sequences`).
    eos_ids: token ids that end generation (default: the tokenizer's EOS).
    default_sampling: used for requests that come through JetStream's orchestrator.
    max_tokens: default per-request cap for those requests (the orchestrator has its own too).
  """

  def __init__(self, config: models.ModelConfig, params: Any, tokenizer: Any, *,
               num_slots: int = 8, cache_len: int = 1024, max_prefill_length: int = 512,
               stop_strings: Sequence[str] = DEFAULT_STOPS, eos_ids: Sequence[int] | None = None,
               default_sampling: SamplingParams = SamplingParams.greedy(),
               max_tokens: int = 1 << 30, seed: int = 0, mesh: jax.sharding.Mesh | None = None):
    if max_prefill_length < 16 or max_prefill_length & (max_prefill_length - 1):
      raise ValueError(f"max_prefill_length={max_prefill_length} must be a power of two >= 16")
    if cache_len < max_prefill_length:
      raise ValueError(f"cache_len={cache_len} must be >= max_prefill_length={max_prefill_length}")
    self.config = config
    self.params = jax.tree_util.tree_map(jnp.asarray, params)
    self.hf_tokenizer = tokenizer
    self.tokenizer = HFTokenizer(tokenizer, eos_ids)
    # JetStream ends a request on its tokenizer's stop set (EOS and PAD); we stop on the same ids
    # so that both drivers end turns identically (for Qwen PAD is EOS anyway).
    self.eos_ids = tuple(sorted(self.tokenizer.stop_tokens))
    self.num_slots = int(num_slots)
    self.cache_len = int(cache_len)
    self._max_prefill_length = int(max_prefill_length)
    self.default_sampling = default_sampling
    self.max_tokens = int(max_tokens)
    self.seed = int(seed)
    self._mesh = mesh or jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    self.stop_ids = stop_sequences(tokenizer, stop_strings) if stop_strings else []
    width = max([len(s) for s in self.stop_ids] + [1])
    stops = np.full((max(1, len(self.stop_ids)), width), -1, np.int32)
    for i, seq in enumerate(self.stop_ids):
      stops[i, width - len(seq):] = seq                      # right-aligned, -1 = wildcard
    self._stops = stops
    self._has_stops = bool(self.stop_ids)
    self._request_counter = 0
    self._generate_jit = jax.jit(self._generate_impl, donate_argnums=(1,))
    # `rows=None` (every slot) and a rows array are two programs of the same jit
    self._decode_block_jit = jax.jit(self._decode_block_impl, donate_argnums=(1,),
                                     static_argnums=(3, 4, 7))
    self._prefill_jit = jax.jit(self._prefill_impl)
    self._insert_jit = jax.jit(self._insert_impl, donate_argnums=(1,))
    self._append_jit = jax.jit(self._append_impl, donate_argnums=(1,),
                               static_argnums=(11, 12))
    self._score_jit = jax.jit(self._score_impl)
    self._copy_prefix_jit = jax.jit(self._copy_prefix_impl, donate_argnums=(0,),
                                    static_argnums=(3,))
    self._init_jit = None
    self._reset_jit = jax.jit(self._reset_state_impl, donate_argnums=(0,))
    self._spare_state: DecodeState | None = None

  # ----------------------------------------------------------------------------- device functions
  def _stop_hit(self, tail: jax.Array) -> jax.Array:
    if not self._has_stops:
      return jnp.zeros(tail.shape[:1], bool)
    stops = jnp.asarray(self._stops)                          # [S, K]
    match = (stops[None] == -1) | (tail[:, None, :] == stops[None])
    return jnp.any(jnp.all(match, axis=-1), axis=-1)

  def _step(self, params, state: DecodeState, cache, limit: int, layers=None, shared=None):
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
    is_eos = jnp.isin(emit, jnp.asarray(self.eos_ids, jnp.int32))
    stopped = valid & (self._stop_hit(tail) | is_eos | (gen_len >= state.max_new))
    write_pos = jnp.where(valid, jnp.minimum(state.pos - offset, limit - 1), limit)
    logits, cache = models.forward_cached(self.config, params, emit[:, None], cache,
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

  def _generate_impl(self, params, state: DecodeState):
    new_state, cache, (emit, valid, gen_len, emit_lp, stopped) = self._step(
        params, state, state.cache, self.cache_len)
    data = jnp.stack([emit, valid.astype(jnp.int32), gen_len], axis=1)
    return new_state.replace(cache=cache), data, emit_lp, stopped

  def _decode_block_impl(self, params, state: DecodeState, n_steps, window: int, steps: int,
                         rows=None, shared_src=None, offset: int = 0):
    """Up to `n_steps` (traced, <= `steps`, the static buffer length) decode steps in one program,
    on a window of the first `window` cache slots.

    Attention, the cache write and the softmax then cost O(window) instead of O(cache_len), and
    the host pays one dispatch and one small transfer per block instead of per token. The loop
    ends early once no row is active; once at most half the rows are (b >= 4), it goes on over
    those rows only (`narrow`). Outputs are [steps, B]; rows after a stop report valid=0.
    With `rows` (the few active slots, padded by repeats), only those rows are gathered and
    decoded (outputs [steps, len(rows)]), so a block's tail of stragglers does not cost a full
    batch; repeated rows compute and write back identical values.
    With `offset` > 0, every active row holds the same first `offset` positions as slot
    `shared_src` (a shared prompt prefix): attention reads them once from that slot, and the
    per-row window covers positions offset..window-1 only.
    """
    full = state
    if rows is not None:
      state = jax.tree_util.tree_map(lambda x: x[rows], state.replace(cache=None))
    win = models.cache_window(full.cache, window, rows, start=offset)
    shared = models.cache_window(full.cache, offset, shared_src) if offset else None
    b = state.tokens.shape[0]
    layers = models.split_layers(self.config, params)   # once per block, not per step
    bufs = (jnp.zeros((steps, b), jnp.int32), jnp.zeros((steps, b), bool),
            jnp.zeros((steps, b), jnp.float32), jnp.zeros((steps, b), bool))

    compact = b >= 4

    def more(carry):
      i, st, _, _ = carry
      return (i < n_steps) & jnp.any(st.active)

    def wide(carry):   # with compaction, the all-row loop ends once at most half the rows decode
      go = more(carry)
      return go & (jnp.sum(carry[1].active.astype(jnp.int32)) * 2 > b) if compact else go

    def body(cols):
      def run(carry):
        i, st, win, bufs = carry
        st, win, (emit, valid, _, lp, stopped) = self._step(params, st, win, window - offset,
                                                            layers, shared)
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

  def _prefill_impl(self, params, tokens, true_length, max_new, temperature, top_p, top_k, key):
    cache = models.init_cache(self.config, 1, tokens.shape[1])
    logits, cache = models.forward_cached(self.config, params, tokens, cache,
                                          jnp.zeros((1,), jnp.int32), last_only=True,
                                          last_index=true_length - 1)
    tok, lp = sampling_lib.sample(logits, key, true_length, temperature, top_p, top_k)
    return Prefix(cache=cache, token=tok, logprob=lp, length=true_length, max_new=max_new,
                  temperature=temperature,
                  top_p=top_p, top_k=top_k, key=key)

  def _insert_impl(self, prefix: Prefix, state: DecodeState, slot):
    def put(big, small):
      return jax.lax.dynamic_update_slice(big, small.astype(big.dtype),
                                          (slot,) + (0,) * (big.ndim - 1))
    cache = jax.tree_util.tree_map(put, state.cache, prefix.cache)
    return self._set_rows(state, cache, slot[None], prefix.token, prefix.logprob, prefix.length,
                          prefix.max_new, prefix.temperature,
                          prefix.top_p, prefix.top_k, prefix.key)

  def _set_rows(self, state, cache, rows, tok, lp, pos, max_new, temperature, top_p, top_k, keys):
    return state.replace(
        cache=cache, tokens=state.tokens.at[rows].set(tok), logprobs=state.logprobs.at[rows].set(lp),
        pos=state.pos.at[rows].set(pos), gen_len=state.gen_len.at[rows].set(0),
        max_new=state.max_new.at[rows].set(max_new), active=state.active.at[rows].set(True),
        tail=state.tail.at[rows].set(-1), temperature=state.temperature.at[rows].set(temperature),
        top_p=state.top_p.at[rows].set(top_p), top_k=state.top_k.at[rows].set(top_k),
        keys=state.keys.at[rows].set(keys))

  def _append_impl(self, params, state: DecodeState, rows, tokens, start, lengths, max_new,
                   temperature, top_p, top_k, keys, window: int, dense: bool = False):
    # Only the first `window` cache slots (>= every row's start + width) take part, so the cost
    # follows the tokens written, not the whole cache. Sparse: the appended rows' caches are
    # gathered and scattered back. Dense (when the padded rows would be every slot anyway):
    # `tokens`/`start`/`lengths` are per slot, slots not appended to start at `window` (their
    # writes are dropped), and the window is sliced in place: no gather or scatter of the cache.
    gather = None if dense else rows
    sub = models.cache_window(state.cache, window, gather)
    logits, sub = models.forward_cached(self.config, params, tokens, sub, start, last_only=True,
                                        last_index=lengths - 1)
    cache = models.cache_put_window(state.cache, sub, gather)
    if dense:
      logits, start, lengths = logits[rows], start[rows], lengths[rows]
    end = start + lengths
    tok, lp = sampling_lib.sample(logits, keys, end, temperature, top_p, top_k)
    return self._set_rows(state, cache, rows, tok, lp, end, max_new, temperature, top_p, top_k, keys)

  def _copy_prefix_impl(self, state: DecodeState, src, dsts, window: int):
    # Gather the source row's window once per destination (padded rows repeat dsts[0], which
    # writes identical values) and scatter it into the destination rows, in place.
    win = models.cache_window(state.cache, window, jnp.broadcast_to(src, dsts.shape))
    return state.replace(cache=models.cache_put_window(state.cache, win, dsts))

  def _score_impl(self, params, tokens):
    cache = models.init_cache(self.config, 1, tokens.shape[1])
    logits, _ = models.forward_cached(self.config, params, tokens, cache,
                                      jnp.zeros((1,), jnp.int32))
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0]

  # ----------------------------------------------------------------------------- JetStream API
  def load_params(self, *args, **kwargs) -> Any:
    """The params given at construction (or the last `swap_params`)."""
    del args, kwargs
    return self.params

  def init_decode_state(self, *args, **kwargs) -> DecodeState:
    """Empty slots (built by a jitted function so its buffers match later, donated states)."""
    del args, kwargs
    if self._spare_state is not None:
      state, self._spare_state = self._spare_state, None
      return self._reset_jit(state)
    if self._init_jit is None:
      self._init_jit = jax.jit(self._init_state_impl)
    return self._init_jit()

  def release_decode_state(self, decode_state: DecodeState) -> None:
    """Hand back a state that is no longer used. On CPU the next `init_decode_state` reuses its
    buffers: a fresh cache of 100+ MB costs page faults and zeroing on every rollout (~20-40 ms
    for the rollout benchmark's). Its stale keys/values are never read, since attention masks
    every slot past a row's length and a slot's cache is written from position 0 (`append`,
    `insert`) before it is read. On accelerators the state is dropped, so the memory goes back
    to the training update between rollouts."""
    if self._mesh.devices.flat[0].platform == "cpu":
      self._spare_state = decode_state

  def _reset_state_impl(self, state: DecodeState) -> DecodeState:
    return self._init_state_impl(cache=state.cache)

  def _init_state_impl(self, cache=None) -> DecodeState:
    b = self.num_slots
    s = self.default_sampling
    return DecodeState(
        cache=models.init_cache(self.config, b, self.cache_len) if cache is None else cache,
        tokens=jnp.zeros((b,), jnp.int32), logprobs=jnp.zeros((b,), jnp.float32),
        pos=jnp.zeros((b,), jnp.int32), gen_len=jnp.zeros((b,), jnp.int32),
        max_new=jnp.full((b,), self.max_tokens, jnp.int32), active=jnp.zeros((b,), bool),
        tail=jnp.full((b, self._stops.shape[1]), -1, jnp.int32),
        temperature=jnp.full((b,), s.temperature, jnp.float32),
        top_p=jnp.full((b,), s.top_p, jnp.float32), top_k=jnp.full((b,), s.top_k, jnp.int32),
        keys=jnp.zeros((b, 2), jnp.uint32))

  def request_key(self, request_id: int) -> np.ndarray:
    """The sampling key of a request: depends only on the engine seed and the request id."""
    return np.asarray(jax.random.fold_in(jax.random.PRNGKey(self.seed), request_id), np.uint32)

  def prefill(self, *, params: Any, existing_prefix: Prefix | None = None,
              padded_tokens: jax.Array, true_length: int,
              sampling: SamplingParams | None = None, request_id: int | None = None) -> Prefix:
    """Prefill one padded prompt (its length is the bucket); logits of the last true token only."""
    if existing_prefix is not None:
      raise ValueError("existing_prefix is not supported: use StepSearchEngine.append to extend a "
                       "live slot instead")
    tokens = jnp.asarray(padded_tokens, jnp.int32).reshape(1, -1)
    if tokens.shape[1] > self.cache_len:
      raise ValueError(f"prefill of {tokens.shape[1]} tokens exceeds cache_len={self.cache_len}")
    if not 0 < true_length <= tokens.shape[1]:
      raise ValueError(f"true_length={true_length} outside 1..{tokens.shape[1]}")
    s = sampling or self.default_sampling
    if request_id is None:
      request_id, self._request_counter = self._request_counter, self._request_counter + 1
    return self._prefill_jit(
        params, tokens, jnp.full((1,), true_length, jnp.int32),
        jnp.full((1,), self.max_tokens, jnp.int32),
        jnp.full((1,), s.temperature, jnp.float32), jnp.full((1,), s.top_p, jnp.float32),
        jnp.full((1,), s.top_k, jnp.int32), jnp.asarray(self.request_key(request_id))[None])

  def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
    return self._insert_jit(prefix, decode_state, jnp.asarray(slot, jnp.int32))

  def generate(self, params: Any, decode_state: DecodeState
               ) -> tuple[DecodeState, engine_api.ResultTokens]:
    state, result, _ = self.generate_rl(params, decode_state)
    return state, result

  def generate_rl(self, params: Any, decode_state: DecodeState):
    """`generate` that also returns (logprobs [B], stopped [B]) device arrays for RL drivers."""
    state, data, logprobs, stopped = self._generate_jit(params, decode_state)
    result = engine_api.ResultTokens(data=data, tokens_idx=(0, 1), valid_idx=(1, 2),
                                     length_idx=(2, 3), samples_per_slot=1)
    return state, result, (logprobs, stopped)

  def append_shape(self, lengths: Sequence[int], buckets: Sequence[int] = ()) -> tuple[int, int]:
    """(rows, token width) that `append` pads rows of these lengths to: rows to a power of two
    (few programs, little idle compute), tokens to the smallest bucket that fits, else a power of
    two >= 16. Drivers use it to price a batching plan."""
    longest = max(lengths)
    width = next((b for b in sorted(buckets) if b >= longest), _pow2_at_least(max(longest, 16)))
    return self._padded_rows(len(lengths)), width

  def _padded_rows(self, n: int) -> int:
    """Rows a call over `n` slots is padded to (`append`, `copy_prefix`): a power of two, at
    most every slot, so few programs compile and little idle compute runs."""
    return min(_pow2_at_least(n), self.num_slots)

  def window_for(self, need: int) -> int:
    """The cache window (a multiple of 128, or cache_len) that holds `need` slots.

    Decode cost is memory-bound on the window (keys/values read every step), so the steps are
    fine; each window size is one program per entry point, compiled the first time it is met.
    """
    return min(self.cache_len, -(-max(int(need), 1) // 128) * 128)

  def decode_block(self, params: Any, decode_state: DecodeState, steps: int = 8,
                   max_steps: int | None = None, shared: tuple[int, int] | None = None
                   ) -> tuple[DecodeState, dict[str, np.ndarray]]:
    """`generate` steps in one device call (RL drivers; not part of JetStream's API).

    Same per-step semantics as `generate` (emit, stop check, write, sample the next token), but
    the loop runs on device over a window of the cache (a multiple of 128 slots) that covers every
    active row for `steps` more tokens, keeps going while the window still has room for every
    row, up to `max_steps` (default `steps`; one program per value), stops early when no row is
    active, and the host receives one small transfer:
    {'tokens', 'valid', 'logprobs', 'stopped'}, each [n, B] for the n steps that ran. When at
    most half the slots are active, only their rows (padded to a power of two) are decoded; and
    once at most half of a block's rows are still active, the block goes on with those rows only
    (a half-width loop in the same program), so a turn's few long answers do not cost a full batch
    per step.

    shared=(slot, length): the caller guarantees that every active slot holds the same first
    `length` tokens as `slot` (a prompt prefix shared through `copy_prefix`). Attention then reads
    those keys/values (rounded down to a multiple of SHARED_PREFIX_STEP) once for all rows instead
    of once per row: decode is bound by reading the cache window, and the template is most of it
    early on.
    """
    pos, active = jax.device_get((decode_state.pos, decode_state.active))
    top = int(pos[active].max()) if active.any() else 0
    window = self.window_for(top + steps)
    max_steps = max(steps, max_steps or steps)
    n_steps = jnp.asarray(max(1, min(max_steps, window - top)), jnp.int32)
    live = np.flatnonzero(active)
    offset, src = 0, None
    if shared is not None and len(live):
      offset = min(int(shared[1]), int(pos[active].min()))
      offset = offset // SHARED_PREFIX_STEP * SHARED_PREFIX_STEP
      src = jnp.asarray(int(shared[0]), jnp.int32) if offset else None
    rows = _pow2_at_least(len(live)) if len(live) else self.num_slots
    sel = None
    if rows * 2 <= self.num_slots:   # few stragglers: decode only their rows
      sel = jnp.asarray(np.concatenate([live, np.full(rows - len(live), live[0])]), jnp.int32)
    state, n, bufs = self._decode_block_jit(params, decode_state, n_steps, window, max_steps,
                                            sel, src, offset)
    n, bufs = jax.device_get((n, bufs))
    out = {}
    for k, v in zip(("tokens", "valid", "logprobs", "stopped"), bufs):
      out[k] = v[:int(n)]
      if sel is not None:            # back to one column per slot
        out[k] = np.zeros((int(n), self.num_slots), v.dtype)
        out[k][:, live] = v[:int(n), :len(live)]
    return state, out

  def get_prefix_destination_sharding(self) -> Any:
    return jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec())

  def get_tokenizer(self) -> tokenizer_pb2.TokenizerParameters:
    return tokenizer_pb2.TokenizerParameters(
        path=str(getattr(self.hf_tokenizer, "name_or_path", "")), extra_ids=0)

  def build_tokenizer(self, metadata: tokenizer_pb2.TokenizerParameters) -> HFTokenizer:
    del metadata
    return self.tokenizer

  @property
  def max_concurrent_decodes(self) -> int:
    return self.num_slots

  @property
  def samples_per_slot(self) -> int:
    return 1

  @property
  def max_prefill_length(self) -> int:
    return self._max_prefill_length

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return self._mesh

  @property
  def colocated_cpus(self) -> None:
    return None

  # ----------------------------------------------------------------------------- RL extras
  def swap_params(self, params: Any) -> None:
    """Use new weights from the next call on; same tree/shapes/dtypes, so nothing recompiles."""
    old = jax.tree_util.tree_structure(self.params)
    new = jax.tree_util.tree_structure(params)
    if old != new:
      raise ValueError(f"swap_params: parameter tree differs from the engine's ({new} vs {old})")
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(self.params),
                          jax.tree_util.tree_leaves(self.params), jax.tree_util.tree_leaves(params)):
      if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"swap_params: {jax.tree_util.keystr(path[0])} is {b.shape} {b.dtype}, "
                         f"the engine's is {a.shape} {a.dtype}")
    # Same shardings as the weights the programs were compiled for (a jit cache key).
    self.params = jax.tree_util.tree_map(
        lambda new, cur: jax.device_put(new, cur.sharding), params, self.params)

  def append(self, decode_state: DecodeState, slots: Sequence[int],
             tokens: Sequence[Sequence[int]], starts: Sequence[int], *,
             params: Any = None, max_new: Sequence[int] | int | None = None,
             sampling: Sequence[SamplingParams] | SamplingParams | None = None,
             keys: Sequence[np.ndarray] | None = None,
             buckets: Sequence[int] = ()) -> DecodeState:
    """Prefill `tokens[i]` into slot `slots[i]` at cache position `starts[i]`, then decode on.

    `starts[i] = 0` is a fresh prompt; `starts[i] = context length` appends a tool result to a
    live slot (only the new tokens are computed). The slot becomes active with a token cap of
    `max_new[i]` and samples its next token from the last appended position. Rows are padded (by
    repeating row 0, which writes identical values) to all slots for short appends and to a power
    of two, tokens to the smallest bucket that fits, and only the first `window_for(start + width)`
    cache slots are read and written, so the cost follows the appended tokens and compilations
    stay few (one per rows x width x window bucket). When the padded rows would be every slot,
    the call runs per slot on the cache window in place (idle slots write nothing) instead of
    gathering and scattering the rows' caches.
    """
    n = len(slots)
    if not (n == len(tokens) == len(starts)):
      raise ValueError("append: slots, tokens and starts must have the same length")
    if n == 0:
      return decode_state
    if len(set(slots)) != n:
      raise ValueError(f"append: slots must be distinct, got {list(slots)}")
    lengths = [len(t) for t in tokens]
    if min(lengths) <= 0:
      raise ValueError("append: every row needs at least one token")
    rows, width = self.append_shape(lengths, buckets)
    for s, st, ln in zip(slots, starts, lengths):
      if not 0 <= s < self.num_slots:
        raise ValueError(f"append: slot {s} outside 0..{self.num_slots - 1}")
      if st + width > self.cache_len:
        raise ValueError(f"append: slot {s} start {st} + bucket {width} (for {ln} tokens) exceeds "
                         f"cache_len={self.cache_len}; re-prefill a truncated context instead")
    # The cache window: the smallest window bucket holding every row's writes.
    window = self.window_for(max(starts) + width)
    pad = [0] * (rows - n)
    tok = np.zeros((rows, width), np.int32)
    for i, t in enumerate(list(tokens) + [tokens[0]] * len(pad)):
      tok[i, :len(t)] = t
    if sampling is None or isinstance(sampling, SamplingParams):
      sampling = [sampling or self.default_sampling] * n
    if max_new is None or isinstance(max_new, int):
      max_new = [self.max_tokens if max_new is None else max_new] * n
    if keys is None:
      keys = [self.request_key(s) for s in slots]

    def col(values, dtype):
      values = list(values)
      return jnp.asarray(np.asarray(values + [values[0]] * len(pad), dtype))

    dense = rows == self.num_slots
    if dense:   # per-slot tokens; idle slots write past the window (dropped)
      tok_rows, tok = tok, np.zeros((self.num_slots, width), np.int32)
      start_col = np.full(self.num_slots, window, np.int32)
      length_col = np.ones(self.num_slots, np.int32)
      for i, (s, st, ln) in enumerate(zip(slots, starts, lengths)):
        tok[s], start_col[s], length_col[s] = tok_rows[i], st, ln
      start_col, length_col = jnp.asarray(start_col), jnp.asarray(length_col)
    else:
      start_col, length_col = col(starts, np.int32), col(lengths, np.int32)
    return self._append_jit(
        self.params if params is None else params, decode_state, col(slots, np.int32),
        jnp.asarray(tok), start_col, length_col, col(max_new, np.int32),
        col([s.temperature for s in sampling], np.float32),
        col([s.top_p for s in sampling], np.float32), col([s.top_k for s in sampling], np.int32),
        jnp.asarray(np.stack([np.asarray(k, np.uint32) for k in keys]
                             + [np.asarray(keys[0], np.uint32)] * len(pad))), window, dense)

  def copy_prefix(self, decode_state: DecodeState, src: int, dsts: Sequence[int],
                  length: int) -> DecodeState:
    """Copy slot `src`'s first `length` cache slots into slots `dsts` (prefix sharing).

    Prompts that share a long prefix (the instruction template every RL prompt starts with)
    then prefill it once: `append` the prefix into one slot, copy it, and `append` each
    prompt's own suffix at position `length`. The copy moves memory only (no model compute);
    the destination slots keep their other state until that `append` sets it, so they should
    not be decoding. Keys/values depend only on the tokens before them, so the result equals
    prefilling each whole prompt (up to float rounding of a batch-1 vs a batched matmul).
    """
    dsts = [int(d) for d in dsts]
    if not dsts:
      return decode_state
    if not 0 < length <= self.cache_len:
      raise ValueError(f"copy_prefix: length={length} outside 1..{self.cache_len}")
    for s in [src] + dsts:
      if not 0 <= s < self.num_slots:
        raise ValueError(f"copy_prefix: slot {s} outside 0..{self.num_slots - 1}")
    rows = self._padded_rows(len(dsts))
    dst = np.asarray(dsts + [dsts[0]] * (rows - len(dsts)), np.int32)
    return self._copy_prefix_jit(decode_state, jnp.asarray(src, jnp.int32), jnp.asarray(dst),
                                 self.window_for(length))

  def score(self, token_ids: Sequence[int], params: Any = None) -> np.ndarray:
    """log p(token_ids[t] | token_ids[:t]) for t >= 1 under the engine's weights (one forward)."""
    n = len(token_ids)
    width = _pow2_at_least(max(n, 16))
    tok = np.zeros((1, width), np.int32)
    tok[0, :n] = token_ids
    out = self._score_jit(self.params if params is None else params, jnp.asarray(tok))
    return np.asarray(out)[:n - 1]

  def compile_counts(self) -> dict[str, int]:
    """How many programs each jitted entry point holds (a swap must not add any)."""
    return {name: getattr(self, f"_{name}_jit")._cache_size()
            for name in ("generate", "decode_block", "prefill", "insert", "append", "score",
                         "copy_prefix", "reset")}
