"""The training objectives of Wu et al. (CVPR 2018), sharded over the instance axis.

Equation numbers are the paper's (arXiv:1805.01978):

  (1)  parametric softmax      P(i|v) = exp(w_i^T v / tau) / sum_j exp(w_j^T v / tau)
  (2)  non-parametric softmax  P(i|v) = exp(v_i^T v / tau) / sum_j exp(v_j^T v / tau)
  (4)  P(i|v) = exp(v^T f_i / tau) / Z_i
  (5)  h(i, v) = P(i|v) / (P(i|v) + m P_n(i)),   P_n(i) = 1/n
  (6)  J_NCE = -E_{P_d}[log h(i, v)] - m E_{P_n}[log(1 - h(i, v'))]
  (7)  Z ~= Z_i ~= n E_j[exp(v_j^T f_i / tau)]   (Monte Carlo over the sampled scores)
  (9)  J_NCE with the proximal term lambda ||v_i^(t) - v_i^(t-1)||^2 on the positives

Conventions (docs/design.md): every function receives the GLOBAL batch (features and instance
indices all-gathered over `axis_name`), scores it against this device's shard of the bank, and
returns `(share, aux)`. `share` is this device's share of the global loss: the loss is
`lax.psum(share, axis_name)`; differentiate the share and psum the encoder gradients. The metrics
in `aux` are already reduced over devices (identical on all of them) and carry no gradient.
The objectives that read the bank return the rows they read in `aux["rows"]`
(`memory_bank.StepRows`, one gather): hand them to `memory_bank.update`, so the step reads the
bank once and updates it in place. The bank, the noise and Z carry no gradient. All arithmetic
is float32. The normalisers (NCE's Z, the softmaxes' sums over shards) are in partition.py.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from instdisc_jax import memory_bank
from instdisc_jax import sharding
from instdisc_jax.memory_bank import MemoryBank
from instdisc_jax.memory_bank import StepRows
from instdisc_jax.noise import NoiseSample
from instdisc_jax.partition import MASKED_LOGIT
from instdisc_jax.partition import Z_MODES  # noqa: F401  Re-exported: configs name the modes here.
from instdisc_jax.partition import Partition
from instdisc_jax.partition import batch_log_partition
from instdisc_jax.partition import sharded_cross_entropy_share
from instdisc_jax.partition import update_partition
from instdisc_jax.sharding import AxisName

# The reference criterion's epsilon (lemniscate.pytorch NCECriterion).
NCE_EPS = 1e-7
# "supervised" is not instance discrimination: the upper-bound row (`supervised_loss`).
OBJECTIVES = ("nce", "softmax", "parametric_softmax", "infonce", "supervised")

sg = jax.lax.stop_gradient


# ------------------------------------------------------------------------------------------------
# Scores.
# ------------------------------------------------------------------------------------------------


def step_rows(bank: MemoryBank, indices: jax.Array, noise: Optional[NoiseSample],
              axis_name: AxisName) -> StepRows:
  """The bank rows an objective reads (positives and noise), in one gather."""
  return memory_bank.gather_step_rows(bank, indices, axis_name,
                                      None if noise is None else noise.rows)


def positive_scores(features: jax.Array, rows: StepRows):
  """s_i = v_i^T f_i with the pre-step bank row, for the positives this shard owns.

  Returns `(scores, owned)`, both (B,); scores are 0 where not owned.
  """
  return jnp.sum(rows.positives * features, axis=-1), rows.owned


def noise_scores(features: jax.Array, rows: StepRows) -> jax.Array:
  """v_j^T f_i for this shard's noise draws: (B, slots), unmasked."""
  if rows.noise.ndim == 2:                           # shared noise: one (slots, d) set
    return features @ rows.noise.T
  return jnp.einsum("bd,bkd->bk", features, rows.noise)


def bank_scores(features: jax.Array, weights: jax.Array) -> jax.Array:
  """f_i^T w_j against every row of this shard: (B, rows_per_shard)."""
  return features @ weights.astype(jnp.float32).T


# ------------------------------------------------------------------------------------------------
# NCE (Eqs. 4-7).
# ------------------------------------------------------------------------------------------------


