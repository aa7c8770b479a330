"""BYOL on ImageNet: the paper's presets by pretraining length and encoder.

Command:
  byol-jax pretrain --config=configs/byol_imagenet.py[:ARG] --workdir=/path/to/run
  byol-jax linear-eval --config=configs/byol_imagenet.py[:ARG] --pretrained=/path/to/run \
      --workdir=/path/to/run/linear
Args (`--config=configs/byol_imagenet.py:ARG`), ARG = [ENCODER][-EPOCHS], either part optional:
  EPOCHS in 40 | 100 | 300 | 1000 picks (base_lr, weight decay, tau_base) as the paper:
    40: 0.45, 1e-6, 0.97 | 100: 0.45, 1e-6, 0.99 | 300: 0.3, 1e-6, 0.99 | 1000: 0.2, 1.5e-6, 0.996.
  ENCODER in r50 | r50x2 | r50x3 | r50x4 | r101 | r152 | r200 | r200x2 (ResNet depth x width).
  '' (default) = 'r50-300'. Examples: ':1000', ':r50x2', ':r200x2-1000'.
  'smoke': a tiny ResNet-18 at 32 px, batch 8, for tests of the ImageNet code paths.
Every preset: batch 4096, LARS, 10 warm-up epochs, cosine lr and tau schedules; linear
evaluation as the paper (80 epochs, batch 1024, SGD + Nesterov, crop + flip augmentation).
Expected linear top-1 (BYOL paper): r50-1000 74.3%, r50-300 72.5%, r50x2-1000 77.4%,
r50x4-1000 78.6%, r200x2-1000 79.6%. Cost: the authors' r50-1000 run took about 8 hours on
512 TPU v3 cores; the others scale with epochs and encoder FLOPs.
"""
from byol_jax import config as config_lib

# Pretraining epochs -> (base_lr, weight_decay, tau_base), BYOL Appendix C.
EPOCH_PRESETS = {
    40: (0.45, 1e-6, 0.97),
    100: (0.45, 1e-6, 0.99),
    300: (0.3, 1e-6, 0.99),
    1000: (0.2, 1.5e-6, 0.996),
}
# Short name -> (config.model.encoder, config.model.width).
ENCODER_PRESETS = {
    "r50": ("resnet50", 1.0),
    "r50x2": ("resnet50", 2.0),
    "r50x3": ("resnet50", 3.0),
    "r50x4": ("resnet50", 4.0),
    "r101": ("resnet101", 1.0),
    "r152": ("resnet152", 1.0),
    "r200": ("resnet200", 1.0),
    "r200x2": ("resnet200", 2.0),
}
DEFAULT_ENCODER, DEFAULT_EPOCHS = "r50", 300
# imagenet2012 as tfds prepares it: 1000 classes (the recipe states it: the probe's width,
# checked against the data at start-up); train 1,281,167 and validation 50,000 examples.
# The train size is not set: it is taken from the data, so the epoch-based schedules follow
# whatever dataset.train_split holds.
NUM_CLASSES = 1000
SPLIT_SIZES = {"train": 1_281_167, "validation": 50_000}


def parse_arg(arg: str | None) -> tuple[str, int]:
  """'[ENCODER][-EPOCHS]' -> (encoder preset name, epochs); '' or None gives the defaults.

  Raises:
    ValueError: naming the bad part and the valid encoders and epochs.
  """
  encoder, epochs = DEFAULT_ENCODER, DEFAULT_EPOCHS
  for part in (arg or "").split("-"):
    if not part:
      continue
    if part in ENCODER_PRESETS:
      encoder = part
    elif part.isdigit() and int(part) in EPOCH_PRESETS:
      epochs = int(part)
    else:
      raise ValueError(
          f"unknown part {part!r} in argument {arg!r} for byol_imagenet; use "
          f"[ENCODER][-EPOCHS] with ENCODER in {list(ENCODER_PRESETS)} and EPOCHS in "
          f"{list(EPOCH_PRESETS)} (e.g. 'r50x2-1000'), or 'smoke'.")
  return encoder, epochs


def _smoke(c) -> None:
  c.batch_size = 8
  c.image_size = 32
  c.num_steps = 2
  c.model.update(dict(encoder="resnet18", width=0.125, projector_hidden=32, projector_out=16,
                      predictor_hidden=32, gn_groups=4))
  c.linear.update(dict(batch_size=8, num_epochs=1.0))


def get_config(arg: str | None = None):
  """The ImageNet recipe for `arg` (see the module docstring); a locked ConfigDict."""
  c = config_lib.base_config()  # The paper's values: batch 4096, 10 warm-up epochs, LARS.
  c.dataset.num_classes = NUM_CLASSES
  if arg == "smoke":
    _smoke(c)
  else:
    encoder, epochs = parse_arg(arg)
    base_lr, weight_decay, tau_base = EPOCH_PRESETS[epochs]
    c.num_epochs = float(epochs)
    c.optim.update(dict(base_lr=base_lr, weight_decay=weight_decay, warmup_epochs=10.0))
    c.target.tau_base = tau_base
    c.model.encoder, c.model.width = ENCODER_PRESETS[encoder]
    # The paper's linear protocol (its values are base_config's; stated here to be seen).
    c.linear.update(dict(mode="augmented", batch_size=1024, num_epochs=80.0))
  c.lock()
  return config_lib.validate(c)
