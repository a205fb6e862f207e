"""Compile one training step's programs for a TPU slice on a CPU machine, and report their memory.

    python -m stepsearch_jax.aot --config configs/qwen2_5_3b.py:v5e-16 --out DIR [--topology NAME]

libtpu compiles for a named topology without the chips (`jax.experimental.topologies`, as
MaxText's train_compile.py does): nothing is loaded, every argument is a `jax.ShapeDtypeStruct`
carrying the sharding the trainer gives it. The programs are the ones a StePPO step runs:
  prefill          the native driver's batched prompt append (every slot, largest prompt bucket)
  append           a tool-result append into live slots (every slot, observation bucket, full cache)
  decode           a decode block (every slot, full cache window, max_decode_steps_per_call steps)
  decode_step      one generate step (the roofline figure: bytes read per emitted token)
  logprobs_values  old/ref log-probs and values over the whole step batch
  update           one policy+critic mini-batch update (ppo micro-batches, remat as configured)
For each: compile seconds, per-device argument/output/temp/alias/peak bytes, FLOPs and bytes
accessed from `cost_analysis()`, and an analytic minimum beside them. During rollouts the train
state (policy, critic, both AdamW states, reference) stays in HBM, so `fits` adds what a program
does not already take as an argument; it requires 10% of HBM to spare.
Writes DIR/aot.json and DIR/aot.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import time
from typing import Any

# libtpu takes a machine-wide lock when its plugin loads, and any JAX process on a machine with
# libtpu installed (a test runner, a trainer falling back to the CPU) may hold it; compiling for
# a topology needs no TPU, so this process does not insist on owning it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from stepsearch_jax import models  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Output folder for aot.json / aot.md.", required=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Slice to compile for (v5e-16, v5e-32, v5e-64, "
                                "v5p-16, v5p-32, v6e-16, ...); default: the config's target.")
_PROGRAMS = flags.DEFINE_list("programs", None, "Subset of programs to compile (default: all).")

# Per chip: HBM bytes, HBM bandwidth (B/s), peak bf16 FLOP/s (public spec sheets).
CHIPS = {
    "v4": (32 << 30, 1.2e12, 275e12),
    "v5e": (16 << 30, 8.19e11, 197e12),
    "v5p": (95 << 30, 2.765e12, 459e12),
    "v6e": (32 << 30, 1.64e12, 918e12),
}
# v5e and v6e slice names count chips; v4 and v5p count TensorCores (2 per chip).
_CORES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1}
_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}
PROGRAMS = ("prefill", "append", "decode", "decode_step", "logprobs_values", "update")
SPARE = 0.10


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str           # e.g. v5e-16
  chip: str           # v5e
  chips: int
  topology: str       # e.g. v5e:4x4

  @property
  def hbm_bytes(self) -> int:
    return CHIPS[self.chip][0]


def parse_slice(name: str) -> Slice:
  """'v5e-16' -> 16 v5e chips on topology v5e:4x4; 'v5p-32' -> 16 v5p chips (v5p:2x2x4)."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
  if not m:
    raise ValueError(f"--topology {name!r}: expected a TPU slice name like v5e-16, v5p-32, v6e-16")
  chip, n = m.group(1), int(m.group(2))
  chips = n // _CORES_PER_CHIP[chip]
  shapes = _3D if chip in ("v4", "v5p") else _2D
  if chips not in shapes:
    raise ValueError(f"--topology {name!r}: {chips} {chip} chips is not a slice shape we know "
                     f"({sorted(shapes)} chips)")
  return Slice(name, chip, chips, f"{chip}:{shapes[chips]}")


