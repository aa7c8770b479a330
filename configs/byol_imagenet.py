"""BYOL on ImageNet, ResNet-50, the paper's 300-epoch setting.

Command:
  byol-jax pretrain --config=configs/byol_imagenet.py --workdir=/path/to/run
Args (`--config=configs/byol_imagenet.py:ARG`):
  '' (default): the paper's ResNet-50, batch 4096, 300 epochs (base_lr 0.3, wd 1e-6, tau 0.99).
  'smoke': a tiny ResNet-18 at 32 px, batch 8, for tests of the ImageNet code paths.
Expected: 72.5% linear top-1 (BYOL Table 5 ablation baseline, 300 epochs); about 4h on
512 TPU v3 cores. Every hyperparameter of the paper is a field here with its value.
"""
from byol_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  if arg == "smoke":
    c.batch_size = 8
    c.image_size = 32
    c.num_steps = 2
    c.model.encoder = "resnet18"
    c.model.width = 0.125
    c.model.projector_hidden = 32
    c.model.projector_out = 16
    c.model.predictor_hidden = 32
    c.model.gn_groups = 4
    c.dataset.num_train_examples = 64
  elif arg:
    raise ValueError(f"unknown argument {arg!r} for byol_imagenet; valid: '', 'smoke'.")
  c.lock()
  return c
