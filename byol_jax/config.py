"""The config schema: every field with the paper's value as default, and its validation.

Recipes in configs/ start from `base_config()` and override fields; `validate` rejects
bad values before any work starts, naming the field and the valid choices.
Field names are a stable contract (see DESIGN.md); add fields, never rename.
"""
import hashlib
import json

import ml_collections

# Names accepted by the string-valued fields. resnet.py, layers.py, networks.py, optim.py
# and augment.py hold the registries these names index; tests check the two stay in step.
ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200")
STEMS = ("imagenet", "small", "small_s2")
NORMS = ("batch", "group_ws", "none")
PADDINGS = ("same", "symmetric")
CONV_IMPLS = ("lax", "taps")
PRECISIONS = ("float32", "bfloat16")
TAU_SCHEDULES = ("cosine", "constant")
TARGET_INITS = ("copy", "separate")
LARS_ORDERS = ("momentum_first", "lr_first")
ZERO_INITS = ("authors", "all", "none")
# model.zero_init_residual as config.json files of runs before 'authors' hold it:
# false started every scale at one, true zeroed every block.
LEGACY_ZERO_INITS = {False: "none", True: "all"}


def view_preset(view: int) -> ml_collections.ConfigDict:
  """The paper's augmentation parameters for view 1 or view 2 (BYOL Table 6).

  Random-resized-crop runs on the host (data.py) and is shared by both views; the rest
  runs on the device (augment.py). Probabilities are per image.
  """
  if view not in (1, 2):
    raise ValueError(f"view must be 1 or 2, got {view}")
  return ml_collections.ConfigDict(dict(
      flip_prob=0.5,
      color_jitter_prob=0.8,
      brightness=0.4,
      contrast=0.4,
      saturation=0.2,
      hue=0.1,
      grayscale_prob=0.2,
      blur_prob=1.0 if view == 1 else 0.1,
      blur_sigma_min=0.1,
      blur_sigma_max=2.0,
      blur_kernel_fraction=0.1,  # kernel side ~ 10% of the image side (23 px at 224).
      solarize_prob=0.0 if view == 1 else 0.2,
      solarize_threshold=0.5,
  ))


