"""Evaluation commands on a pretrained, frozen encoder: the linear protocol and kNN.

Linear protocol (BYOL Appendix C.1, as the authors' release runs it): a linear classifier
on the frozen representation (batch norm on its moving statistics), SGD with Nesterov
momentum 0.9, no weight decay, batch 1024, lr = base_lr * batch / 256 decayed by a cosine
to 0 over linear.num_epochs, no warm-up. Each base lr of linear.learning_rates trains on
'train_minus_val' and is scored on 'val_from_train'; the best is retrained on the whole
train split and reported on dataset.eval_split.
  linear.mode='augmented': a random-resized crop + flip of every image each step (paper).
  linear.mode='features':  features of the centre crops are extracted once and the
                           classifier trains on them (fast; no augmentation).
Validation and test features never change (frozen encoder, centre crop), so both modes
extract them once. Results go to results.json (knn.json for kNN), written atomically.
The features come from a features.FeatureExtractor (`baselines.resolve_features`): the
encoder's representation, or for the baseline `--pretrained=pixels` the standardised raw
pixels, through the same code path.

Several processes (the multi-host runtime started by the CLI): each process extracts the
features of its own slice of a split and every process receives all of them, in data-set
order (evaluate.extract_features), so in 'features' mode, and for kNN, each process
computes what one process with the same total device count computes. In 'augmented' mode
each step's gradient is averaged over every device of every process; the global batch is
each process's next batch of its own shuffled slice (data/pipelines.py), so its order
depends on the process count: the same protocol, other batches. Only process 0 writes
results.json, knn.json, metrics.jsonl and the TensorBoard events.
"""
import functools
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from byol_jax.training import augment
from byol_jax.evaluation import baselines
from byol_jax import config as config_lib
from byol_jax.data import pipelines
from byol_jax.evaluation import evaluate
from byol_jax.evaluation import features as features_lib
from byol_jax.store import files
from byol_jax.training import losses
from byol_jax import parallel
from byol_jax.data import sources
from byol_jax.store import writers

RESULTS_FILE = "results.json"
KNN_FILE = "knn.json"
MODES = ("augmented", "features")
# The authors' release scales the linear-eval lr as the pretraining lr: base * batch / 256.
LR_REFERENCE_BATCH = 256


class LinearState(NamedTuple):
  step: jnp.ndarray  # int32 scalar: SGD steps taken.
  params: dict  # w [D, C], b [C].
  opt_state: optax.OptState


def cosine_lr(step: jnp.ndarray, total_steps: jnp.ndarray, lr: jnp.ndarray) -> jnp.ndarray:
  """lr * (1 + cos(pi * min(step, total) / total)) / 2: lr at step 0, 0 at the end."""
  progress = jnp.minimum(step, total_steps) / jnp.maximum(total_steps, 1)
  return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def make_optimizer(momentum: float, nesterov: bool,
                   weight_decay: float) -> optax.GradientTransformation:
  """Weight decay (weights only) and the (Nesterov) momentum trace; no lr.

  The step multiplies by the scheduled lr itself, so that the lr is a run-time argument
  and one compiled step serves the whole sweep (the same maths as optax.sgd).
  """
  decay = optax.add_decayed_weights(weight_decay, mask=lambda p: {"w": True, "b": False})
  return optax.chain(decay, optax.trace(decay=momentum, nesterov=nesterov))


def init_linear(dim: int, num_classes: int, optimizer) -> LinearState:
  """Zero weights and bias: the problem is convex, so no random init is needed."""
  params = dict(w=jnp.zeros((dim, num_classes)), b=jnp.zeros((num_classes,)))
  return LinearState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def linear_logits(params: dict, feats: jnp.ndarray) -> jnp.ndarray:
  """[N, D] -> [N, C] logits."""
  return jnp.matmul(feats, params["w"], precision=jax.lax.Precision.HIGHEST) + params["b"]


