"""SIGTERM handling for spot / preemptible VMs: keep the last finished step, exit, resume later.

TPU spot and preemptible VMs get SIGTERM about 30 s before they go. The trainer then saves the
last FINISHED step and exits with `EXIT_CODE` (143 = 128 + SIGTERM, so a launcher can tell "resume
me" from "done"); re-running the same command resumes from that checkpoint.

When the signal lands decides how fast that is:
  * during a rollout or the log-prob pass (most of a step), the learner state is still the last
    finished step's: the step is abandoned at once (`Preempted` is raised in the main thread) and
    that state is saved;
  * during the update or a save, the state is in flux: the request is noted and honoured as soon
    as the step's update is done.
With several processes, every process must issue the same programs, so nobody abandons a step
alone: the flag is agreed at the end of each step (one all-gather) and all save that step.
`deadline_s` (config.preempt_deadline_s) is the budget from signal to exit; the trainer reports
how much of it the save took and warns when it ran over.
"""

from __future__ import annotations

import signal
import time

EXIT_CODE = 143


class Preempted(Exception):
  """Raised in the main thread by SIGTERM while the current step may be abandoned."""


class Preemption:
  """Installs a SIGTERM handler for the life of a run (`with Preemption(...) as p:`)."""

  def __init__(self, deadline_s: float, multi_process: bool = False):
    self.deadline_s = float(deadline_s)
    self.multi_process = multi_process
    self.signalled_at: float | None = None
    self._abandonable = False
    self._previous = None

  def __enter__(self) -> "Preemption":
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    if self.signalled_at is None:
      self.signalled_at = time.time()
      print("SIGTERM: saving the last finished step, then exiting", flush=True)
    if self._abandonable and not self.multi_process:
      self._abandonable = False
      raise Preempted()

  def abandonable(self, yes: bool) -> None:
    """Mark whether the current phase may be abandoned (the learner state is untouched)."""
    self._abandonable = yes
    if yes and self.signalled_at is not None and not self.multi_process:
      self._abandonable = False
      raise Preempted()

  @property
  def requested(self) -> bool:
    return self.signalled_at is not None

  def agreed(self) -> bool:
    """Whether to stop after this step: this process's flag, or any process's when several."""
    if not self.multi_process:
      return self.requested
    import numpy as np
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray([self.requested], np.int32))
    return bool(np.asarray(flags).any())

  def left_s(self) -> float:
    return self.deadline_s - (time.time() - (self.signalled_at or time.time()))
