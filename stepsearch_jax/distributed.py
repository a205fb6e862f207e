"""Join JAX's multi-host runtime when the process is one of several (TPU pod, GPU nodes, CPU hosts).

The same ``python -m stepsearch_jax.train`` runs on one machine and on many;
:func:`maybe_initialize` (called first thing in train) decides from the environment whether this
process is part of a multi-process job and, if so, calls ``jax.distributed.initialize()`` before
any JAX backend exists.
It must run before the first ``jax.devices()``: after that, joining is impossible and we say so.

Sources, first match wins:
  * explicit arguments, else ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID`` (``SLURM_NTASKS`` / ``SLURM_PROCID`` fill the count and id when only the
    address is given);
  * SLURM (``SLURM_JOB_ID`` with ``SLURM_NTASKS`` > 1) and Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1):
    JAX's own cluster detection finds coordinator, count and id;
  * TPU pods: ``TPU_WORKER_HOSTNAMES`` with several hosts or ``MEGASCALE_COORDINATOR_ADDRESS``; on a
    GCE TPU VM those variables may be absent from an ssh shell, so launch/tpu_pod.sh sets
    ``STEPSEARCH_DISTRIBUTED=1`` and JAX asks the TPU metadata server;
  * ``STEPSEARCH_DISTRIBUTED=1`` forces an auto-detected initialize, ``=0`` disables all of this.

Check a cluster's wiring without training: ``python -m stepsearch_jax.distributed`` on every host
prints each process's index, count, devices and a cross-process all-gather.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from absl import logging

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_STATE: dict = {}   # set once this process has joined (or decided it is alone)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What :func:`maybe_initialize` will do: ``kind`` is 'single' (no call) or where the settings
  came from; ``kwargs`` go to ``jax.distributed.initialize`` (empty = JAX auto-detects)."""
  kind: str
  kwargs: dict
  reason: str