def topology_mesh(sl: Slice, data: int, fsdp: int, tensor: int) -> Mesh:
  from jax.experimental import mesh_utils, topologies
  topo = topologies.get_topology_desc(platform="tpu", topology_name=sl.topology,
                                      chip_config_name="default",
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  devices = topo.devices
  if data * fsdp * tensor != len(devices):
    raise ValueError(f"mesh data*fsdp*tensor = {data}x{fsdp}x{tensor} = {data * fsdp * tensor} "
                     f"does not match the {len(devices)} chips of {sl.name}")
  try:
    grid = mesh_utils.create_device_mesh((data, fsdp, tensor), devices)
  except NotImplementedError:   # e.g. 16 x 2 on a 4x8 torus: split a physical axis
    grid = mesh_utils.create_device_mesh((data, fsdp, tensor), devices,
                                         allow_split_physical_axes=True)
  return Mesh(grid, ("data", "fsdp", "tensor"))


def config_module(path: str):
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def model_config(cfg, config_path: str | None) -> models.ModelConfig:
  """The policy's shape: model.hf_path/config.json when staged, else the config file's MODEL."""
  hf = os.path.join(cfg.model.hf_path or "", "config.json")
  common = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
  if cfg.model.hf_path and os.path.exists(hf):
    with open(hf) as f:
      return models.ModelConfig.from_hf(json.load(f), **common)
  module = config_module(config_path) if config_path else None
  dims = getattr(module, "MODEL", None)
  if dims is None:
    fields = dict(cfg.model.init)
    if not fields.get("vocab_size"):
      raise ValueError("config.model.init.vocab_size is needed to compile without a tokenizer")
    return models.ModelConfig(**fields, **common)
  keys = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
          "intermediate_size", "vocab_size", "tie_word_embeddings")
  return models.ModelConfig(model_type=dims.get("model_type", "qwen2"),
                            max_position_embeddings=32768, **{k: dims[k] for k in keys}, **common)


