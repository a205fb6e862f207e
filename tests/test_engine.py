"""StepSearchEngine against transformers+torch on the same weights, plus the RL extras."""


import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stepsearch_jax import models  # noqa: E402
from stepsearch_jax.data.wordlevel import train_wordlevel  # noqa: E402
from stepsearch_jax.engine import SamplingParams, StepSearchEngine  # noqa: E402
from stepsearch_jax.rollout.schedule import decode_rows  # noqa: E402

TEXTS = ["who is the mother of alice ? <search> mother of alice </search> <information> Doc 1 "
         "</information> <answer> bob </answer> the cat sat on the mat and the dog ran away"] * 2
PROMPTS = ["who is the mother of alice ?", "the cat sat", "the dog ran away and the cat sat on",
           "bob sat on the mat", "alice ran"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return train_wordlevel(TEXTS, str(tmp_path_factory.mktemp("tok")))


def _hf_model(tok, kind, path):
  torch.manual_seed(0)
  common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  if kind == "llama":
    cfg = transformers.LlamaConfig(head_dim=16, tie_word_embeddings=False, **common)
    model = transformers.LlamaForCausalLM(cfg)
  else:
    cfg = transformers.Qwen2Config(tie_word_embeddings=False, **common)
    model = transformers.Qwen2ForCausalLM(cfg)
  model.eval().save_pretrained(path)
  return model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tok, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(request.param))
  hf = _hf_model(tok, request.param, path)
  config, params = models.load_pretrained(path)
  engine = StepSearchEngine(config, params, tok, num_slots=4, cache_len=128,
                            max_prefill_length=64, stop_strings=(), max_tokens=12)
  return hf, engine


def _hf_greedy(hf, ids, n, eos):
  with torch.no_grad():
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=eos)
  out = out[0, len(ids):].tolist()
  return out


def _drain(engine, state, steps):
  outs = [[] for _ in range(engine.num_slots)]
  lps = [[] for _ in range(engine.num_slots)]
  for _ in range(steps):
    state, result, (logprobs, _) = engine.generate_rl(engine.params, state)
    res = result.convert_to_numpy()
    for s in range(engine.num_slots):
      slot = res.get_result_at_slot(s)
      if slot.valid[0, 0]:
        outs[s].append(int(slot.tokens[0, 0]))
        lps[s].append(float(np.asarray(logprobs)[s]))
  return state, outs, lps


def test_greedy_matches_transformers_generate(setup, tok):
  hf, engine = setup
  state = engine.init_decode_state()
  prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS[:4]]
  for slot, ids in enumerate(prompts):
    padded = np.zeros(16, np.int32)
    padded[:len(ids)] = ids
    prefix = engine.prefill(params=engine.params, padded_tokens=padded, true_length=len(ids))
    state = engine.insert(prefix, state, slot)
  state, outs, lps = _drain(engine, state, 14)
  for slot, ids in enumerate(prompts):
    want = _hf_greedy(hf, ids, 12, tok.eos_token_id)
    got = outs[slot]
    # The engine stops on EOS/PAD (and emits it); compare up to the same point.
    assert got == want[:len(got)] and len(got) >= min(len(want), 1), (slot, got, want)
    assert len(got) == 12 or got[-1] in engine.eos_ids
    # Sampler logprobs equal log_softmax of the full-sequence forward on the same tokens.
    full = np.asarray(models.apply_lm(engine.config, engine.params,
                                      np.asarray([ids + got], np.int32)))[0]
    ref = jax.nn.log_softmax(full, axis=-1)
    expect = [float(ref[len(ids) - 1 + i, t]) for i, t in enumerate(got)]
    np.testing.assert_allclose(lps[slot], expect, atol=2e-4)


def test_append_into_live_slot_equals_single_prefill(setup, tok):
  """Prefill a prompt in two pieces (append into the same slot) == one prefill of it all."""
  _, engine = setup
  ids = tok.encode(PROMPTS[2], add_special_tokens=False)
  state = engine.init_decode_state()
  state = engine.append(state, [1], [ids[:3]], [0], max_new=1)
  state, _, _ = _drain(engine, state, 3)                       # slot 1 emits one token, stops
  state = engine.append(state, [0, 1], [ids, ids[3:]], [0, 3], max_new=8)  # slot 1: from pos 3
  state, outs, _ = _drain(engine, state, 10)
  assert outs[0] and outs[1] == outs[0]


