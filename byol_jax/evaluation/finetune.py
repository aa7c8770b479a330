"""Semi-supervised fine-tuning: the whole pretrained encoder plus a new linear head,
trained on a class-balanced labelled subset of the train split, reported on the test split.

The recipe follows the BYOL paper (Appendix C.1, after SimCLR): the network starts from
the pretrained encoder; training images get a random-resized crop and a horizontal flip
only (pipelines.finetune_dataset), test images the centre crop of pipelines.eval_dataset; both are
standardised inside the network. Cross-entropy, SGD with Nesterov momentum 0.9, batch
1024, no weight decay or other regularisation (config.finetune). Batch norm runs in
training mode with statistics synchronised across devices, and its moving averages are
updated as it trains (evaluation uses them). Choices the paper leaves open, made here:
the learning rate decays from finetune.learning_rate to 0 by a cosine over the run, with
no warm-up and no scaling by batch size (the paper sweeps lr in {0.005, ..., 0.1} and
30 or 50 epochs on a validation split; this module runs one setting); the head is a
Haiku Linear with its default init (a zero head would give the encoder no gradient at
first). Subsets: round(fraction x class count) examples per class (at least 1), drawn
by seed, or the indices of a file (`read_subset_file`); the paper's 1% / 10% ImageNet
splits are SimCLR's file-name lists, which this module cannot read.

Outputs in the workdir: results.json (written atomically), subset.txt (the subset's
indices, so `--config.finetune.subset_file=DIR/subset.txt` reruns the same subset),
metrics.jsonl and TensorBoard events of the training loss.
"""
import functools
import json
import math
import os
import time
from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from byol_jax.training import augment
from byol_jax.evaluation import baselines
from byol_jax import config as config_lib
from byol_jax.data import pipelines
from byol_jax.evaluation import features
from byol_jax.store import files
from byol_jax.training import losses
from byol_jax.model import networks
from byol_jax.training import optim
from byol_jax import parallel
from byol_jax.data import sources
from byol_jax.store import writers

RESULTS_FILE = "results.json"
SUBSET_FILE = "subset.txt"
HEAD = "classifier"  # The new head's module name; the encoder's modules are 'encoder/...'.


# ------------------------------------------------------------------------- subsets


def check_fraction(fraction: float) -> None:
  """Raises ValueError unless 0 < fraction <= 1."""
  if isinstance(fraction, bool) or not (isinstance(fraction, (int, float)) and
                                        0.0 < fraction <= 1.0):
    raise ValueError(f"finetune.label_fraction={fraction!r} must be in (0, 1] (e.g. 0.01 or "
                     "0.1 for the paper's 1% and 10% subsets).")


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """A class-balanced random subset of example indices.

  Each class c with n_c examples contributes max(1, floor(fraction * n_c + 0.5)) of them
  (rounded half up), drawn without replacement by a NumPy generator seeded with `seed`;
  classes are visited in increasing label order, so the result depends only on
  (labels, fraction, seed).

  Args:
    labels: [N] integer labels, labels[i] the class of example i.
    fraction: in (0, 1].
    seed: any non-negative integer.

  Returns:
    [K] int64 sorted distinct indices into labels.
  """
  check_fraction(fraction)
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"labels must be a non-empty 1-D array; got shape {labels.shape}.")
  rng = np.random.default_rng(seed)
  chosen = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    take = max(1, int(math.floor(fraction * members.size + 0.5)))
    chosen.append(rng.choice(members, size=take, replace=False))
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def read_subset_file(path: str, num_examples: int) -> np.ndarray:
  """Reads a subset file: one example index (an integer in [0, num_examples)) a line.

  Blank lines and lines starting with '#' are ignored.

  Returns:
    [K] int64 sorted indices.

  Raises:
    FileNotFoundError: no such file. ValueError: a line that is not an integer, an index
    out of range, a repeated index (each message names the line), or no index at all.
  """
  if not files.is_file(path):
    raise FileNotFoundError(f"finetune.subset_file={path!r} does not exist; give a text file "
                            "of train example indices, one per line.")
  seen: dict[int, int] = {}
  for number, line in enumerate(files.read_text(path).splitlines(), start=1):
    text = line.strip()
    if not text or text.startswith("#"):
      continue
    try:
      index = int(text)
    except ValueError:
      raise ValueError(f"{path}:{number}: {text[:60]!r} is not an integer example index; a "
                       "subset file lists indices into dataset.train_split in stored order "
                       "(file names, as in SimCLR's lists, are not supported).") from None
    if not 0 <= index < num_examples:
      raise ValueError(f"{path}:{number}: index {index} is outside [0, {num_examples}), "
                       f"the {num_examples} examples of the train split.")
    if index in seen:
      raise ValueError(f"{path}:{number}: index {index} repeats line {seen[index]}; each "
                       "example may be listed once.")
    seen[index] = number
  if not seen:
    raise ValueError(f"{path} lists no example index.")
  return np.sort(np.fromiter(seen, np.int64, len(seen)))


