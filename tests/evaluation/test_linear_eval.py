"""The linear protocol and standalone kNN: optimiser maths against optax.sgd, a separable
problem solved exactly, lr selection, results.json/knn.json written by the real entry
points on a small Fashion-MNIST-format data set (features and augmented modes), clear
errors for an encoder that does not fit the data."""
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fakes
import tolerances
from byol_jax import config as config_lib
from byol_jax.evaluation import linear_eval
from byol_jax.model import networks
from byol_jax.weights import encoder_weights

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGE_SIZE = 8  # The 28-px fakes are resized to 8 px: the smallest compile.


def recipe(data_dir, **linear):
  c = fakes.recipe("byol_fashion_mnist", "smoke")
  c.unlock()
  c.image_size = IMAGE_SIZE
  c.dataset.update(dict(data_dir=data_dir, num_train_examples=64, validation_examples=16))
  c.linear.update(dict(dict(batch_size=16, num_epochs=2.0, learning_rates=(0.4, 0.05),
                            mode="features"), **linear))
  return config_lib.validate(c)


@pytest.fixture(scope="module")
def encoder(data_dir):
  """A randomly initialised tiny encoder as `pretrained.load` would return it."""
  model = recipe(data_dir).model
  model.width = 0.0625
  params, state = networks.make_encoder_network(model).init(
      jax.random.PRNGKey(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)), is_training=True)
  host = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
  return encoder_weights.Pretrained(model=model, params=host(params), state=host(state),
                                   image_size=IMAGE_SIZE, channels=1, step=123, source="workdir")


def test_cosine_lr_hand_values():
  # float32: the fraction and pi x it (~3 ulps into cos), cos, 1 + cos, x lr / 2.
  got = [linear_eval.cosine_lr(step, 100, 0.8) for step in (0, 50, 25, 100, 150)]
  want = [0.8, 0.4, 0.4 * (1 + math.sqrt(0.5)), 0.0, 0.0]
  tolerances.assert_close(got, want, tolerances.ulps(8, 0.8))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_linear_update_equals_optax_sgd_nesterov_with_cosine_decay(weight_decay):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 16))
  optimizer = linear_eval.make_optimizer(0.9, True, weight_decay)
  lin = linear_eval.init_linear(6, 3, optimizer)
  lin = lin._replace(params=dict(w=jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
                                 b=jnp.ones(3)))  # Non-zero: weight decay has work to do.
  reference = optax.chain(
      optax.add_decayed_weights(weight_decay, mask=dict(w=True, b=False)),
      optax.sgd(optax.cosine_decay_schedule(0.5, 5), momentum=0.9, nesterov=True))
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

  @jax.jit  # One compile for both four-step runs.
  def both(lin):
    ref_params, ref_state = lin.params, reference.init(lin.params)
    for _ in range(4):
      lin, _ = linear_eval.linear_update(lin, x, y, jnp.float32(0.5), jnp.int32(5),
                                         optimizer=optimizer)
      updates, ref_state = reference.update(jax.grad(loss)(ref_params), ref_state,
                                            ref_params)
      ref_params = optax.apply_updates(ref_params, updates)
    return lin.params, ref_params

  got, ref_params = both(lin)
  # Against the optax chain in float64: no less accurate than its float32 run
  # (tolerances.NOISE_FACTOR x its error or the noise floor).
  with jax.enable_x64(True):
    _, want = both(linear_eval.LinearState(
        lin.step, *(jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), t)
                    for t in (lin.params, lin.opt_state))))
    want = tolerances.float64(want)
  tolerances.assert_no_less_accurate(got, ref_params, want)


def separable_problem(rng, n, dim=8, classes=3):
  """Class means 6 apart on orthogonal axes, unit noise: a linear boundary separates
  them with a margin (the Bayes error is ~1e-9)."""
  y = rng.integers(0, classes, n)
  x = rng.normal(size=(n, dim)) + 6.0 * np.eye(dim)[y]
  return x.astype(np.float32), y.astype(np.int32)