def _split_constant(value: float) -> tuple[float, float]:
  """`value` as hi + lo, two float32 numbers whose float32 sum misses it by ~1e-7 * ulp(hi)."""
  hi = float(np.float32(value))
  return hi, float(np.float32(value - hi))


def nce_log_terms(log_p_pos: jax.Array, log_p_neg: jax.Array, *, num_instances: int,
                  num_noise: int, eps: float = NCE_EPS):
  """log h(i, v) of the positives and log(1 - h(j, v)) of the noise (Eq. 5), elementwise.

  With c = m P_n = m / n and the reference's epsilon:

    log h     = log P - log(P + c + eps)      = -softplus(log(c + eps) - log P)
    log(1 - h) = log c - log(P + c + eps)     = -logaddexp(log P - log c, log(1 + eps / c))

  The noise form never forms log c - log(P + c + eps) as the difference of two numbers of size
  |log(m / n)|: each such difference of two separately rounded float32 constants is off by up to
  ~ulp(log(n / m)), with the same sign for every term, and the m noise terms of an example add
  it up (on the data of `tests/test_numerics.py` the loss was off by 2.5e-5 to 6.4e-3 for
  m = 4096 and 65,536, n = 10^3 to 10^7). Here the constants are combined in float64 on the
  host, log(1 + eps / c) is computed directly, and each constant that meets a float32 logit is
  applied as two float32 parts (hi + lo), so the rounding left is the logits' own, of random
  sign (<= 1e-6 against float64 on the same data).

  Args:
    log_p_pos: log P(i|v) of the positives (any shape).
    log_p_neg: log P(j|v) of the noise draws (any shape).
    num_instances: n.
    num_noise: m.
    eps: the reference criterion's epsilon.
  """
  noise_mass = num_noise / num_instances                   # c = m P_n(i)
  log_mass_hi, log_mass_lo = _split_constant(np.log(noise_mass))
  log_denominator_hi, log_denominator_lo = _split_constant(np.log(noise_mass + eps))
  log_eps_ratio = float(np.log1p(eps / noise_mass))        # log((c + eps) / c), tiny
  log_h_pos = -jax.nn.softplus((log_denominator_hi - log_p_pos) + log_denominator_lo)
  log_one_minus_h_neg = -jnp.logaddexp((log_p_neg - log_mass_hi) - log_mass_lo, log_eps_ratio)
  return log_h_pos, log_one_minus_h_neg