# -------------------------------------------------------------------- the network


class FinetuneState(NamedTuple):
  step: jnp.ndarray  # int32 scalar.
  params: hk.Params  # Encoder ('encoder/...') and head (HEAD) modules in one dict.
  bn_state: hk.State  # Encoder batch-norm moving statistics.
  opt_state: optax.OptState


class Deps(NamedTuple):
  """What `update` and `eval_step` need besides their arguments; built once per run."""
  encoder: hk.TransformedWithState  # Cross-replica BN over DEVICE_AXIS.
  head: hk.Transformed
  representation_dim: int  # D, the head's input width.
  optimizer: optax.GradientTransformation
  lr_schedule: optax.Schedule


def make_deps(model_cfg: ml_collections.ConfigDict, num_classes: int,
              ft_cfg: ml_collections.ConfigDict, total_steps: int,
              precision: str = "float32", axis_name: str | None = parallel.DEVICE_AXIS) -> Deps:
  """Network, head, optimiser (SGD + Nesterov, cosine lr over `total_steps`) of a run.

  Weight decay (finetune.weight_decay, 0 in the paper) skips biases and norm parameters.
  """
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1.")
  encoder = networks.make_encoder_network(model_cfg, axis_name=axis_name, precision=precision)
  head = hk.transform(lambda y: hk.Linear(num_classes, name=HEAD)(y))
  lr = optax.cosine_decay_schedule(ft_cfg.learning_rate, total_steps)
  sgd = optax.sgd(lr, momentum=ft_cfg.momentum or None, nesterov=bool(ft_cfg.nesterov))
  optimizer = sgd
  if ft_cfg.weight_decay:
    optimizer = optax.chain(
        optax.add_decayed_weights(ft_cfg.weight_decay, mask=optim.adaptation_mask), sgd)
  return Deps(encoder, head, networks.representation_dim(model_cfg), optimizer, lr)


def init_state(deps: Deps, encoder_params: hk.Params, encoder_state: hk.State,
               rng: jax.Array) -> FinetuneState:
  """Unreplicated state: the given encoder, a freshly initialised head."""
  head_params = deps.head.init(rng, jnp.zeros((1, deps.representation_dim), jnp.float32))
  params = {**jax.tree_util.tree_map(jnp.asarray, dict(encoder_params)), **head_params}
  return FinetuneState(jnp.zeros((), jnp.int32), params,
                       jax.tree_util.tree_map(jnp.asarray, dict(encoder_state)),
                       deps.optimizer.init(params))


def _split(params: hk.Params) -> tuple[hk.Params, hk.Params]:
  return hk.data_structures.partition(lambda module, name, value: module != HEAD, params)


def logits_fn(params: hk.Params, bn_state: hk.State, images: jnp.ndarray, is_training: bool,
              deps: Deps) -> tuple[jnp.ndarray, hk.State]:
  """Class scores [N, num_classes] of images [N, H, W, C] (uint8 or [0, 1] floats)."""
  encoder_params, head_params = _split(params)
  y, bn_state = deps.encoder.apply(encoder_params, bn_state, None,
                                   augment.to_unit_range(images), is_training=is_training)
  return deps.head.apply(head_params, None, y), bn_state


def loss_fn(params: hk.Params, bn_state: hk.State, images: jnp.ndarray, labels: jnp.ndarray,
            deps: Deps):
  """Mean cross-entropy on this device's batch; differentiate w.r.t. argument 0.

  Returns:
    (loss, (new_bn_state, logits [b, num_classes])).
  """
  logits, bn_state = logits_fn(params, bn_state, images, True, deps)
  return losses.softmax_cross_entropy(logits, labels), (bn_state, logits)


def update(state: FinetuneState, batch: dict, *, deps: Deps) -> tuple[FinetuneState, dict]:
  """One fine-tuning step on this device's share of the global batch (run under pmap).

  Args:
    state: this device's replica.
    batch: image [b, H, W, C] uint8 (host-cropped and flipped), label [b] int32.
    deps: from `make_deps`.

  Returns:
    (new_state, metrics): loss, train_top1 (averaged over devices), learning_rate.
  """
  grads, (bn_state, logits) = jax.grad(loss_fn, has_aux=True)(
      state.params, state.bn_state, batch["image"], batch["label"], deps)
  grads = jax.lax.pmean(grads, parallel.DEVICE_AXIS)
  updates, opt_state = deps.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(loss=losses.softmax_cross_entropy(logits, batch["label"]),
                 train_top1=losses.topk_accuracy(logits, batch["label"], 1))
  metrics = jax.lax.pmean(metrics, parallel.DEVICE_AXIS)
  metrics["learning_rate"] = deps.lr_schedule(state.step)
  return FinetuneState(state.step + 1, params, bn_state, opt_state), metrics