def linear_update(lin: LinearState, feats: jnp.ndarray, labels: jnp.ndarray,
                  lr: jnp.ndarray, total_steps: jnp.ndarray, *, optimizer,
                  axis_name: str | None = None) -> tuple[LinearState, jnp.ndarray]:
  """One SGD step of the classifier on a batch of frozen features.

  Args:
    lin: the classifier state. feats: [b, D]. labels: [b] ints.
    lr: peak (already batch-scaled) learning rate. total_steps: length of the cosine.
    optimizer: from `make_optimizer`.
    axis_name: pmapped axis to average gradients over (None: one device).

  Returns:
    (new state, mean cross-entropy of the batch before the step).
  """
  def loss_fn(params):
    return losses.softmax_cross_entropy(linear_logits(params, feats), labels)

  loss, grads = jax.value_and_grad(loss_fn)(lin.params)
  if axis_name is not None:
    grads, loss = jax.lax.pmean((grads, loss), axis_name)
  updates, opt_state = optimizer.update(grads, lin.opt_state, lin.params)
  step_lr = cosine_lr(lin.step, total_steps, lr)
  params = jax.tree_util.tree_map(lambda p, u: p - step_lr * u, lin.params, updates)
  return LinearState(lin.step + 1, params, opt_state), loss


def _make_features_epoch(optimizer):
  """jit: SGD steps over batches x[index[s]] for s in range(S) (one epoch), mean loss."""
  @jax.jit
  def epoch(lin, x, y, index, lr, total_steps):
    def body(state, rows):
      return linear_update(state, x[rows], y[rows], lr, total_steps, optimizer=optimizer)
    lin, batch_losses = jax.lax.scan(body, lin, index)
    return lin, jnp.mean(batch_losses)
  return epoch


def _schedule(num_examples: int, c: ml_collections.ConfigDict) -> tuple[int, int]:
  """(steps per epoch, total steps) of linear training on `num_examples`."""
  batch = int(c.linear.batch_size)
  if num_examples < batch:
    raise ValueError(f"linear.batch_size={batch} exceeds the {num_examples} training examples; "
                     f"set --config.linear.batch_size to at most {num_examples}.")
  per_epoch = num_examples // batch
  return per_epoch, max(1, int(round(c.linear.num_epochs * per_epoch)))


def _log_every(c, per_epoch: int) -> int:
  return max(1, int(round(c.linear.every_epochs * per_epoch)))


def train_on_features(x: np.ndarray, y: np.ndarray, c: ml_collections.ConfigDict, lr: float,
                      print_fn: Callable[[str], None] = print, epoch_fn=None) -> dict:
  """Trains the linear classifier on fixed features (linear.* of `c`), one device.

  Args:
    x: [N, D] features. y: [N] labels in [0, dataset.num_classes).
    c: the config (linear.*, dataset.num_classes, seed).
    lr: peak learning rate (already scaled by batch / 256).
    print_fn: progress lines. epoch_fn: a compiled epoch to reuse (from an earlier call).

  Returns:
    dict(params=host {w [D, C], b [C]}, steps=, examples=N, final_loss=).
  """
  per_epoch, total = _schedule(len(x), c)
  optimizer = make_optimizer(c.linear.momentum, c.linear.nesterov, c.linear.weight_decay)
  epoch_fn = epoch_fn or _make_features_epoch(optimizer)
  lin = init_linear(x.shape[1], c.dataset.num_classes, optimizer)
  xs, ys = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
  rng = np.random.default_rng(c.seed)
  batch, done, loss = int(c.linear.batch_size), 0, float("nan")
  while done < total:
    steps = min(per_epoch, total - done)
    index = rng.permutation(len(x))[:steps * batch].reshape(steps, batch)
    lin, loss = epoch_fn(lin, xs, ys, index, jnp.float32(lr), jnp.int32(total))
    done += steps
    if done % _log_every(c, per_epoch) < steps or done == total:
      print_fn(f"  lr {lr:g}: step {done}/{total} (epoch {done / per_epoch:.1f}) "
               f"train loss {float(loss):.4f}")
  return dict(params=jax.device_get(lin.params), steps=total, examples=len(x),
              final_loss=float(loss))


