"""Model parity with transformers+torch (the oracle), KV-cache semantics, HF export, value model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stepsearch_jax import models  # noqa: E402
from stepsearch_jax.models import hf as hf_io  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=0)
HF_CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(**TINY, rope_theta=10000.0, tie_word_embeddings=True),
    "llama": lambda: transformers.LlamaConfig(**TINY, rope_theta=500.0, tie_word_embeddings=False,
                                              attention_bias=True),
}


def _torch_model(kind, seed=0):
  """A random HF model with peaked logits (std 0.15) and non-trivial norms/biases."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[kind]()).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request, tmp_path_factory):
  model = _torch_model(request.param)
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path)
  config, params = models.load_pretrained(path)
  return request.param, model, config, params, path


def _torch_logits(model, tokens, mask=None, positions=None):
  kwargs = {}
  if mask is not None:
    kwargs["attention_mask"] = torch.tensor(np.asarray(mask))
  if positions is not None:
    kwargs["position_ids"] = torch.tensor(np.asarray(positions))
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens)), **kwargs).logits.numpy()


def test_config_mapping(pair):
  kind, model, config, _, _ = pair
  assert config.model_type == kind
  assert config.num_layers == 2 and config.num_kv_heads == 2 and config.head_dim == 16
  assert config.tie_word_embeddings == (kind == "qwen2")
  assert config.qkv_bias and config.o_bias == (kind == "llama")
  assert config.rope_theta == (10000.0 if kind == "qwen2" else 500.0)


def test_logits_match_transformers(pair):
  _, model, config, params, _ = pair
  tokens = np.random.RandomState(0).randint(1, 128, size=(2, 12)).astype(np.int32)
  ours = np.asarray(models.apply_lm(config, params, jnp.asarray(tokens)))
  assert ours.dtype == np.float32 and ours.shape == (2, 12, 128)
  np.testing.assert_allclose(ours, _torch_logits(model, tokens), atol=1e-4, rtol=0)


def test_left_and_right_padding_match_transformers(pair):
  _, model, config, params, _ = pair
  tokens = np.random.RandomState(1).randint(1, 128, size=(2, 10)).astype(np.int32)
  mask = np.ones((2, 10), np.int32)
  mask[0, :3] = 0      # left padding
  mask[1, 7:] = 0      # right padding
  positions = np.asarray(models.default_positions(jnp.asarray(mask)))
  assert positions[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
  ours = np.asarray(models.apply_lm(config, params, jnp.asarray(tokens), jnp.asarray(mask)))
  ref = _torch_logits(model, tokens, mask, positions)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
  assert np.isfinite(ours).all()


def test_chunked_attention_long_rows_match_transformers(pair):
  """Rows of 256 tokens go through `_causal_attention` in 4 query chunks: left and right padding
  still equal transformers' logits, chunk boundaries included."""
  from stepsearch_jax.models import decoder
  _, model, config, params, _ = pair
  assert decoder._chunk_count(256) == 4
  tokens = np.random.RandomState(2).randint(1, 128, size=(2, 256)).astype(np.int32)
  mask = np.ones((2, 256), np.int32)
  mask[0, :70] = 0      # left padding across the first chunk boundary
  mask[1, 190:] = 0     # right padding
  positions = np.asarray(models.default_positions(jnp.asarray(mask)))
  ours = np.asarray(models.apply_lm(config, params, jnp.asarray(tokens), jnp.asarray(mask)))
  ref = _torch_logits(model, tokens, mask, positions)
  np.testing.assert_allclose(ours[mask.astype(bool)], ref[mask.astype(bool)], atol=2e-4, rtol=0)


def test_chunked_attention_equals_one_block_with_segments(monkeypatch):
  """Packed segment ids: the chunked causal attention and one dense block agree in value and
  gradient at every real query (the skipped blocks are exactly the masked ones). Queries with no
  visible key (left padding) average whatever keys their block holds: unread either way."""
  from stepsearch_jax.models import decoder
  rng = np.random.RandomState(3)
  b, t, kh, g, d = 2, 320, 2, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((b, t, kh, g, d), (b, t, kh, d), (b, t, kh, d)))
  seg = np.zeros((b, t), np.int32)
  seg[0, :100], seg[0, 100:250], seg[0, 250:300] = 1, 2, 3    # packed row, padded tail
  seg[1, 40:] = 1                                              # left-padded row
  seg = jnp.asarray(seg)
  assert decoder._chunk_count(t) == 5

  real = (seg > 0)[:, :, None, None, None]

  def run(chunks):
    monkeypatch.setattr(decoder, "QUERY_CHUNKS", chunks)
    f = lambda q, k, v: jnp.where(real, decoder._causal_attention(q, k, v, seg, 0.3) ** 2,  # noqa: E731
                                  0.0).sum()
    return jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)

  (dense, dense_g), (chunked, chunked_g) = run(1), run(16)
  np.testing.assert_allclose(chunked, dense, rtol=1e-5)
  for a, c in zip(dense_g, chunked_g):
    np.testing.assert_allclose(c, a, atol=1e-4, rtol=1e-4)


