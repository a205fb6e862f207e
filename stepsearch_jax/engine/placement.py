"""Where the engine's arrays live: one global mesh (all devices of all processes), as the learner.

Placement model:
  * params: the engine's own copy in the compute dtype (the model casts every weight to it at
    use anyway, so this changes no result), tensor-parallel over every model-parallel device
    (`DECODE_WEIGHT_RULES`: heads, MLP and vocab over fsdp x tensor, nothing over fsdp alone).
    The learner's FSDP layout would make every decode step all-gather every layer's weights on
    every chip (compiled for Qwen2.5-3B on v5e-16: 14 GiB of a 16 GiB chip for a decode block);
    a weight push after an update is one reshard + cast instead. On one device it is the
    learner's own arrays when the dtypes agree;
  * KV cache: slots over (data, fsdp), KV heads over tensor where they divide (1 KV head on
    tensor=2 is replicated over tensor, as in the model); a cache of 128 slots x 4096 tokens then
    costs each chip 1/(data*fsdp*tensor) of it instead of all of it;
  * per-slot decode state (pending token, position, sampling params, keys): slots over
    (data, fsdp), like the cache rows they describe;
  * everything the host reads back (emitted tokens, logprobs, stop flags, positions) comes out
    replicated: every process gets the full [steps, slots] block from its own devices, so the
    host-side decisions that follow (stops, queries, admission) are computed identically on every
    process without a broadcast.

Multi-controller: every process runs the same driver over the same episodes and issues the same
programs in the same order (the decisions are pure functions of replicated outputs and of the
retrieval results, which each host gets from its own sidecar over the same index). Host values
enter as global arrays built from each process's identical copy (`put`).

Why one global engine and not one engine per host with its own slots: the global engine needs no
weight reshard after an update (the learner's params are already placed) and no cross-host
gather of trajectories before the update; its cost is that decode steps run collectives over the
whole mesh (measured in bench/multihost.py).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stepsearch_jax import models
from stepsearch_jax.models import sharding as sharding_lib


def default_mesh() -> Mesh:
  """One device, with the (data, fsdp, tensor) axes every rule refers to."""
  return sharding_lib.make_mesh((1, 1, 1), jax.local_devices()[:1])


class Placement:
  """Shardings of an engine's params, decode state and host-read outputs on `mesh`."""

  def __init__(self, mesh: Mesh, config: models.ModelConfig, num_slots: int, cache_len: int,
               stop_width: int):
    from stepsearch_jax.engine.programs import DecodeState, Prefix
    self.mesh = mesh
    sizes = dict(mesh.shape)
    shards = int(sizes.get("data", 1)) * int(sizes.get("fsdp", 1))
    if num_slots % shards:
      raise ValueError(f"num_slots={num_slots} is not a multiple of mesh data*fsdp={shards}: the "
                       "decode slots are sharded over those axes (round rollout.num_slots up)")
    self.config = config
    # Slots per shard group: gathering a few rows (stragglers) out of a slot-sharded cache by a
    # dynamic index has no local SPMD lowering (XLA all-gathers the whole cache window: 0.7 GiB
    # per layer per chip for Qwen2.5-3B on v5e-16), so with slot_shards > 1 decode blocks run
    # over every slot and never compact rows.
    self.slot_shards = shards
    self.replicated = NamedSharding(mesh, PartitionSpec())
    slot = sharding_lib.logical_sharding(mesh, "batch", shape=(num_slots,))
    slot2 = sharding_lib.logical_sharding(mesh, "batch", None, shape=(num_slots, stop_width))
    keys = sharding_lib.logical_sharding(mesh, "batch", None, shape=(num_slots, 2))
    cache = jax.eval_shape(lambda: models.init_cache(config, num_slots, cache_len))
    self.cache = sharding_lib.cache_sharding(mesh, cache)
    self.state = DecodeState(cache=self.cache, tokens=slot, logprobs=slot, pos=slot,
                             gen_len=slot, max_new=slot, active=slot, tail=slot2,
                             temperature=slot, top_p=slot, top_k=slot, keys=keys)
    # A prefill's cache is batch 1 (nothing to split over data/fsdp); its KV heads still go over
    # tensor. The spec does not depend on the prompt's bucket length.
    one = jax.eval_shape(lambda: models.init_cache(config, 1, 16))
    rep = self.replicated
    self.prefix = Prefix(cache=sharding_lib.cache_sharding(mesh, one), token=rep, logprob=rep,
                         length=rep, max_new=rep, temperature=rep, top_p=rep, top_k=rep, key=rep)

  def param_shardings(self, params: Any) -> Any:
    return sharding_lib.param_shardings(self.config, params, self.mesh,
                                        sharding_lib.DECODE_WEIGHT_RULES)

  def params(self, params: Any) -> Any:
    """`params` as the engine holds them: compute dtype, decode shardings."""
    dtype = self.config.compute_dtype
    placed = sharding_lib.put_global(params, self.param_shardings(params))
    if all(x.dtype == dtype for x in jax.tree.leaves(placed)):
      return placed
    return jax.jit(lambda t: jax.tree.map(lambda x: x.astype(dtype), t),
                   out_shardings=self.param_shardings(params))(placed)

  def put(self, x: Any, sharding: NamedSharding | None = None) -> jax.Array:
    """A host value (the same on every process) as a global array (default: replicated)."""
    return sharding_lib.put_global(x, sharding or self.replicated)

  @staticmethod
  def host(tree: Any) -> Any:
    """numpy copies of replicated (or fully addressable) device arrays, on every process."""
    def one(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
          raise ValueError(f"cannot read a {x.sharding} array on one process: make it replicated")
        return np.asarray(x.addressable_data(0))
      return np.asarray(x)
    return jax.tree.map(one, tree)
