"""The per-layer KV cache layout and the engine's in-place (dense) append path.

A dense append (the padded rows would be every slot) runs per slot on the cache window with idle
slots writing nothing; it must leave a live idle slot's cache and state untouched and give the same
tokens and logprobs as one-row (gather/scatter) appends.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stepsearch_jax import models  # noqa: E402
from stepsearch_jax.data.wordlevel import train_wordlevel  # noqa: E402
from stepsearch_jax.engine import SamplingParams, StepSearchEngine  # noqa: E402

TEXTS = ["who is the mother of alice ? <search> mother of alice </search> <information> Doc 1 "
         "</information> <answer> bob </answer> the cat sat on the mat and the dog ran away"] * 2
PROMPTS = ["who is the mother of alice ?", "the cat sat", "the dog ran away and the cat sat on",
           "bob sat on the mat"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  tok = train_wordlevel(TEXTS, str(tmp_path_factory.mktemp("tok")))
  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, tie_word_embeddings=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  path = str(tmp_path_factory.mktemp("qwen2"))
  transformers.Qwen2ForCausalLM(cfg).eval().save_pretrained(path)
  config, params = models.load_pretrained(path)
  return tok, config, params


def test_cache_layout_and_window_helpers(model):
  _, config, params = model
  cache = models.init_cache(config, 3, 40)
  assert len(cache["k"]) == len(cache["v"]) == config.num_layers
  assert cache["k"][0].shape == (3, config.num_kv_heads, config.head_dim, 40)
  assert cache["v"][0].shape == (3, config.num_kv_heads, 40, config.head_dim)
  rs = np.random.RandomState(0)
  cache = jax.tree.map(lambda c: jnp.asarray(rs.randn(*c.shape), c.dtype), cache)
  rows = jnp.asarray([2, 0])
  sub = models.cache_window(cache, 16, rows)
  assert sub["k"][1].shape[models.CACHE_SEQ_AXIS["k"]] == 16
  np.testing.assert_array_equal(sub["v"][1], np.asarray(cache["v"][1])[[2, 0], :, :16])
  np.testing.assert_array_equal(sub["k"][0], np.asarray(cache["k"][0])[[2, 0], :, :, :16])
  bumped = jax.tree.map(lambda s: s + 1, sub)
  back = models.cache_put_window(cache, bumped, rows)
  want = np.asarray(cache["k"][1]).copy()
  want[[2, 0], :, :, :16] += 1
  np.testing.assert_array_equal(back["k"][1], want)
  np.testing.assert_array_equal(back["v"][0][1], np.asarray(cache["v"][0])[1])  # row 1 untouched

  # Pre-split layer weights give the same cached forward as slicing them inside.
  tokens = jnp.asarray(rs.randint(1, 20, size=(2, 5)), jnp.int32)
  a, _ = models.forward_cached(config, params, tokens, models.init_cache(config, 2, 8),
                               jnp.zeros(2, jnp.int32))
  b, _ = models.forward_cached(config, params, tokens, models.init_cache(config, 2, 8),
                               jnp.zeros(2, jnp.int32), layers=models.split_layers(config, params))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _emit(engine, state, steps):
  outs = [[] for _ in range(engine.num_slots)]
  lps = [[] for _ in range(engine.num_slots)]
  for _ in range(steps):
    state, result, (logprobs, _) = engine.generate_rl(engine.params, state)
    data = np.asarray(result.data)
    for s in range(engine.num_slots):
      if data[s, 1]:
        outs[s].append(int(data[s, 0]))
        lps[s].append(float(np.asarray(logprobs)[s]))
  return state, outs, lps


def test_dense_append_with_a_live_idle_slot_equals_one_row_appends(model):
  tok, config, params = model
  kw = dict(num_slots=4, cache_len=160, max_prefill_length=64, stop_strings=(), max_tokens=8)
  dense = StepSearchEngine(config, params, tok, **kw)
  single = StepSearchEngine(config, params, tok, **kw)
  prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
  hot = SamplingParams(temperature=1.5, top_p=0.9)
  keys = [dense.request_key(i) for i in range(4)]

  def run(engine, one_row):
    state = engine.init_decode_state()
    groups = [[0], [1], [2], [3]] if one_row else [[0, 1, 2, 3]]
    for g in groups:
      state = engine.append(state, g, [prompts[s] for s in g], [0] * len(g), max_new=20,
                            sampling=hot, keys=[keys[s] for s in g])
    state, first, first_lp = _emit(engine, state, 3)
    pos = [len(p) + len(o) for p, o in zip(prompts, first)]
    # Tool results into slots 0..2 while slot 3 keeps decoding: 3 rows pad to all 4 slots, so
    # `dense` runs the in-place path with slot 3 idle; `single` appends one row at a time.
    groups = [[0], [1], [2]] if one_row else [[0, 1, 2]]
    for g in groups:
      state = engine.append(state, g, [prompts[(s + 1) % 4] for s in g], [pos[s] for s in g],
                            max_new=6, sampling=SamplingParams.greedy(), keys=[keys[s] for s in g])
    state, more, more_lp = _emit(engine, state, 8)
    return first + more, first_lp + more_lp

  d_out, d_lp = run(dense, one_row=False)
  s_out, s_lp = run(single, one_row=True)
  assert d_out == s_out
  assert all(len(o) >= 3 for o in d_out[:4]) and all(d_out[4:7])
  assert d_out[7]                                       # slot 3 decoded on through the append
  np.testing.assert_allclose(sum(d_lp, []), sum(s_lp, []), atol=1e-5)
