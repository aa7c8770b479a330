"""The evaluation commands on 2 local processes x 2 CPU devices, against 1 process x 4.

linear-eval (both linear.mode values) and knn run through the real entry point as one
2-process job (tests/multihost.py); the reference is the same library call in this pytest
process, which has 4 devices (conftest.py). Proven here: the 2 x 2 results are those of
1 x 4, and both are those of a float64 replay of the protocol; only process 0 writes
(each process gets its own --workdir and stdout, and process 1's workdir stays absent); a
process SIGKILLed mid-evaluation takes the other down with a non-zero status within the
heartbeat timeout; every command that computes on devices starts the multi-host runtime
once, the same way, before its work.

Data: the raw-pixel baseline (`--pretrained=pixels`) on the fake Fashion-MNIST at 8 px:
features are 64 standardised pixels, (x / 255 - mean) / std, with no reduction in them,
so a float32 run's features are within a few roundings of the replay's, whatever XLA
makes of the divisions (`pixel_feature_error`). Everything after the features differs
between runs only in the order of reductions (the classifier's dot products and the
gradient's sum over the batch, split over devices and processes) and in roundings.
The tolerance is a worst-case bound on that, carried step by step through the SGD by
`sgd_replay` (a float64 replay on the same features); accuracies must equal the replay's
when no prediction's margin is within what that bound lets the logits move, which the
tests check, so the comparison of top-1 and top-5 is exact.

Augmented mode: each process reads and shuffles its own slice of the split (data/), so
the global batches of a 2-process run are not those of 1 process; the 1 x 4 reference
reads both processes' slices and feeds their concatenation (process 0's devices first),
as tests/test_multihost.py does for pretraining. Features mode and kNN need nothing of
the kind: features are gathered from all processes in data-set order.
"""
import contextlib
import json
import math
import signal
import time

import jax
import numpy as np
import pytest

from multihost import kill_all, launch, wait_all
from tolerances import EPS32
from byol_jax import cli
from byol_jax.evaluation import evaluate
from byol_jax.evaluation import finetune
from byol_jax.evaluation import linear_eval
from byol_jax.jobs import loop
from fakes import smoke_config
from test_loop import RECIPE

# The evaluation recipe of every test here: the smoke recipe at 8 px on the 64 + 12 fake
# images, 16 of them held out for validation, batch 16 (4 per device), 2 epochs, one
# learning rate (so the choice of lr is no question of rounding), deterministic crops.
OVERRIDES = {"image_size": 8, "dataset.validation_examples": 16,
             "dataset.deterministic": True, "linear.batch_size": 16,
             "linear.num_epochs": 2.0, "linear.learning_rates": (0.4,),
             "linear.standardize": False, "linear.every_epochs": 1.0}
NUM_CLASSES = 10


def _flag(key, value):
  if isinstance(value, tuple):
    value = "(" + ",".join(str(v) for v in value) + ",)"
  return f"--config.{key}={value}"


def _config(data_dir, **extra):
  return smoke_config(data_dir, **{**OVERRIDES, **extra})


def _child_args(data_dir, extra=()):
  return [f"--config={RECIPE}:smoke", f"--config.dataset.data_dir={data_dir}",
          "--config.dataset.num_train_examples=64", "--pretrained=pixels",
          *(_flag(k, v) for k, v in OVERRIDES.items()), *extra]


def _run_two_processes(command, data_dir, tmp_path, extra=(), timeout=600):
  """`byol_jax COMMAND` as a 2-process job: process i has workdir tmp_path/'p{i}' and stdout
  tmp_path/'p{i}.log'. Returns (return codes, [process 0's workdir, process 1's], logs)."""
  workdirs = [tmp_path / f"p{i}" for i in range(2)]
  logs = [tmp_path / f"p{i}.log" for i in range(2)]
  procs = launch(command, [[*_child_args(data_dir, extra), f"--workdir={w}"] for w in workdirs],
                 stdouts=logs)
  try:
    codes, _ = wait_all(procs, timeout)
  finally:
    kill_all(procs)
  return codes, workdirs, [log.read_text() for log in logs]


def _check_only_process_0_wrote(codes, workdirs, logs, filename):
  assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
  written = sorted(p.name for p in workdirs[0].iterdir())
  assert filename in written and "metrics.jsonl" in written, written
  assert any(name.startswith("events.out.tfevents") for name in written), written
  assert not workdirs[1].exists(), sorted(workdirs[1].rglob("*"))


