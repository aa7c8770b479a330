"""Semi-supervised fine-tuning: subset selection, the subset input pipeline, the pmapped
fine-tuning step (whole encoder trained, SGD-Nesterov maths, 4 devices = 1 device) and
the job end to end on a small Fashion-MNIST-format data set the tests write."""
import functools
import json
import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

import fakes
import tolerances
from byol_jax import config as config_lib
from byol_jax.data import pipelines
from byol_jax.evaluation import finetune
from byol_jax.model import networks
from byol_jax import parallel
from byol_jax.data import prepare
from byol_jax.weights import encoder_weights

ROOT = pathlib.Path(__file__).resolve().parents[2]
SIZE, CHANNELS, CLASSES, BATCH = 8, 1, 10, 8
N_TRAIN, N_TEST = 64, 12
LR, MOMENTUM, E2E_STEPS = 0.05, 0.9, 2


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
  root = tmp_path_factory.mktemp("fmnist")
  arrays = fakes.write_fashion_mnist(root / "idx", n_train=N_TRAIN, n_test=N_TEST)
  prepare.prepare_fashion_mnist(str(root / "idx"), str(root / "tfds"))
  return str(root / "tfds"), arrays


def recipe(data_dir, **overrides):
  """configs/byol_fashion_mnist.py:smoke on the test data, at 8 px, fine-tuning 2 steps."""
  # 0.25 of classes of 6-7 examples: 2 each, 20 in all; 0.8 epochs of 20 at batch 8: 2 steps.
  return fakes.smoke_config(data_dir, **{
      "image_size": SIZE, "finetune.label_fraction": 0.25, "finetune.batch_size": BATCH,
      "finetune.num_epochs": 0.8, "finetune.learning_rate": LR, "finetune.momentum": MOMENTUM,
      **overrides})


def tiny_model():
  c = config_lib.base_config()
  c.model.update(dict(encoder="resnet18", width=0.0625, stem="small", gn_groups=4))
  return c.model


@pytest.fixture(scope="module")
def encoder():
  """A Pretrained as pretrained.load returns it, from a random init of a tiny encoder."""
  model = tiny_model()
  net = networks.make_encoder_network(model)
  params, state = net.init(jax.random.PRNGKey(1), jnp.zeros((2, SIZE, SIZE, CHANNELS)),
                           is_training=True)
  host = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
  return encoder_weights.Pretrained(model=model, params=host(params), state=host(state),
                                   image_size=SIZE, channels=CHANNELS, step=7, source="workdir")


# ----------------------------------------------------------------------- subsets


def test_balanced_subset_takes_the_rounded_fraction_of_every_class_hand_worked():
  labels = np.array([0] * 250 + [1] * 150 + [2] * 5 + [3] * 1)
  np.random.default_rng(0).shuffle(labels)
  # 1%: 2.5 -> 3, 1.5 -> 2, 0.05 -> 0 -> at least 1, 0.01 -> 1.  10%: 25, 15, 0.5 -> 1, 1.
  for fraction, expected in ((0.01, [3, 2, 1, 1]), (0.1, [25, 15, 1, 1]), (1.0, [250, 150, 5, 1])):
    subset = finetune.balanced_subset(labels, fraction, seed=3)
    assert subset.dtype == np.int64
    assert np.all(np.diff(subset) > 0), "sorted and distinct"
    assert np.bincount(labels[subset], minlength=4).tolist() == expected
  assert np.array_equal(finetune.balanced_subset(labels, 1.0, 0), np.arange(labels.size))


def test_balanced_subset_is_a_function_of_the_seed():
  labels = np.arange(1000) % 10
  a = finetune.balanced_subset(labels, 0.1, seed=0)
  assert np.array_equal(a, finetune.balanced_subset(labels, 0.1, seed=0))
  draws = [tuple(finetune.balanced_subset(labels, 0.1, seed=s)) for s in range(5)]
  assert len(set(draws)) == 5


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_fraction_is_refused_naming_the_field(fraction):
  with pytest.raises(ValueError, match="label_fraction"):
    finetune.balanced_subset(np.arange(10) % 2, fraction, seed=0)


def test_subset_file_is_read_sorted_with_comments_and_blank_lines(tmp_path):
  path = tmp_path / "subset.txt"
  path.write_text("# ten percent\n7\n\n 3 \n0\n")
  assert finetune.read_subset_file(str(path), 8).tolist() == [0, 3, 7]


