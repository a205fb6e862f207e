"""Run logging that a person can read: metrics.jsonl, TensorBoard events, a curve PNG, md tables."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence


class MetricsWriter:
  """Appends one JSON line per step to DIR/metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard is optional: metrics.jsonl is the record of truth
        self._tb = None

  def write(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{prefix + k: _jsonable(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _jsonable(v):
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def trajectories_path(workdir: str, kind: str, step: int) -> str:
  """Where a run keeps the full trajectories of one validation (kind "val") or training step
  ("train"), for ``python -m stepsearch_jax.report``."""
  return os.path.join(workdir, "trajectories", f"{kind}_step_{step}.jsonl")


def read_metrics(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
  def fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


CURVES = (("reward parts", ()),        # reward/<term> for every rewards.terms.TERMS, then final
          ("held-out F1 / EM", ("val/f1", "val/em")),
          ("searches per question", ("rollout/searches",)),
          ("response length (tokens)", ("rollout/response_len",)))


def plot_curves(metrics_path: str, out_png: str, title: str = "") -> str | None:
  """Plot the training curves (reward parts, F1, searches, response length) into a PNG."""
  rows = read_metrics(metrics_path)
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from stepsearch_jax.rewards.terms import TERMS
  fig, axes = plt.subplots(2, 2, figsize=(11, 7))
  for ax, (name, keys) in zip(axes.flat, CURVES):
    if name == "reward parts":
      keys = tuple(f"reward/{t}" for t in TERMS) + ("reward/final",)
    for k in keys:
      pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
      if pts:
        ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3, label=k.split("/")[-1])
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png