def nce_loss(features: jax.Array, indices: jax.Array, bank: MemoryBank, noise: NoiseSample,
             partition: Partition, *, temperature: float, z_mode: str = "frozen",
             z_momentum: float = 0.99, axis_name: AxisName = None, eps: float = NCE_EPS,
             rows: Optional[StepRows] = None):
  """NCE exactly as the reference criterion, with Z estimated by Monte Carlo (Eq. 7).

  loss = -(sum_i log h(i, v_i) + sum_i sum_{j in noise(i)} log(1 - h(j, v_j))) / B, with
  P = exp(s / tau) / Z, h = P / (P + m/n + eps) and 1 - h = (m/n) / (P + m/n + eps), as in
  lemniscate.pytorch's NCECriterion. Computed in log space, so no temperature overflows.

  Args:
    features: (B, d) L2-normalised features of the global batch.
    indices: int (B,) their instance indices.
    bank: the bank shard (pre-step values).
    noise: this shard's noise draws (`noise.sample`).
    partition: the Z state; see `update_partition` for `z_mode` and `z_momentum`.
    temperature: tau.
    axis_name: mapped axis the bank is sharded over, or None.
    eps: the reference criterion's epsilon.
    rows: the step's rows from `step_rows` if already gathered (else gathered here; either
      way they are returned in `aux["rows"]`).

  Returns:
    `(share, aux)`: aux holds `partition` (the Z used, to store in the state), `metrics` and
    `rows` (the `StepRows` read, for `memory_bank.update`).
  """
  n, m = bank.num_instances, noise.num_noise
  features = features.astype(jnp.float32)
  batch = features.shape[0]
  rows = step_rows(bank, indices, noise, axis_name) if rows is None else rows
  pos, owned = positive_scores(features, rows)
  neg = noise_scores(features, rows)
  pos_logits, neg_logits = pos / temperature, neg / temperature
  valid = noise.valid if not noise.shared else jnp.broadcast_to(noise.valid, neg.shape)

  batch_log_z = batch_log_partition(pos_logits, owned, neg_logits, valid, num_instances=n,
                                    num_noise=m, axis_name=axis_name)
  new_partition = update_partition(partition, batch_log_z, z_mode, z_momentum)
  log_z = new_partition.log_z

  # Eq. (4) with (7): log P = s / tau - log Z.  Eq. (5): h = P / (P + m P_n).
  log_p_pos = pos_logits - log_z
  log_p_neg = neg_logits - log_z
  log_h_pos, log_one_minus_h_neg = nce_log_terms(log_p_pos, log_p_neg, num_instances=n,
                                                 num_noise=m, eps=eps)

  # Eq. (6), summed over the noise and averaged over the batch like the reference.
  # Each example's terms first (the noise terms are small), then the B examples, whose terms
  # are of size log(n / m), with a compensated sum (a float32 sum of B such numbers would lose
  # several ulps of the loss).
  per_example = (jnp.where(owned, log_h_pos, 0.0)
                 + jnp.sum(jnp.where(valid, log_one_minus_h_neg, 0.0), axis=-1))
  share = -compensated_sum(per_example) / batch

  metrics = {
      "z": jnp.exp(log_z),
      "log_z": log_z,
      "batch_log_z": batch_log_z,
      "positive_prob": _owned_mean(jnp.exp(log_p_pos), owned, axis_name),
      "positive_h": _owned_mean(jnp.exp(log_h_pos), owned, axis_name),
      "positive_score": _owned_mean(pos, owned, axis_name),
      "noise_score": _masked_mean(neg, valid, axis_name),
  }
  return share, {"partition": new_partition, "metrics": metrics, "rows": rows}


# ------------------------------------------------------------------------------------------------
# Softmax cross-entropy (Eqs. 1, 2 and InfoNCE); its sharded normaliser is in partition.py.
# ------------------------------------------------------------------------------------------------


def _softmax_metrics(positive_logits, owned, global_lse, temperature, axis_name):
  return {
      "positive_prob": _owned_mean(jnp.exp(positive_logits - global_lse), owned, axis_name),
      "positive_score": _owned_mean(positive_logits * temperature, owned, axis_name),
  }


def softmax_loss(features: jax.Array, indices: jax.Array, bank: MemoryBank, *,
                 temperature: float, axis_name: AxisName = None,
                 rows: Optional[StepRows] = None):
  """Full non-parametric softmax over all n real rows of the bank (Eqs. 2, 3).

  The reference's `LinearAverage` + cross-entropy. Costs B x n / D scores per device per step.
  `aux["rows"]` holds the positives' rows (from `rows` or gathered here), for the update.
  """
  features = features.astype(jnp.float32)
  logits = bank_scores(features, sg(bank.values())) / temperature
  logits = jnp.where(sharding.real_row_mask(bank.layout, axis_name), logits, MASKED_LOGIT)
  rows = step_rows(bank, indices, None, axis_name) if rows is None else rows
  pos, owned = positive_scores(features, rows)
  share, global_lse = sharded_cross_entropy_share(logits, pos / temperature, owned, axis_name)
  return share, {"metrics": _softmax_metrics(pos / temperature, owned, global_lse,
                                             temperature, axis_name),
                 "rows": rows}


