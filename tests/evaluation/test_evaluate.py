"""Frozen-feature extraction on 4 devices and the kNN monitor, against independent references:
a single-device apply of the same encoder, a NumPy brute-force kNN, and hand-worked votes."""
import math

import jax
import numpy as np
import pytest

import tolerances
from byol_jax import config as config_lib
from byol_jax.evaluation import evaluate
from byol_jax.model import networks
from byol_jax import parallel


def brute_force_knn(bank, bank_labels, queries, k, temperature, num_classes):
  """The whole similarity matrix at once, a full sort, a Python vote loop."""
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  sims = queries.astype(np.float64) @ bank.T.astype(np.float64)
  scores = np.zeros((len(queries), num_classes))
  for i, row in enumerate(sims):
    for j in np.argsort(-row)[:k]:
      scores[i, bank_labels[j]] += math.exp(row[j] / temperature)
  return scores


def _score_bound(want, dim, temperature):
  """Rounding bound of float32 kNN scores: the cosine of two normalised D-vectors (each
  component (D/2 + 2) ulps, the dot D ulps: 2 D + 4 ulps of 1) enters exp(s / T), so each
  vote's relative error is (2 D + 4) ulps / T; the float32 result, half an ulp more. (Valid
  while the top-k is well separated from the next similarity, as here.)"""
  return tolerances.ulps((2 * dim + 4) / temperature + 1, want)


@pytest.fixture(scope="module")
def random_problem():
  rng = np.random.default_rng(0)
  return dict(bank=rng.normal(size=(37, 5)).astype(np.float32),
              bank_labels=rng.integers(0, 4, 37),
              queries=rng.normal(size=(23, 5)).astype(np.float32),
              query_labels=rng.integers(0, 4, 23))


@pytest.mark.parametrize("max_elements", [40, 7, evaluate.KNN_MAX_MATRIX_ELEMENTS])
def test_knn_scores_match_numpy_brute_force_in_any_chunking(random_problem, max_elements):
  p = random_problem
  got = evaluate.knn_predict(p["bank"], p["bank_labels"], p["queries"], k=6, temperature=0.1,
                             num_classes=4, max_elements=max_elements)
  want = brute_force_knn(p["bank"].astype(np.float64), p["bank_labels"],
                         p["queries"].astype(np.float64), 6, 0.1, 4)
  tolerances.assert_close(got, want, _score_bound(want, 5, 0.1))


def test_knn_chunks_respect_the_bound_and_cover_k():
  for num_q, num_bank, k, bound in [(23, 37, 6, 40), (10_000, 60_000, 20, 1 << 24),
                                    (5, 3, 2, 4), (1, 10**6, 20, 1 << 20)]:
    q, b = evaluate.knn_chunks(num_q, num_bank, k, bound)
    assert 1 <= q <= num_q and b >= k
    assert q * b <= max(bound, k), (num_q, num_bank, k, bound, q, b)


def test_knn_hand_worked_votes_and_temperature():
  # Unit vectors; the query [1, 0] has cosine 1, 0, -1, 0.6 to the four bank entries.
  bank = np.array([[1, 0], [0, 1], [-1, 0], [0.6, 0.8]], np.float32)
  labels = np.array([0, 1, 1, 1])
  query = np.array([[2.0, 0.0]], np.float32)  # Scale must not matter (cosine).
  two = evaluate.knn_predict(bank, labels, query, k=2, temperature=0.5, num_classes=2)
  want = np.array([[math.exp(2.0), math.exp(1.2)]])
  tolerances.assert_close(two, want, _score_bound(want, 2, 0.5))
  # A high temperature flattens the weights: the two weaker class-1 votes then win.
  three = evaluate.knn_predict(bank, labels, query, k=3, temperature=10.0, num_classes=2)
  want = np.array([[math.exp(0.1), math.exp(0.06) + 1.0]])
  tolerances.assert_close(three, want, _score_bound(want, 2, 10.0))
  assert np.argmax(two) == 0 and np.argmax(three) == 1
  # k larger than the bank uses the whole bank.
  all_k = evaluate.knn_predict(bank, labels, query, k=50, temperature=1.0, num_classes=2)
  want = np.array([[math.e, 1.0 + math.exp(-1.0) + math.exp(0.6)]])
  tolerances.assert_close(all_k, want, _score_bound(want, 2, 1.0))


