"""Checkpoints: orbax CheckpointManager (async, keep last N) of the learner state plus JSON metadata.

A checkpoint at step s holds two items:
  state: the learner's train state pytree (policy, critic, both optimizer states, update count);
         arrays are restored straight onto the shardings of the target (``Learner.abstract_state()``).
  meta:  JSON: step, the retrieval index fingerprint, the resolved config, the data iterator
         position, the RNG key data and anything else the caller adds.

Safety: orbax writes each step into a temporary directory and renames it only once complete, so a
crash or failed write leaves the previous checkpoint as the latest usable one. ``save`` refuses
to write when the caller reports non-finite values (use :func:`is_finite`), so a NaN never
overwrites good weights. ``restore`` checks the fingerprint before reading any array.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

class FingerprintMismatchError(ValueError):
  """The checkpoint was written against a different retrieval index (or corpus)."""


@jax.jit
def _all_finite(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def is_finite(tree: Any) -> bool:
  """True when every floating-point leaf of `tree` is free of NaN and inf.

  One program for the whole tree: per-leaf eager reductions over a sharded state are one
  collective program each, and many of them in flight deadlocked XLA:CPU's in-process
  all-reduce on a 2-core machine (threads of one device waiting for the other's).
  """
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return True
  out = _all_finite(leaves)
  return bool(np.asarray(out.addressable_data(0)) if hasattr(out, "addressable_data") else out)


def rng_to_json(key: jax.Array) -> list:
  """A jax PRNG key (typed or raw uint32) as a JSON list."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.asarray(key).tolist()


def rng_from_json(data: list, typed: bool = True) -> jax.Array:
  raw = jnp.asarray(np.asarray(data, np.uint32))
  return jax.random.wrap_key_data(raw) if typed else raw


def _split_none(tree):
  """(tree without None subtrees, set of top-level keys that were None)."""
  if not isinstance(tree, dict):
    return tree, set()
  return {k: v for k, v in tree.items() if v is not None}, {k for k, v in tree.items() if v is None}


class Checkpointer:
  """Save / restore learner state + metadata under `directory` (one sub-directory per step)."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                           enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, *, fingerprint: str, meta: dict | None = None,
           finite: bool = True) -> bool:
    """Start an (async) save of `state` at `step`; returns False (and writes nothing) if not finite.

    meta: JSON-serialisable dict (config, data position, rng via rng_to_json, ...).
    """
    if not finite:
      logging.error("checkpoint at step %d skipped: non-finite values detected; the last good "
                    "checkpoint (step %s) is kept", step, self.latest_step())
      return False
    payload, nones = _split_none(state)
    meta = dict(meta or {}, step=int(step), fingerprint=str(fingerprint),
                none_keys=sorted(nones))
    self._mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(payload), meta=ocp.args.JsonSave(meta)))
    return True

  def read_meta(self, step: int | None = None) -> dict | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    self._mngr.wait_until_finished()
    out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def restore(self, target: Any, *, fingerprint: str, step: int | None = None
              ) -> tuple[Any, dict] | None:
    """Restore (state, meta) from `step` (default latest) or None when there is no checkpoint.

    target: the state pytree or its abstract form (ShapeDtypeStruct with shardings), e.g.
      ``learner.abstract_state()``; arrays come back with the target's shardings.
    Raises FingerprintMismatchError when the checkpoint's fingerprint differs from `fingerprint`.
    """
    self._mngr.wait_until_finished()
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    meta = self.read_meta(step)
    if meta.get("fingerprint") != str(fingerprint):
      raise FingerprintMismatchError(
          f"checkpoint {self.directory}/{step} was written with retrieval index fingerprint "
          f"{meta.get('fingerprint')!r}, but the current index has {fingerprint!r}; use the same "
          "index (retrieval.index_dir) or a fresh workdir")
    payload, nones = _split_none(target)
    if nones != set(meta.get("none_keys", [])):
      raise ValueError(f"checkpoint {self.directory}/{step} has absent entries "
                       f"{meta.get('none_keys')} but the target has {sorted(nones)} (a different "
                       "algorithm: with vs. without a critic?)")
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        payload)
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    state = dict(out["state"]) if isinstance(out["state"], dict) else out["state"]
    if isinstance(state, dict):
      for k in nones:
        state[k] = None
      state = {k: state[k] for k in target}  # the target's key order
    return state, meta

  def restore_as_saved(self, step: int | None = None) -> tuple[dict, dict] | None:
    """(state, meta) from `step` (default latest) without a target: host arrays as they were
    saved, for readers that need no shardings or optimizer structure (evaluation, export)."""
    self._mngr.wait_until_finished()
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return dict(out["state"]), self.read_meta(step)

  def wait(self) -> None:
    """Block until pending async saves are committed (raises if one failed)."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
