"""Qwen2.5-3B/7B configs for every target mesh, and launch/capacity.py's arithmetic."""

import importlib.util
import json
import pathlib

import pytest

from stepsearch_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ["configs/qwen2_5_3b.py", "configs/qwen2_5_7b.py"]


def _load(rel):
  spec = importlib.util.spec_from_file_location(pathlib.Path(rel).stem, ROOT / rel)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


capacity = _load("launch/capacity.py")
CASES = [(rel, t) for rel in CONFIGS for t in _load(rel).TARGETS]


@pytest.mark.parametrize("rel,target", CASES)
def test_config_validates_with_paper_settings_and_a_mesh_that_fits_the_target(rel, target):
  module = _load(rel)
  cfg = config_lib.validate(module.get_config(target))
  chip, chips, hosts, data, fsdp, tensor = module.TARGETS[target]
  assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (data, fsdp, tensor)
  assert data * fsdp * tensor == chips and chips % hosts == 0
  assert cfg.algo.micro_batch % (data * fsdp) == 0, "micro-batch must split over batch axes"
  assert module.MODEL["num_kv_heads"] % tensor == 0 and module.MODEL["num_heads"] % tensor == 0
  # method §4.2
  assert cfg.optim.actor_lr == cfg.optim.critic_lr == 5e-7
  assert (cfg.optim.actor_warmup, cfg.optim.critic_warmup) == (319, 56)
  assert (cfg.data.batch_size, cfg.algo.mini_batch, cfg.algo.micro_batch) == (128, 32, 16)
  assert (cfg.rollout.max_turns, cfg.rollout.max_tokens_per_turn, cfg.rollout.max_obs_tokens) == (
      5, 800, 800)
  assert (cfg.rollout.max_context, cfg.rollout.max_start) == (4096, 2048)
  assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k) == (1.0, 0.95, -1)
  assert (cfg.retrieval.topk, cfg.algo.kl_coef, cfg.algo.clip_ratio) == (3, 0.001, 0.2)
  assert (cfg.algo.value_clip, cfg.algo.entropy_coef, cfg.algo.gamma, cfg.algo.lam) == (
      0.5, 0.001, 1.0, 1.0)
  assert (cfg.total_steps, cfg.save_every, cfg.eval_every) == (1120, 60, 60)
  assert cfg.model.dtype == "bfloat16" and cfg.model.remat
  assert cfg.model.hf_path == f"/data/models/{module.MODEL['name']}"


def test_default_and_unknown_target():
  module = _load(CONFIGS[0])
  assert module.get_config().mesh.fsdp == module.TARGETS[module.DEFAULT_TARGET][4]
  with pytest.raises(ValueError, match="unknown target 'v9-1'"):
    module.get_config("v9-1")


@pytest.mark.parametrize("rel,expected_b", [(CONFIGS[0], 3.09), (CONFIGS[1], 7.62)])
def test_param_counts_match_transformers_qwen2(rel, expected_b):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  d = _load(rel).MODEL
  hf = transformers.Qwen2Config(
      vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=d["num_layers"],
      num_attention_heads=d["num_heads"], num_key_value_heads=d["num_kv_heads"],
      intermediate_size=d["intermediate_size"], tie_word_embeddings=d["tie_word_embeddings"])
  with torch.device("meta"):
    model = transformers.Qwen2ForCausalLM(hf)
  oracle = sum(p.numel() for p in model.parameters())   # tied weights are counted once
  counts = capacity.param_counts(d)
  assert counts["actor"] == oracle
  assert round(oracle / 1e9, 2) == expected_b           # the published model sizes
  lm_head = 0 if d["tie_word_embeddings"] else d["vocab_size"] * d["hidden_size"]
  assert counts["critic"] == oracle - lm_head + d["hidden_size"] + 1


def test_memory_terms():
  module = _load(CONFIGS[0])
  cfg = module.get_config("v5e-16")
  d = module.MODEL
  mem = capacity.memory(cfg, d, (1, 16, 1))
  n = capacity.param_counts(d)["actor"]
  assert mem["params"] == pytest.approx(n * 4 / 16)
  assert mem["optimizer"] == pytest.approx(2 * mem["params"])
  assert mem["reference"] == pytest.approx(n * 2 / 16)
  # 128 slots x 4096 x 36 layers x (K,V) x 2 KV heads x 128 x bf16, over 16 chips
  assert mem["kv_cache"] == pytest.approx(128 * 4096 * 36 * 2 * 2 * 128 * 2 / 16)
  # tensor=4 does not divide 2 KV heads: the cache is then split over data x fsdp only
  assert capacity.memory(cfg, d, (1, 4, 4))["kv_cache"] == pytest.approx(mem["kv_cache"] * 4)


def test_capacity_markdown_lists_every_target_and_uses_measured_mfu(tmp_path, capsys):
  bench = tmp_path / "update.json"
  capacity.main([*CONFIGS, "--bench", str(bench)])
  assumed = capsys.readouterr().out
  assert "ASSUMED" in assumed and "35% MFU" in assumed
  for rel in CONFIGS:
    for target in _load(rel).TARGETS:
      assert f"| {target} |" in assumed
  # bench/update.py's schema: the target is not a measurement; the largest model's median is used.
  bench.write_text(json.dumps({"target_update_mfu": 0.35, "results": [
      {"model": "20m", "params": 2e7, "update_mfu": 0.4},
      {"model": "135m", "params": 1.35e8, "update_mfu": 0.175}]}))
  capacity.main([f"{CONFIGS[0]}:v5e-16", "--bench", str(bench)])
  measured = capsys.readouterr().out
  assert "ASSUMED" not in measured and "18% MFU" in measured
  assert "results[1].update_mfu (135m)" in measured
  bench.write_text(json.dumps({"target_mfu": 0.9, "other": {"mfu_percent": 17.5}}))
  assert capacity.find_mfu(str(bench)) == (0.175, f"{bench}: other.mfu_percent")
  _, (row,) = capacity.rows(f"{CONFIGS[0]}:v5e-16", None, 0.175)
  _, (row35,) = capacity.rows(f"{CONFIGS[0]}:v5e-16", None, 0.35)
  assert row["seconds"] == pytest.approx(2 * row35["seconds"])
  assert f"{row['seconds']:.1f} s" in measured


def test_capacity_md_is_current():
  """launch/CAPACITY.md must be what capacity.py prints (with its MFU source) for both configs."""
  text = (ROOT / "launch" / "CAPACITY.md").read_text()
  for rel in CONFIGS:
    model, table = capacity.rows(rel, None, 0.35)
    for r in table:
      m = r["mem"]
      assert f"| {r['target']} | {r['chips']} ({r['hosts']}) |" in text
      assert f"| {m['kv_cache'] / capacity.GIB:.2f} | {m['activations'] / capacity.GIB:.2f} |" \
          f" {r['total'] / capacity.GIB:.1f} |" in text, (rel, r["target"])
