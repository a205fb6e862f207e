"""Logical axis names -> mesh axes ('data', 'fsdp', 'tensor'): one RULES table, MaxText style.

Parameters get logical names from their tables in params.py (this module never imports the
model); activations are constrained by name inside the model when a mesh is set
(``jax.set_mesh``). A mesh axis is used at most once per array (first dimension wins) and is
dropped for a dimension it does not divide, so one table serves every model size and mesh shape
(e.g. 1 kv head on tensor=2 is simply replicated).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stepsearch_jax.models import params as params_lib

MESH_AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)
_RULES = dict(RULES)

# The decode engine's weights: no FSDP (a decode step would all-gather every layer's weights on
# every chip for a handful of tokens), but tensor parallelism over every model-parallel device:
# heads, MLP and vocab split over fsdp x tensor, embed whole. Only the small per-token
# activations move between chips. Activations and the KV cache keep RULES.
DECODE_WEIGHT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", None),
    ("heads", ("fsdp", "tensor")),
    ("kv_heads", "tensor"),
    ("mlp", ("fsdp", "tensor")),
    ("vocab", ("fsdp", "tensor")),
)


def make_mesh(shape: dict | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over (data, fsdp, tensor); one size may be -1 = all remaining devices."""
  if isinstance(shape, dict) or hasattr(shape, "keys"):
    unknown = set(shape.keys()) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"mesh shape has unknown axes {sorted(unknown)}; expected {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != 3:
      raise ValueError(f"mesh shape {tuple(shape)} must have 3 sizes {MESH_AXES}")
  devices = list(jax.devices() if devices is None else devices)
  if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh shape {sizes}: sizes must be >= 1 with at most one -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh shape {sizes}: {len(devices)} devices not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  total = int(np.prod(sizes))
  if total > len(devices):
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {total} devices, "
                     f"have {len(devices)}")
  if total == len(devices) and devices == list(jax.devices()):
    from jax.experimental import mesh_utils  # topology-aware order on TPU/GPU
    grid = mesh_utils.create_device_mesh(sizes, devices)
  else:
    grid = np.asarray(devices[:total], dtype=object).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh_shape: dict[str, int] | None = None,
                    rules: Sequence[tuple[str, Any]] = ()) -> PartitionSpec:
  """PartitionSpec for logical names; with shapes, drops mesh axes that do not divide the dim.
  `rules` override entries of RULES (e.g. DECODE_WEIGHT_RULES)."""
  table = {**_RULES, **dict(rules)}
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    if name is not None and name not in table:
      raise ValueError(f"unknown logical axis {name!r}; known: {list(table)}")
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    for ax in axes:
      if ax in used or (mesh_shape is not None and ax not in mesh_shape):
        continue
      if shape is not None and mesh_shape is not None:
        size = int(np.prod([mesh_shape[a] for a in kept + [ax]]))
        if shape[i] % size:
          continue
      kept.append(ax)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, *logical_axes: str | None,
                     shape: Sequence[int] | None = None) -> NamedSharding:
  """NamedSharding for an activation/batch, e.g. ``logical_sharding(mesh, 'batch', 'length')``."""
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, dict(mesh.shape)))


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
  """with_sharding_constraint by logical names, only when a (data, fsdp, tensor) mesh is set."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  spec = logical_to_spec(logical_axes, x.shape, dict(zip(mesh.axis_names, mesh.axis_sizes)))
  return jax.lax.with_sharding_constraint(x, spec)


def _value_model(tree: Any) -> bool:
  return isinstance(tree, dict) and set(tree.keys()) == {"trunk", "head"}


def param_shardings(config, params_or_shapes: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = ()) -> Any:
  """Pytree of NamedSharding matching policy params or value params ({'trunk', 'head'})."""
  axes = params_lib.logical_axes(config, value=_value_model(params_or_shapes))
  mesh_shape = dict(mesh.shape)

  def one(names, leaf):
    return NamedSharding(mesh, logical_to_spec(names, leaf.shape, mesh_shape, rules))
  return jax.tree.map(one, axes, params_or_shapes, is_leaf=lambda x: isinstance(x, tuple))


def put_global(tree: Any, shardings: Any) -> Any:
  """Place host values or device arrays onto (possibly multi-process) shardings.

  Every process passes the same values (as every process of a multi-controller run computes
  them): where a sharding spans devices of other processes, each process builds its own shards
  from its copy (`jax.make_array_from_callback`); `jax.device_put` cannot move a local array
  onto devices it cannot address.
  """
  def one(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if sharding.is_fully_addressable and (not isinstance(x, jax.Array) or x.is_fully_addressable):
      return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.jit(lambda a: a, out_shardings=sharding)(x)    # reshard across processes
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return jax.tree.map(one, tree, shardings)


def shard_params(params: Any, mesh: Mesh, config) -> Any:
  """Place (or re-place) params onto their NamedShardings."""
  return jax.device_put(params, param_shardings(config, params, mesh))


def cache_sharding(mesh: Mesh, cache: Any) -> Any:
  """Shardings for the KV cache pytree ({'k': per layer [B, Hkv, Dh, S], 'v': [B, Hkv, S, Dh]})."""
  names = {"k": ("batch", "kv_heads", "head_dim", "length"),
           "v": ("batch", "kv_heads", "length", "head_dim")}
  return {name: jax.tree.map(lambda c, n=name: logical_sharding(mesh, *names[n], shape=c.shape),
                             layers) for name, layers in cache.items()}
