"""BYOL on Fashion-MNIST: the CPU recipe (small-image ResNet-18 at width 1/8, 28 px, 1 channel).

Command (after `byol-jax prepare-data fashion_mnist`):
  byol-jax pretrain --config=configs/byol_fashion_mnist.py --workdir=runs/fashion_mnist
Args (`--config=configs/byol_fashion_mnist.py:ARG`):
  '' (default): the CPU run of README's main command.
  'smoke': a few steps of a tiny network, for tests of the real entry point.
Deviations from the ImageNet recipe, for 28 px grayscale images on 2 CPU cores: small stem,
width 1/8, 512/128 heads, crops of at least 20% of the image (8% of 28 px is a few pixels),
a shorter warm-up, 3 epochs. Measured on 2 CPU cores: 702 steps at 160-175 images/s,
19 minutes in all; the online probe (LARS-trained, a monitor, not the linear protocol)
reached 43.5% top-1 / 93.7% top-5 on the test split, seed 0. Not yet tuned for accuracy.
"""
from byol_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.base_config()
  c.batch_size = 256
  c.image_size = 28
  c.num_epochs = 3.0
  c.dataset.update(dict(name="fashion_mnist", train_split="train", eval_split="test",
                        num_classes=10, num_train_examples=60_000, validation_examples=5_000,
                        deterministic=False))
  c.model.update(dict(encoder="resnet18", width=0.125, stem="small", projector_hidden=512,
                      projector_out=128, predictor_hidden=512, gn_groups=8))
  c.optim.update(dict(base_lr=1.0, weight_decay=1e-6, warmup_epochs=0.5))
  c.target.tau_base = 0.99
  c.augment.crop_area_min = 0.2
  c.checkpoint.every_steps = 200
  c.log.every_steps = 20
  c.eval.every_steps = 0  # Evaluate at the end only.
  if arg == "smoke":
    c.batch_size = 8
    c.num_steps = 4
    c.model.update(dict(projector_hidden=32, projector_out=16, predictor_hidden=32))
    c.checkpoint.every_steps = 2
    c.log.every_steps = 1
  elif arg:
    raise ValueError(f"unknown argument {arg!r} for byol_fashion_mnist; valid: '', 'smoke'.")
  c.lock()
  return c
