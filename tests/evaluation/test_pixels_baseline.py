"""`--pretrained=pixels`, the raw-pixel baseline: its statistics and features against NumPy on
the images written to disk, the linear protocol and kNN run on it end to end (kNN equal to
an independent NumPy kNN), and fine-tuning refusing it (also as a command: exit status 2)."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
import tolerances
from byol_jax.evaluation import baselines
from byol_jax import cli
from byol_jax import config as config_lib
from byol_jax.data import pipelines
from byol_jax.data import prepare
from byol_jax.evaluation import finetune
from byol_jax.evaluation import linear_eval
from byol_jax.evaluation import features
from byol_jax.model import networks
from byol_jax.weights import encoder_weights

ROOT = pathlib.Path(__file__).resolve().parents[2]
SIZE = 28  # Fashion-MNIST's own size: with eval_crop_fraction 1 the pipeline delivers the
N_TRAIN, N_TEST = 64, 20  # written images unchanged. No convolution: size costs no compile.
STATS_BATCH = 24  # 64 = 24 + 24 + 16: the last batch carries 8 padding images.


def _informative_images(rng, labels):
  """Left half: a faint template per class (+-6 grey levels) plus noise (sd 12); right half:
  uniform noise over 0..255, 20x the variance and no information; pixel (0, 0) is 0
  everywhere. Unstandardised, the right half drowns the left (kNN near chance); per-pixel
  standardisation gives the informative half its weight back."""
  templates = np.random.default_rng(123).uniform(-6, 6, (10, SIZE, SIZE))
  images = 128 + templates[labels] + rng.normal(0, 12, (len(labels), SIZE, SIZE))
  images[:, :, SIZE // 2:] = rng.uniform(0, 255, (len(labels), SIZE, SIZE - SIZE // 2))
  images[:, 0, 0] = 0
  return np.clip(images, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """Fashion-MNIST-format files whose pixels tell the class, built as a tfds data set."""
  root = tmp_path_factory.mktemp("pixels")
  rng = np.random.default_rng(0)
  arrays = {}
  (root / "idx").mkdir()
  for split, prefix, n in (("train", "train", N_TRAIN), ("test", "t10k", N_TEST)):
    labels = np.arange(n) % 10
    images = _informative_images(rng, labels)
    fakes.write_idx(root / "idx" / f"{prefix}-images-idx3-ubyte", images, compress=False)
    fakes.write_idx(root / "idx" / f"{prefix}-labels-idx1-ubyte", labels, compress=False)
    arrays[split] = (images, labels)
  prepare.prepare_fashion_mnist(str(root / "idx"), str(root / "tfds"))
  return str(root / "tfds"), arrays


def recipe(data_dir, **linear):
  """The smoke recipe on the written images at 8 px, the whole image evaluated, the linear
  protocol on raw features (`linear` overrides its fields)."""
  linear = {"batch_size": 16, "num_epochs": 10.0, "learning_rates": (0.4, 0.05),
            "mode": "features", "standardize": False, **linear}
  return fakes.smoke_config(data_dir, image_size=SIZE, **{
      "dataset.validation_examples": 16, "dataset.eval_crop_fraction": 1.0,
      **{f"linear.{k}": v for k, v in linear.items()}})


def delivered(c, split):
  """The images [N, H*W*C] in [0, 1] (float64) and labels of one pipeline pass, no padding."""
  images, labels = [], []
  for batch in pipelines.eval_dataset(c, split, local_device_count=1):
    keep = np.asarray(batch["mask"]).reshape(-1).astype(bool)
    images.append(np.asarray(batch["image"]).reshape((keep.size, -1))[keep] / 255.0)
    labels.append(np.asarray(batch["label"]).reshape(-1)[keep])
  return np.concatenate(images), np.concatenate(labels)


def test_pixel_statistics_are_numpys_over_the_written_training_images(written):
  data_dir, arrays = written
  c = recipe(data_dir)
  c.batch_size = STATS_BATCH
  assert N_TRAIN % STATS_BATCH  # A padded last batch, which must not count.
  p = baselines.resolve_features(c, baselines.PIXELS)  # What --pretrained=pixels gives.
  x = arrays["train"][0].reshape(N_TRAIN, -1).astype(np.float64) / 255.0
  stats = p.params[baselines.MODULE]
  assert stats["mean"].dtype == stats["std"].dtype == np.float32
  # Statistics in float64 (Chan's batch merge, ~1e-15 relative), then rounded to float32.
  tolerances.assert_close(stats["mean"], x.mean(axis=0), tolerances.ulps(1, x.mean(axis=0)))
  std = x.std(axis=0)
  assert std[0] == 0 and stats["std"][0] == np.inf  # Constant pixel.
  tolerances.assert_close(stats["std"][1:], std[1:], tolerances.ulps(1, std[1:]))
  assert (p.source, p.step, p.image_size, p.channels, p.state) == ("pixels", 0, SIZE, 1, {})
  assert (p.name, p.dim) == (f"raw pixels ({SIZE * SIZE} standardised values)", SIZE * SIZE)
  # Features, not an encoder: no Pretrained, no model section that could name 'pixels'.
  assert isinstance(p, features.FeatureExtractor)
  assert not isinstance(p, encoder_weights.Pretrained)


def test_pixel_features_are_the_standardised_flattened_images(written):
  c = recipe(written[0])
  p = baselines.pixels_features(c)
  net = p.network
  assert p.dim == SIZE * SIZE
  images = np.random.default_rng(1).uniform(0, 1, (5, SIZE, SIZE, 1)).astype(np.float32)
  got, state = jax.jit(lambda x: net.apply(p.params, p.state, None, x, is_training=False))(
      images)
  mean = p.params["pixels"]["mean"].astype(np.float64)
  std = p.params["pixels"]["std"].astype(np.float64)
  want = (images.reshape(5, -1).astype(np.float64) - mean) / std
  assert got.dtype == jnp.float32 and got.shape == (5, SIZE * SIZE) and state == {}
  # The pixel constant over training (std inf) is 0 for any input, here uniform noise.
  assert np.all(np.asarray(got)[:, 0] == 0) and np.all(want[:, 0] == 0) and np.all(images[:, 0, 0] > 0)
  # x, mean and std are float32 values both sides: only the difference and the quotient
  # round (or a product by a rounded 1 / std): 3 half-ulps, 2 ulps of |z|.
  tolerances.assert_close(got, want, tolerances.ulps(2, want))


def test_an_encoder_gets_the_encoder_network_and_its_representation_size():
  c = config_lib.base_config()
  c.model.update(dict(encoder="resnet18", width=0.0625))
  p = encoder_weights.Pretrained(model=c.model, params={}, state={}, image_size=8, channels=1,
                                 step=0, source="workdir")
  x = jnp.zeros((2, 8, 8, 1))
  shapes = lambda net: jax.eval_shape(  # noqa: E731
      lambda: net.init(jax.random.PRNGKey(0), x, is_training=True))
  fx = features.of_encoder(p)
  ours, theirs = shapes(fx.network), shapes(networks.make_encoder_network(c.model))
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
  assert fx.dim == networks.representation_dim(c.model) == 32
  assert fx.name == "encoder resnet18 x0.0625"


def read_results(workdir, name):
  return json.loads(pathlib.Path(workdir, name).read_text())


def test_linear_protocol_on_pixels_beats_chance_where_pixels_tell_the_class(written, tmp_path):
  lines = []
  result = linear_eval.run(recipe(written[0]), baselines.PIXELS, str(tmp_path),
                           print_fn=lines.append)
  saved = read_results(tmp_path, linear_eval.RESULTS_FILE)
  assert saved == json.loads(json.dumps(result))
  assert (saved["pretrained"], saved["pretrained_step"]) == ("pixels", 0)
  assert (saved["train_examples"], saved["eval_examples"]) == (N_TRAIN, N_TEST)
  assert set(saved["val_top1"]) == {"0.4", "0.05"}
  assert saved["top1"] >= 0.5  # Chance is 0.1.
  assert any("raw pixels (784 standardised values)" in line for line in lines)


def test_augmented_linear_protocol_runs_on_pixels(written, tmp_path):
  c = recipe(written[0], mode="augmented", num_epochs=1.0, learning_rates=(0.1,))
  linear_eval.run(c, baselines.PIXELS, str(tmp_path), print_fn=lambda line: None)
  saved = read_results(tmp_path, linear_eval.RESULTS_FILE)
  assert (saved["mode"], saved["pretrained"], saved["steps"]) == ("augmented", "pixels", 4)
  assert np.isfinite(saved["final_train_loss"]) and 0.0 <= saved["top1"] <= 1.0


def numpy_knn_top1_top5(bank, bank_labels, queries, query_labels, k, temperature, classes):
  """Cosine similarity, the k most similar vote exp(sim / T) for their label; ties in the
  scores go to the lower class index."""
  unit = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)  # noqa: E731
  sims = unit(queries) @ unit(bank).T
  top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  votes = np.zeros((len(queries), classes))
  for q in range(len(queries)):
    for j in top[q]:
      votes[q, bank_labels[j]] += np.exp(sims[q, j] / temperature)
  order = np.argsort(-votes, axis=1, kind="stable")
  hit = order[:, :5] == query_labels[:, None]
  return float(np.mean(hit[:, 0])), float(np.mean(hit.any(axis=1)))


def test_knn_on_pixels_equals_numpy_knn_on_the_standardised_pixels(written, tmp_path):
  c = recipe(written[0])
  c.knn.update(dict(k=5, train_examples=40))
  result = linear_eval.knn_run(c, baselines.PIXELS, str(tmp_path), print_fn=lambda line: None)
  train, _ = delivered(c, "train")
  bank, bank_labels = delivered(c, "train[:40]")
  queries, query_labels = delivered(c, "test")
  mean, std = train.mean(axis=0), np.where(train.std(axis=0) < baselines.STD_FLOOR, np.inf, train.std(axis=0))
  knn = lambda b, q: numpy_knn_top1_top5(b, bank_labels, q, query_labels, 5,  # noqa: E731
                                         c.knn.temperature, 10)
  top1, top5 = knn((bank - mean) / std, (queries - mean) / std)
  assert (result["knn_top1"], result["knn_top5"]) == (top1, top5)
  # The data tell a wrong standardisation apart: not two chance scores, not raw pixels'.
  assert top1 >= 0.4 and knn(bank, queries)[0] <= top1 - 0.2
  saved = read_results(tmp_path, linear_eval.KNN_FILE)
  assert (saved["pretrained"], saved["knn_train_examples"], saved["knn_eval_examples"]) == (
      "pixels", 40, N_TEST)


def test_finetune_refuses_pixels_naming_the_fix(written, tmp_path):
  message = r"fine-tuning needs an encoder; pixels is a baseline .* use --pretrained=random"
  with pytest.raises(ValueError, match=message):
    finetune.run(recipe(written[0]), baselines.PIXELS, str(tmp_path / "ft"))
  with pytest.raises(ValueError, match=message):  # Also when handed the resolved baseline.
    finetune.finetune(recipe(written[0]), baselines.pixels_features(recipe(written[0])),
                      str(tmp_path / "ft"))
  assert not (tmp_path / "ft").exists()


def test_finetune_command_exits_2_with_one_line_for_pixels(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["byol-jax", "finetune", f"--config={ROOT / 'configs' / 'byol_fashion_mnist.py'}:smoke",
              "--pretrained=pixels", f"--workdir={tmp_path / 'ft'}"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["byol-jax: error: fine-tuning needs an encoder; pixels is a baseline for "
                 "linear-eval and knn only; use --pretrained=random for the random-encoder "
                 "baseline."]
  assert not (tmp_path / "ft").exists()
