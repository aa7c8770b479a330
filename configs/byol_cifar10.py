"""BYOL on CIFAR-10: small-stem ResNet-18 at 32 px (tfds 'cifar10', 50k train / 10k test).

Data: tfds prepares it once (downloads from cs.toronto.edu):
  python -c "import tensorflow_datasets as tfds; tfds.builder('cifar10').download_and_prepare()"
Command:
  byol-jax pretrain --config=configs/byol_cifar10.py[:ARG] --workdir=runs/cifar10
  byol-jax linear-eval --config=configs/byol_cifar10.py[:ARG] --pretrained=runs/cifar10 \
      --workdir=runs/cifar10/linear
Args (`--config=configs/byol_cifar10.py:ARG`):
  '' (default, one GPU): ResNet-18 width 1 with the small stem (3x3 conv, no max-pool: a
    7x7/2 conv and a pool would shrink 32 px to 8 px before the first block), batch 512,
    1000 epochs (97k steps), base_lr 1.0 (peak lr 2.0), weight decay 1e-5, tau_base 0.99.
    The epoch count and the larger weight decay follow common practice for BYOL on 50k
    images: runs on small data sets keep improving for ~1000 epochs and overfit less with
    more decay than ImageNet's 1e-6. Gaussian blur is off in both views: at 32 px its
    3-tap kernel mostly erases the little detail the images have.
  'cpu': the same recipe shrunk to width 1/8, 512/128 heads, batch 256 and 3 epochs (585
    steps), sized like configs/byol_fashion_mnist.py (measured there: ~170 images/s on 2
    cores, about 15-20 minutes; not yet measured on CIFAR-10, whose 3 channels cost a little
    more in the first convolution).
  'smoke': a few steps of a tiny network, for tests.
Expected: not yet measured by this project (experiments/README.md holds measured figures).
Linear evaluation fits a classifier on frozen features ('features' mode), cheap at 32 px.
"""
from byol_jax import config as config_lib


def _gpu(c) -> None:
  c.batch_size = 512
  c.num_epochs = 1000.0
  c.model.update(dict(encoder="resnet18", width=1.0, stem="small"))
  c.optim.update(dict(base_lr=1.0, weight_decay=1e-5, warmup_epochs=10.0))
  c.target.tau_base = 0.99
  for view in (c.augment.view1, c.augment.view2):
    view.blur_prob = 0.0
  c.checkpoint.every_steps = 2000
  c.eval.every_steps = 9700  # About every 100 epochs.


def _cpu(c) -> None:
  c.batch_size = 256
  c.num_epochs = 3.0
  c.model.update(dict(width=0.125, projector_hidden=512, projector_out=128,
                      predictor_hidden=512, gn_groups=8))
  c.optim.warmup_epochs = 0.5  # 10 epochs would be longer than the run.
  c.checkpoint.every_steps = 200
  c.log.every_steps = 20
  c.eval.every_steps = 0  # At the end only.


def get_config(arg: str | None = None):
  """The CIFAR-10 recipe for `arg` ('', 'cpu' or 'smoke'); a locked ConfigDict."""
  c = config_lib.base_config()
  c.image_size = 32
  c.dataset.update(dict(name="cifar10", train_split="train", eval_split="test",
                        # Train size from the data (50,000 in the tfds catalogue).
                        num_classes=10, num_train_examples=0, validation_examples=5_000))
  c.linear.update(dict(mode="features", batch_size=1024, num_epochs=100.0))
  _gpu(c)
  if arg in ("cpu", "smoke"):
    _cpu(c)
  if arg == "smoke":
    c.batch_size = 8
    c.num_steps = 4
    c.model.update(dict(projector_hidden=32, projector_out=16, predictor_hidden=32))
    c.checkpoint.every_steps = 2
    c.log.every_steps = 1
    c.linear.update(dict(batch_size=8, num_epochs=1.0))
  elif arg not in (None, "", "cpu"):
    raise ValueError(f"unknown argument {arg!r} for byol_cifar10; valid: '', 'cpu', 'smoke'.")
  c.lock()
  return config_lib.validate(c)