def make_pmapped_update(deps: Deps, devices=None):
  """`update` bound to `deps`, pmapped over `devices` (default all local); donates the state."""
  return jax.pmap(functools.partial(update, deps=deps), axis_name=parallel.DEVICE_AXIS,
                  donate_argnums=(0,), devices=devices)


def eval_step(params: hk.Params, bn_state: hk.State, batch: dict, *, deps: Deps) -> dict:
  """Correct top-1/top-5 counts and example count of a masked batch, summed over devices."""
  logits, _ = logits_fn(params, bn_state, batch["image"], False, deps)
  mask = batch["mask"].astype(jnp.float32)
  k5 = min(5, logits.shape[-1])
  counts = dict(top1=jnp.sum(losses.topk_correct(logits, batch["label"], 1) * mask),
                top5=jnp.sum(losses.topk_correct(logits, batch["label"], k5) * mask),
                count=jnp.sum(mask))
  return jax.lax.psum(counts, parallel.DEVICE_AXIS)


def evaluate(deps: Deps, state: FinetuneState, batches) -> dict:
  """Top-1/top-5 over one pass of sharded eval batches: dict(top1, top5, examples)."""
  step = jax.pmap(functools.partial(eval_step, deps=deps), axis_name=parallel.DEVICE_AXIS)
  totals = None
  for batch in batches:
    counts = step(state.params, state.bn_state, batch)
    totals = counts if totals is None else jax.tree_util.tree_map(jnp.add, totals, counts)
  if totals is None:
    raise ValueError("the evaluation split yielded no batches; check dataset.eval_split.")
  totals = {k: float(np.asarray(v)[0]) for k, v in jax.device_get(totals).items()}
  n = max(totals["count"], 1.0)
  return dict(top1=totals["top1"] / n, top5=totals["top5"] / n, examples=int(totals["count"]))


# ------------------------------------------------------------------------ the job


def check_has_encoder(pretrained) -> None:
  """Refuses the pixels baseline (the word or its FeatureExtractor): nothing to fine-tune."""
  word = os.fspath(pretrained) if isinstance(pretrained, (str, os.PathLike)) else None
  if word == baselines.PIXELS or isinstance(pretrained, features.FeatureExtractor):
    raise ValueError("fine-tuning needs an encoder; pixels is a baseline for linear-eval and knn "
                     "only; use --pretrained=random for the random-encoder baseline.")


def choose_subset(c: ml_collections.ConfigDict) -> tuple[np.ndarray, int]:
  """finetune.subset_file's indices when set, else `balanced_subset` of the labels by c.seed.

  Returns:
    (sorted indices [K] into dataset.train_split, N its size). Labels are read (a pass
    over the split's records, images not decoded) only for the balanced draw.
  """
  if c.finetune.subset_file:
    num_examples = sources.open_split(c, c.dataset.train_split).total_examples
    return read_subset_file(c.finetune.subset_file, num_examples), num_examples
  check_fraction(c.finetune.label_fraction)
  labels = pipelines.split_labels(c, c.dataset.train_split)
  return balanced_subset(labels, c.finetune.label_fraction, c.seed), int(labels.size)


def _train(c, deps: Deps, state: FinetuneState, batches, total: int,
           writer: writers.MetricWriter) -> tuple[FinetuneState, dict]:
  """`total` pmapped steps; logs every log.every_steps and the last; stops on a NaN loss."""
  step_fn = make_pmapped_update(deps)
  every = max(1, min(c.log.every_steps, total))
  last = {}
  for step in range(1, total + 1):
    state, metrics = step_fn(state, next(batches))
    if step % every == 0 or step == total:
      last = {k: float(np.asarray(v)[0]) for k, v in jax.device_get(metrics).items()}
      if not math.isfinite(last["loss"]):
        raise FloatingPointError(f"fine-tuning loss is {last['loss']} at step {step}; lower "
                                 f"finetune.learning_rate (now {c.finetune.learning_rate}).")
      writer.write(step, last)
  return state, last


