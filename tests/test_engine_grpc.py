"""JetStream's own gRPC client stub against our server streams the in-process engine's tokens."""

import contextlib
import os
import subprocess
import sys
import time

import grpc
import jax
import portpicker
import pytest

from stepsearch_jax import models
from stepsearch_jax.data.wordlevel import train_wordlevel
from stepsearch_jax.engine import StepSearchEngine
from stepsearch_jax.serve import start_server
from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["who is the mother of alice ? <search> mother of alice </search> <answer> bob </answer> "
         "the cat sat on the mat and the dog ran away"] * 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  d = tmp_path_factory.mktemp("grpc")
  tok = train_wordlevel(TEXTS, str(d / "hf"))
  config = models.ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=64,
                              intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                              head_dim=16, tie_word_embeddings=False, attention_bias=False)
  params = models.init_params(config, jax.random.PRNGKey(3))
  models.save_pretrained(str(d / "hf"), config, params)   # tokenizer files already there
  return tok, config, params, str(d / "hf")


def _in_process(engine, ids, n):
  state = engine.append(engine.init_decode_state(), [0], [ids], [0], max_new=n)
  out = []
  for _ in range(n + 1):
    state, result, _ = engine.generate_rl(engine.params, state)
    slot = result.convert_to_numpy().get_result_at_slot(0)
    if slot.valid[0, 0] and int(slot.tokens[0, 0]) not in engine.tokenizer.stop_tokens:
      out.append(int(slot.tokens[0, 0]))
    elif not slot.valid[0, 0] or int(slot.tokens[0, 0]) in engine.tokenizer.stop_tokens:
      break
  return out


def _decode(port, ids, n, session="continuation"):
  with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    grpc.channel_ready_future(channel).result(timeout=60)
    stub = jetstream_pb2_grpc.OrchestratorStub(channel)
    request = jetstream_pb2.DecodeRequest(
        session_cache=session, max_tokens=n,
        token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=ids))
    out = []
    for response in stub.Decode(request, timeout=120):
      for sample in response.stream_content.samples:
        out.extend(sample.token_ids)
    return out


def test_grpc_stub_streams_engine_tokens(model):
  tok, config, params, _ = model
  engine = StepSearchEngine(config, params, tok, num_slots=4, cache_len=160,
                            max_prefill_length=128, stop_strings=(), max_tokens=10)
  prompts = [tok.encode(t, add_special_tokens=False)
             for t in ["who is the mother of alice ?", "the cat sat on the mat and"]]
  want = [_in_process(engine, ids, 10) for ids in prompts]
  port = portpicker.pick_unused_port()
  server = start_server(engine, port)
  try:
    got = [_decode(port, ids, 10) for ids in prompts]
  finally:
    server.stop()
  assert all(len(w) > 0 for w in want)
  assert got == want


@contextlib.contextmanager
def _serve(hf_dir, log_path, max_tokens, with_config=True):
  """`python -m stepsearch_jax.serve [--config ...] --hf DIR --port N` on loopback; yields the
  port. Without a config the folder alone (model + tokenizer) must be enough."""
  port = portpicker.pick_unused_port()
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "stepsearch_jax.serve", f"--hf={hf_dir}", f"--port={port}",
         "--slots=2"]
  if with_config:
    cmd += [f"--config={ROOT}/configs/demo.py", "--config.rollout.max_context=128",
            f"--config.rollout.max_tokens_per_turn={max_tokens}"]
  log = open(log_path, "w+")
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
  try:
    deadline = time.time() + 300       # a loaded CI machine compiles slowly
    while "serving on" not in open(log_path).read():
      assert proc.poll() is None, open(log_path).read()[-3000:]
      assert time.time() < deadline, "server did not start"
      time.sleep(0.5)
    yield port
  finally:
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.parametrize("with_config", [True, False])
def test_serve_cli_on_loopback(model, tmp_path, with_config):
  """`python -m stepsearch_jax.serve [--config ...] --hf DIR --port N` answers the stub."""
  tok, config, params, hf_dir = model
  with _serve(hf_dir, tmp_path / "serve.log", 8, with_config) as port:
    ids = tok.encode("the cat sat", add_special_tokens=False)
    engine = StepSearchEngine(config, params, tok, num_slots=2, cache_len=137,
                              max_prefill_length=128, max_tokens=8)
    assert _decode(port, ids, 8) == _in_process(engine, ids, 8)


@pytest.mark.parametrize("kind", ["qwen2-untied", "qwen2-tied", "llama"])
def test_grpc_greedy_equals_transformers(tmp_path, kind):
  """JetStream's gRPC client against our server gets transformers' greedy tokens, for Qwen2
  (attention bias; tied and untied embeddings) and Llama (the issue: later tokens differed for
  Qwen2 with bias and untied embeddings while the first was right)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tok = train_wordlevel(TEXTS, str(tmp_path / "hf"))
  torch.manual_seed(0)
  common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  if kind == "llama":
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(head_dim=16,
                                                                tie_word_embeddings=False, **common))
  else:
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        tie_word_embeddings=kind == "qwen2-tied", **common))
  with torch.no_grad():   # random biases (HF initialises them at 0), so the bias path matters
    for name, p in hf.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.2)
  hf.eval().save_pretrained(tmp_path / "hf")
  prompts = [tok.encode(t, add_special_tokens=False)
             for t in ["who is the mother of alice ?", "the cat sat on the mat and",
                       "bob sat on the mat"]]
  stops = set(tok.convert_tokens_to_ids(["</search>", "</answer>"]))
  want = []
  for ids in prompts:
    with torch.no_grad():
      out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        do_sample=False, max_new_tokens=10, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.eos_token_id)
    ids_out = [t for t in out[0, len(ids):].tolist() if t != tok.eos_token_id]
    # the server stops on </search> and </answer> (emitted, then the request ends)
    cut = next((i + 1 for i, t in enumerate(ids_out) if t in stops), len(ids_out))
    want.append(ids_out[:cut])
  with _serve(tmp_path / "hf", tmp_path / "serve.log", 10) as port:
    got = [_decode(port, ids, 10) for ids in prompts]
  assert all(len(w) > 1 for w in want)
  assert got == want, (got, want)