def test_knn_accuracy_top1_top5_against_brute_force(random_problem):
  p = random_problem
  got = evaluate.knn_accuracy(p["bank"], p["bank_labels"], p["queries"], p["query_labels"],
                              k=6, temperature=0.1, num_classes=4, max_elements=40)
  scores = brute_force_knn(p["bank"], p["bank_labels"], p["queries"], 6, 0.1, 4)
  # The same count over 23 queries, as a float64 mean both: exact.
  assert got["knn_top1"] == np.mean(scores.argmax(1) == p["query_labels"])
  assert got["knn_top5"] == 1.0  # Four classes: every label is within the top 5.
  # Queries equal to bank entries, k=1: each finds itself.
  itself = evaluate.knn_accuracy(p["bank"], p["bank_labels"], p["bank"], p["bank_labels"],
                                 k=1, temperature=0.1, num_classes=4)
  assert itself["knn_top1"] == 1.0


def test_knn_rejects_bad_input_with_clear_errors(random_problem):
  p = random_problem
  with pytest.raises(ValueError, match="same D"):
    evaluate.knn_predict(p["bank"], p["bank_labels"], p["queries"][:, :3], 5, 0.1, 4)
  with pytest.raises(ValueError, match="labels"):
    evaluate.knn_predict(p["bank"], p["bank_labels"][:5], p["queries"], 5, 0.1, 4)
  with pytest.raises(ValueError, match="temperature"):
    evaluate.knn_predict(p["bank"], p["bank_labels"], p["queries"], 5, 0.0, 4)
  c = config_lib.base_config()
  c.knn.train_examples = -1
  with pytest.raises(ValueError, match="knn.train_examples"):
    evaluate.knn_train_split(c)
  c.knn.train_examples = 500
  assert evaluate.knn_train_split(c) == "train[:500]"


def tiny_model():
  m = config_lib.base_config().model
  m.update(dict(encoder="resnet18", width=0.0625, stem="small"))
  return m


def test_extract_features_on_4_devices_equals_one_device_apply():
  devices = jax.local_device_count()
  assert devices == 4
  encoder = networks.make_encoder_network(tiny_model(), axis_name=parallel.DEVICE_AXIS)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (10, 8, 8, 1)).astype(np.uint8)
  labels = np.arange(10, dtype=np.int32) % 3
  params, state = networks.make_encoder_network(tiny_model()).init(
      jax.random.PRNGKey(0), images.astype(np.float32) / 255, is_training=True)
  # Moving statistics far from the init values: a training-mode forward would differ.
  # Means small and variances in [0.5, 2], so that the ReLUs pass part of every layer
  # (means of 0.5-2 on inputs in [0, 1] zeroed every feature).
  def moving(path, x):
    low, high = (-0.2, 0.2) if "mean_ema" in jax.tree_util.keystr(path) else (0.5, 2.0)
    return rng.uniform(low, high, x.shape).astype(np.float32)
  state = jax.tree_util.tree_map_with_path(moving, state)
  # Two global batches of 8 (2 per device); the last holds 2 real examples and 6 padding.
  padded = np.concatenate([images, np.zeros((6, 8, 8, 1), np.uint8)])
  pad_labels = np.concatenate([labels, np.full(6, 7, np.int32)])
  mask = (np.arange(16) < 10).astype(np.int32)
  batches = [dict(image=padded[i:i + 8].reshape(devices, 2, 8, 8, 1),
                  label=pad_labels[i:i + 8].reshape(devices, 2),
                  mask=mask[i:i + 8].reshape(devices, 2)) for i in (0, 8)]
  feats, got_labels = evaluate.extract_features(
      evaluate.make_pmapped_features(encoder), parallel.replicate(params),
      parallel.replicate(state), iter(batches))
  single = networks.make_encoder_network(tiny_model())
  want, _ = single.apply(params, state, None, images.astype(np.float32) / 255,
                         is_training=False)
  assert feats.shape == (10, networks.representation_dim(tiny_model()))
  assert np.count_nonzero(np.asarray(want)) > want.size // 4  # The comparison is not of zeros.
  np.testing.assert_array_equal(got_labels, labels)
  # Against the same apply in float64: the 4-device features no less accurate than the
  # 1-device ones (tolerances.NOISE_FACTOR x their error or the noise floor).
  with jax.enable_x64(True):
    p64, s64, x64 = tolerances.float64((params, state, images.astype(np.float32) / 255))
    ref, _ = jax.jit(lambda p, s, x: single.apply(p, s, None, x, is_training=False))(p64, s64, x64)
    ref = tolerances.float64(ref)
  tolerances.assert_no_less_accurate(feats, want, ref)


def test_extract_features_refuses_an_empty_split():
  fn = lambda params, state, images: images
  with pytest.raises(ValueError, match="no batches"):
    evaluate.extract_features(fn, None, None, iter([]))
