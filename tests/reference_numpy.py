"""Plain NumPy (float64) transcriptions of the paper's formulas and the reference code.

Written straight from the equations, with no sharding and no log-space tricks, so the library's
sharded, numerically careful versions can be checked against them. The loss functions take
`xp=jax.numpy` too, so that `jax.grad` of the plain formula can be compared with ours.
"""

import numpy as np

EPS = 1e-7


def normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def bank_update(bank, indices, features, momentum):
  """v_i <- normalise(momentum * v_i + (1 - momentum) * f_i), pre-step v_i."""
  bank = bank.copy()
  bank[indices] = normalize(momentum * bank[indices] + (1 - momentum) * features)
  return bank


def log_partition_estimate(features, indices, bank, noise, temperature):
  """log of Z = n * mean(exp(s / tau)) over the B x (m+1) positive and noise scores (Eq. 7)."""
  n = bank.shape[0]
  pos = np.sum(bank[indices] * features, axis=1)
  neg = np.einsum("bd,bkd->bk", features, bank[noise])
  scores = np.concatenate([pos[:, None], neg], axis=1)
  return np.log(n * np.mean(np.exp(scores / temperature)))


def nce_loss(features, indices, bank, noise, temperature, z, xp=np):
  """lemniscate.pytorch NCEAverage + NCECriterion. noise: (B, m) global indices."""
  n = bank.shape[0]
  m = noise.shape[1]
  pos = xp.exp(xp.sum(bank[indices] * features, axis=1) / temperature) / z
  neg = xp.exp(xp.einsum("bd,bkd->bk", features, bank[noise]) / temperature) / z
  pn = 1.0 / n
  log_h_pos = xp.log(pos / (pos + m * pn + EPS))
  log_1mh_neg = xp.log(m * pn / (neg + m * pn + EPS))
  return -(log_h_pos.sum() + log_1mh_neg.sum()) / features.shape[0]


def softmax_xent(logits, targets, xp=np):
  logits = logits - logits.max(axis=1, keepdims=True)
  log_probs = logits - xp.log(xp.exp(logits).sum(axis=1, keepdims=True))
  return -xp.mean(log_probs[np.arange(len(targets)), targets])


def softmax_loss(features, indices, bank, temperature, xp=np):
  """Full non-parametric softmax over all n rows (Eq. 2)."""
  return softmax_xent(features @ bank.T / temperature, indices, xp)


def parametric_softmax_loss(features, indices, weights, temperature, xp=np):
  """Parametric instance softmax (Eq. 1, with the temperature)."""
  return softmax_xent(features @ weights.T / temperature, indices, xp)


def infonce_loss(features, indices, bank, noise, temperature, xp=np):
  """Cross-entropy over [positive, m noise] logits."""
  pos = xp.sum(bank[indices] * features, axis=1)
  neg = xp.einsum("bd,bkd->bk", features, bank[noise])
  logits = xp.concatenate([pos[:, None], neg], axis=1) / temperature
  return softmax_xent(logits, np.zeros(len(indices), int), xp)


def proximal_term(features, indices, bank, weight, xp=np):
  return weight * xp.mean(xp.sum((features - bank[indices]) ** 2, axis=1))


def knn(queries, bank, labels, k, temperature, num_classes):
  """Brute-force weighted kNN; ties go to the lower bank index. Returns (scores, neighbours)."""
  sims = queries @ bank.T
  k = min(k, bank.shape[0])
  order = np.stack([np.lexsort((np.arange(len(s)), -s))[:k] for s in sims])
  top = np.take_along_axis(sims, order, axis=1)
  scores = np.zeros((len(queries), num_classes))
  for q in range(len(queries)):
    for s, i in zip(top[q], order[q]):
      if labels[i] >= 0:
        scores[q, labels[i]] += np.exp(s / temperature)
  return scores, order


def numerical_grad(fn, x, h=1e-6):
  """Central finite differences of a scalar function of an array (float64)."""
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[idx] = h
    grad[idx] = (fn(x + step) - fn(x - step)) / (2 * h)
  return grad