def augmented_step(lin, enc_params, enc_state, batch, lr, total_steps, *, encoder, optimizer):
  """Per device: frozen encoder on the augmented crops, then `linear_update` (pmean)."""
  feats, _ = encoder.apply(enc_params, enc_state, None, augment.to_unit_range(batch["image"]),
                           is_training=False)
  return linear_update(lin, jax.lax.stop_gradient(feats), batch["label"], lr, total_steps,
                       optimizer=optimizer, axis_name=parallel.DEVICE_AXIS)


def make_pmapped_augmented_step(encoder, optimizer):
  """`augmented_step` bound and pmapped once (lr and total steps are broadcast arguments)."""
  return jax.pmap(functools.partial(augmented_step, encoder=encoder, optimizer=optimizer),
                  axis_name=parallel.DEVICE_AXIS, in_axes=(0, 0, 0, 0, None, None),
                  donate_argnums=(0,))


def train_augmented(c: ml_collections.ConfigDict, step_fn, enc_params, enc_state, dim: int,
                    split: str, lr: float, print_fn: Callable[[str], None] = print) -> dict:
  """Trains the classifier on random-resized crops + flips of `split` (the paper's way).

  Args:
    c: the config (linear.*, dataset.*, image_size, augment.crop_*).
    step_fn: from `make_pmapped_augmented_step` (its optimiser is linear.*'s).
    enc_params, enc_state: the frozen encoder, replicated. dim: its representation size.
    split: the training split (alias or tfds string). lr: peak (batch-scaled) lr.

  Returns:
    dict(params=host {w, b}, steps=, examples=, final_loss=).
  """
  num_examples = sources.open_split(c, split).total_examples
  per_epoch, total = _schedule(num_examples, c)
  optimizer = make_optimizer(c.linear.momentum, c.linear.nesterov, c.linear.weight_decay)
  lin = parallel.replicate(init_linear(dim, c.dataset.num_classes, optimizer))
  source = pipelines.linear_train_dataset(c, split=split, process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     local_device_count=jax.local_device_count(),
                                     batch_size=c.linear.batch_size)
  batches, loss = pipelines.device_prefetch(source), float("nan")
  for step in range(1, total + 1):
    lin, loss = step_fn(lin, enc_params, enc_state, next(batches), jnp.float32(lr),
                        jnp.int32(total))
    if step % _log_every(c, per_epoch) == 0 or step == total:
      print_fn(f"  lr {lr:g}: step {step}/{total} (epoch {step / per_epoch:.1f}) "
               f"train loss {float(np.asarray(loss)[0]):.4f}")
  params = jax.device_get(parallel.unreplicate(lin.params))
  return dict(params=params, steps=total, examples=num_examples,
              final_loss=float(np.asarray(loss)[0]))


def accuracy(params: dict, x: np.ndarray, y: np.ndarray) -> dict:
  """Top-1/top-5 of a linear classifier on features (NumPy, float64 logits)."""
  logits = np.asarray(x, np.float64) @ np.asarray(params["w"], np.float64) + params["b"]
  order = np.argsort(-logits, axis=1, kind="stable")
  hit = order[:, :min(5, logits.shape[1])] == np.asarray(y)[:, None]
  return dict(top1=float(np.mean(hit[:, 0])), top5=float(np.mean(hit.any(axis=1))))


def select_learning_rate(learning_rates, score_fn: Callable[[float], float]):
  """Scores every lr and returns (best lr, {lr: score}); ties go to the earlier lr."""
  if not learning_rates:
    raise ValueError("config.linear.learning_rates is empty; give at least one, e.g. (0.2,).")
  scores = {float(lr): float(score_fn(float(lr))) for lr in learning_rates}
  best = max(scores, key=lambda lr: (scores[lr], -list(scores).index(lr)))
  return best, scores


# ----------------------------------------------------------------- the commands


def load_checked(c: ml_collections.ConfigDict, pretrained) -> features_lib.FeatureExtractor:
  """The features of `pretrained` (a path, 'random', 'pixels' or a Pretrained), pmappable
  over parallel.DEVICE_AXIS in c.precision, checked to fit the recipe's data.

  Raises:
    ValueError: image size or channel count differ between the network and the config.
  """
  fx = baselines.resolve_features(c, pretrained, parallel.DEVICE_AXIS, c.precision)
  features_lib.check_images(c, fx.image_size, fx.channels, fx.name)
  return fx


