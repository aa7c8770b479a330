"""Ablation: batch size from 4096 down to 256 (BYOL Figure 3a).

Only batch_size changes. The learning rate follows it linearly, because optim.py sets the
peak lr to optim.base_lr * batch_size / 256; the number of epochs is kept, so a smaller
batch takes proportionally more steps (and more target updates, tau per step unchanged).
The recipe's data set must have at least 4096 training examples for the largest run.
"""

BATCH_SIZES = (4096, 2048, 1024, 512, 256)


def get_sweep() -> list[dict]:
  """The runs: [{'name': str, 'overrides': {dotted config field: value}}]."""
  return [{"name": f"batch_{b}", "overrides": {"batch_size": b}} for b in BATCH_SIZES]