def test_trainer_on_features_separates_a_linearly_separable_problem():
  rng = np.random.default_rng(0)
  train_x, train_y = separable_problem(rng, 600)
  test_x, test_y = separable_problem(rng, 300)
  c = config_lib.base_config()
  c.dataset.num_classes = 3
  c.linear.update(dict(batch_size=64, num_epochs=10.0))
  lines = []
  trained = linear_eval.train_on_features(train_x, train_y, c, lr=0.2, print_fn=lines.append)
  assert trained["steps"] == 10 * (600 // 64) and lines[-1].startswith("  lr 0.2: step 90/90")
  assert linear_eval.accuracy(trained["params"], train_x, train_y)["top1"] == 1.0
  assert linear_eval.accuracy(trained["params"], test_x, test_y)["top1"] == 1.0
  # An untrained (lr 0) classifier predicts class 0 for everything: chance, not 100%.
  untrained = linear_eval.train_on_features(train_x, train_y, c, lr=0.0, print_fn=lines.append)
  # Exact: the same count over the same number, in float64 both.
  assert linear_eval.accuracy(untrained["params"], test_x, test_y)["top1"] == np.mean(test_y == 0)


def test_standardizer_uses_training_statistics():
  x = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]], np.float32)
  f = linear_eval.standardizer(x)
  std = np.std(x[:, 0].astype(np.float64))
  # float32: the mean (9 / 3) and differences are exact; the std (mean of 3 squares, sqrt) is
  # within 2 ulps, the quotient and the cast 1 ulp more: 3 ulps.
  want = (x[:, 0] - 3.0) / std
  tolerances.assert_close(f(x)[:, 0], want, tolerances.ulps(3, want))
  np.testing.assert_array_equal(f(x)[:, 1], 0.0)  # Constant feature: std floored, no NaN; exact.
  want = np.array([4.0 / std, 2.0 / 1e-6])  # The floor 1e-6 rounds to float32 (0.5 ulps).
  tolerances.assert_close(f(np.array([[7.0, 12.0]]))[0], want, tolerances.ulps(3, want))


def test_standardized_training_ignores_per_feature_scale_and_offset():
  """With linear.standardize, rescaling and shifting each feature changes nothing."""
  rng = np.random.default_rng(1)
  x, y = separable_problem(rng, 256)
  c = config_lib.base_config()
  c.dataset.num_classes = 3
  c.linear.update(dict(batch_size=64, num_epochs=3.0))
  scale = 10.0 ** rng.uniform(-2, 2, x.shape[1])
  offset = rng.uniform(-50, 50, x.shape[1])
  runs, zs = [], []
  for feats in (x, x * scale + offset):
    zs.append(linear_eval.standardizer(feats)(feats))
    runs.append(linear_eval.train_on_features(zs[-1], y, c, lr=0.1, print_fn=lambda line: None))
  # The two feature sets differ by rounding only: z0 is float32 arithmetic on x (the mean of
  # N = 256 values: N ulps of max|x|; the difference; the std, N / 2 + 3 ulps relative; the
  # quotient), |z0 - z| <= delta = (N + 4) ulps of max|x| / min std + max|z|, and z1 is
  # float64 arithmetic rounded to float32. The weights may differ by 4 x what scaling run 0's
  # features by 1 + delta does to them (the training's sensitivity to that rounding), or 4 x 16
  # ulps of the weights (its own 12 steps' rounding).
  delta = float(tolerances.ulps(len(x) + 4, np.abs(x).max() / x.std(axis=0).min() + np.abs(zs[0]).max()))
  assert np.max(np.abs(zs[0] - zs[1])) <= delta
  moved = linear_eval.train_on_features(zs[0] * np.float32(1 + delta), y, c, lr=0.1,
                                        print_fn=lambda line: None)
  w0, w1, w_moved = (np.asarray(r["params"]["w"], np.float64) for r in (*runs, moved))
  limit = 4 * max(np.max(np.abs(w_moved - w0)), tolerances.ulps(16, np.max(np.abs(w0))))
  assert np.max(np.abs(w1 - w0)) <= limit, (np.max(np.abs(w1 - w0)), limit)


def test_accuracy_top1_top5_hand_worked():
  params = dict(w=np.eye(6, dtype=np.float32), b=np.zeros(6, np.float32))
  x = np.array([[0, 5, 4, 3, 2, 1], [6, 5, 4, 3, 2, 1]], np.float32)  # Ranks: 1,2,3,4,5,0 / 0..5
  assert linear_eval.accuracy(params, x, np.array([0, 5])) == dict(top1=0.0, top5=0.0)
  assert linear_eval.accuracy(params, x, np.array([1, 4])) == dict(top1=0.5, top5=1.0)