def base_config() -> ml_collections.ConfigDict:
  """The paper's ResNet-50 ImageNet setting (300-epoch preset); recipes override it."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 4096  # Global, over all devices of all processes.
  c.image_size = 224
  c.num_epochs = 300.0  # Float: fractional epochs are allowed.
  c.num_steps = 0  # 0: derived from num_epochs and the train split size.
  c.precision = "float32"

  c.dataset = ml_collections.ConfigDict(dict(
      name="imagenet2012",
      data_dir="",  # '' = tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR).
      train_split="train",
      eval_split="validation",
      # 0: from the prepared data set's metadata (sources.resolve_dataset, at every job's
      # start): the label feature's class count and the size of train_split (slices
      # included). A non-zero value must equal the data's: a recipe may state its data
      # set's numbers, and pointed at other data it stops with the fix instead of silently
      # scheduling the run for another size. ImageNet: 1000 classes, 1,281,167 examples.
      num_classes=0,
      num_train_examples=0,
      # Held out of train_split for the linear protocol's learning-rate choice; checked
      # against the split's size at the start of linear evaluation.
      validation_examples=10_000,
      deterministic=False,
      channels=0,  # 0: the data set's own channel count; 1 or 3 converts.
      eval_crop_fraction=224 / 256,  # Centre crop of the shorter side at evaluation.
      cache_max_bytes=2 * 1024**3,  # Splits smaller than this are cached in memory.
      shuffle_buffer=0,  # 0: whole slice when cached, else max(1000, 10 x batch).
      num_threads=0,  # tf.data private thread pool; 0: all cores.
  ))

  c.model = ml_collections.ConfigDict(dict(
      encoder="resnet50",
      width=1.0,
      resnet_v2=False,
      stem="imagenet",
      norm="batch",
      # The norm of the projector's and predictor's hidden layer; '' = model.norm's.
      head_norm="",
      bn_decay=0.9,
      bn_eps=1e-5,
      gn_groups=32,
      projector_hidden=4096,
      projector_out=256,
      predictor_hidden=4096,
      use_predictor=True,
      padding="same",
      # How convolutions and the stem's max-pool are computed (layers.CONV_IMPLS); same
      # parameters and outputs either way. 'lax' (XLA's ops) for TPUs and GPUs; 'taps'
      # (strided slices and one matmul) is 2x faster on CPUs for 28 px images.
      conv_impl="lax",
      # Standardise inputs with ImageNet channel statistics inside the network, as the
      # authors' release does; exported encoders then take plain [0, 1] pixels.
      normalize_inputs=True,
      # Which residual branches start at zero (their closing norm's scale, or the closing
      # conv where no norm follows it); resnet.ZERO_INITS. 'authors' (the paper's numbers
      # come from it): hk.nets.ResNet's init, which zeroes the last BN scale of every
      # bottleneck v1 block (ResNet-50 and deeper) and starts basic (ResNet-18/34) and v2
      # blocks at one. 'all': every block (Goyal et al. 2017). 'none': no block.
      # A field of any type: config.json files of earlier runs hold the bools false / true
      # (= 'none' / 'all'), which still load and mean that (resolve_zero_init); the command
      # line reads --config.model.zero_init_residual=all as the string. Being a reference,
      # it is shared by ConfigDict(c.model) copies: copy with ConfigDict(c.to_dict()).
      zero_init_residual=ml_collections.FieldReference("authors", field_type=object),
      # A projection shortcut (shortcut_conv + shortcut_batchnorm) in block 0 of group 0
      # too, as the authors' ResNetTorso has for every depth. It changes only ResNet-18/34:
      # bottleneck blocks change the channel count there, so ResNet-50 and deeper always
      # have it. False (torchvision's and hk.nets.ResNet18's layout) for this project's
      # recipes; True to hold the authors' ResNet-18/34 weights.
      first_group_projection=False,
  ))

  c.optim = ml_collections.ConfigDict(dict(
      base_lr=0.3,  # Scaled by batch_size / 256.
      weight_decay=1e-6,
      momentum=0.9,
      trust_coefficient=1e-3,
      warmup_epochs=10.0,
      predictor_lr_multiplier=1.0,
      # 'momentum_first': trace, then multiply by the current lr (the authors' release).
      # 'lr_first': multiply by lr, then trace (optax.lars). They differ while lr changes.
      lars_order="momentum_first",
  ))

  c.target = ml_collections.ConfigDict(dict(
      tau_base=0.99,
      schedule="cosine",
      init="copy",  # Target starts as a copy of the online net (authors' release).
  ))

  c.augment = ml_collections.ConfigDict(dict(
      crop_area_min=0.08,
      crop_area_max=1.0,
      crop_aspect_min=3 / 4,
      crop_aspect_max=4 / 3,
      view1=view_preset(1),
      view2=view_preset(2),
  ))

  c.monitor = ml_collections.ConfigDict(dict(
      max_nonfinite_steps=5,  # Consecutive skipped (non-finite) steps before the job stops.
      # Collapse: collapse_std * sqrt(projector_out) (about 1 when healthy) below this...
      collapse_threshold=0.05,
      collapse_patience=100,  # ...for this many steps in a row: a loud warning.
      stop_on_collapse=False,  # True: stop the job instead of only warning.
  ))
  # A jax.profiler trace of steps (first, last), inclusive and counted from 1, into
  # workdir/profile/ for TensorBoard's profile plugin, e.g. (100, 110); () = off.
  c.profile = ml_collections.ConfigDict(dict(steps=()))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3))
  c.log = ml_collections.ConfigDict(dict(every_steps=100))
  c.eval = ml_collections.ConfigDict(dict(every_steps=5000))

  # Linear evaluation of the frozen online encoder (`byol-jax linear-eval`).
  c.linear = ml_collections.ConfigDict(dict(
      mode="augmented",  # 'augmented': crop + flip each epoch (paper); 'features': frozen features once.
      batch_size=1024,
      num_epochs=80.0,
      momentum=0.9,  # SGD with Nesterov momentum.
      nesterov=True,
      weight_decay=0.0,
      # True: standardise each feature with the training features' mean and std before the
      # classifier ('features' mode only). Not in the paper (default False); MAE-style
      # probes do the same with a non-affine batch norm. It only rescales the inputs, so the
      # classifier stays linear in the representation.
      standardize=False,
      # Chosen on the validation split carved from train (dataset.validation_examples),
      # then the chosen one is retrained on all of train and reported on dataset.eval_split.
      learning_rates=(0.4, 0.3, 0.2, 0.1, 0.05),
      every_epochs=10.0,  # Log the train loss this often.
  ))
  # Semi-supervised fine-tuning of the whole encoder on a labelled subset.
  c.finetune = ml_collections.ConfigDict(dict(
      label_fraction=0.01,  # 0.01 or 0.1 in the paper; a class-balanced subset chosen by seed.
      subset_file="",  # Optional: a text file of train example indices (one per line) instead.
      batch_size=1024,
      num_epochs=30.0,
      learning_rate=0.01,
      momentum=0.9,
      nesterov=True,
      weight_decay=0.0,
  ))
  # kNN monitor on frozen features: cosine similarity, temperature-weighted votes.
  # every_steps: during pretraining, every N steps and at the end (0: never); the bank is
  # the first train_examples of the train split (0: all of it), the queries the eval split.
  c.knn = ml_collections.ConfigDict(dict(k=20, temperature=0.07, every_steps=0,
                                         train_examples=0))
  return c


def _choice(value, field: str, valid) -> None:
  if value not in valid:
    raise ValueError(f"config.{field}={value!r} is not valid; choose one of {list(valid)}.")


def _positive(value, field: str, allow_zero: bool = False) -> None:
  if value < 0 or (value == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"config.{field}={value!r} must be {bound}.")


def _probability(value, field: str) -> None:
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"config.{field}={value!r} must be a probability in [0, 1].")


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every constrained field; raises ValueError naming the first bad one.

  Returns the config unchanged so it can be used inline.
  """
  _choice(c.model.encoder, "model.encoder", ENCODERS)
  _choice(c.model.stem, "model.stem", STEMS)
  _choice(c.model.norm, "model.norm", NORMS)
  _choice(c.model.head_norm, "model.head_norm", ("",) + NORMS)
  _choice(c.model.padding, "model.padding", PADDINGS)
  _choice(c.model.conv_impl, "model.conv_impl", CONV_IMPLS)
  _choice(c.precision, "precision", PRECISIONS)
  _choice(c.target.schedule, "target.schedule", TAU_SCHEDULES)
  _choice(c.target.init, "target.init", TARGET_INITS)
  _choice(c.optim.lars_order, "optim.lars_order", LARS_ORDERS)
  resolve_zero_init(c.model.zero_init_residual)
  for field in ("batch_size", "image_size", "model.width", "model.projector_hidden",
                "model.projector_out", "model.predictor_hidden"):
    _positive(_get(c, field), field)
  for field in ("num_epochs", "num_steps", "optim.base_lr", "optim.weight_decay",
                "optim.warmup_epochs", "optim.predictor_lr_multiplier", "dataset.num_classes",
                "dataset.num_train_examples", "dataset.validation_examples"):
    _positive(_get(c, field), field, allow_zero=True)
  if c.num_steps == 0 and c.num_epochs == 0:
    raise ValueError("config.num_steps and config.num_epochs are both 0: set one of them.")
  steps = tuple(c.profile.steps)
  if steps and not (len(steps) == 2 and all(isinstance(s, int) for s in steps) and
                    1 <= steps[0] <= steps[1]):
    raise ValueError(f"config.profile.steps={steps!r} must be () (off) or (first, last) with "
                     "1 <= first <= last, e.g. '(100, 110)'.")
  _probability(c.target.tau_base, "target.tau_base")
  _probability(c.optim.momentum, "optim.momentum")
  for view in ("view1", "view2"):
    for key, value in c.augment[view].items():
      if key.endswith("_prob"):
        _probability(value, f"augment.{view}.{key}")
  return c