def parametric_softmax_loss(features: jax.Array, indices: jax.Array, weights: jax.Array, *,
                            num_instances: int, temperature: float,
                            axis_name: AxisName = None):
  """Parametric instance softmax (Eq. 1): one learnable weight vector w_i per instance.

  `weights` is this shard's (rows_per_shard, d) block of the learnable (n, d) matrix, sharded like
  the bank; its gradient is complete on its shard (do not psum it). The paper's Eq. (1) has no
  temperature; we divide by tau like the other rows of Table 1 (with a learnable w, tau only
  rescales w's effective learning rate).
  """
  features = features.astype(jnp.float32)
  bank = MemoryBank(rows=weights, num_instances=num_instances,
                    num_shards=sharding.num_shards(axis_name))
  layout = bank.layout
  logits = bank_scores(features, weights) / temperature
  logits = jnp.where(sharding.real_row_mask(layout, axis_name), logits, MASKED_LOGIT)
  local_row, owned = sharding.owned_rows(layout, indices, axis_name)
  pos_logits = jnp.take_along_axis(logits, local_row[:, None], axis=1)[:, 0]
  share, global_lse = sharded_cross_entropy_share(logits, pos_logits, owned, axis_name)
  return share, {"metrics": _softmax_metrics(pos_logits, owned, global_lse, temperature,
                                             axis_name)}


def infonce_loss(features: jax.Array, indices: jax.Array, bank: MemoryBank, noise: NoiseSample,
                 *, temperature: float, axis_name: AxisName = None,
                 rows: Optional[StepRows] = None):
  """Sampled softmax cross-entropy over the positive and its m bank negatives (InfoNCE).

  loss_i = -log( exp(s_i / tau) / (exp(s_i / tau) + sum_{j in noise(i)} exp(s_j / tau)) ).
  `aux["rows"]` holds the rows read (from `rows` or gathered here), for the update.
  """
  features = features.astype(jnp.float32)
  rows = step_rows(bank, indices, noise, axis_name) if rows is None else rows
  pos, owned = positive_scores(features, rows)
  neg = noise_scores(features, rows)
  valid = noise.valid if not noise.shared else jnp.broadcast_to(noise.valid, neg.shape)
  pos_logits = pos / temperature
  logits = jnp.concatenate([
      jnp.where(owned, pos_logits, MASKED_LOGIT)[:, None],
      jnp.where(valid, neg / temperature, MASKED_LOGIT)], axis=1)
  share, global_lse = sharded_cross_entropy_share(logits, pos_logits, owned, axis_name)
  metrics = _softmax_metrics(pos_logits, owned, global_lse, temperature, axis_name)
  metrics["noise_score"] = _masked_mean(neg, valid, axis_name)
  return share, {"metrics": metrics, "rows": rows}


# ------------------------------------------------------------------------------------------------
# Proximal regularisation (Eq. 9).
# ------------------------------------------------------------------------------------------------


def proximal_term(features: jax.Array, indices: jax.Array, bank: MemoryBank, *,
                  weight: float, axis_name: AxisName = None,
                  rows: Optional[StepRows] = None) -> jax.Array:
  """This shard's share of lambda * mean_i ||v_i^(t) - v_i^(t-1)||^2 (Eq. 9).

  v_i^(t) = f_i is the feature computed now, v_i^(t-1) the (pre-step) bank row. Add the share to
  any objective's share.
  """
  rows = step_rows(bank, indices, None, axis_name) if rows is None else rows
  sq = jnp.sum(jnp.square(features.astype(jnp.float32) - rows.positives), axis=-1)
  return weight * jnp.sum(jnp.where(rows.owned, sq, 0.0)) / features.shape[0]


# ------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------


def compensated_sum(x: jax.Array) -> jax.Array:
  """Sum of all elements of a float32 array, pairwise, carrying every addition's rounding error.

  Each level adds neighbouring pairs and keeps the exact error of each addition (Knuth's
  TwoSum, valid in any rounding-to-nearest arithmetic); the errors are summed alongside and
  added at the end. The result is within about one ulp of the exact sum, where a plain float32
  sum of N numbers can be off by sqrt(N) ulps or more. log2(N) elementwise passes. The gradient
  is the plain sum's (ones): the correction carries none. A sum that overflows is the plain
  sum's +-inf.
  """
  values = jnp.ravel(sg(x))
  size = 1 << max(0, (values.shape[0] - 1).bit_length())
  values = jnp.pad(values, (0, size - values.shape[0]))
  error = jnp.zeros_like(values)
  while values.shape[0] > 1:
    a, b = values[0::2], values[1::2]
    total = a + b
    b_part = total - a
    rounding = (a - (total - b_part)) + (b - b_part)
    error = error[0::2] + error[1::2] + rounding
    values = total
  plain = jnp.sum(x)
  correction = values[0] + error[0] - plain
  # A sum that overflows has no rounding error to speak of (inf - inf is nan): it stays the plain
  # sum, so a diverged loss reads inf, not nan.
  return plain + sg(jnp.where(jnp.isfinite(correction), correction, 0.0))