def _int_env(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def detect(env: Mapping[str, str] | None = None, *, coordinator_address: str | None = None,
           num_processes: int | None = None, process_id: int | None = None,
           local_device_ids: Sequence[int] | None = None, enable: bool | None = None) -> Plan:
  """Decide from arguments and environment whether and how to initialize; touches no JAX state."""
  env = os.environ if env is None else env
  flag = env.get("STEPSEARCH_DISTRIBUTED", "").strip().lower()
  if flag and flag not in _TRUE + _FALSE:
    raise ValueError(f"STEPSEARCH_DISTRIBUTED={flag!r}: use 1 (force) or 0 (disable)")
  if enable is None and flag:
    enable = flag in _TRUE
  if enable is False:
    return Plan("single", {}, "disabled (enable=False or STEPSEARCH_DISTRIBUTED=0)")

  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "").strip() or None
  count = num_processes if num_processes is not None else _int_env(env, "JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else _int_env(env, "JAX_PROCESS_ID")
  if address:
    count = count if count is not None else _int_env(env, "SLURM_NTASKS")
    pid = pid if pid is not None else _int_env(env, "SLURM_PROCID")
    missing = [n for n, v in (("JAX_NUM_PROCESSES (or num_processes)", count),
                              ("JAX_PROCESS_ID (or process_id)", pid)) if v is None]
    if missing:
      raise ValueError(f"coordinator address {address!r} is set but {' and '.join(missing)} "
                       "is not")
    if count < 1 or not 0 <= pid < count:
      raise ValueError(f"process id {pid} / process count {count}: need 0 <= id < count")
    if count == 1 and not enable:
      return Plan("single", {}, f"JAX_NUM_PROCESSES=1 (coordinator {address} unused)")
    kwargs = dict(coordinator_address=address, num_processes=count, process_id=pid)
    if local_device_ids is not None:
      kwargs["local_device_ids"] = list(local_device_ids)
    return Plan("explicit", kwargs, f"coordinator {address}, process {pid} of {count}")
  if count is not None or pid is not None:
    raise ValueError("JAX_NUM_PROCESSES / JAX_PROCESS_ID are set but JAX_COORDINATOR_ADDRESS "
                     "(host:port of process 0) is not")

  slurm_tasks = _int_env(env, "SLURM_NTASKS") or _int_env(env, "SLURM_STEP_NUM_TASKS")
  if env.get("SLURM_JOB_ID") and slurm_tasks and slurm_tasks > 1:
    return Plan("slurm", {}, f"SLURM job {env['SLURM_JOB_ID']} with {slurm_tasks} tasks")
  ompi = _int_env(env, "OMPI_COMM_WORLD_SIZE")
  if ompi and ompi > 1:
    return Plan("ompi", {}, f"Open MPI world of {ompi}")
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return Plan("tpu", {}, f"TPU pod with {len(hosts)} hosts (TPU_WORKER_HOSTNAMES)")
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return Plan("tpu", {}, "multi-slice TPU (MEGASCALE_COORDINATOR_ADDRESS)")
  if enable:
    return Plan("auto", {}, "forced (enable=True or STEPSEARCH_DISTRIBUTED=1): JAX auto-detects")
  return Plan("single", {}, "no multi-process environment found")


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
                     enable: bool | None = None) -> tuple[int, int]:
  """Join the multi-process runtime if the environment (or the arguments) asks for it.

  Idempotent: later calls return the first result. Returns (process_index, process_count).
  """
  import jax  # pylint: disable=g-import-not-at-top

  if _STATE:
    return _STATE["index"], _STATE["count"]
  if jax.distributed.is_initialized():
    _STATE.update(index=jax.process_index(), count=jax.process_count(), kind="external")
    logging.info("distributed: already initialized elsewhere; process %d of %d",
                 _STATE["index"], _STATE["count"])
    return _STATE["index"], _STATE["count"]
  plan = detect(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id, local_device_ids=local_device_ids, enable=enable)
  if plan.kind != "single":
    logging.info("distributed: jax.distributed.initialize(%s) (%s)",
                 ", ".join(f"{k}={v!r}" for k, v in plan.kwargs.items()), plan.reason)
    try:
      jax.distributed.initialize(**plan.kwargs)
    except RuntimeError as e:
      if "before" in str(e).lower() or "backend" in str(e).lower():
        raise RuntimeError(f"distributed: cannot join ({plan.reason}): a JAX backend already "
                           "exists; call maybe_initialize() before any jax.devices()/jit") from e
      raise
  else:
    logging.info("distributed: single process (%s)", plan.reason)
  _STATE.update(index=jax.process_index(), count=jax.process_count(), kind=plan.kind)
  logging.info("distributed: process %d of %d, %d local / %d global devices (%s)",
               _STATE["index"], _STATE["count"], jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  return _STATE["index"], _STATE["count"]


def main_first(name: str, fn):
  """Run `fn` on process 0, then (after a barrier) on the others, and return its result.

  For set-up steps that write into the shared workdir what every process then reuses (world
  files, tokenizer, index, warm-start weights): process 0 builds them, the others find them
  built. One process: just `fn()`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    out = fn()
    multihost_utils.sync_global_devices(f"stepsearch:{name}")
    return out
  multihost_utils.sync_global_devices(f"stepsearch:{name}")
  return fn()


def _check() -> dict:
  """Initialize, then all-gather (index + 1) from every process; the sum proves the wiring."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  index, count = maybe_initialize()
  again = maybe_initialize()
  gathered = multihost_utils.process_allgather(np.array([index + 1], np.int32))
  # A psum across every device of every process, through a jitted global computation.
  mesh = jax.make_mesh((jax.device_count(),), ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  local = np.full((jax.local_device_count(),), index + 1, np.float32)
  arr = multihost_utils.host_local_array_to_global_array(local, mesh,
                                                         jax.sharding.PartitionSpec("d"))
  total = jax.jit(lambda x: x.sum(), in_shardings=sharding)(arr)
  return dict(process_index=index, process_count=count, idempotent=again == (index, count),
              local_devices=jax.local_device_count(), global_devices=jax.device_count(),
              allgather=[int(v) for v in np.asarray(gathered).reshape(-1)],
              device_sum=float(total), backend=jax.default_backend())


if __name__ == "__main__":
  import json  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  print("DISTRIBUTED_CHECK " + json.dumps(_check()), flush=True)
