"""StepSearchEngine: JetStream's Engine API over our Flax decoder, plus what RL rollouts need.

The engine is host-side glue: it validates requests, pads them into the argument structs of the
device programs (`programs.py`, one pure function each), places host values on the mesh
(`placement.py`) and reads back the replicated outputs. Which slots to fill, what to append and
how to batch appends is the rollout driver's business (`rollout/schedule.py`).

Threads: the engine holds no lock and no thread. JetStream's orchestrator calls prefill/insert
and generate from its own prefill and generate threads (it serialises access to a decode state);
the native driver calls everything from one thread. Programs are compiled on first use per
static key (cache window, rows, token bucket) and reused across weight swaps.

Semantics of a step (`programs.py`): prefill only samples the first token; the first `generate`
after `insert` emits it. This keeps JetStream's contract (prefill returns a Prefix, tokens come out
of generate) and costs one wasted forward per request at its end.

Stops: the token that completes a stop sequence (``</search>``, ``</answer>``) is emitted as valid;
from the next step on the slot reports ``valid=0``, which JetStream's detokenizer treats as the end
of the request. An EOS token is emitted with ``valid=1`` too but is in the tokenizer's stop set, so
JetStream drops it; our drivers drop it as well (the method's responses never contain EOS), and the
slot's ``pos`` does not advance past it, so an append overwrites it.

RL extras: per-slot sampling (``sampling.py``), per-token logprobs, ``append`` (prefill the
tokens of a tool result into a live slot at its current length, batched over slots),
``decode_block`` (several generate steps per device call on a window of the cache), ``swap_params``
between steps (params are a jit argument, so same shapes/dtypes/shardings never recompile) and
donation of the decode state (the KV cache is updated in place).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from jetstream.engine import engine_api
from jetstream.engine import tokenizer_pb2

from stepsearch_jax import models
from stepsearch_jax.engine import placement as placement_lib
from stepsearch_jax.engine import programs as programs_lib
from stepsearch_jax.engine import sampling as sampling_lib
from stepsearch_jax.engine.programs import Block, DecodeState, Prefix, Rows
from stepsearch_jax.engine.tokenizer import HFTokenizer, stop_sequences

SamplingParams = sampling_lib.SamplingParams
DEFAULT_STOPS = ("</search>", "</answer>")
# decode_block(shared=...) reads a shared prompt prefix rounded down to this many positions: one
# program per multiple met (a fixed template meets one), and at most 31 prefix slots per row are
# still read per row. 128 left ~1/4 of a template's slots per row (measured 8% slower decode).
SHARED_PREFIX_STEP = 32


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


class StepSearchEngine(engine_api.Engine):
  """JetStream Engine for a `stepsearch_jax.models` decoder (qwen2/llama).

  Args:
    config: the model's ModelConfig. params: its params pytree. tokenizer: an HF tokenizer.
    num_slots: decode batch (JetStream's max_concurrent_decodes); a multiple of the mesh's
      data*fsdp size (slots are sharded over those axes).
    cache_len: KV cache length per slot; must hold a context plus one turn of generation.
    max_prefill_length: longest JetStream prefill (a power of two >= 16, as JetStream's padding
      helper requires).
    stop_strings: strings whose token ids stop a slot (see `tokenizer.stop_sequences`).
    eos_ids: token ids that end generation (default: the tokenizer's EOS).
    default_sampling: used for requests that come through JetStream's orchestrator.
    max_tokens: default per-request cap for those requests (the orchestrator has its own too).
    mesh: the (data, fsdp, tensor) mesh to place params and decode state on (the training mesh;
      default: the first device).
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
    self._mesh = mesh if mesh is not None else placement_lib.default_mesh()
    self.stop_ids = stop_sequences(tokenizer, stop_strings) if stop_strings else []
    width = max([len(s) for s in self.stop_ids] + [1])
    stops = tuple(tuple([-1] * (width - len(s)) + list(s)) for s in self.stop_ids)
    self.spec = programs_lib.Spec(config=config, num_slots=self.num_slots,
                                  cache_len=self.cache_len, eos_ids=self.eos_ids, stops=stops)
    self.placement = placement_lib.Placement(self._mesh, config, self.num_slots, self.cache_len,
                                             self.spec.stop_width)
    self.programs = programs_lib.Programs(self.spec, self.placement)
    # What swap_params accepts: the caller's tree, shapes and dtypes (the engine's own copy may
    # be in the compute dtype).
    self._param_struct = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    self.params = self.placement.params(params)
    self._request_counter = 0
    self._spare_state: DecodeState | None = None

  # Raw jits, for tests that count compiled programs.
  @property
  def _decode_block_jit(self):
    return self.programs.decode_block

  def _put(self, x, dtype, sharding=None) -> jax.Array:
    return self.placement.put(np.asarray(x, dtype), sharding)

  # ----------------------------------------------------------------------------- JetStream API
  def load_params(self, *args, **kwargs) -> Any:
    """The params given at construction (or the last `swap_params`)."""
    del args, kwargs
    return self.params

  def init_decode_state(self, *args, **kwargs) -> DecodeState:
    """Empty slots on the placement's shardings (a jitted init, so buffers match later states)."""
    del args, kwargs
    if self._spare_state is not None:
      state, self._spare_state = self._spare_state, None
      return self.programs.run("reset", state)
    return self.programs.run("init")

  def release_decode_state(self, decode_state: DecodeState) -> None:
    """Hand back a state that is no longer used. On CPU the next `init_decode_state` reuses its
    buffers: a fresh cache of 100+ MB costs page faults and zeroing on every rollout (~20-40 ms
    for the rollout benchmark's). Its stale keys/values are never read, since attention masks
    every slot past a row's length and a slot's cache is written from position 0 (`append`,
    `insert`) before it is read. On accelerators the state is dropped, so the memory goes back
    to the training update between rollouts."""
    if self._mesh.devices.flat[0].platform == "cpu":
      self._spare_state = decode_state

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
    tokens = np.asarray(padded_tokens, np.int32).reshape(1, -1)
    if tokens.shape[1] > self.cache_len:
      raise ValueError(f"prefill of {tokens.shape[1]} tokens exceeds cache_len={self.cache_len}")
    if not 0 < true_length <= tokens.shape[1]:
      raise ValueError(f"true_length={true_length} outside 1..{tokens.shape[1]}")
    s = sampling or self.default_sampling
    if request_id is None:
      request_id, self._request_counter = self._request_counter, self._request_counter + 1
    put = self._put
    return self.programs.run(
        "prefill", params, put(tokens, np.int32), put([true_length], np.int32),
        put([self.max_tokens], np.int32), put([s.temperature], np.float32),
        put([s.top_p], np.float32), put([s.top_k], np.int32),
        put(self.request_key(request_id)[None], np.uint32))

  def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
    return self.programs.run("insert", prefix, decode_state, self._put(slot, np.int32))

  def generate(self, params: Any, decode_state: DecodeState
               ) -> tuple[DecodeState, engine_api.ResultTokens]:
    state, result, _ = self.generate_rl(params, decode_state)
    return state, result

  def generate_rl(self, params: Any, decode_state: DecodeState):
    """`generate` that also returns (logprobs [B], stopped [B]) device arrays for RL drivers."""
    state, data, logprobs, stopped = self.programs.run("generate", params, decode_state)
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
                   max_steps: int | None = None, shared: tuple[int, int] | None = None,
                   rows: Sequence[int] | None = None
                   ) -> tuple[DecodeState, dict[str, np.ndarray]]:
    """`generate` steps in one device call (RL drivers; not part of JetStream's API).

    Same per-step semantics as `generate` (emit, stop check, write, sample the next token), but
    the loop runs on device over a window of the cache (a multiple of 128 slots) that covers every
    active row for `steps` more tokens, keeps going while the window still has room for every
    row, up to `max_steps` (default `steps`; one program per value), stops early when no row is
    active, and the host receives one small transfer:
    {'tokens', 'valid', 'logprobs', 'stopped'}, each [n, num_slots] for the n steps that ran.
    Once at most half of a block's rows are still active, the block goes on with those rows only
    (a half-width loop in the same program).

    rows: decode only these slots (gathered, padded by repeats to a power of two; the caller's
    straggler policy, `rollout.schedule.decode_rows`); default: every slot. Ignored when the
    slots are sharded over several devices (`Placement.slot_shards`).
    shared=(slot, length): the caller guarantees that every active slot holds the same first
    `length` tokens as `slot` (a prompt prefix shared through `copy_prefix`). Attention then reads
    those keys/values (rounded down to a multiple of SHARED_PREFIX_STEP) once for all rows instead
    of once per row: decode is bound by reading the cache window, and the template is most of it
    early on.
    """
    pos, active = self.placement.host(self.programs.run("slot_view", decode_state))
    top = int(pos[active].max()) if active.any() else 0
    window = self.window_for(top + steps)
    max_steps = max(steps, max_steps or steps)
    n_steps = max(1, min(max_steps, window - top))
    live = np.flatnonzero(active)
    offset, src = 0, None
    if shared is not None and len(live):
      offset = min(int(shared[1]), int(pos[active].min()))
      offset = offset // SHARED_PREFIX_STEP * SHARED_PREFIX_STEP
      src = self._put(int(shared[0]), np.int32) if offset else None
    sel = None
    gather = self.placement.slot_shards == 1        # see Placement.slot_shards
    if rows is not None and gather:
      rows = [int(r) for r in rows] or [0]
      sel = np.asarray(rows + [rows[0]] * (_pow2_at_least(len(rows)) - len(rows)), np.int32)
    blk = Block(n_steps=self._put(n_steps, np.int32),
                rows=None if sel is None else self._put(sel, np.int32), shared_src=src,
                window=window, steps=max_steps, offset=offset, compact=gather)
    state, n, bufs = self.programs.run("decode_block", params, decode_state, blk)
    n, bufs = self.placement.host((n, bufs))
    out = {}
    for k, v in zip(("tokens", "valid", "logprobs", "stopped"), bufs):
      out[k] = v[:int(n)]
      if sel is not None:            # back to one column per slot
        out[k] = np.zeros((int(n), self.num_slots), v.dtype)
        out[k][:, rows] = v[:int(n), :len(rows)]
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
    old = jax.tree_util.tree_structure(self._param_struct)
    new = jax.tree_util.tree_structure(params)
    if old != new:
      raise ValueError(f"swap_params: parameter tree differs from the engine's ({new} vs {old})")
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(self._param_struct),
                          jax.tree_util.tree_leaves(self._param_struct),
                          jax.tree_util.tree_leaves(params)):
      if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"swap_params: {jax.tree_util.keystr(path[0])} is {b.shape} {b.dtype}, "
                         f"the engine's is {a.shape} {a.dtype}")
    # Onto the placement's shardings and dtype (a jit cache key): a reshard, no recompile.
    self.params = self.placement.params(params)

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
    repeating row 0, which writes identical values) to a power of two, tokens to the smallest
    bucket that fits, and only the first `window_for(start + width)` cache slots are read and
    written, so the cost follows the appended tokens and compilations stay few (one per rows x
    width x window bucket). When the padded rows would be every slot, the call runs per slot on
    the cache window in place (idle slots write nothing) instead of gathering and scattering the
    rows' caches.
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
    pad = rows - n
    if sampling is None or isinstance(sampling, SamplingParams):
      sampling = [sampling or self.default_sampling] * n
    if max_new is None or isinstance(max_new, int):
      max_new = [self.max_tokens if max_new is None else max_new] * n
    if keys is None:
      keys = [self.request_key(s) for s in slots]

    def col(values, dtype):
      values = list(values)
      return np.asarray(values + [values[0]] * pad, dtype)

    dense = rows == self.num_slots
    if dense:   # per-slot tokens; idle slots write past the window (dropped)
      tok = np.zeros((self.num_slots, width), np.int32)
      start_col = np.full(self.num_slots, window, np.int32)
      length_col = np.ones(self.num_slots, np.int32)
      for s, st, t in zip(slots, starts, tokens):
        tok[s, :len(t)], start_col[s], length_col[s] = t, st, len(t)
    else:
      tok = np.zeros((rows, width), np.int32)
      for i, t in enumerate(list(tokens) + [tokens[0]] * pad):
        tok[i, :len(t)] = t
      start_col, length_col = col(starts, np.int32), col(lengths, np.int32)
    put = self._put
    r = Rows(slots=put(col(slots, np.int32), np.int32), tokens=put(tok, np.int32),
             start=put(start_col, np.int32), lengths=put(length_col, np.int32),
             max_new=put(col(max_new, np.int32), np.int32),
             temperature=put(col([s.temperature for s in sampling], np.float32), np.float32),
             top_p=put(col([s.top_p for s in sampling], np.float32), np.float32),
             top_k=put(col([s.top_k for s in sampling], np.int32), np.int32),
             keys=put(np.stack([np.asarray(k, np.uint32) for k in keys]
                               + [np.asarray(keys[0], np.uint32)] * pad), np.uint32),
             window=window, dense=dense)
    return self.programs.run("append", self.params if params is None else params, decode_state, r)

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
    return self.programs.run("copy_prefix", decode_state, self._put(src, np.int32),
                             self._put(dst, np.int32), self.window_for(length))

  def score(self, token_ids: Sequence[int], params: Any = None) -> np.ndarray:
    """log p(token_ids[t] | token_ids[:t]) for t >= 1 under the engine's weights (one forward)."""
    n = len(token_ids)
    width = _pow2_at_least(max(n, 16))
    tok = np.zeros((1, width), np.int32)
    tok[0, :n] = token_ids
    out = self.programs.run("score", self.params if params is None else params,
                            self._put(tok, np.int32))
    return self.placement.host(out)[:n - 1]

  def compile_counts(self) -> dict[str, int]:
    """How many programs each jitted entry point holds (a swap must not add any)."""
    return self.programs.compile_counts()