def _greedy(config, params, prompts, steps, bucket=16, max_len=64):
  """Prefill a padded bucket (rows of different lengths), then T=1 decode steps."""
  b = len(prompts)
  tokens = np.zeros((b, bucket), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  cache = models.init_cache(config, b, max_len)
  logits, cache = models.forward_cached(config, params, jnp.asarray(tokens), cache,
                                        jnp.zeros(b, jnp.int32), last_only=True,
                                        last_index=lengths - 1)
  out = []
  index = lengths
  for _ in range(steps):
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out.append(np.asarray(nxt))
    logits, cache = models.forward_cached(config, params, nxt[:, None], cache, index,
                                          last_only=True)
    index = index + 1
  return np.stack(out, axis=1)


def test_greedy_kv_cache_matches_generate(pair):
  _, model, config, params, _ = pair
  rs = np.random.RandomState(2)
  prompts = [rs.randint(1, 128, size=5).tolist(), rs.randint(1, 128, size=9).tolist()]
  ours = _greedy(config, params, prompts, 32)
  for row, prompt in enumerate(prompts):
    with torch.no_grad():
      ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False, pad_token_id=0)
    assert ours[row].tolist() == ref[0, len(prompt):].tolist(), f"row {row}"


def test_append_chunk_matches_full_forward(pair):
  """Appending a tool-result chunk (T>1 at cache_index = current length) in a padded bucket."""
  _, _, config, params, _ = pair
  rs = np.random.RandomState(3)
  seq = rs.randint(1, 128, size=(2, 13)).astype(np.int32)
  full = np.asarray(models.apply_lm(config, params, jnp.asarray(seq)))
  cache = models.init_cache(config, 2, 32)
  first = np.zeros((2, 8), np.int32)
  first[:, :6] = seq[:, :6]
  _, cache = models.forward_cached(config, params, jnp.asarray(first), cache,
                                   jnp.zeros(2, jnp.int32))
  chunk = np.zeros((2, 8), np.int32)
  chunk[:, :7] = seq[:, 6:]
  logits, cache = models.forward_cached(config, params, jnp.asarray(chunk), cache,
                                        jnp.full(2, 6, jnp.int32))
  np.testing.assert_allclose(np.asarray(logits)[:, :7], full[:, 6:], atol=1e-4, rtol=0)
  last, _ = models.forward_cached(config, params, jnp.asarray(chunk), cache,
                                  jnp.full(2, 6, jnp.int32), last_only=True,
                                  last_index=jnp.asarray([6, 2]))
  np.testing.assert_allclose(np.asarray(last), full[[0, 1], [12, 8]], atol=1e-4, rtol=0)


def test_hidden_states_then_logits_equals_apply(pair):
  _, _, config, params, _ = pair
  tokens = jnp.asarray(np.random.RandomState(4).randint(0, 128, size=(2, 7)), jnp.int32)
  hidden = models.hidden_states(config, params, tokens)
  assert hidden.shape == (2, 7, 64)
  np.testing.assert_allclose(np.asarray(models.logits_from_hidden(config, params, hidden)),
                             np.asarray(models.apply_lm(config, params, tokens)), atol=1e-6)


