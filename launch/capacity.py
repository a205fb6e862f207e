#!/usr/bin/env python3
"""Memory per chip and step time, on paper, for a StePPO config on each of its target meshes.

    python launch/capacity.py configs/qwen2_5_3b.py configs/qwen2_5_7b.py > launch/CAPACITY.md
    python launch/capacity.py configs/qwen2_5_7b.py:v5e-64 --tokens 2500 --mfu 0.4

Reads the config file's get_config(target), its MODEL dims (or model.hf_path/config.json when that
folder exists) and its TARGETS table, and prints markdown. Why on paper: to pick a slice before
paying for one. Parameters are sharded over fsdp x tensor and replicated over data; the KV cache and
activations over data x fsdp (and tensor when it divides the KV heads). The sum is an upper bound:
the rollout's KV cache and the update's gradients/activations need not be live together.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 1 << 30
# Dense bf16 peak FLOP/s, HBM per chip (GiB) and HBM bandwidth (TB/s) assumed for each chip.
CHIPS = {
    "v5e": dict(peak=197e12, hbm_gib=16, hbm_tbs=0.82, label="TPU v5e"),
    "v5p": dict(peak=459e12, hbm_gib=95, hbm_tbs=2.77, label="TPU v5p"),
    "h100": dict(peak=989e12, hbm_gib=80, hbm_tbs=3.35, label="H100 SXM"),
}
ASSUMED_MFU = 0.35
FIT_FRACTION = 0.9   # leave ~10% of HBM to XLA scratch and fragmentation
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def load_config_module(spec: str):
  """`configs/x.py[:target]` -> (module, target or None)."""
  path, _, target = spec.partition(":")
  full = path if os.path.isabs(path) else str(ROOT / path)
  if not os.path.isfile(full):
    raise SystemExit(f"capacity: config file {path} not found")
  sys.path.insert(0, str(ROOT))
  mod_spec = importlib.util.spec_from_file_location(pathlib.Path(full).stem, full)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  for attr in ("MODEL", "TARGETS", "get_config"):
    if not hasattr(module, attr):
      raise SystemExit(f"capacity: {path} defines no {attr}")
  if target and target not in module.TARGETS:
    raise SystemExit(f"capacity: {path}: unknown target {target!r}; "
                     f"one of {sorted(module.TARGETS)}")
  return module, target or None


def model_dims(module, cfg) -> dict:
  """The config file's MODEL, or the staged folder's config.json when it is there."""
  dims = dict(module.MODEL)
  cfg_json = os.path.join(cfg.model.hf_path, "config.json")
  if cfg.model.hf_path and os.path.isfile(cfg_json):
    with open(cfg_json) as f:
      hf = json.load(f)
    dims.update(num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
                head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                intermediate_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                tie_word_embeddings=hf.get("tie_word_embeddings", False))
  return dims


def param_counts(d: dict) -> dict:
  """Qwen2 parameter counts: q/k/v with bias, o without, SwiGLU MLP, RMSNorms."""
  h, hd, nh, kv, i = (d["hidden_size"], d["head_dim"], d["num_heads"], d["num_kv_heads"],
                      d["intermediate_size"])
  attn = h * nh * hd + nh * hd + 2 * (h * kv * hd + kv * hd) + nh * hd * h
  layer_matmul = attn + 3 * h * i
  layer = layer_matmul + 2 * h
  embed = d["vocab_size"] * h
  trunk = embed + d["num_layers"] * layer + h
  actor = trunk + (0 if d["tie_word_embeddings"] else embed)
  critic = trunk + h + 1                         # value head on the final hidden state
  return dict(actor=actor, critic=critic,
              actor_matmul=d["num_layers"] * layer_matmul + embed,   # lm head counts as a matmul
              critic_matmul=d["num_layers"] * layer_matmul + h)


def memory(cfg, d: dict, mesh: tuple[int, int, int]) -> dict:
  """Bytes per chip for each resident buffer."""
  data, fsdp, tensor = mesh
  counts = param_counts(d)
  shard = fsdp * tensor
  pbytes = _DTYPE_BYTES[cfg.model.param_dtype]
  cbytes = _DTYPE_BYTES[cfg.model.dtype]
  batch_shards = data * fsdp
  kv_tensor = tensor if d["num_kv_heads"] % tensor == 0 else 1
  ctx = cfg.rollout.max_context
  kv = (cfg.rollout.num_slots * ctx * d["num_layers"] * 2 * d["num_kv_heads"] * d["head_dim"]
        * cbytes)
  seqs = max(1, math.ceil(cfg.algo.micro_batch / batch_shards))   # sequences per chip per micro
  h, v, i, nh = d["hidden_size"], d["vocab_size"], d["intermediate_size"], d["num_heads"]
  remat = seqs * ctx * d["num_layers"] * h * cbytes if cfg.model.remat else (
      seqs * ctx * d["num_layers"] * (6 * h + 3 * i // tensor) * cbytes)
  layer = seqs * ctx * (4 * h + 3 * i // tensor) * cbytes + seqs * (nh // tensor) * ctx * ctx * 4
  logits = seqs * ctx * (v // tensor) * 4 * 2        # fp32 logits and their gradient
  return dict(
      params=counts["actor"] * pbytes / shard,
      optimizer=counts["actor"] * 2 * 4 / shard,     # AdamW mu and nu in fp32
      gradients=counts["actor"] * pbytes / shard,
      critic=counts["critic"] * (2 * pbytes + 8) / shard,   # params + grads + AdamW moments
      reference=counts["actor"] * cbytes / shard,
      kv_cache=kv / (batch_shards * kv_tensor),
      activations=remat + layer + logits)


def step_flops(cfg, d: dict, tokens: int) -> float:
  """FLOPs of one PPO step: rollout, old/ref logprobs, values, actor and critic updates (with
  one extra forward for remat). Attention uses the causal average context tokens/2."""
  c = param_counts(d)
  attn = 2 * 2 * d["num_layers"] * d["num_heads"] * d["head_dim"] * (tokens / 2)
  fwd_actor = 2 * c["actor_matmul"] + attn
  fwd_critic = 2 * c["critic_matmul"] + attn
  per_update = 4 if cfg.model.remat else 3
  epochs = cfg.algo.ppo_epochs
  per_token = fwd_actor * (3 + per_update * epochs) + fwd_critic * (1 + per_update * epochs)
  return per_token * tokens * cfg.data.batch_size * cfg.rollout.n


def find_mfu(path: str) -> tuple[float, str] | None:
  """The measured PPO-update MFU from bench/update.py's JSON: `update_mfu` of its largest model
  (results[i]); else the first key containing 'mfu' that is not a target."""
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    obj = json.load(f)
  name = os.path.relpath(path, ROOT) if path.startswith(str(ROOT)) else path
  rows_ = [r for r in obj.get("results", []) if isinstance(r, dict)
           and isinstance(r.get("update_mfu"), (int, float))] if isinstance(obj, dict) else []
  if rows_:
    i, best = max(enumerate(rows_), key=lambda ir: ir[1].get("params", 0))
    return float(best["update_mfu"]), f"{name}: results[{i}].update_mfu ({best.get('model', '?')})"
  stack = [("", obj)]
  while stack:
    where, node = stack.pop(0)
    if isinstance(node, dict):
      for k, v in node.items():
        if ("mfu" in k.lower() and not k.lower().startswith("target")
            and isinstance(v, (int, float)) and v > 0):
          return (v / 100 if v > 1 else float(v)), f"{name}: {where}{k}"
        stack.append((f"{where}{k}.", v))
    elif isinstance(node, list):
      stack.extend((f"{where}{n}.", v) for n, v in enumerate(node))
  return None


def rows(spec: str, tokens: int | None, mfu: float) -> tuple[dict, list[dict]]:
  module, only = load_config_module(spec)
  out = []
  dims = None
  for target, (chip, chips, hosts, *mesh) in module.TARGETS.items():
    if only and target != only:
      continue
    cfg = module.get_config(target)
    dims = model_dims(module, cfg)
    mem = memory(cfg, dims, tuple(mesh))
    hbm = CHIPS[chip]["hbm_gib"] * GIB
    total = sum(mem.values())
    ntok = tokens or cfg.rollout.max_context
    flops = step_flops(cfg, dims, ntok)
    out.append(dict(target=target, chip=chip, chips=chips, hosts=hosts, mesh=tuple(mesh), mem=mem,
                    total=total, hbm=hbm, fits=total <= FIT_FRACTION * hbm, flops=flops,
                    tokens=ntok, steps=cfg.total_steps,
                    seconds=flops / (chips * CHIPS[chip]["peak"] * mfu)))
  return dict(name=module.MODEL["name"], dims=dims, counts=param_counts(dims)), out


def markdown(spec: str, tokens: int | None, mfu: float, mfu_source: str) -> str:
  model, table = rows(spec, tokens, mfu)
  c = model["counts"]
  cfg_steps = table[0]["steps"]
  lines = [f"### {model['name']} (`{spec.split(':')[0]}`)", "",
           f"Parameters: policy {c['actor'] / 1e9:.3f} B, critic {c['critic'] / 1e9:.3f} B "
           f"(tied embeddings: {model['dims']['tie_word_embeddings']}).", "",
           "| target | chips (hosts) | mesh d/f/t | params | optimizer | gradients | critic | "
           "reference | KV cache | activations | total | HBM | fits |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in table:
    m = r["mem"]
    cells = [f"{m[k] / GIB:.2f}" for k in ("params", "optimizer", "gradients", "critic",
                                            "reference", "kv_cache", "activations")]
    lines.append(f"| {r['target']} | {r['chips']} ({r['hosts']}) | {'/'.join(map(str, r['mesh']))}"
                 f" | {' | '.join(cells)} | {r['total'] / GIB:.1f} | {r['hbm'] / GIB:.0f} | "
                 f"{'yes' if r['fits'] else '**no**'} |")
  lines += ["", "GiB per chip.", "",
            f"| target | tokens/trajectory | PFLOP per step | step time at {mfu:.0%} MFU | "
            f"{cfg_steps} steps |", "|---|---|---|---|---|"]
  for r in table:
    lines.append(f"| {r['target']} | {r['tokens']} | {r['flops'] / 1e15:.1f} | "
                 f"{r['seconds']:.1f} s | {r['seconds'] * r['steps'] / 3600:.1f} h |")
  lines += ["", f"MFU source: {mfu_source}.", ""]
  return "\n".join(lines)


_PREAMBLE = """\
# Capacity on paper