# --------------------------------------------------------- the 1 x 4 reference


class Captured:
  """What the in-process reference run used: its features by split, its feature extractor
  (the pixel statistics), and (augmented mode) the global batches of each training."""

  def __init__(self):
    self.features, self.fx, self.streams = {}, None, []


def _capture(monkeypatch, merged_slices: bool) -> Captured:
  captured = Captured()
  real_split_features = evaluate.split_features
  real_load = linear_eval.load_checked
  real_train = linear_eval.pipelines.linear_train_dataset

  def split_features(c, feature_fn, params, state, split, batch_size=None):
    out = real_split_features(c, feature_fn, params, state, split, batch_size)
    captured.features[split] = out
    return out

  def load_checked(c, pretrained):
    captured.fx = real_load(c, pretrained)
    return captured.fx

  class MergedSlices:
    """linear_train_dataset for 1 process: the concatenated batches of a 2 x 2 run."""

    def __init__(self, c, **kwargs):
      kwargs.update(process_count=2, local_device_count=2)
      self._parts = [real_train(c, **dict(kwargs, process_index=i)) for i in range(2)]
      self.batches = []
      captured.streams.append(self.batches)

    def __iter__(self):
      return self

    def __next__(self):
      parts = [next(p) for p in self._parts]
      batch = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
      self.batches.append(batch)
      return batch

  monkeypatch.setattr(evaluate, "split_features", split_features)
  monkeypatch.setattr(linear_eval, "load_checked", load_checked)
  if merged_slices:
    monkeypatch.setattr(linear_eval.pipelines, "linear_train_dataset", MergedSlices)
  return captured


def pixel_features(images, fx) -> np.ndarray:
  """The pixels network's map in NumPy float32: uint8 images [..., H, W, C] -> [N, H*W*C]."""
  images = np.asarray(images)
  x = images.reshape((-1, np.prod(images.shape[-3:]))).astype(np.float32) / np.float32(255.0)
  return (x - fx.params["pixels"]["mean"]) / fx.params["pixels"]["std"]


def pixel_feature_error(x, fx) -> np.ndarray:
  """[N]: how far (2-norm) any float32 evaluation of the pixel map can be from x [N, D],
  another one. Per pixel, with a = q / 255 <= 1: a is rounded once or twice (a division,
  or a product with a rounded reciprocal: <= EPS32 a), a - mean once, the division by
  std (or product with its reciprocal) once or twice: |error| <= EPS32 (1 / std + 2 |x|)
  for each evaluation, twice that between two; 0 where std is inf (a constant pixel)."""
  inv_std = 1.0 / np.asarray(fx.params["pixels"]["std"], np.float64)
  per_pixel = 2 * EPS32 * (inv_std + 2 * np.abs(np.asarray(x, np.float64)))
  return np.linalg.norm(per_pixel, axis=1)


# ------------------------------------------------- float64 replay and its bound


def gamma(n: int) -> float:
  """Relative rounding of a float32 sum of n terms (products included), in any order, in
  EPS32 as tolerances.py counts it: the error is <= gamma(n) sum|terms|."""
  return n * EPS32