def test_copy_prefix_then_suffix_equals_whole_prompts(setup, tok):
  """Prefix sharing: prefill a common prefix once into slot 2, copy it into slots 0 and 3, append
  each prompt's suffix; tokens and logprobs equal prefilling every whole prompt."""
  _, engine = setup
  common = tok.encode(PROMPTS[2], add_special_tokens=False)
  tails = [tok.encode(p, add_special_tokens=False) for p in (PROMPTS[0], PROMPTS[3], PROMPTS[4])]
  rows, slots = [common + t for t in tails], [0, 2, 3]
  state = engine.init_decode_state()
  state = engine.append(state, [1], [common[:2]], [0], max_new=12)       # slot 1 decodes meanwhile
  whole = engine.append(engine.init_decode_state(), slots, rows, [0] * 3, max_new=8)
  whole, want, want_lp = _drain(engine, whole, 10)
  state = engine.append(state, [2], [common], [0], max_new=8)
  state = engine.copy_prefix(state, 2, [0, 3], len(common))
  state = engine.append(state, slots, tails, [len(common)] * 3, max_new=8)
  state, got, got_lp = _drain(engine, state, 10)
  assert [got[s] for s in slots] == [want[s] for s in slots] and all(got[s] for s in slots)
  np.testing.assert_allclose(sum((got_lp[s] for s in slots), []),
                             sum((want_lp[s] for s in slots), []), atol=1e-5)
  assert got[1]                                          # the decoding slot was left alone
  with pytest.raises(ValueError, match="slot 7"):
    engine.copy_prefix(state, 7, [0], 3)


def test_decode_block_reading_a_shared_prefix_once_equals_reading_every_row(setup, tok):
  """decode_block(shared=(slot, n)): rows that share a 170-token prefix read its keys/values
  once (from one slot) instead of from every row; tokens and logprobs are unchanged, in the
  all-slot and the few-row program."""
  _, engine = setup
  kw = dict(num_slots=4, cache_len=300, max_prefill_length=64, stop_strings=(), max_tokens=12)
  eng = StepSearchEngine(engine.config, engine.params, tok, **kw)
  ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
  common = (ids[2] * 30)[:170]
  tails = [ids[0], ids[3], ids[4], ids[1]]
  hot = SamplingParams(temperature=1.5)

  def run(slots, shared):
    state = eng.append(eng.init_decode_state(), [slots[0]], [common], [0], max_new=1)
    state = eng.copy_prefix(state, slots[0], slots[1:], len(common))
    state = eng.append(state, slots, [tails[s] for s in slots], [len(common)] * len(slots),
                       max_new=10, sampling=hot, keys=[eng.request_key(s) for s in slots])
    outs, lps = [[] for _ in range(4)], [[] for _ in range(4)]
    while True:
      state, out = eng.decode_block(eng.params, state, 4, 8,
                                    shared=(slots[0], len(common)) if shared else None,
                                    rows=decode_rows(np.isin(np.arange(4), slots)))
      for s in range(4):
        v = out["valid"][:, s]
        outs[s] += out["tokens"][v, s].tolist()
        lps[s] += out["logprobs"][v, s].tolist()
      if not out["valid"].any() or not out["valid"][-1].any():
        return outs, lps

  cases = ([0, 1, 2, 3], [1, 3])                # every slot; two rows (gathered)
  plain = [run(slots, False) for slots in cases]
  programs = eng._decode_block_jit._cache_size()
  for slots, (want, want_lp) in zip(cases, plain):
    got, got_lp = run(slots, True)
    assert got == want and all(got[s] for s in slots)
    np.testing.assert_allclose(sum(got_lp, []), sum(want_lp, []), atol=1e-5)
  # the shared-prefix programs (offset 160 of the 170 shared tokens: SHARED_PREFIX_STEP 32, not a
  # multiple of the 128-slot window) are new ones that ran
  assert eng._decode_block_jit._cache_size() >= programs + 2


