"""The evaluation commands on 2 local processes x 2 CPU devices, against 1 process x 4.

linear-eval (both linear.mode values) and knn run through the real entry point as one
2-process job (tests/multihost.py); the reference is the same library call in this pytest
process, which has 4 devices (conftest.py). Proven here: the 2 x 2 results are those of
1 x 4, and both are those of a float64 replay of the protocol; only process 0 writes
(each process gets its own --workdir and stdout, and process 1's workdir stays absent); a
process SIGKILLed mid-evaluation takes the other down with a non-zero status within the
heartbeat timeout; (the runtime's start per command: tests/cli/test_runtime_start.py).

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
as tests/jobs/test_multihost.py does for pretraining. Features mode and kNN need nothing of
the kind: features are gathered from all processes in data-set order.
"""
import json

import numpy as np

from byol_jax.evaluation import evaluate
from byol_jax.evaluation import linear_eval
from fakes import smoke_config
from float64_replay import (features_mode_batches, gamma, knn_robust_accuracy,
                            pixel_feature_error, pixel_features, robust_accuracy, sgd_replay)
from multihost import RECIPE, kill_all, kill_peer_once_started, launch, wait_all


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


def _linear_eval_2x2_and_1x4(mode, data_dir, tmp_path, monkeypatch):
  """linear-eval in `mode` as a 2-process job (only process 0 may write) and as the same
  library call here on 4 devices, its inputs captured. Returns (2x2 results, 1x4 results,
  the config, the captured inputs, the learning rate)."""
  codes, workdirs, logs = _run_two_processes("linear-eval", data_dir, tmp_path,
                                             [f"--config.linear.mode={mode}"])
  _check_only_process_0_wrote(codes, workdirs, logs, linear_eval.RESULTS_FILE)
  multi = json.loads((workdirs[0] / linear_eval.RESULTS_FILE).read_text())
  c = _config(data_dir, **{"linear.mode": mode})
  captured = _capture(monkeypatch, merged_slices=mode == "augmented")
  single = linear_eval.run(c, "pixels", str(tmp_path / "1x4"), print_fn=lambda line: None)
  lr = 0.4 * c.linear.batch_size / linear_eval.LR_REFERENCE_BATCH
  return multi, single, c, captured, lr


def _check_both_against_the_replay(multi, single, replays, captured, c, loss, bound):
  """Both runs' accuracies equal the replay's; their losses within the bound of each other."""
  replay_val, replay_final = replays
  for name, result in (("2x2", multi), ("1x4", single)):
    test, _ = _check_linear_result(name, result, replay_val, replay_final, captured, c, loss,
                                   bound)
  diffs = _report(multi, single, ("top1", "top5", "final_train_loss"), loss=loss,
                  loss_bound=bound, test_margin_over_reach=test["top1_min_gap_over_reach"])
  assert diffs["final_train_loss"] <= 2 * bound


# ------------------------------------------------------------------- the tests


def test_linear_eval_features_mode_on_2x2_gives_the_1x4_results(data_dir, tmp_path,
                                                                monkeypatch):
  multi, single, c, captured, lr = _linear_eval_2x2_and_1x4("features", data_dir, tmp_path,
                                                            monkeypatch)

  # The replay: train_minus_val for the lr's validation score, then all of train
  # ('val_from_train' is its head), on the features the 1 x 4 run extracted.
  sweep_x, sweep_y = captured.features["train_minus_val"]
  val_x, val_y = captured.features["val_from_train"]
  replays = []
  for x, y in ((sweep_x, sweep_y), (np.concatenate([val_x, sweep_x]),
                                     np.concatenate([val_y, sweep_y]))):
    batches, total = features_mode_batches(x, y, pixel_feature_error(x, captured.fx), c)
    replays.append(sgd_replay(batches, lr, total, c.linear.momentum, NUM_CLASSES))
  # The reported loss is the mean over the last epoch's steps (4 of them).
  replay_final = replays[1]
  per_epoch = (len(val_x) + len(sweep_x)) // c.linear.batch_size
  loss = replay_final["loss"][-per_epoch:].mean()
  bound = replay_final["loss_bound"][-per_epoch:].mean() + gamma(per_epoch) * loss
  _check_both_against_the_replay(multi, single, replays, captured, c, loss, bound)


def test_linear_eval_augmented_mode_on_2x2_gives_the_1x4_results(data_dir, tmp_path,
                                                                 monkeypatch):
  multi, single, c, captured, lr = _linear_eval_2x2_and_1x4("augmented", data_dir, tmp_path,
                                                            monkeypatch)
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
  # The reported loss is the last step's.
  loss, bound = replays[1]["loss"][-1], replays[1]["loss_bound"][-1]
  _check_both_against_the_replay(multi, single, replays, captured, c, loss, bound)



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
  code, _, elapsed = kill_peer_once_started(procs, lambda: ": step " in logs[0].read_text(),
                                            start_timeout=600)
  print(f"process 0 ended {elapsed:.1f} s after its peer was killed, status {code}")
  assert code is not None, "process 0 still ran 90 s after its peer was killed"
  # The heartbeat timeout, then the service's poll and the exit: well within 3 x.
  assert code != 0 and elapsed < 3 * heartbeat + 15, (code, elapsed,
                                                      logs[0].read_text()[-3000:])
  assert not (workdirs[0] / linear_eval.RESULTS_FILE).exists()