def sgd_replay(batches, lr, total_steps, momentum, num_classes):
  """linear_eval's SGD in float64, and how far a float32 run of it can be.

  The protocol: zero init; per step, the mean cross-entropy of the logits x W + b on the
  batch, its gradient g, the trace m = g + mu m, the update g + mu m (Nesterov) times the
  cosine lr lr (1 + cos(pi t / T)) / 2.

  The bound (worst case, every reduction in any order; |.| are 2-norms, x^ = [x, 1]): at
  params within d of the exact ones, on features within e of the replay's, a float32 run's
  logits are off by <= (gamma(D+1) |x^| + e) |params|; its softmax by half that (the
  Jacobian diag p - p p^T has norm <= 1/2: it is a variance of values whose squares sum
  to 1) plus its own roundings; its gradient by |X^| |dP| / b, plus e |p - e_y|, plus the
  rounding of its b-term sums; and the exact gradient is |X^|^2 / (2b)-Lipschitz in the
  params (the Hessian is that Jacobian times x^ x^T, averaged). The trace, the update and
  the step add 2 roundings each, the lr 8 ulps (the float32 cosine, as test_linear_eval's
  hand values bound it). d starts at 0 and is carried from step to step.

  Args:
    batches: [(features [b, D], labels [b], feature error [b] (as `pixel_feature_error`))]
      of each step, in order.
    lr: the peak lr (base x batch / 256), as the run passes it (float32).
    total_steps: T of the cosine. momentum: mu.
    num_classes: C.

  Returns:
    dict(params [D+1, C] (the bias as last row), loss [T] (each step's loss, before its
    update), loss_bound [T], params_bound (on |float32 final params - params|)).
  """
  lr, mu = float(np.float32(lr)), float(np.float32(momentum))
  dim, classes = batches[0][0].shape[1], num_classes
  w, m = np.zeros((dim + 1, classes)), np.zeros((dim + 1, classes))
  d_w = d_m = 0.0  # Bounds on |run - replay| of the params and of the trace.
  losses, loss_bounds = [], []
  for t, (x, y, x_err) in enumerate(batches):
    xh = np.concatenate([np.asarray(x, np.float64), np.ones((len(x), 1))], axis=1)
    b, e = len(xh), float(np.max(x_err))
    r, s = np.linalg.norm(xh, axis=1).max(), np.linalg.norm(xh, 2)
    z = xh @ w
    top = z.max(axis=1, keepdims=True)
    lse = (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))[:, 0]
    p = np.exp(z - lse[:, None])
    zy = z[np.arange(b), y]
    g = xh.T @ (p - np.eye(classes)[y]) / b
    w_run = np.linalg.norm(w) + d_w  # Bounds on the run's |params|, |x^| and |X^|.
    r_run, s_run = r + e, s + e * math.sqrt(b)
    d_z = (gamma(dim + 1) * r_run + e) * w_run
    # exp(z - lse) with z - lse and lse rounded: relative error (|z - lse| + C + 16) EPS32.
    d_p = 0.5 * d_z + (np.abs(z - lse[:, None]).max() + classes + 16) * EPS32
    d_g = (s * s / (2 * b) * d_w + s_run * d_p / math.sqrt(b) + e * (math.sqrt(2) + d_p) +
           gamma(b + 1) * r_run * (math.sqrt(2) + d_p))
    nll = lse - zy
    losses.append(nll.mean())
    # One example's loss has gradient |p - e_y| |x^| <= sqrt(2) r in the params; then the
    # logits, the log-sum-exp's roundings, and the mean over the batch (on each device,
    # then across devices).
    loss_bounds.append(math.sqrt(2) * r * d_w + 2 * d_z + (classes + 16) * EPS32 +
                       2 * EPS32 * np.max(np.abs(lse) + np.abs(zy)) + gamma(b + 1) * nll.mean())
    lr_t = lr * 0.5 * (1 + math.cos(math.pi * t / total_steps))
    m_new = g + mu * m
    update = g + mu * m_new
    n_g, n_m, n_new, n_u = (np.linalg.norm(a) for a in (g, m, m_new, update))
    d_m_new = d_g + mu * d_m + 2 * EPS32 * (n_g + d_g + mu * (n_m + d_m))
    d_u = d_g + mu * d_m_new + 2 * EPS32 * (n_g + d_g + mu * (n_new + d_m_new))
    w_new = w - lr_t * update
    d_w = (d_w + lr_t * d_u + 8 * EPS32 * lr * (n_u + d_u) +
           2 * EPS32 * (np.linalg.norm(w_new) + d_w + lr_t * (n_u + d_u)))
    w, m, d_m = w_new, m_new, d_m_new
  return dict(params=w, loss=np.array(losses), loss_bound=np.array(loss_bounds),
              params_bound=d_w)


def features_mode_batches(x, y, x_err, c):
  """train_on_features' batches: each epoch a permutation by a generator seeded c.seed,
  cut into full batches. Returns ([(x, y, x_err) per step], total steps)."""
  batch = int(c.linear.batch_size)
  per_epoch = len(x) // batch
  total = max(1, int(round(c.linear.num_epochs * per_epoch)))
  rng, out = np.random.default_rng(c.seed), []
  while len(out) < total:
    steps = min(per_epoch, total - len(out))
    index = rng.permutation(len(x))[:steps * batch].reshape(steps, batch)
    out += [(x[i], y[i], x_err[i]) for i in index]
  return out, total


