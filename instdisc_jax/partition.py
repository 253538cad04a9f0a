"""The partition functions (normalisers) of the objectives, summed over the sharded instances.

Equation numbers are the paper's (Wu et al., CVPR 2018, arXiv:1805.01978). Every objective
normalises exp(score / tau) over all n instances, and the bank that holds them is sharded over
devices, so each normaliser is a log-sum-exp over shards:

* NCE (Eq. 4) needs Z_i = sum_j exp(v_j^T f_i / tau), which no step computes. The paper
  estimates it by Monte Carlo (Eq. 7): Z ~= Z_i ~= n E_j[exp(v_j^T f_i / tau)] over the scores a
  step samples anyway (the positives and their noise draws); the reference freezes the first
  batch's estimate. `batch_log_partition` is that estimate, `update_partition` keeps it in the
  train state (`Partition`) by one of `Z_MODES`.
* The softmax objectives (Eqs. 1, 2 and InfoNCE) need the exact sum over their logits, spread
  over the shards: `sharded_cross_entropy_share`.

Only one number per shard (or per example) is reduced, without gradient (`sharded_logsumexp`),
so no normaliser costs communication that grows with n or m. Z is held as log Z and every sum is
a log-sum-exp, so no temperature overflows. Conventions as in docs/design.md.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from instdisc_jax import sharding
from instdisc_jax.sharding import AxisName

# Logit given to masked entries (padding rows, unused noise slots, positives owned elsewhere):
# exp() of it is exactly 0 in float32, and it is finite, so gradients stay finite.
MASKED_LOGIT = -1e30

Z_MODES = ("frozen", "ema", "batch")

sg = jax.lax.stop_gradient


@flax.struct.dataclass
class Partition:
  """Running estimate of log Z, kept in the train state (replicated).

  Stored as log Z so that no temperature can overflow it. `initialized` is False until the first
  batch has been seen.
  """

  log_z: jax.Array
  initialized: jax.Array

  @classmethod
  def create(cls) -> "Partition":
    return cls(log_z=jnp.zeros((), jnp.float32), initialized=jnp.zeros((), bool))


def sharded_logsumexp(local_lse: jax.Array, axis_name: AxisName) -> jax.Array:
  """Elementwise log(sum over shards of exp(local_lse)), without gradient.

  `local_lse` holds each shard's own logsumexp (any shape); only that many numbers are reduced.
  """
  local_lse = sg(local_lse)
  shift = sharding.pmax(local_lse, axis_name)
  return shift + jnp.log(sharding.psum(jnp.exp(local_lse - shift), axis_name))


def batch_log_partition(pos_logits, owned, noise_logits, noise_valid, *, num_instances: int,
                        num_noise: int, axis_name: AxisName) -> jax.Array:
  """log of the Monte Carlo estimate Z = n * mean(exp(s / tau)) over the batch's B x (m + 1)
  sampled scores (the positives and their noise), as the reference computes it."""
  logits = jnp.concatenate([
      jnp.where(owned, pos_logits, MASKED_LOGIT).reshape(-1),
      jnp.where(noise_valid, noise_logits, MASKED_LOGIT).reshape(-1)])
  count = pos_logits.shape[0] * (num_noise + 1)
  log_sum = sharded_logsumexp(jax.nn.logsumexp(logits), axis_name)
  return np.log(num_instances) + log_sum - np.log(count)


def update_partition(partition: Partition, batch_log_z: jax.Array, mode: str,
                     ema_momentum: float = 0.99) -> Partition:
  """The Z used for this step, by mode:

  * "frozen": the first batch's estimate, then constant (the reference);
  * "ema": Z <- ema_momentum * Z + (1 - ema_momentum) * Z_batch, starting at the first estimate;
  * "batch": this batch's estimate.
  """
  if mode not in Z_MODES:
    raise ValueError(f"Z mode must be one of {Z_MODES}, got {mode!r}")
  batch_log_z = sg(batch_log_z)
  if mode == "frozen":
    log_z = jnp.where(partition.initialized, partition.log_z, batch_log_z)
  elif mode == "ema":
    ema = jnp.logaddexp(np.log(ema_momentum) + partition.log_z,
                        np.log1p(-ema_momentum) + batch_log_z)
    log_z = jnp.where(partition.initialized, ema, batch_log_z)
  else:
    log_z = batch_log_z
  return Partition(log_z=log_z, initialized=jnp.ones((), bool))


def sharded_cross_entropy_share(local_logits: jax.Array, positive_logits: jax.Array,
                                owned: jax.Array, axis_name: AxisName):
  """This shard's share of mean_i [-l_i,pos + logsumexp_j l_ij] when the logits of row i are
  spread over shards (local_logits (B, K) here, masked entries at -1e30) and the positive logit
  is among the local logits of exactly one shard (`owned`).

  The global logsumexp L_i needs the other shards' sums, which are reduced without gradient.
  Its gradient is recovered locally: with w_i = exp(lse_local_i - L_i), this shard's part of the
  softmax mass, the term w_i - stopgrad(w_i) is 0 in value and has gradient
  sum_{j local} softmax_ij * d l_ij, which is exactly this shard's part of d L_i. So the shares
  sum to the loss and their gradients sum to its gradient, with only B numbers communicated.

  Returns `(share, global_logsumexp)`, the latter (B,) and without gradient.
  """
  batch = local_logits.shape[0]
  local_lse = jax.nn.logsumexp(local_logits, axis=-1)
  global_lse = sharded_logsumexp(local_lse, axis_name)
  mass = jnp.exp(local_lse - global_lse)
  per_example = (-jnp.where(owned, positive_logits, 0.0)
                 + global_lse / sharding.num_shards(axis_name)
                 + (mass - sg(mass)))
  return jnp.sum(per_example) / batch, global_lse