def test_export_reloads_in_transformers(pair, tmp_path):
  kind, _, config, params, _ = pair
  fresh = models.init_params(config, jax.random.key(7))
  models.save_pretrained(str(tmp_path), config, fresh)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
  assert reloaded.config.model_type == kind
  tokens = np.random.RandomState(5).randint(0, 128, size=(2, 9)).astype(np.int32)
  np.testing.assert_allclose(np.asarray(models.apply_lm(config, fresh, jnp.asarray(tokens))),
                             _torch_logits(reloaded, tokens), atol=1e-4, rtol=0)
  assert os.path.exists(tmp_path / "generation_config.json")


def test_sharded_index_loads(pair, tmp_path):
  _, model, config, params, _ = pair
  model.save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")
  assert os.path.exists(tmp_path / "hf" / hf_io.INDEX_FILE)
  _, loaded = models.load_pretrained(str(tmp_path / "hf"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, loaded)
  # Our own sharded writer round-trips too.
  models.save_pretrained(str(tmp_path / "ours"), config, params, max_shard_bytes=40_000)
  assert os.path.exists(tmp_path / "ours" / hf_io.INDEX_FILE)
  _, again = models.load_pretrained(str(tmp_path / "ours"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, again)


def test_value_model_from_policy(pair):
  _, _, config, params, _ = pair
  vparams = models.init_value_params(config, jax.random.key(1), params)
  assert set(vparams) == {"trunk", "head"}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, vparams["trunk"])
  tokens = jnp.asarray(np.random.RandomState(6).randint(0, 128, size=(2, 5)), jnp.int32)
  values = models.apply_value(config, vparams, tokens)
  assert values.shape == (2, 5) and values.dtype == jnp.float32
  hidden = models.hidden_states(config, params, tokens)
  expected = hidden @ vparams["head"]["kernel"] + vparams["head"]["bias"]
  np.testing.assert_allclose(np.asarray(values), np.asarray(expected), atol=1e-5)
  assert float(jnp.std(values)) > 0


def test_missing_and_misshaped_tensors_name_them(pair, tmp_path):
  _, _, config, params, _ = pair
  models.save_pretrained(str(tmp_path), config, params)
  st = hf_io.SafetensorsFile(str(tmp_path / "model.safetensors"))
  tensors = {n: np.array(st.get(n)) for n in st.names}
  victim = "model.layers.1.mlp.up_proj.weight"
  del tensors[victim]
  del st
  hf_io.save_safetensors(str(tmp_path / "model.safetensors"), tensors)
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
    models.load_pretrained(str(tmp_path))
  models.save_pretrained(str(tmp_path), config, params)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["intermediate_size"] = 96
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj"
                                       r"\.weight has shape \(128, 64\), expected \(96, 64\)"):
    models.load_pretrained(str(tmp_path))


def test_remat_and_bf16(pair):
  """remat changes memory, not math; bf16 compute stays close to float32 logits."""
  _, _, config, params, _ = pair
  tokens = jnp.asarray(np.random.RandomState(8).randint(0, 128, size=(2, 6)), jnp.int32)

  def loss(p, cfg):
    logp = jax.nn.log_softmax(models.apply_lm(cfg, p, tokens))
    return -jnp.mean(jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1))
  g0 = jax.grad(loss)(params, config)
  g1 = jax.grad(loss)(params, config.replace(remat=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
               g0, g1)
  f32 = models.apply_lm(config, params, tokens)
  bf16 = models.apply_lm(config.replace(dtype="bfloat16"), params, tokens)
  assert bf16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(f32 - bf16))) < 0.1 * float(jnp.max(jnp.abs(f32)))


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="model_type"):
    models.ModelConfig.from_hf({"model_type": "gpt2"})
  with pytest.raises(ValueError, match="rope_scaling.rope_type='yarn'"):
    models.ModelConfig.from_hf({"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8,
                                "intermediate_size": 8, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn"}})
  with pytest.raises(ValueError, match="num_kv_heads"):
    models.ModelConfig(num_heads=4, num_kv_heads=3)