Generated by `python launch/capacity.py configs/qwen2_5_3b.py configs/qwen2_5_7b.py`; rerun it
after changing a config.

Assumed chips (dense bf16 peak, HBM per chip, HBM bandwidth):
{chips}

TPU v5e slice names count chips; v5p names count TensorCores (2 per chip, one JAX device each), so
v5p-32 is 16 chips.

Memory per chip: policy params in `model.param_dtype` (float32 master weights) sharded over
fsdp x tensor; AdamW mu and nu in float32; gradients in the param dtype; critic = its params,
gradients and AdamW moments; frozen reference model in the compute dtype (bf16); KV cache =
num_slots x max_context x layers x 2 x kv_heads x head_dim x 2 bytes, sharded over data x fsdp
(and tensor when it divides the KV heads); activations = one micro-batch with per-layer remat
(layer inputs, one layer's working set with materialised fp32 attention scores, fp32 logits and
their gradient). `total` sums all of them, an upper bound: the rollout's KV cache and the update's
gradients and activations need not be live at once. `fits` = total <= {fit:.0%} of HBM.

Step time = FLOPs per step / (chips x peak x MFU). FLOPs per step = 128 trajectories x {tokens}
tokens x (7 policy forwards: rollout, old log-probs, reference, and 4 for the update with remat;
5 critic forwards: values and the update) x 2 x matmul params, plus causal attention. Taking every
trajectory at the full context is an upper bound (real StepSearch trajectories are shorter).
Decoding is bound by memory and interconnect bandwidth rather than FLOPs, so the rollout share of
a real step takes longer than this figure says.