def _check_linear(c: ml_collections.ConfigDict) -> None:
  if c.linear.mode not in MODES:
    raise ValueError(f"config.linear.mode={c.linear.mode!r} is not valid; choose one of "
                     f"{list(MODES)}.")
  parallel.per_device_batch(c.linear.batch_size)
  if c.linear.standardize and c.linear.mode != "features":
    raise ValueError("config.linear.standardize=True needs config.linear.mode='features' (the "
                     "statistics come from the precomputed training features).")
  if c.linear.num_epochs <= 0:
    raise ValueError(f"config.linear.num_epochs={c.linear.num_epochs} must be > 0.")


def _source_name(pretrained) -> str:
  return os.fspath(pretrained) if isinstance(pretrained, (str, os.PathLike)) else str(
      pretrained.source)


def standardizer(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
  """f(z) = (z - mean(x)) / std(x) per feature (std floored at 1e-6), from features x [N, D]."""
  mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
  return lambda z: ((z - mean) / std).astype(np.float32)


def _make_trainer(c, fx, params, state, val, features, print_fn):
  """(train(split, lr) -> dict(params, steps, examples, final_loss), transform).

  split is 'train_minus_val' (the sweep) or dataset.train_split (the final run); transform
  maps evaluation features the way the training features were mapped (linear.standardize).
  """
  optimizer = make_optimizer(c.linear.momentum, c.linear.nesterov, c.linear.weight_decay)
  if c.linear.mode == "features":
    sweep = features("train_minus_val")
    transform = standardizer(sweep[0]) if c.linear.standardize else (lambda z: z)
    sweep = (transform(sweep[0]), sweep[1])
    # 'val_from_train' is the head of train and 'train_minus_val' the rest (sources.py).
    splits = {"train_minus_val": sweep, c.dataset.train_split:
              (np.concatenate([transform(val[0]), sweep[0]]), np.concatenate([val[1], sweep[1]]))}
    epoch_fn = _make_features_epoch(optimizer)
    return (lambda split, lr: train_on_features(*splits[split], c, lr, print_fn, epoch_fn),
            transform)
  step_fn = make_pmapped_augmented_step(fx.network, optimizer)
  return (lambda split, lr: train_augmented(c, step_fn, params, state, fx.dim, split, lr,
                                            print_fn), lambda z: z)


def run(c: ml_collections.ConfigDict, pretrained, workdir: str,
        print_fn: Callable[[str], None] | None = None) -> dict:
  """The linear protocol on a frozen pretrained encoder; writes workdir/results.json.

  Args:
    c: the recipe (dataset.*, image_size, linear.*, precision, seed); model.* is ignored:
      the architecture comes from the pretrained encoder.
    pretrained: a path for `pretrained.load` (workdir, byol_jax export, authors' .pkl),
      'random' or 'pixels' (the baselines of `baselines.resolve_features`), or an
      `encoder_weights.Pretrained`.
    workdir: results.json, metrics.jsonl and TensorBoard scalars go here.
    print_fn: progress lines (default print).

  Returns:
    The dict written to results.json: top1, top5 (on dataset.eval_split), learning_rate
    (chosen base lr), effective_learning_rate, val_top1 {lr: top-1}, epochs, mode, steps,
    train_examples, eval_examples, elapsed_seconds, pretrained, pretrained_step, config...
  """
  print_fn = print_fn or (lambda line: print(line, flush=True))
  start = time.monotonic()
  config_lib.validate(c)
  _check_linear(c)
  c = sources.resolve_dataset(c, reads=("eval", "holdout"))
  fx = load_checked(c, pretrained)
  _schedule(sources.open_split(c, "train_minus_val").total_examples, c)  # Fail early.
  params, state = parallel.replicate(fx.params), parallel.replicate(fx.state)
  feature_fn = evaluate.make_pmapped_features(fx.network)
  features = lambda split: evaluate.split_features(c, feature_fn, params, state, split,
                                                   c.linear.batch_size)
  scale = c.linear.batch_size / LR_REFERENCE_BATCH
  print_fn(f"linear eval ({c.linear.mode}): {fx.name} from "
           f"{_source_name(pretrained)} (step {fx.step}); extracting features...")
  val_x, val_y = features("val_from_train")
  test_x, test_y = features(c.dataset.eval_split)
  train, transform = _make_trainer(c, fx, params, state, (val_x, val_y), features, print_fn)
  val_x, test_x = transform(val_x), transform(test_x)
  print_fn(f"features ready: {len(val_x)} validation, {len(test_x)} test examples "
           f"({time.monotonic() - start:.1f}s)")

  def score(base_lr):
    top1 = accuracy(train("train_minus_val", base_lr * scale)["params"], val_x, val_y)["top1"]
    print_fn(f"base lr {base_lr:g}: validation top-1 {top1:.2%}")
    return top1

  best, val_scores = select_learning_rate(c.linear.learning_rates, score)
  print_fn(f"chosen base lr {best:g}; retraining on {c.dataset.train_split}...")
  final = train(c.dataset.train_split, best * scale)
  result = dict(
      accuracy(final["params"], test_x, test_y), learning_rate=best,
      effective_learning_rate=best * scale,
      val_top1={f"{lr:g}": top1 for lr, top1 in val_scores.items()},
      epochs=float(c.linear.num_epochs), mode=c.linear.mode, steps=final["steps"],
      train_examples=final["examples"], eval_examples=len(test_x),
      eval_split=c.dataset.eval_split, final_train_loss=final["final_loss"],
      elapsed_seconds=time.monotonic() - start, pretrained=_source_name(pretrained),
      pretrained_step=int(fx.step), config=c.to_dict())
  _write_outputs(workdir, result, RESULTS_FILE, "linear")
  print_fn(f"linear eval: top-1 {result['top1']:.2%} top-5 {result['top5']:.2%} on "
           f"{c.dataset.eval_split} (base lr {best:g}, {result['elapsed_seconds']:.0f}s)")
  return result


def _write_outputs(workdir: str, result: dict, filename: str, prefix: str) -> None:
  """result as JSON (atomically, process 0) and its numbers as TensorBoard scalars."""
  if jax.process_index() != 0:
    return
  scalars = {f"{prefix}/{k}": v for k, v in result.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
  scalars.update({f"{prefix}/val_top1/lr={lr}": v for lr, v in result.get("val_top1", {}).items()})
  with writers.MetricWriter(workdir, max(1, result.get("steps", 1)),
                            print_fn=lambda line: None) as writer:
    writer.write(result.get("steps", 0), scalars)
  files.write_json_atomic(files.join(workdir, filename), result)


def knn_run(c: ml_collections.ConfigDict, pretrained, workdir: str,
            print_fn: Callable[[str], None] | None = None) -> dict:
  """kNN accuracy of a frozen pretrained encoder (knn.*); writes workdir/knn.json.

  Bank: dataset.train_split (its first knn.train_examples when set); queries:
  dataset.eval_split; both centre-cropped. Arguments as `run`.

  Returns:
    The dict written: knn_top1, knn_top5, k, temperature, example counts, and more.
  """
  print_fn = print_fn or (lambda line: print(line, flush=True))
  start = time.monotonic()
  config_lib.validate(c)
  c = sources.resolve_dataset(c, reads=("eval", "knn"))
  fx = load_checked(c, pretrained)
  result = evaluate.knn_monitor(c, evaluate.make_pmapped_features(fx.network),
                                parallel.replicate(fx.params), parallel.replicate(fx.state))
  result.update(k=int(c.knn.k), temperature=float(c.knn.temperature),
                elapsed_seconds=time.monotonic() - start, pretrained=_source_name(pretrained),
                pretrained_step=int(fx.step), eval_split=c.dataset.eval_split, config=c.to_dict())
  _write_outputs(workdir, result, KNN_FILE, "knn")
  print_fn(f"kNN (k={c.knn.k}, T={c.knn.temperature:g}): top-1 {result['knn_top1']:.2%} "
           f"top-5 {result['knn_top5']:.2%} ({result['elapsed_seconds']:.0f}s)")
  return result