@pytest.mark.parametrize("text, message", [
    ("1\nn01440764_10026.JPEG\n", r":2: .*not an integer.*file names"),
    ("1\n8\n", r":2: index 8 is outside \[0, 8\)"),
    ("-1\n", r":1: index -1 is outside"),
    ("4\n2\n4\n", r":3: index 4 repeats line 1"),
    ("# nothing\n\n", "lists no example index"),
])
def test_bad_subset_files_are_refused_naming_the_line(tmp_path, text, message):
  path = tmp_path / "subset.txt"
  path.write_text(text)
  with pytest.raises(ValueError, match=message):
    finetune.read_subset_file(str(path), 8)


def test_missing_subset_file_says_what_to_give(tmp_path):
  with pytest.raises(FileNotFoundError, match="one per line"):
    finetune.read_subset_file(str(tmp_path / "none.txt"), 8)


# ----------------------------------------------------------------- input pipeline


def _reference_example(data_dir, index):
  """Example `index` of 'train' by tfds's own slicing, decoded: (image [28, 28, 1], label)."""
  ds = tfds.builder("fashion_mnist", data_dir=data_dir).as_dataset(
      split=f"train[{index}:{index + 1}]")
  (ex,) = list(tfds.as_numpy(ds))
  return ex["image"], int(ex["label"])


def test_split_labels_follow_tfds_stored_order(fmnist):
  data_dir, arrays = fmnist
  c = recipe(data_dir)
  labels = pipelines.split_labels(c)
  assert labels.shape == (N_TRAIN,)
  assert sorted(labels.tolist()) == sorted(arrays["train"][1].tolist())
  for i in (0, 17, 63):
    assert labels[i] == _reference_example(data_dir, i)[1]


def test_finetune_dataset_yields_exactly_the_subset_cropped_and_flipped(fmnist):
  data_dir, _ = fmnist
  # Full-image crops resized 28 -> 28 are the image itself, so each output must be the
  # indexed example or its mirror image.
  c = recipe(data_dir, image_size=28, **{"augment.crop_area_min": 1.0,
                                         "augment.crop_aspect_min": 1.0,
                                         "augment.crop_aspect_max": 1.0,
                                         "dataset.eval_crop_fraction": 1.0,
                                         "dataset.deterministic": True})
  subset = [3, 10, 11, 40]
  reference = [_reference_example(data_dir, i) for i in subset]
  seen = []
  for process in range(2):
    batch = next(pipelines.finetune_dataset(c, subset, process_index=process, process_count=2,
                                       local_device_count=2, batch_size=4))
    assert batch["image"].shape == (2, 1, 28, 28, 1) and batch["image"].dtype == np.uint8
    for image, label in zip(batch["image"].reshape(-1, 28, 28, 1), batch["label"].reshape(-1)):
      matches = [k for k, (ref, ref_label) in enumerate(reference)
                 if ref_label == label and (np.array_equal(image, ref) or
                                            np.array_equal(image, ref[:, ::-1]))]
      assert matches, "an example outside the subset, or altered beyond crop + flip"
      seen.append(matches[0])
  assert sorted(seen) == [0, 1, 2, 3], "the two processes split the subset between them"


def test_finetune_dataset_refuses_bad_indices(fmnist):
  c = recipe(fmnist[0])
  for indices, message in (([1, 1], "distinct"), ([], "non-empty"), ([0, 64], r"\[0, 64\)")):
    with pytest.raises(ValueError, match=message):
      pipelines.finetune_dataset(c, indices, local_device_count=1, batch_size=4)


# ------------------------------------------------------------------ update step


def _deps(devices_axis=parallel.DEVICE_AXIS):
  ft = ml_collections.ConfigDict(dict(learning_rate=LR, momentum=MOMENTUM, nesterov=True,
                                      weight_decay=0.0))
  return finetune.make_deps(tiny_model(), CLASSES, ft, E2E_STEPS, axis_name=devices_axis)