MFU {mfu:.0%}: {source}.
"""


def preamble(mfu: float, mfu_source: str, tokens: int | None) -> str:
  chips = "\n".join(f"- {v['label']}: {v['peak'] / 1e12:.0f} TFLOP/s, {v['hbm_gib']} GiB, "
                     f"{v['hbm_tbs']} TB/s" for v in CHIPS.values())
  return _PREAMBLE.format(chips=chips, fit=FIT_FRACTION, mfu=mfu, source=mfu_source,
                          tokens="max_context (4096)" if tokens is None else tokens)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("configs", nargs="+", help="configs/x.py or configs/x.py:target")
  p.add_argument("--tokens", type=int, help="tokens per trajectory (default rollout.max_context)")
  p.add_argument("--mfu", type=float, help="model FLOPs utilisation (default: measured, else 35%%)")
  p.add_argument("--bench", default=str(ROOT / "bench" / "results" / "update_h200.json"),
                 help="bench JSON holding a measured MFU (default: the H200 run)")
  args = p.parse_args(argv)
  if args.mfu:
    mfu, source = args.mfu, "given with --mfu"
  elif found := find_mfu(args.bench):
    with open(args.bench) as f:
      info = json.load(f)
    where = (f"{info.get('devices', '?')} {info.get('backend', '?')} device(s), "
             f"{info.get('dtype', '?')}")
    mfu, source = found[0], (f"measured by the PPO update benchmark ({found[1]}; {where}); that "
                             "figure is relative to the measured peak matmul rate of the machine "
                             "it ran on, one device and a 135M model, taken as the sharded "
                             "model's MFU on paper")
  else:
    mfu, source = ASSUMED_MFU, ("ASSUMED (no measured MFU: bench/results/update.json is absent); "
                                "typical of well-sharded bf16 training")
  print(preamble(mfu, source, args.tokens))
  for spec in args.configs:
    print(markdown(spec, args.tokens, mfu, source))
  return 0


if __name__ == "__main__":
  sys.exit(main())