def robust_accuracy(params, params_bound, x, y, x_err):
  """Top-1/top-5 of the replay's classifier on features x, and how many examples' hits a
  float32 run could change.

  Example i is a top-k hit iff its label's logit beats the k-th largest other logit (ties:
  lower class first, as linear_eval.accuracy). A run's params within params_bound and
  features within x_err move each logit by <= |x^_i| params_bound + x_err_i |params|
  (+ the bound's products; logits are computed in float64), so a gap over twice that
  cannot close.
  """
  xh = np.concatenate([np.asarray(x, np.float64), np.ones((len(x), 1))], axis=1)
  z = xh @ params
  reach = 2 * ((np.linalg.norm(xh, axis=1) + x_err) * params_bound +
               x_err * np.linalg.norm(params)) + 1e-9
  zy = z[np.arange(len(y)), y]
  others = np.sort(np.where(np.eye(z.shape[1], dtype=bool)[y], -np.inf, z), axis=1)[:, ::-1]
  out = {}
  for k, name in ((1, "top1"), (min(5, z.shape[1]), "top5")):
    gap = zy - others[:, k - 1]
    out[name] = float(np.mean(gap > 0))
    out[name + "_fragile"] = int(np.sum(np.abs(gap) <= reach))
    out[name + "_min_gap_over_reach"] = float(np.min(np.abs(gap) / reach))
  return out


def _check_linear_result(name, result, replay_val, replay_final, captured, c, loss, bound):
  """A run's results.json against the replay: accuracies equal (no prediction is within
  the bound of a tie: checked), the final train loss within its bound."""
  fx = captured.fx
  test_x, test_y = captured.features[c.dataset.eval_split]
  val_x, val_y = captured.features["val_from_train"]
  test = robust_accuracy(replay_final["params"], replay_final["params_bound"], test_x, test_y,
                         pixel_feature_error(test_x, fx))
  val = robust_accuracy(replay_val["params"], replay_val["params_bound"], val_x, val_y,
                        pixel_feature_error(val_x, fx))
  assert test["top1_fragile"] == test["top5_fragile"] == val["top1_fragile"] == 0, (test, val)
  assert (result["top1"], result["top5"]) == (test["top1"], test["top5"]), (name, test)
  assert result["val_top1"] == {"0.4": val["top1"]}, (name, val)
  assert abs(result["final_train_loss"] - loss) <= bound, (
      name, result["final_train_loss"], loss, bound)
  assert result["steps"] == 8 and result["mode"] == c.linear.mode
  return test, val


def _report(multi, single, keys, **figures):
  """Prints |2x2 - 1x4| of `keys` and the figures they are held to; returns the former."""
  diffs = {k: abs(float(multi[k]) - float(single[k])) for k in keys}
  print("2x2 vs 1x4:", diffs, figures)
  return diffs


# ------------------------------------------------------------------- the tests


def test_linear_eval_features_mode_on_2x2_gives_the_1x4_results(data_dir, tmp_path,
                                                                monkeypatch):
  codes, workdirs, logs = _run_two_processes("linear-eval", data_dir, tmp_path,
                                             ["--config.linear.mode=features"])
  _check_only_process_0_wrote(codes, workdirs, logs, linear_eval.RESULTS_FILE)
  multi = json.loads((workdirs[0] / linear_eval.RESULTS_FILE).read_text())
  c = _config(data_dir, **{"linear.mode": "features"})
  captured = _capture(monkeypatch, merged_slices=False)
  single = linear_eval.run(c, "pixels", str(tmp_path / "1x4"), print_fn=lambda line: None)

  # The replay: train_minus_val for the lr's validation score, then all of train
  # ('val_from_train' is its head), on the features the 1 x 4 run extracted.
  lr = 0.4 * c.linear.batch_size / linear_eval.LR_REFERENCE_BATCH
  sweep_x, sweep_y = captured.features["train_minus_val"]
  val_x, val_y = captured.features["val_from_train"]
  replays = []
  for x, y in ((sweep_x, sweep_y), (np.concatenate([val_x, sweep_x]),
                                     np.concatenate([val_y, sweep_y]))):
    batches, total = features_mode_batches(x, y, pixel_feature_error(x, captured.fx), c)
    replays.append(sgd_replay(batches, lr, total, c.linear.momentum, NUM_CLASSES))
  replay_val, replay_final = replays
  # The reported loss is the mean over the last epoch's steps (4 of them).
  per_epoch = (len(val_x) + len(sweep_x)) // c.linear.batch_size
  loss = replay_final["loss"][-per_epoch:].mean()
  bound = replay_final["loss_bound"][-per_epoch:].mean() + gamma(per_epoch) * loss
  for name, result in (("2x2", multi), ("1x4", single)):
    test, _ = _check_linear_result(name, result, replay_val, replay_final, captured, c, loss,
                                   bound)
  diffs = _report(multi, single, ("top1", "top5", "final_train_loss"), loss=loss,
                  loss_bound=bound, test_margin_over_reach=test["top1_min_gap_over_reach"])
  assert diffs["final_train_loss"] <= 2 * bound