def _abstract(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def _bytes_per_device(tree) -> int:
  """Bytes of one device's shard of every leaf of an abstract (sharded) tree."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _bucket(n: int, buckets) -> int:
  return next((int(b) for b in sorted(buckets) if b >= n), 1 << max(4, (n - 1).bit_length()))


def build(cfg, mc: models.ModelConfig, mesh: Mesh) -> dict[str, tuple[Any, tuple, dict]]:
  """{program: (jitted fn, abstract args, analytic figures)} for one training step on `mesh`."""
  from stepsearch_jax import ppo
  from stepsearch_jax.engine import placement as placement_lib
  from stepsearch_jax.engine import programs as programs_lib
  from stepsearch_jax.models.params import param_shapes
  from stepsearch_jax.models.sharding import logical_sharding, param_shardings
  from stepsearch_jax.ppo import algorithms
  from stepsearch_jax.ppo.logprobs import make_prepare_fn
  from stepsearch_jax.ppo.update import (UpdateParams, make_optimizer, make_update_fn,
                                         opt_state_shardings)
  from stepsearch_jax import workspace
  r = cfg.rollout
  rep = NamedSharding(mesh, PartitionSpec())
  algo = algorithms.get_algorithm(cfg.algo.name)

  # ---- the learner's state, abstract, on the learner's shardings
  rows = int(cfg.data.batch_size) * int(r.n)
  mini, micro = int(cfg.algo.mini_batch), int(cfg.algo.micro_batch)
  updates = max(rows // mini, 1) * int(cfg.algo.ppo_epochs)
  actor_tx, actor_sched = make_optimizer(float(cfg.optim.actor_lr), int(cfg.optim.actor_warmup),
                                         cfg.optim, updates)
  critic_tx, critic_sched = make_optimizer(float(cfg.optim.critic_lr),
                                           int(cfg.optim.critic_warmup), cfg.optim, updates)
  pol = param_shapes(mc)
  pol_sh = param_shardings(mc, pol, mesh)
  policy = _abstract(pol, pol_sh)

  def opt(tx, params, sh):
    shapes = jax.eval_shape(tx.init, params)
    return _abstract(shapes, opt_state_shardings(tx, shapes, sh, mesh))

  state = {"policy": policy, "policy_opt": opt(actor_tx, pol, pol_sh), "critic": None,
           "critic_opt": None, "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}
  if algo.uses_critic:
    cri = param_shapes(mc, value=True)
    cri_sh = param_shardings(mc, cri, mesh)
    state["critic"] = _abstract(cri, cri_sh)
    state["critic_opt"] = opt(critic_tx, cri, cri_sh)
  ref = policy if cfg.algo.kl_coef else None
  state_sh = jax.tree.map(lambda x: x.sharding, state)

  # ---- the step batch: every trajectory at the full context (prompt bucket + response)
  total = int(r.max_context)
  prompt = _bucket(min(int(r.max_start), total // 2), r.prefill_buckets)
  resp = total - prompt
  n = rows // micro

  def field(shape, dtype):
    names = (None, "batch") + (None,) * (len(shape) - 2)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=logical_sharding(mesh, *names, shape=shape))

  f32 = jnp.float32
  i32 = jnp.int32
  batch = ppo.PPOBatch(tokens=field((n, micro, total), i32),
                       segment_ids=field((n, micro, total), i32),
                       response_index=field((n, micro, resp), i32),
                       response_segment=field((n, micro, resp), i32),
                       response_mask=field((n, micro, resp), f32),
                       loss_mask=field((n, micro, resp), f32), rewards=field((n, micro, resp), f32),
                       group_ids=field((n, micro, resp), i32),
                       old_logprobs=field((n, micro, resp), f32),
                       ref_logprobs=field((n, micro, resp), f32),
                       values=field((n, micro, resp), f32), advantages=field((n, micro, resp), f32),
                       returns=field((n, micro, resp), f32))
  batch_sh = jax.tree.map(lambda x: x.sharding, batch)
  hp = UpdateParams.from_config(cfg)
  update = make_update_fn(mc, mc, hp, actor_tx, critic_tx, actor_sched, critic_sched,
                          mini // micro, {"state": state_sh, "batch": batch_sh, "replicated": rep})
  prepare = make_prepare_fn(mc, mc, hp.temperature, {
      "policy": pol_sh, "critic": state_sh["critic"], "ref": pol_sh if ref is not None else None,
      "batch": batch_sh})

  # ---- the engine's programs on the same mesh (what workspace.engine_for builds)
  shards = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
  slots = -(-min(int(r.num_slots), max(rows, int(cfg.data.val_batch_size))) // shards) * shards
  prefill_len = workspace.prefill_length(cfg)
  cache_len = prefill_len + int(r.max_tokens_per_turn) + int(r.max_obs_tokens)
  spec = programs_lib.Spec(config=mc, num_slots=slots, cache_len=cache_len, eos_ids=(0, 1),
                           stops=((-1, 2, 3, 4), (5, 6, 7, 8)))
  placement = placement_lib.Placement(mesh, mc, slots, cache_len, spec.stop_width)
  progs = programs_lib.Programs(spec, placement)
  dstate = _abstract(jax.eval_shape(lambda: programs_lib.init_state(spec)), placement.state)
  # the engine's own weights: compute dtype, decode (tensor-parallel) shardings
  engine_w = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, mc.compute_dtype,
                                                             sharding=sh),
                          pol, placement.param_shardings(pol))

  def rows_for(width: int, window: int) -> programs_lib.Rows:
    def a(shape, dtype):
      return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
    return programs_lib.Rows(slots=a((slots,), jnp.int32), tokens=a((slots, width), jnp.int32),
                             start=a((slots,), jnp.int32), lengths=a((slots,), jnp.int32),
                             max_new=a((slots,), jnp.int32), temperature=a((slots,), f32),
                             top_p=a((slots,), f32), top_k=a((slots,), jnp.int32),
                             keys=a((slots, 2), jnp.uint32), window=window, dense=True)

  def window_for(need):
    return min(cache_len, -(-need // 128) * 128)

  prompt_w = _bucket(int(r.max_start), r.prefill_buckets)
  obs_w = _bucket(int(r.max_obs_tokens), r.prefill_buckets)
  steps = int(r.max_decode_steps_per_call)
  blk = programs_lib.Block(n_steps=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
                           window=cache_len, steps=steps,
                           compact=placement.slot_shards == 1)

  # ---- analytic figures (per device)
  weights = _bytes_per_device(engine_w)
  kv = _bytes_per_device(dstate.cache)
  p_pol = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pol))
  p_cri = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["critic"] or {}))
  chips = mesh.devices.size
  tokens_update = mini * total
  remat = 8 if mc.remat else 6
  train_state = _bytes_per_device(state) + (_bytes_per_device(ref) if ref is not None else 0)
  slots_per_chip = slots // shards

  return {
      "prefill": (progs.append, (engine_w, dstate, rows_for(prompt_w, window_for(prompt_w))),
                  dict(note=f"{slots} slots x {prompt_w} prompt tokens",
                       flops_min=2 * p_pol * slots * prompt_w / chips,
                       resident=train_state)),
      "append": (progs.append, (engine_w, dstate, rows_for(obs_w, cache_len)),
                 dict(note=f"{slots} slots x {obs_w} observation tokens at the cache end",
                      flops_min=2 * p_pol * slots * obs_w / chips,
                      resident=train_state)),
      "decode": (progs.decode_block, (engine_w, dstate, blk),
                 dict(note=f"{slots} slots, window {cache_len}, up to {steps} steps",
                      bytes_min=weights + kv, resident=train_state)),
      "decode_step": (progs.generate, (engine_w, dstate),
                      dict(note=f"{slots} slots, window {cache_len}, one token each",
                           bytes_min=weights + kv, resident=train_state,
                           slots_per_chip=slots_per_chip)),
      "logprobs_values": (prepare, (policy, ref, state["critic"], batch),
                          dict(note=f"{rows} trajectories x {total} tokens",
                               flops_min=2 * (p_pol * (2 if ref is not None else 1) + p_cri)
                               * rows * total / chips,
                               resident=train_state
                               - _bytes_per_device((policy, ref, state["critic"])))),
      "update": (update, (state, batch, jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)),
                 dict(note=f"mini-batch {mini} x {total} tokens ({mini // micro} micro-batches"
                      f"{', remat' if mc.remat else ''})",
                      flops_min=remat * (p_pol + p_cri) * tokens_update / chips,
                      flops_rule=f"{remat} x params x tokens", resident=0)),
  }, mesh


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "temp", "alias", "generated_code")}
  peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
  out["peak"] = peak or out["argument"] + out["output"] + out["temp"] - out["alias"]
  return {f"{k}_bytes": v for k, v in out.items()}


def _cost(compiled) -> dict:
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  c = c or {}
  return {"flops": float(c.get("flops", 0.0)), "bytes_accessed": float(c.get("bytes accessed", 0.0))}


def compile_step(cfg, config_path: str | None, sl: Slice, only=None, log=print) -> dict:
  """Compile every program of one training step for `sl`; returns the report dict."""
  mc = model_config(cfg, config_path)
  mesh = topology_mesh(sl, int(cfg.mesh.data), int(cfg.mesh.fsdp), int(cfg.mesh.tensor))
  progs, mesh = build(cfg, mc, mesh)
  hbm, bw, peak_flops = CHIPS[sl.chip]
  report = {"topology": sl.name, "topology_name": sl.topology, "devices": int(mesh.devices.size),
            "mesh": dict(mesh.shape), "hbm_bytes_per_device": hbm, "model": dataclasses.asdict(mc),
            "programs": {}}
  for name, (fn, args, extra) in progs.items():
    if only and name not in only:
      continue
    t0 = time.time()
    with jax.set_mesh(mesh):
      compiled = fn.lower(*args).compile()
    row = {"compile_s": round(time.time() - t0, 2), **_memory(compiled), **_cost(compiled),
           "hbm_bytes": hbm, "note": extra["note"]}
    resident = int(max(extra.get("resident", 0), 0))
    row["resident_bytes"] = resident
    row["fits"] = bool(row["peak_bytes"] + resident <= (1 - SPARE) * hbm)
    if "flops_min" in extra:
      row["flops_min"] = float(extra["flops_min"])
      row["flops_ratio"] = row["flops"] / row["flops_min"] if row["flops_min"] else None
      row["mfu_bound_s"] = row["flops"] / peak_flops
    if "bytes_min" in extra:
      row["bytes_min"] = int(extra["bytes_min"])
      row["bytes_ratio"] = row["bytes_accessed"] / row["bytes_min"] if row["bytes_min"] else None
    if "slots_per_chip" in extra and row["bytes_accessed"]:
      step_s = row["bytes_accessed"] / bw
      row["projected_tokens_per_s_per_chip"] = extra["slots_per_chip"] / step_s
    report["programs"][name] = row
    log(f"{sl.name} {name}: compiled in {row['compile_s']} s, peak "
        f"{row['peak_bytes'] / 2**30:.2f} GiB + resident {resident / 2**30:.2f} GiB of "
        f"{hbm / 2**30:.0f} GiB, fits={row['fits']}")
  report["fits"] = all(p["fits"] for p in report["programs"].values())
  return report


def markdown(report: dict) -> str:
  gib = 2 ** 30
  lines = [f"### {report['topology']} ({report['topology_name']}, {report['devices']} chips, mesh "
           f"{'/'.join(str(v) for v in report['mesh'].values())}): fits = {report['fits']}", "",
           "| program | what | compile s | args GiB | out GiB | temp GiB | alias GiB | peak GiB | "
           "+ resident GiB | HBM GiB | fits | GFLOP | x analytic | GB accessed | x analytic |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, p in report["programs"].items():
    fr = p.get("flops_ratio")
    br = p.get("bytes_ratio")
    lines.append(
        f"| `{name}` | {p['note']} | {p['compile_s']:.1f} | {p['argument_bytes'] / gib:.2f} | "
        f"{p['output_bytes'] / gib:.2f} | {p['temp_bytes'] / gib:.2f} | "
        f"{p['alias_bytes'] / gib:.2f} | {p['peak_bytes'] / gib:.2f} | "
        f"{p['resident_bytes'] / gib:.2f} | {p['hbm_bytes'] / gib:.0f} | "
        f"{'yes' if p['fits'] else '**no**'} | {p['flops'] / 1e9:.1f} | "
        f"{'' if fr is None else f'{fr:.2f}'} | {p['bytes_accessed'] / 1e9:.2f} | "
        f"{'' if br is None else f'{br:.2f}'} |")
  lines += ["", "FLOPs and bytes are XLA's `cost_analysis()` per chip, which counts a loop body once "
            "(the update's and the log-prob pass's layer scan and micro-batch loop, the decode "
            "block's steps), so for those programs they are per iteration, not per call; the "
            "analytic column is the whole call."]
  step = report["programs"].get("decode_step", {})
  if step.get("projected_tokens_per_s_per_chip"):
    lines += ["", f"Decode projected at the chip's HBM bandwidth: "
              f"{step['projected_tokens_per_s_per_chip']:.0f} tokens/s per chip (JetStream's "
              "published Llama-3-8B on v5e-8: 8,249 tok/s, ~1,031 per chip)."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from stepsearch_jax import cli
  cfg = cli.load()
  config_path, arg = cli.config_source()
  target = _TOPOLOGY.value or arg
  if not target:
    raise SystemExit("FATAL give --topology (e.g. v5e-16) or a config target (FILE.py:v5e-16)")
  try:
    sl = parse_slice(target)
  except ValueError as e:
    raise SystemExit(f"FATAL {e}") from None
  report = compile_step(cfg, config_path, sl, only=_PROGRAMS.value)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "aot.json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(_OUT.value, "aot.md"), "w") as f:
    f.write(markdown(report))
  print(markdown(report))


if __name__ == "__main__":
  from stepsearch_jax import cli as _cli
  _cli.run(main)
