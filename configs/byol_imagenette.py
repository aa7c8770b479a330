"""BYOL on Imagenette (10 ImageNet classes): the authors' single-GPU setting.

Data: tfds 'imagenette/160px-v2' (shorter side 160 px; splits 'train' 9,469 and
'validation' 3,925 images). Prepare it once with tfds (it downloads from fast.ai):
  python -c "import tensorflow_datasets as tfds; tfds.builder('imagenette/160px-v2').download_and_prepare()"
Command:
  byol-jax pretrain --config=configs/byol_imagenette.py --workdir=runs/imagenette
  byol-jax linear-eval --config=configs/byol_imagenette.py --pretrained=runs/imagenette \
      --workdir=runs/imagenette/linear
Args (`--config=configs/byol_imagenette.py:ARG`):
  '' (default): ResNet-18 (ImageNet stem) on 128 px crops, batch 256, base_lr 2.0, weight
    decay 1e-6, 1000 epochs, the paper's augmentations and heads (4096 -> 256).
  'smoke': a few steps of a tiny network at 32 px, for tests.
Expected (BYOL release, this setting): about 92.3% online-classifier top-1 on 'validation'
after about 4 hours on one V100. tau_base is the base config's 0.99 (the release's small
setting names no other value). Linear evaluation fits a classifier on frozen features
('features' mode: the encoder runs once over the centre crops), cheap at this size.
"""
from byol_jax import config as config_lib


def get_config(arg: str | None = None):
  """The Imagenette recipe for `arg` ('' or 'smoke'); a locked ConfigDict."""
  c = config_lib.base_config()
  c.batch_size = 256
  c.image_size = 128
  c.num_epochs = 1000.0
  c.dataset.update(dict(name="imagenette/160px-v2", train_split="train",
                        eval_split="validation", num_classes=10,
                        # Train size from the data (9,469 in the tfds catalogue).
                        num_train_examples=0, validation_examples=500))
  c.model.update(dict(encoder="resnet18", width=1.0, stem="imagenet"))
  c.optim.update(dict(base_lr=2.0, weight_decay=1e-6, warmup_epochs=10.0))
  c.target.tau_base = 0.99
  c.checkpoint.every_steps = 1000
  c.eval.every_steps = 3700  # About every 100 epochs (37 steps per epoch).
  c.linear.update(dict(mode="features", batch_size=1024, num_epochs=100.0))
  if arg == "smoke":
    c.batch_size = 8
    c.image_size = 32
    c.num_steps = 2
    c.model.update(dict(width=0.125, projector_hidden=32, projector_out=16,
                        predictor_hidden=32, gn_groups=4))
    c.linear.update(dict(batch_size=8, num_epochs=1.0))
  elif arg:
    raise ValueError(f"unknown argument {arg!r} for byol_imagenette; valid: '', 'smoke'.")
  c.lock()
  return config_lib.validate(c)