def test_select_learning_rate_picks_the_best_validation_score():
  known = {0.4: 0.50, 0.3: 0.91, 0.2: 0.91, 0.1: 0.20}
  seen = []
  best, scores = linear_eval.select_learning_rate(
      (0.4, 0.3, 0.2, 0.1), lambda lr: seen.append(lr) or known[lr])
  assert best == 0.3 and scores == known and seen == [0.4, 0.3, 0.2, 0.1]
  with pytest.raises(ValueError, match="learning_rates"):
    linear_eval.select_learning_rate((), lambda lr: 0.0)


def read_results(workdir, name):
  assert not list(pathlib.Path(workdir).glob("*.tmp"))
  return json.loads(pathlib.Path(workdir, name).read_text())


@pytest.mark.parametrize("standardize", [False, True])
def test_features_mode_end_to_end_writes_results(data_dir, encoder, tmp_path, standardize):
  lines = []
  result = linear_eval.run(recipe(data_dir, standardize=standardize), encoder, str(tmp_path),
                           print_fn=lines.append)
  saved = read_results(tmp_path, linear_eval.RESULTS_FILE)
  assert saved == json.loads(json.dumps(result))
  assert set(saved["val_top1"]) == {"0.4", "0.05"}
  best = max(saved["val_top1"], key=lambda lr: (saved["val_top1"][lr], lr == "0.4"))
  assert saved["learning_rate"] == float(best)
  assert saved["effective_learning_rate"] == float(best) * 16 / 256  # x 2**-4: exact.
  assert (saved["mode"], saved["train_examples"], saved["eval_examples"]) == ("features", 64, 12)
  assert saved["steps"] == 2 * (64 // 16) and saved["epochs"] == 2.0
  assert 0.0 <= saved["top1"] <= saved["top5"] <= 1.0
  assert saved["pretrained_step"] == 123 and saved["config"]["linear"]["batch_size"] == 16
  assert saved["elapsed_seconds"] > 0
  assert list(tmp_path.glob("events.out.tfevents*"))
  assert any("chosen base lr" in line for line in lines)


def test_augmented_mode_end_to_end(data_dir, encoder, tmp_path):
  c = recipe(data_dir, mode="augmented", standardize=False, num_epochs=1.0, learning_rates=(0.1,))
  result = linear_eval.run(c, encoder, str(tmp_path), print_fn=lambda line: None)
  saved = read_results(tmp_path, linear_eval.RESULTS_FILE)
  assert saved["mode"] == "augmented" and saved["steps"] == 64 // 16
  assert saved["learning_rate"] == 0.1 and list(saved["val_top1"]) == ["0.1"]
  assert saved["train_examples"] == 64 and saved["top1"] == result["top1"]
  assert math.isfinite(saved["final_train_loss"])


def test_knn_run_writes_knn_json(data_dir, encoder, tmp_path):
  c = recipe(data_dir)
  c.knn.update(dict(k=5, train_examples=40))
  result = linear_eval.knn_run(c, encoder, str(tmp_path), print_fn=lambda line: None)
  saved = read_results(tmp_path, linear_eval.KNN_FILE)
  assert saved == json.loads(json.dumps(result))
  assert (saved["knn_train_examples"], saved["knn_eval_examples"], saved["k"]) == (40, 12, 5)
  assert 0.0 <= saved["knn_top1"] <= saved["knn_top5"] <= 1.0


def test_encoder_that_does_not_fit_the_data_is_refused(data_dir, encoder, tmp_path):
  with pytest.raises(ValueError, match=r"trained on 8 px images with 1 channel\(s\), but this "
                                       r"config gives 16 px .*--config.image_size=8"):
    linear_eval.run(_with(recipe(data_dir), image_size=16), encoder, str(tmp_path))
  with pytest.raises(ValueError, match=r"with 3 channel\(s\), but .* with 1 channel\(s\).*"
                                       r"--config.dataset.channels=3"):
    linear_eval.run(recipe(data_dir), encoder._replace(channels=3), str(tmp_path))
  with pytest.raises(ValueError, match="linear.mode"):
    linear_eval.run(recipe(data_dir, mode="fast"), encoder, str(tmp_path))
  with pytest.raises(ValueError, match="standardize=True needs config.linear.mode='features'"):
    linear_eval.run(recipe(data_dir, mode="augmented", standardize=True), encoder,
                    str(tmp_path))
  with pytest.raises(ValueError, match="linear.batch_size=128 exceeds the 48"):
    linear_eval.run(recipe(data_dir, batch_size=128), encoder, str(tmp_path))
  assert not (tmp_path / linear_eval.RESULTS_FILE).exists()


def _with(c, **fields):
  c.update(fields)
  return c