def test_linear_eval_augmented_mode_on_2x2_gives_the_1x4_results(data_dir, tmp_path,
                                                                 monkeypatch):
  codes, workdirs, logs = _run_two_processes("linear-eval", data_dir, tmp_path,
                                             ["--config.linear.mode=augmented"])
  _check_only_process_0_wrote(codes, workdirs, logs, linear_eval.RESULTS_FILE)
  multi = json.loads((workdirs[0] / linear_eval.RESULTS_FILE).read_text())
  c = _config(data_dir, **{"linear.mode": "augmented"})
  captured = _capture(monkeypatch, merged_slices=True)
  single = linear_eval.run(c, "pixels", str(tmp_path / "1x4"), print_fn=lambda line: None)

  lr = 0.4 * c.linear.batch_size / linear_eval.LR_REFERENCE_BATCH
  # Each training (the lr's score on train_minus_val, then all of train) read its own
  # stream: 3 and 4 steps an epoch, 2 epochs (more batches may have been prefetched).
  assert len(captured.streams) == 2
  replays = []
  for stream, total in zip(captured.streams, (6, 8)):
    batches = []
    for batch in stream[:total]:
      x = pixel_features(batch["image"], captured.fx)
      batches.append((x, batch["label"].reshape(-1), pixel_feature_error(x, captured.fx)))
    replays.append(sgd_replay(batches, lr, total, c.linear.momentum, NUM_CLASSES))
  replay_val, replay_final = replays
  # The reported loss is the last step's.
  loss, bound = replay_final["loss"][-1], replay_final["loss_bound"][-1]
  for name, result in (("2x2", multi), ("1x4", single)):
    test, _ = _check_linear_result(name, result, replay_val, replay_final, captured, c, loss,
                                   bound)
  diffs = _report(multi, single, ("top1", "top5", "final_train_loss"), loss=loss,
                  loss_bound=bound, test_margin_over_reach=test["top1_min_gap_over_reach"])
  assert diffs["final_train_loss"] <= 2 * bound


def knn_robust_accuracy(bank, bank_labels, queries, query_labels, k, temperature, classes,
                        feature_error):
  """kNN top-1/top-5 in float64 on features, and how many queries' hits a float32 run
  (on features within feature_error [N] of these) could change.

  A float32 run's cosine similarities are off by <= sim_err: a feature vector off by e
  moves its direction by <= 2 e / |x|; normalising rounds the norm (a D-term sum of
  squares: gamma(D) relative, halved by the square root) and each entry (2 roundings);
  a similarity of unit vectors is a D-term dot product whose |terms| sum to <= 1. So the
  k neighbours are the same when the k-th and (k+1)-th similarities differ by more than
  2 sim_err, and then every vote weight exp(s / T) is off by a factor <= exp(sim_err / T)
  (weights and votes are summed in float64, the scores then rounded to float32); a class
  without votes stays exactly 0 in every run.
  """
  def unit(a):
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)

  dim = bank.shape[1]
  bank_err, query_err = feature_error
  direction = 2 * max(np.max(bank_err / np.linalg.norm(bank, axis=1)),
                      np.max(query_err / np.linalg.norm(queries, axis=1)))
  sim_err = (gamma(dim) + 2 * (gamma(dim) / 2 + 3 * EPS32) + 2 * direction) * 1.01 + EPS32
  sims = unit(queries) @ unit(bank).T
  order = np.argsort(-sims, axis=1, kind="stable")
  k = min(k, len(bank))
  sorted_sims = np.take_along_axis(sims, order, axis=1)
  neighbours_fragile = (sorted_sims[:, k - 1] - sorted_sims[:, k] <= 2 * sim_err
                        if k < len(bank) else np.zeros(len(queries), bool))
  votes = np.zeros((len(queries), classes))
  rows = np.arange(len(queries))[:, None]
  np.add.at(votes, (rows, bank_labels[order[:, :k]]), np.exp(sorted_sims[:, :k] / temperature))
  # Relative change of a vote, either way, and the float32 rounding of the scores.
  spread = math.exp(2 * sim_err / temperature) - 1 + 2 * EPS32
  zy = votes[np.arange(len(queries)), query_labels]
  others = np.sort(np.where(np.eye(classes, dtype=bool)[query_labels], -np.inf, votes),
                   axis=1)[:, ::-1]
  ranked = np.argsort(-votes, axis=1, kind="stable")  # Ties: lower class first.
  out = {}
  for kk, name in ((1, "knn_top1"), (min(5, classes), "knn_top5")):
    # A hit iff the label's votes beat the kk-th largest other class's; equal only at 0
    # (no votes, in every run alike), where the lower class index goes first.
    o = others[:, kk - 1]
    out[name] = float(np.mean((ranked[:, :kk] == query_labels[:, None]).any(axis=1)))
    close = (np.abs(zy - o) <= spread * (zy + o)) & ~((zy == 0) & (o == 0))
    out[name + "_fragile"] = int(np.sum(neighbours_fragile | close))
  return out