def _masked_mean(x: jax.Array, mask: jax.Array, axis_name: AxisName) -> jax.Array:
  total = sharding.psum(jnp.sum(jnp.where(mask, sg(x), 0.0)), axis_name)
  count = sharding.psum(jnp.sum(mask), axis_name)
  return total / jnp.maximum(count, 1)


def _owned_mean(x: jax.Array, owned: jax.Array, axis_name: AxisName) -> jax.Array:
  return _masked_mean(x, owned, axis_name)


def global_loss(share: jax.Array, axis_name: AxisName) -> jax.Array:
  """The loss value from the shares (no gradient)."""
  return sharding.psum(sg(share), axis_name)


# ------------------------------------------------------------------------------------------------
# The supervised upper bound.
# ------------------------------------------------------------------------------------------------


def supervised_loss(features: jax.Array, labels: jax.Array, classifier: jax.Array, *,
                    temperature: float, axis_name: AxisName = None):
  """Cross-entropy of a linear classifier on the embedding: the same encoder trained with labels.

    P(c | v_i) = exp(v_i^T w_c / tau) / sum_{c'} exp(v_i^T w_c' / tau)
    loss = -(1 / |L|) sum_{i in L} log P(y_i | v_i),   L = the labelled examples of the batch,

  with v_i the L2-normalised embedding (the features every other objective and the kNN see) and
  W = [w_1 .. w_C] a learnable (d, C) matrix. This is Eq. (1) with the n instance weights
  replaced by C class weights: the paper's parametric softmax with labels for classes, which is
  the supervised baseline its Table 1 compares to, on the same network, head and budget. The
  classifier reads the normalised embedding rather than the pooled backbone features so that
  the kNN, the probe and fine-tuning of the supervised run read the features it was trained on.
  As for Eq. (1), the temperature only rescales W's effective learning rate; keeping it makes
  the logits' scale at initialisation the same as the instance objectives'. Labels < 0 (unknown)
  are left out of L.

  W is replicated and the batch is global, so every device could compute the whole loss; instead
  device k scores only its own examples, rows [k B / D, (k + 1) B / D) of the global batch (the
  ones it contributed to `gather_batch`). The shares sum to the loss, no example is scored
  twice, and W's gradient on each device is that of its share: psum it like the encoder's.

  Args:
    features: (B, d) L2-normalised features of the global batch.
    labels: int (B,) their labels (-1 unknown).
    classifier: (d, C) class weights W, replicated.
    temperature: tau.
    axis_name: mapped axis the batch was gathered over, or None.

  Returns:
    `(share, aux)`: aux holds `metrics` (`train_top1`, the batch's accuracy in %, and
    `positive_prob`, the mean P(y_i | v_i)), reduced over devices.
  """
  features = features.astype(jnp.float32)
  batch = features.shape[0]
  per_device = batch // sharding.num_shards(axis_name)
  start = sharding.shard_index(axis_name) * per_device
  own_features = jax.lax.dynamic_slice_in_dim(features, start, per_device)
  own_labels = jax.lax.dynamic_slice_in_dim(labels, start, per_device)
  labelled = own_labels >= 0
  targets = jnp.where(labelled, own_labels, 0)
  logits = own_features @ classifier.astype(jnp.float32) / temperature
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  target_log_prob = jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]
  count = jnp.maximum(jnp.sum(labels >= 0), 1).astype(jnp.float32)     # |L|, global
  share = -jnp.sum(jnp.where(labelled, target_log_prob, 0.0)) / count
  correct = labelled & (jnp.argmax(logits, axis=-1) == targets)
  metrics = {
      "train_top1": 100.0 * sharding.psum(jnp.sum(correct), axis_name) / count,
      "positive_prob": _masked_mean(jnp.exp(target_log_prob), labelled, axis_name),
  }
  return share, {"metrics": metrics}
