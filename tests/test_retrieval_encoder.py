"""The JAX/Flax BERT encoder against sentence-transformers on the same MiniLM weights."""

import json
import os

import numpy as np
import pytest

from retrieval import encoder as enc_lib

TEXTS = [
    "hello world",
    "Who directed the film that won the Palme d'Or in 1994?",
    '"Pulp Fiction"\nPulp Fiction is a 1994 American crime film written and directed by Quentin.',
    "word " * 400,                                   # longer than 256 tokens: truncation
    "Ünïcödé  text\twith   odd\n\nspacing and CAPITALS",
    "a",
]


@pytest.fixture(scope="module")
def jax_encoder():
  return enc_lib.Encoder(dtype="float32", max_batch=8)


def test_matches_sentence_transformers(jax_encoder):
  from sentence_transformers import SentenceTransformer
  st = SentenceTransformer(enc_lib.default_encoder_path(), device="cpu")
  ref = st.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
  ours = jax_encoder.encode(TEXTS, kind="query")
  assert ours.shape == ref.shape == (len(TEXTS), 384)
  cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
  assert cos.min() >= 0.9999, cos
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_batching_and_order_do_not_change_embeddings(jax_encoder):
  together = jax_encoder.encode(TEXTS)
  alone = np.stack([jax_encoder.encode([t])[0] for t in TEXTS[:3]])
  np.testing.assert_allclose(together[:3], alone, atol=2e-6)


def test_bfloat16_close_to_float32(jax_encoder):
  bf = enc_lib.Encoder(dtype="bfloat16", max_batch=8)
  cos = (bf.encode(TEXTS) * jax_encoder.encode(TEXTS)).sum(1)
  assert cos.min() >= 0.999, cos


def test_conventions_per_model(tmp_path):
  src = enc_lib.default_encoder_path()
  assert enc_lib.conventions_for(src) == enc_lib.Conventions()   # MiniLM: no prefixes, mean
  e5 = tmp_path / "e5-base-v2"
  e5.mkdir()
  (e5 / "config.json").write_text(json.dumps({"_name_or_path": "intfloat/e5-base-v2"}))
  c = enc_lib.conventions_for(str(e5))
  assert (c.query_prefix, c.passage_prefix, c.pooling, c.max_length) == (
      "query: ", "passage: ", "mean", 256)
  (e5 / "retrieval_conventions.json").write_text(json.dumps({"query_prefix": "q> "}))
  assert enc_lib.conventions_for(str(e5)).query_prefix == "q> "


def test_prefix_is_applied(tmp_path):
  # A MiniLM copy whose conventions file asks for e5-style prefixes must embed "query: x".
  folder = tmp_path / "minilm-prefixed"
  folder.mkdir()
  for name in os.listdir(enc_lib.default_encoder_path()):
    os.symlink(os.path.join(enc_lib.default_encoder_path(), name), folder / name)
  (folder / "retrieval_conventions.json").write_text(
      json.dumps({"query_prefix": "query: ", "passage_prefix": "passage: "}))
  e = enc_lib.Encoder(str(folder), max_batch=8)
  plain = enc_lib.Encoder(max_batch=8)
  np.testing.assert_allclose(e.encode(["paris"], "query"), plain.encode(["query: paris"]),
                             atol=2e-6)
  np.testing.assert_allclose(e.encode(["paris"], "passage"), plain.encode(["passage: paris"]),
                             atol=2e-6)


def test_missing_weight_is_named(tmp_path):
  folder = tmp_path / "broken"
  folder.mkdir()
  (folder / "config.json").write_text(open(
      os.path.join(enc_lib.default_encoder_path(), "config.json")).read())
  with pytest.raises(FileNotFoundError, match="safetensors"):
    enc_lib.load_bert(str(folder))


def test_packed_rows_match_sentence_transformers(jax_encoder):
  """Many short texts share rows (segment-masked attention, per-text positions and pooling):
  each one's embedding is still sentence-transformers' for that text alone, and cls pooling
  reads each text's own first token."""
  from sentence_transformers import SentenceTransformer
  rng = np.random.default_rng(0)
  words = "paris river film director born city war king river capital novel".split()
  texts = [" ".join(rng.choice(words, rng.integers(1, 9))) for _ in range(40)]
  lengths = [len(t) for t in jax_encoder.tokenize(texts)]
  width, rows, calls = enc_lib.plan(lengths, jax_encoder.max_batch)
  assert len(rows) < len(texts) and max(len(r) for r in rows) > 1   # packing happened
  assert all(sum(lengths[i] for i in r) <= width for r in rows)
  assert sorted(i for r in rows for i in r) == list(range(len(texts)))
  st = SentenceTransformer(enc_lib.default_encoder_path(), device="cpu")
  ref = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
  np.testing.assert_allclose(jax_encoder.encode(texts), ref, atol=2e-5)
  cls = enc_lib.Encoder(conventions=enc_lib.Conventions(pooling="cls"), max_batch=8)
  alone = np.stack([cls.encode([t])[0] for t in texts[:5]])
  np.testing.assert_allclose(cls.encode(texts)[:5], alone, atol=2e-6)


def test_split_calls_weighs_padding_against_calls():
  assert enc_lib.split_calls(34, 32, 32) == [32, 2]
  assert enc_lib.split_calls(70, 64, 16) == [64, 8]         # 2 empty rows of 16 < one more call
  assert enc_lib.split_calls(7, 64, 256) == [4, 2, 1]        # wide rows: three calls beat padding
  assert enc_lib.split_calls(0, 8, 64) == []


def _first_fit_decreasing(lengths, width, max_per_row):
  """The textbook packing, scanning every row for every text: the oracle for pack_rows."""
  rows, room = [], []
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    for r in range(len(rows)):
      if lengths[i] <= room[r] and len(rows[r]) < max_per_row:
        rows[r].append(i)
        room[r] -= lengths[i]
        break
    else:
      rows.append([i])
      room.append(width - lengths[i])
  return rows


@pytest.mark.parametrize("seed", range(20))
def test_pack_rows_is_first_fit_decreasing(seed):
  """Closing rows that can take no more texts must not change the packing."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(0, 300))
  width = int(rng.choice(enc_lib.ROW_WIDTHS[3:]))
  # odd seeds query-like: many short texts, where the per-row text limit binds
  low, high = (3, 12) if seed % 2 else (1, width + 1)
  lengths = [int(x) for x in rng.integers(low, high, n)]
  rows = enc_lib.pack_rows(lengths, width, enc_lib._slots(width))
  assert rows == _first_fit_decreasing(lengths, width, enc_lib._slots(width))
  assert sorted(i for r in rows for i in r) == list(range(n))
  assert all(sum(lengths[i] for i in r) <= width for r in rows)