def test_knn_on_2x2_gives_the_1x4_results(data_dir, tmp_path, monkeypatch):
  codes, workdirs, logs = _run_two_processes("knn", data_dir, tmp_path)
  _check_only_process_0_wrote(codes, workdirs, logs, linear_eval.KNN_FILE)
  multi = json.loads((workdirs[0] / linear_eval.KNN_FILE).read_text())
  c = _config(data_dir)
  captured = _capture(monkeypatch, merged_slices=False)
  single = linear_eval.knn_run(c, "pixels", str(tmp_path / "1x4"), print_fn=lambda line: None)
  bank, bank_labels = captured.features[c.dataset.train_split]
  queries, query_labels = captured.features[c.dataset.eval_split]
  want = knn_robust_accuracy(bank, bank_labels, queries, query_labels, c.knn.k,
                             c.knn.temperature, NUM_CLASSES,
                             (pixel_feature_error(bank, captured.fx),
                              pixel_feature_error(queries, captured.fx)))
  assert want["knn_top1_fragile"] == want["knn_top5_fragile"] == 0, want
  for result in (multi, single):
    assert (result["knn_top1"], result["knn_top5"]) == (want["knn_top1"], want["knn_top5"])
    assert (result["knn_train_examples"], result["knn_eval_examples"]) == (64, 12)
  _report(multi, single, ("knn_top1", "knn_top5"))


def test_killing_one_process_mid_evaluation_stops_the_other(data_dir, tmp_path):
  heartbeat = 10
  workdirs = [tmp_path / f"p{i}" for i in range(2)]
  logs = [tmp_path / f"p{i}.log" for i in range(2)]
  common = _child_args(data_dir, ["--config.linear.mode=augmented",
                                   "--config.linear.num_epochs=100000.0"])
  procs = launch("linear-eval", [[*common, f"--workdir={w}"] for w in workdirs],
                 heartbeat=heartbeat, stdouts=logs)
  try:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and ": step " not in logs[0].read_text():
      assert all(p.poll() is None for p in procs), "a process ended before training began"
      time.sleep(0.2)
    assert ": step " in logs[0].read_text(), "linear training never started"
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    codes, _ = wait_all(procs[:1], timeout=90)
    elapsed = time.monotonic() - killed_at
  finally:
    kill_all(procs)
  print(f"process 0 ended {elapsed:.1f} s after its peer was killed, status {codes[0]}")
  assert codes[0] is not None, "process 0 still ran 90 s after its peer was killed"
  # The heartbeat timeout, then the service's poll and the exit: well within 3 x.
  assert codes[0] != 0 and elapsed < 3 * heartbeat + 15, (codes, elapsed,
                                                           logs[0].read_text()[-3000:])
  assert not (workdirs[0] / linear_eval.RESULTS_FILE).exists()


# ----------------------------------------------- the runtime's start, per command


_MULTIHOST_ARGS = ["--coordinator_address=10.0.0.1:1234", "--num_processes=4",
                   "--process_id=3", "--initialization_timeout=77", "--heartbeat_timeout=33"]
_EXPECTED = dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                 initialization_timeout=77, heartbeat_timeout_seconds=33)


