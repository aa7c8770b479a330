"""Float64 references for the multi-host evaluation tests, each with a worst-case bound on how
far a float32 run can be from it: the pixel baseline's features, the linear protocol's SGD
replayed step by step (`sgd_replay`), accuracies that hold within the bound
(`robust_accuracy`), and kNN votes (`knn_robust_accuracy`).
"""
import math

import numpy as np

from tolerances import EPS32


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