def test_stop_sequence_and_cap(setup, tok):
  hf, engine = setup
  for prompt in PROMPTS:   # a prompt whose greedy output has a new token after position 0
    ids = tok.encode(prompt, add_special_tokens=False)
    free = _hf_greedy(hf, ids, 12, tok.eos_token_id)
    free = free[:next((i for i, t in enumerate(free) if t in engine.eos_ids), len(free))]
    fresh = [i for i in range(1, len(free)) if free[i] not in free[:i]]
    if fresh:
      break
  first = fresh[0]
  stop_word = tok.decode([free[first]])
  stopper = StepSearchEngine(engine.config, engine.params, tok, num_slots=2, cache_len=128,
                             max_prefill_length=64, stop_strings=(stop_word,), max_tokens=12)
  state = stopper.append(stopper.init_decode_state(), [0, 1], [ids, ids], [0, 0],
                         max_new=[12, first])
  state, outs, _ = _drain(stopper, state, 14)
  assert outs[0] == free[:first + 1]          # stop token emitted, nothing after
  assert outs[1] == free[:first]              # per-slot token cap


def test_sampling_params(setup, tok):
  _, engine = setup
  ids = tok.encode(PROMPTS[1], add_special_tokens=False)
  key = engine.request_key(7)
  top1 = SamplingParams(temperature=1.0, top_k=1)
  hot = SamplingParams(temperature=5.0, top_p=0.9)
  state = engine.append(engine.init_decode_state(), [0, 1, 2, 3], [ids] * 4, [0] * 4,
                        max_new=10, sampling=[SamplingParams.greedy(), top1, hot, hot],
                        keys=[key, key, key, key])
  state, outs, _ = _drain(engine, state, 11)
  assert outs[0] == outs[1]                   # top-k 1 is greedy
  assert outs[2] == outs[3]                   # same key and positions -> same draws
  assert outs[2] != outs[0]                   # temperature 5 leaves the greedy path


def test_weight_swap_changes_output_without_recompiling(setup, tok):
  _, engine = setup
  ids = tok.encode(PROMPTS[0], add_special_tokens=False)
  original = engine.params

  def run():
    state = engine.append(engine.init_decode_state(), [0], [ids], [0], max_new=8)
    return _drain(engine, state, 9)[1][0]

  before = run()
  counts = engine.compile_counts()
  new = models.init_params(engine.config, jax.random.PRNGKey(123))
  new = jax.tree_util.tree_map(lambda a, b: b.astype(a.dtype), original, new)
  try:
    engine.swap_params(new)
    after = run()
    assert after != before
    assert engine.compile_counts() == counts
    with pytest.raises(ValueError, match="swap_params"):
      engine.swap_params({"not": np.zeros(3)})
  finally:
    engine.swap_params(original)
  assert run() == before


def test_decode_block_goes_on_over_the_stragglers_alone(setup, tok):
  """Once at most half of a block's rows are active, the block continues over those rows only
  (a half-width loop): tokens and logprobs equal one `generate` per token, in one device call."""
  _, engine = setup
  kw = dict(num_slots=8, cache_len=200, max_prefill_length=64, stop_strings=())
  fast = StepSearchEngine(engine.config, engine.params, tok, **kw)
  slow = StepSearchEngine(engine.config, engine.params, tok, **kw)
  rows = [tok.encode(PROMPTS[i % len(PROMPTS)], add_special_tokens=False) for i in range(8)]
  caps = [14, 2, 3, 2, 11, 4, 1, 3]           # 2 rows run on after step 4: the half-width loop
  hot = SamplingParams(temperature=1.5)
  keys = [fast.request_key(i) for i in range(8)]
  state = slow.init_decode_state()
  for i in range(8):
    state = slow.append(state, [i], [rows[i]], [0], max_new=caps[i], sampling=hot, keys=[keys[i]])
  _, want, want_lp = _drain(slow, state, 16)
  state = fast.append(fast.init_decode_state(), list(range(8)), rows, [0] * 8, max_new=caps,
                      sampling=hot, keys=keys)
  state, out = fast.decode_block(fast.params, state, 4, 32)
  got = [out["tokens"][out["valid"][:, s], s].tolist() for s in range(8)]
  got_lp = [out["logprobs"][out["valid"][:, s], s].tolist() for s in range(8)]
  assert got == want and all(0 < len(g) <= c for g, c in zip(got, caps))
  # the block ran past the point where at most 4 of the 8 rows were left, in one call
  assert int(out["valid"][4].sum()) <= 4 and len(out["tokens"]) == max(map(len, got)) > 8
  np.testing.assert_allclose(sum(got_lp, []), sum(want_lp, []), atol=1e-5)


