"""SGD as the reference uses it, and its learning-rate schedules."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Linear warm-up, then the reference's step decay or a cosine decay to 0.

  step: lr x `lr_decay_factor` at each epoch in `lr_boundaries` (reference: 0.1 at 120 and 160).
  """
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if config.lr_schedule == "step":
    boundaries = {int(epoch * steps_per_epoch) - warmup: config.lr_decay_factor
                  for epoch in config.lr_boundaries}
    main = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  elif config.lr_schedule == "cosine":
    main = optax.cosine_decay_schedule(config.learning_rate, max(total_steps - warmup, 1))
  else:
    raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}")
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(0.0, config.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def sgd(config: ml_collections.ConfigDict, schedule: optax.Schedule):
  """torch.optim.SGD(momentum, weight_decay): the L2 term is added to the gradient before the
  momentum trace, on every parameter (BatchNorm and biases too), as the reference does."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
