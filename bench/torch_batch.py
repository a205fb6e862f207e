"""Torch-side helpers shared by the rollout benchmarks (bench/rollout.py, bench/rollout_scale.py)."""


def left_padded(active, pad: int):
  """The live episodes' contexts as one left-padded torch batch (ids, attention mask)."""
  import torch
  width = max(len(e.context) for e in active)
  ids = torch.full((len(active), width), pad, dtype=torch.long)
  mask = torch.zeros((len(active), width), dtype=torch.long)
  for i, e in enumerate(active):
    ids[i, width - len(e.context):] = torch.tensor(e.context)
    mask[i, width - len(e.context):] = 1
  return ids, mask