@pytest.fixture
def device_work(monkeypatch, tmp_path):
  """Stand-ins for every command's library call and for jax.distributed.initialize: each
  records the initialize calls made before it ran."""
  events = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: events.append(("initialize", kwargs)))

  def stand_in(name, result):
    def run(*args, **kwargs):
      events.append((name, sum(e[0] == "initialize" for e in events)))
      return result
    return run

  monkeypatch.setattr(loop, "pretrain", stand_in("pretrain", {"preempted": False, "step": 1}))
  monkeypatch.setattr(linear_eval, "run",
                      stand_in("linear-eval", {"top1": 0.5, "top5": 1.0, "learning_rate": 0.4}))
  monkeypatch.setattr(linear_eval, "knn_run", stand_in("knn", {}))
  monkeypatch.setattr(finetune, "run", stand_in("finetune", {}))
  sweep_file = tmp_path / "two_runs.py"
  sweep_file.write_text("def get_sweep():\n  return [{'name': 'a', 'overrides': {'seed': 1}},\n"
                        "                        {'name': 'b', 'overrides': {'seed': 2}}]\n")
  return events, str(sweep_file)


_SMOKE = f"--config={RECIPE}:smoke"
_COMMANDS = {
    "pretrain": lambda tmp, sweep_file: ["pretrain", _SMOKE, f"--workdir={tmp}/w"],
    "linear-eval": lambda tmp, sweep_file: ["linear-eval", _SMOKE, "--pretrained=random",
                                            f"--workdir={tmp}/w"],
    "knn": lambda tmp, sweep_file: ["knn", _SMOKE, "--pretrained=random", f"--workdir={tmp}/w"],
    "finetune": lambda tmp, sweep_file: ["finetune", _SMOKE, "--pretrained=random",
                                         f"--workdir={tmp}/w"],
    "sweep": lambda tmp, sweep_file: ["sweep", sweep_file, f"--base={RECIPE}:smoke",
                                      f"--workdir={tmp}/w"],
    "sweep --run": lambda tmp, sweep_file: ["sweep", sweep_file, f"--base={RECIPE}:smoke",
                                            f"--workdir={tmp}/w", "--run=1"],
}


@pytest.mark.parametrize("command", sorted(_COMMANDS))
@pytest.mark.parametrize("how", ["flags", "environment", "cluster"])
def test_every_device_command_starts_the_multihost_runtime_once_before_its_work(
    command, how, device_work, tmp_path, monkeypatch):
  events, sweep_file = device_work
  args = _COMMANDS[command](tmp_path, sweep_file)
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  expected = _EXPECTED
  if how == "flags":
    args += _MULTIHOST_ARGS
  elif how == "environment":
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    args += ["--initialization_timeout=77", "--heartbeat_timeout=33"]
  else:  # Cloud TPU, SLURM: jax finds the cluster itself.
    args += ["--distributed", "--initialization_timeout=77", "--heartbeat_timeout=33"]
    expected = dict(initialization_timeout=77, heartbeat_timeout_seconds=33)
  cli.run(["byol-jax", *args])
  assert events[0] == ("initialize", expected), events
  work = events[1:]
  # One start for the whole command: a sweep's runs and their evaluations all run after it.
  assert work and all(count == 1 for _, count in work), events
  runs = {"sweep": 2, "sweep --run": 1}.get(command)
  if runs:
    assert [name for name, _ in work] == ["pretrain", "linear-eval"] * runs
  for name in ("coordinator_address", "num_processes", "process_id", "heartbeat_timeout"):
    assert f"--{name}" in cli.command_usage(command.split()[0])


def test_without_multihost_flags_no_command_starts_the_runtime(device_work, tmp_path,
                                                               monkeypatch):
  events, sweep_file = device_work
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  for make in _COMMANDS.values():
    cli.run(["byol-jax", *make(tmp_path, sweep_file)])
  assert not [e for e in events if e[0] == "initialize"], events


@pytest.mark.parametrize("mode", ["--print_commands", "--collect"])
def test_a_sweep_that_only_prints_or_tabulates_starts_no_runtime(mode, device_work, tmp_path):
  events, sweep_file = device_work
  with pytest.raises(SystemExit) if mode == "--collect" else contextlib.nullcontext():
    # Nothing ran in this workdir, so --collect finds the runs missing (status 1).
    cli.run(["byol-jax", "sweep", sweep_file, f"--base={RECIPE}:smoke",
             f"--workdir={tmp_path}", mode, *_MULTIHOST_ARGS])
  assert events == []