@pytest.fixture(scope="module")
def one_step(encoder):
  """One step on the same global batch of 8: on 4 devices (2 each) and on 1 device."""
  deps = _deps()
  state = finetune.init_state(deps, encoder.params, encoder.state, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = dict(image=rng.integers(0, 256, (BATCH, SIZE, SIZE, CHANNELS)).astype(np.uint8),
               label=rng.integers(0, CLASSES, (BATCH,)).astype(np.int32))
  out = {}
  for count in (4, 1):
    devices = jax.local_devices()[:count]
    step = finetune.make_pmapped_update(deps, devices)
    new, metrics = step(parallel.replicate(state, devices),
                        parallel.shard(parallel.split_for_devices(batch, count), devices))
    out[count] = (jax.device_get(parallel.unreplicate(new)),
                  jax.device_get(parallel.unreplicate(metrics)))
  return state, batch, out


class _Float64Images:
  """The encoder fed float64 images: the library turns uint8 into float32 [0, 1] first."""

  def __init__(self, net):
    self._net = net

  def apply(self, params, state, rng, images, **kwargs):
    return self._net.apply(params, state, rng, images.astype(jnp.float64), **kwargs)


@pytest.fixture(scope="module")
def whole_batch_float64(one_step):
  """(loss, new bn_state, logits, grads) of the whole batch of 8 (batch norm over all 8, no
  pmap) in float64: the reference of the float32 steps. x64 is on only inside."""
  state, batch, _ = one_step
  deps = _deps(devices_axis=None)
  deps = deps._replace(encoder=_Float64Images(deps.encoder))
  with jax.enable_x64(True):
    fn = jax.jit(jax.value_and_grad(functools.partial(finetune.loss_fn, deps=deps), has_aux=True))
    (loss, (bn_state, logits)), grads = fn(*tolerances.float64((state.params, state.bn_state)),
                                           batch["image"], batch["label"])
    out = tolerances.float64((loss, bn_state, logits, grads))
  assert not jax.config.jax_enable_x64
  return out


def test_fine_tuning_step_trains_every_encoder_and_head_parameter(one_step):
  state, _, out = one_step
  new, metrics = out[4]
  assert int(new.step) == 1 and np.isfinite(metrics["loss"])
  moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), state.params,
                                 new.params)
  still = [f"{m}/{n}" for m, leaves in moved.items() for n, d in leaves.items() if d == 0]
  assert not still, f"parameters not trained: {still}"
  assert any(m.startswith("encoder/") for m in moved) and finetune.HEAD in moved
  # Batch norm ran in training mode: its moving statistics moved too.
  changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b), state.bn_state,
                                   new.bn_state)
  assert all(jax.tree_util.tree_leaves(changed))


def test_step_is_sgd_nesterov_on_the_whole_batch_gradient(one_step, whole_batch_float64):
  state, batch, out = one_step
  # Reference: plain jax.grad of the cross-entropy over the whole batch of 8 (batch norm
  # over all 8), no pmap. First Nesterov step from a zero trace: p - lr * (1 + m) * g.
  deps = _deps(devices_axis=None)
  grad_fn = jax.jit(jax.grad(functools.partial(finetune.loss_fn, deps=deps), has_aux=True))
  grads, (bn_state, _) = grad_fn(state.params, state.bn_state, batch["image"], batch["label"])
  expected = jax.tree_util.tree_map(lambda g: -LR * (1 + MOMENTUM) * g, grads)
  applied = jax.tree_util.tree_map(np.subtract, out[4][0].params, state.params)
  assert max(np.max(np.abs(u)) for u in jax.tree_util.tree_leaves(applied)) > 1e-3
  # Against the same step from the float64 whole-batch gradient, the pmapped step's params and
  # statistics are no less accurate than this float32 formula's (tolerances.NOISE_FACTOR x).
  _, bn_state64, _, grads64 = whole_batch_float64
  want = jax.tree_util.tree_map(lambda p, g: np.asarray(p, np.float64) - LR * (1 + MOMENTUM) * g,
                                state.params, grads64)
  baseline = jax.tree_util.tree_map(lambda p, e: np.asarray(p + e), state.params, expected)
  tolerances.assert_no_less_accurate(out[4][0].params, baseline, want)
  tolerances.assert_no_less_accurate(out[4][0].bn_state, bn_state, bn_state64)