def resolve_zero_init(value) -> str:
  """The ZERO_INITS name a model.zero_init_residual value means (legacy bools included).

  Raises:
    ValueError: naming the field, the value and the valid ones.
  """
  if isinstance(value, bool):
    return LEGACY_ZERO_INITS[value]
  if isinstance(value, str) and value in ZERO_INITS:
    return value
  raise ValueError(f"config.model.zero_init_residual={value!r} is not valid; choose one of "
                   f"{list(ZERO_INITS)} (the legacy False / True mean 'none' / 'all').")


def _get(c: ml_collections.ConfigDict, dotted: str):
  for part in dotted.split("."):
    c = c[part]
  return c


def steps_per_epoch(c: ml_collections.ConfigDict) -> int:
  """Optimizer steps in one pass over the pretraining examples (at least 1)."""
  return max(1, c.dataset.num_train_examples // c.batch_size)


def total_steps(c: ml_collections.ConfigDict) -> int:
  """`num_steps` when set, else `num_epochs` worth of steps."""
  if c.num_steps:
    return int(c.num_steps)
  return max(1, int(round(c.num_epochs * steps_per_epoch(c))))


def warmup_steps(c: ml_collections.ConfigDict) -> int:
  """Linear warm-up length in steps (`optim.warmup_epochs`), capped at the run length."""
  return min(total_steps(c), int(round(c.optim.warmup_epochs * steps_per_epoch(c))))


def config_hash(c: ml_collections.ConfigDict) -> str:
  """sha256 of the config's canonical JSON: equal configs give equal hashes on every host."""
  return hashlib.sha256(json.dumps(c.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
