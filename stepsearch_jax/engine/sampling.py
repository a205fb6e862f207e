"""Per-row sampling on device: greedy, temperature, top-k, top-p, with the model's own logprob.

Each row carries its own parameters, so one decode batch can mix greedy validation rows with
temperature-1 training rows. The random key of a token is ``fold_in(row_key, position)``: a
trajectory's samples depend only on its key and absolute positions, not on which slot or batch
it shares, so two drivers that feed the same context draw the same tokens.

The logprob we return is ``log_softmax(logits)[token]`` of the UNMODIFIED model distribution
(temperature 1, no truncation): the quantity PPO's ratio needs. Sampling transforms only choose
the token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 = greedy; top_p 1 and top_k <= 0 disable truncation."""
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = -1

  @classmethod
  def greedy(cls) -> "SamplingParams":
    return cls(temperature=0.0, top_p=1.0, top_k=-1)

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"SamplingParams.temperature={self.temperature} must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingParams.top_p={self.top_p} must be in (0, 1]")


def _truncate(scaled: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
  """Mask logits outside each row's top-k, then outside its top-p nucleus (vLLM's order)."""
  vocab = scaled.shape[-1]
  srt = -jnp.sort(-scaled, axis=-1)                                    # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  ranks = jnp.arange(vocab)[None, :]
  srt = jnp.where(ranks < k[:, None], srt, -jnp.inf)
  probs = jax.nn.softmax(srt, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs                          # exclusive cumulative mass
  keep = (before < top_p[:, None]) & (ranks < k[:, None])
  thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1)
  return jnp.where(scaled >= thresh[:, None], scaled, -jnp.inf)


def sample(logits: jax.Array, keys: jax.Array, positions: jax.Array, temperature: jax.Array,
           top_p: jax.Array, top_k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits [B, V] float32 -> (tokens [B] int32, logprobs [B] float32)."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  do_sample = temperature > 0
  scaled = logits / jnp.where(do_sample, temperature, 1.0)[:, None]
  # The sort for top-k/top-p is the costly part; skip it when no row asks for truncation.
  needs_trunc = jnp.any(do_sample & ((top_p < 1.0) | (top_k > 0)))
  scaled = jax.lax.cond(needs_trunc, _truncate, lambda s, p, k: s, scaled, top_p, top_k)
  # The draw (a Gumbel per vocabulary entry) costs ~8x the argmax (SmolLM2 b32 on this CPU: 34
  # of a 275 ms decode step): skip it when every row is greedy (evaluation, scripted benches).

  def draw(scaled):
    row_keys = jax.vmap(jax.random.fold_in)(keys, positions.astype(jnp.uint32))
    return jax.vmap(lambda k, l: jax.random.categorical(k, l))(row_keys, scaled).astype(jnp.int32)

  drawn = jax.lax.cond(jnp.any(do_sample), draw, lambda s: greedy_tok, scaled)
  tokens = jnp.where(do_sample, drawn, greedy_tok)
  return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