def finetune(c: ml_collections.ConfigDict, pretrained, workdir: str,
             print_fn: Callable[[str], None] | None = None, pretrained_path: str = "") -> dict:
  """Fine-tunes `pretrained` (an encoder_weights.Pretrained) as config `c` says; see `run`."""
  check_has_encoder(pretrained)
  say = print_fn or (lambda line: print(line, flush=True))
  start = time.monotonic()
  c = ml_collections.ConfigDict(c.to_dict())  # Unlocked copy; the encoder owns `model`.
  c.model = ml_collections.ConfigDict(pretrained.model.to_dict())
  config_lib.validate(c)
  c = sources.resolve_dataset(c, reads=("eval",))
  ft = c.finetune
  features.check_images(c, pretrained.image_size, pretrained.channels, "encoder")
  parallel.per_device_batch(ft.batch_size)  # Fails early, naming both numbers.
  subset, num_train = choose_subset(c)
  total = max(1, math.ceil(ft.num_epochs * subset.size / ft.batch_size))
  say(f"fine-tuning {pretrained_path or 'the given encoder'} (pretraining step {pretrained.step})"
      f" on {subset.size} of {num_train} train examples for {total} steps")
  if jax.process_index() == 0:
    files.write_text_atomic(files.join(workdir, SUBSET_FILE), "".join(f"{i}\n" for i in subset))

  deps = make_deps(c.model, c.dataset.num_classes, ft, total, c.precision)
  state = parallel.replicate(init_state(deps, pretrained.params, pretrained.state,
                                        jax.random.PRNGKey(c.seed)))
  local = dict(process_index=jax.process_index(), process_count=jax.process_count(),
               local_device_count=jax.local_device_count())
  with writers.MetricWriter(workdir, total, images_per_step=ft.batch_size,
                            print_fn=print_fn) as writer:
    batches = pipelines.device_prefetch(pipelines.finetune_dataset(c, subset, batch_size=ft.batch_size,
                                                         **local))
    state, last = _train(c, deps, state, batches, total, writer)
    train_seconds = time.monotonic() - start
    scores = evaluate(deps, state, pipelines.device_prefetch(pipelines.eval_dataset(
        c, c.dataset.eval_split, batch_size=ft.batch_size, **local)))
    writer.write(total, {f"test_{k}": v for k, v in scores.items()})

  results = dict(
      top1=scores["top1"], top5=scores["top5"], eval_examples=scores["examples"],
      eval_split=c.dataset.eval_split, subset_size=int(subset.size),
      train_examples=num_train,
      label_fraction=None if ft.subset_file else float(ft.label_fraction),
      subset_file=ft.subset_file or None, seed=int(c.seed), epochs=float(ft.num_epochs),
      steps=total, final_train_loss=last.get("loss"),
      elapsed_seconds=round(time.monotonic() - start, 3),
      train_seconds=round(train_seconds, 3),
      pretrained=dict(path=pretrained_path, step=int(pretrained.step),
                      source=pretrained.source),
      config=c.to_dict())
  if jax.process_index() == 0:
    files.write_text_atomic(files.join(workdir, RESULTS_FILE),
                  json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")
  say(f"fine-tuned: test top-1 {scores['top1']:.2%}, top-5 {scores['top5']:.2%} on "
      f"{scores['examples']} examples ({results['elapsed_seconds']:.0f} s)")
  return results


def run(c: ml_collections.ConfigDict, pretrained: str, workdir: str,
        print_fn: Callable[[str], None] | None = None) -> dict:
  """`byol-jax finetune`: fine-tunes a pretrained encoder on a labelled train subset.

  Args:
    c: the recipe config (dataset.*, image_size, finetune.*, seed, log.*, precision); its
      `model` section is replaced by the pretrained encoder's.
    pretrained: a pretraining workdir, a byol_jax export or an authors' release .pkl
      (anything `pretrained.load` reads), or 'random' (`baselines.random_init`); not
      'pixels', the raw-pixel baseline of linear-eval and knn, which has no encoder.
    workdir: where results.json, subset.txt, metrics.jsonl and TensorBoard events go.
    print_fn: console output (default print).

  Returns:
    The results.json dict: top1, top5, eval_examples, subset_size, label_fraction,
    subset_file, seed, epochs, steps, elapsed_seconds (all of it), train_seconds (up to the
    end of training), pretrained {path, step, source},
    config, ...

  Raises:
    ValueError: bad fraction or subset file, images that do not match the encoder's, or
      pretrained='pixels' (refused before anything is read).
    FileNotFoundError: the pretrained path or subset file does not exist.
  """
  check_has_encoder(pretrained)
  return finetune(c, baselines.resolve_encoder(c, pretrained), workdir, print_fn, pretrained)