def test_four_devices_equal_one_device_for_one_step(one_step, whole_batch_float64):
  state, batch, out = one_step
  (four, _), (one, _) = out[4], out[1]
  chex.assert_trees_all_equal(four.step, one.step)
  # The float64 step: a first Nesterov step from a zero trace (checked above), whose trace is
  # the gradient. Leaf by leaf the 4-device run is no less accurate than the 1-device one
  # (tolerances.NOISE_FACTOR x its error or the noise floor), metrics included.
  loss64, bn_state64, logits64, grads64 = whole_batch_float64
  trace = lambda s: s._replace(trace=grads64) if isinstance(s, optax.TraceState) else s  # noqa: E731
  want = one._replace(
      params=jax.tree_util.tree_map(lambda p, g: np.asarray(p, np.float64) - LR * (1 + MOMENTUM) * g,
                                    state.params, grads64),
      bn_state=bn_state64,
      opt_state=jax.tree_util.tree_map(trace, one.opt_state,
                                       is_leaf=lambda s: isinstance(s, optax.TraceState)))
  tolerances.assert_no_less_accurate(four, one, want)
  want_metrics = dict(loss=loss64, learning_rate=LR,
                      train_top1=np.mean(np.argmax(logits64, -1) == batch["label"]))
  tolerances.assert_no_less_accurate(out[4][1], out[1][1], want_metrics)


# ---------------------------------------------------------------------- the job


def test_finetune_writes_results_and_a_reproducible_subset(fmnist, encoder, tmp_path):
  data_dir, arrays = fmnist
  c = recipe(data_dir)
  lines = []
  results = finetune.finetune(c, encoder, str(tmp_path), print_fn=lines.append,
                              pretrained_path="/pretrained/run")
  on_disk = json.loads((tmp_path / finetune.RESULTS_FILE).read_text())
  assert on_disk == json.loads(json.dumps(results))
  # Independent count: classes of the written labels, round(0.25 * n) each.
  counts = np.bincount(arrays["train"][1], minlength=CLASSES)
  expected = sum(max(1, math.floor(0.25 * n + 0.5)) for n in counts)
  assert expected == 20 and results["subset_size"] == expected
  subset = [int(x) for x in (tmp_path / finetune.SUBSET_FILE).read_text().split()]
  labels = pipelines.split_labels(c)
  assert len(set(subset)) == expected
  assert np.bincount(labels[subset], minlength=CLASSES).tolist() == [2] * CLASSES
  assert results["steps"] == E2E_STEPS == math.ceil(0.8 * expected / BATCH)
  assert results["eval_examples"] == N_TEST
  assert 0.0 <= results["top1"] <= results["top5"] <= 1.0
  assert results["label_fraction"] == 0.25 and results["seed"] == c.seed
  assert results["epochs"] == 0.8 and results["elapsed_seconds"] > 0
  assert results["pretrained"] == dict(path="/pretrained/run", step=7, source="workdir")
  # The network is the pretrained encoder's, whatever the recipe's model section says.
  assert results["config"]["model"]["width"] == 0.0625 != c.model.width
  assert any("test top-1" in line for line in lines)
  # The written subset file reproduces the subset (and needs no labels).
  again = finetune.choose_subset(recipe(data_dir, **{
      "finetune.subset_file": str(tmp_path / finetune.SUBSET_FILE)}))
  assert again[0].tolist() == sorted(subset) and again[1] == N_TRAIN


def test_mismatched_images_and_bad_settings_fail_before_any_work(fmnist, encoder, tmp_path):
  c = recipe(fmnist[0])
  with pytest.raises(ValueError, match=r"8 px images with 1 channel.*--config.image_size=8"):
    finetune.finetune(recipe(fmnist[0], image_size=16), encoder, str(tmp_path))
  with pytest.raises(ValueError, match="label_fraction"):
    finetune.finetune(recipe(fmnist[0], **{"finetune.label_fraction": 0.0}), encoder,
                      str(tmp_path))
  with pytest.raises(FileNotFoundError, match="subset_file"):
    finetune.finetune(recipe(fmnist[0], **{"finetune.subset_file": str(tmp_path / "x")}),
                      encoder, str(tmp_path))
  with pytest.raises(ValueError, match="not divisible"):
    finetune.finetune(recipe(fmnist[0], **{"finetune.batch_size": 6}), encoder, str(tmp_path))
  assert not (tmp_path / finetune.RESULTS_FILE).exists() and c.finetune.batch_size == BATCH