def test_decode_block_and_batched_append_equal_generate_and_per_slot_append(setup, tok):
  """The native driver's fast path (one batched append, k steps per call on a cache window)
  emits the same tokens and logprobs as per-slot appends + one `generate` per token, including
  a slot whose cache reaches past the window that later blocks use, then appended to again."""
  _, engine = setup
  kw = dict(num_slots=4, cache_len=300, max_prefill_length=64, stop_strings=(), max_tokens=12)
  fast = StepSearchEngine(engine.config, engine.params, tok, **kw)
  slow = StepSearchEngine(engine.config, engine.params, tok, **kw)
  prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS[:3]]
  long = (prompts[2] * 20)[:150]                         # slot 3 lives past slot 128
  rows = prompts + [long]
  hot = SamplingParams(temperature=2.0, top_p=0.95)
  sampling = [SamplingParams.greedy(), hot, SamplingParams(temperature=1.0), hot]
  keys = [fast.request_key(i) for i in range(4)]
  caps = [12, 5, 9, 3]

  def run_slow(state, slots, toks, starts):
    for i, s in enumerate(slots):
      state = slow.append(state, [s], [toks[i]], [starts[i]], max_new=caps[s],
                          sampling=sampling[s], keys=[keys[s]])
    state, outs, lps = _drain(slow, state, 14)
    return state, outs, lps

  def run_fast(state, slots, toks, starts, steps):
    state = fast.append(state, slots, toks, starts, max_new=[caps[s] for s in slots],
                        sampling=[sampling[s] for s in slots], keys=[keys[s] for s in slots])
    outs, lps, ran = [[] for _ in range(4)], [[] for _ in range(4)], []
    while True:
      state, out = fast.decode_block(fast.params, state, steps)
      ran.append(len(out["tokens"]))
      for s in range(4):
        v = out["valid"][:, s]
        outs[s] += out["tokens"][v, s].tolist()
        lps[s] += out["logprobs"][v, s].tolist()
      if len(out["tokens"]) < steps or not out["valid"].any():
        return state, outs, lps, ran

  s_state, s_outs, s_lps = run_slow(slow.init_decode_state(), [0, 1, 2, 3], rows, [0] * 4)
  f_state, f_outs, f_lps, ran = run_fast(fast.init_decode_state(), [0, 1, 2, 3], rows, [0] * 4, 4)
  assert f_outs == s_outs and all(0 < len(o) <= c for o, c in zip(f_outs, caps))
  assert sum(map(len, f_outs)) > 10
  np.testing.assert_allclose(sum(f_lps, []), sum(s_lps, []), atol=1e-5)
  assert ran[-1] < 4                                    # the block ends once no slot is active
  # Append a tool result to slots 1 and 3 (slot 3 at position ~153, past the 128 window the
  # last blocks used, so those blocks must have left its cache intact) and decode on.
  pos = [len(r) + len([t for t in o if t not in fast.eos_ids]) for r, o in zip(rows, f_outs)]
  more = [prompts[0], prompts[1]]
  s_state, s_outs, s_lps = run_slow(s_state, [1, 3], more, [pos[1], pos[3]])
  f_state, f_outs, f_lps, _ = run_fast(f_state, [1, 3], more, [pos[1], pos[3]], 16)
  assert f_outs == s_outs and f_outs[1] and f_outs[3]
  np.testing.assert_allclose(sum(f_lps, []), sum(s_lps, []), atol=1e-5)
  assert fast.window_for(pos[3]) == 256 and fast.window_for(20) == 128
  assert fast.window_for(10_000) == fast.cache_len
