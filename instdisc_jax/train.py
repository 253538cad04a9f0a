"""The training loop: `Trainer` builds a run from its config, restores it and trains it.

The step itself (`instdisc_jax.step`) is pure; this module feeds it batches, writes metrics and
checkpoints, runs the periodic and final kNN, and stops cleanly on a signal.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Optional

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from instdisc_jax import augment
from instdisc_jax import config_validation
from instdisc_jax import data
from instdisc_jax import models
from instdisc_jax import optim
from instdisc_jax import parallel
from instdisc_jax.checkpointing import CHECKPOINTS_DIR
from instdisc_jax.checkpointing import Checkpointer
from instdisc_jax.checkpointing import check_compatible
from instdisc_jax.config_io import RESULTS_NAME
from instdisc_jax.config_io import incompatible_fields
from instdisc_jax.config_io import run_meta
from instdisc_jax.config_io import save_config
from instdisc_jax.errors import NonFiniteLossError
from instdisc_jax.errors import UserError
from instdisc_jax.memory_bank import MemoryBank
from instdisc_jax.metric_writers import MetricWriter
from instdisc_jax.parallel import AXIS
from instdisc_jax.preemption import Preempted
from instdisc_jax.preemption import StopSignal
from instdisc_jax.sharding import ShardLayout
from instdisc_jax.steps import INSTANCE_SHARDED_KEYS
from instdisc_jax.steps import StepConfig
from instdisc_jax.steps import TrainState
from instdisc_jax.steps import init_state
from instdisc_jax.steps import knn_eval_step
from instdisc_jax.steps import pmapped
from instdisc_jax.steps import train_step
from instdisc_jax.steps import write_features_step
from instdisc_jax.workdir import WorkdirLock
from instdisc_jax.workdir import create_workdir

log = logging.getLogger(__name__)


def build_model(config: ml_collections.ConfigDict) -> models.ResNet:
  """The encoder `config` describes, as the trainer (and the benchmarks) build it."""
  return models.get_model(
      config.model, low_dim=config.low_dim, dtype=jnp.dtype(config.compute_dtype),
      bn_axis_name=AXIS if config.cross_device_bn else None,
      head_batchnorm=config.head_batchnorm,
      **({"width": config.model_width} if config.model_width else {}))


def augment_config(config: ml_collections.ConfigDict, split) -> augment.AugmentConfig:
  """The transforms for `split`: the config's strengths, the dataset's normalisation.

  Known datasets use their published statistics; others (folders, npz) are measured on up to
  2,000 of their images.
  """
  stats = augment.DATASET_STATS.get(config.dataset) or data.pixel_stats(split)
  jitter = config.augment.color_jitter
  return augment.AugmentConfig(
      image_size=config.image_size, mean=stats.mean, std=stats.std,
      crop_scale=(config.augment.crop_scale_min, 1.0), crop_on_device=split.fixed_size,
      grayscale_prob=config.augment.grayscale_prob, brightness=jitter, contrast=jitter,
      saturation=jitter, hue=jitter, flip=config.augment.flip)


@dataclasses.dataclass
class _Pending:
  """Per-step metrics not yet fetched from the devices (fetching every step would stall them)."""

  metrics: list = dataclasses.field(default_factory=list)
  first_step: int = 0

  def add(self, step: int, metrics) -> None:
    if not self.metrics:
      self.first_step = step
    self.metrics.append(metrics)

  def fetch(self) -> list[dict]:
    fetched = [jax.tree.map(parallel.first_replica, m) for m in self.metrics]
    self.metrics = []
    return fetched


class Trainer:
  """Builds the run from a config, restores it from the workdir, and trains it.

  The pieces (`state`, `p_train_step`, `evaluate_knn`, ...) are attributes so that tests and
  the evaluator can use them.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    # The notice that kNN is skipped waits for `initialize`: a refusal must be the only line.
    self.train_split, self.eval_split, self.data_notice = data.load_splits_and_notice(config)
    n = self.train_split.num_examples
    config_validation.validate_against_data(config, n)
    if config.objective == "supervised" and (self.train_split.labels is None
                                             or not np.any(self.train_split.labels >= 0)):
      raise UserError(f"config.objective=supervised, but {self.train_split.name} has no labels: "
                      "train it on a labelled split, or choose an unsupervised objective")
    self.layout = ShardLayout(n, jax.device_count())
    self.steps_per_epoch = n // config.batch_size
    self.total_steps = (config.num_train_steps if config.num_train_steps > 0
                        else config.num_epochs * self.steps_per_epoch)
    self.num_classes = (self.eval_split or self.train_split).num_classes or 1
    channels = self.train_split.channels
    self.image_shape = (config.image_size, config.image_size, channels)

    self.model = build_model(config)
    self.learning_rate_fn = optim.learning_rate_schedule(config, self.steps_per_epoch,
                                                         self.total_steps)
    self.tx = optim.sgd(config, self.learning_rate_fn)
    self.augment_config = augment_config(config, self.train_split)
    self.hp = StepConfig.from_config(config, self.layout, self.augment_config, self.num_classes)

    static = dict(model=self.model, hp=self.hp)
    self.p_init = pmapped(init_state, tx=self.tx, image_shape=self.image_shape,
                          low_dim=config.low_dim, bank_init=config.bank_init,
                          bank_dtype=jnp.dtype(config.bank_dtype), **static)
    self.p_train_step = pmapped(train_step, donate_argnums=(0,), tx=self.tx,
                                learning_rate_fn=self.learning_rate_fn, **static)
    self.p_knn = pmapped(knn_eval_step, **static)
    self.p_write_features = pmapped(write_features_step, donate_argnums=(1,), **static)

    labels = self.train_split.labels
    if labels is None:
      labels = np.full((n,), -1, np.int32)
    self.bank_labels = parallel.shard_local_rows(
        self.layout.shard_array(labels.astype(np.int32), fill=-1)[
            parallel.local_device_indices()])
    self.meta = run_meta(config, self.layout, self.train_split.fingerprint)
    self.checkpointer = None      # Made by `initialize`: building a Trainer writes nothing.
    self.state = None
    self.iterator = None

  # -- set-up -------------------------------------------------------------------------------------

  def check_workdir(self) -> None:
    """Refuses a workdir holding another run (other data, or a different n, d, model, ...).

    Reads only, so it can run before the workdir is locked or anything is written to it. The
    data are compared first: when only they changed, the fix is the data, not the config.
    """
    data.check_fingerprint(self.workdir, self.train_split, write=False)
    check_compatible(self.workdir, self.meta, incompatible_fields)

  def finished_results(self) -> Optional[dict]:
    """The results of this run if it has already finished, else None. Reads only.

    Finished means: `results.json` was written (the final evaluation ran) and the newest
    checkpoint has reached `total_steps`. Rerunning such a run must neither evaluate again nor
    write a second record of its last step into metrics.jsonl.
    """
    path = epath.Path(self.workdir) / RESULTS_NAME
    checkpoints = epath.Path(self.workdir) / CHECKPOINTS_DIR
    if not parallel.any_process(path.exists() and checkpoints.exists()):
      return None
    checkpointer = Checkpointer(self.workdir, keep=None, sharded_keys=INSTANCE_SHARDED_KEYS,
                                read_only=True)
    try:
      latest = checkpointer.latest_step()
    finally:
      checkpointer.close()
    try:
      results = json.loads(path.read_text()) if path.exists() else {"step": latest}
    except (OSError, ValueError):
      results = None                          # Damaged: evaluating again rewrites it.
    finished = (latest is not None and latest >= self.total_steps and isinstance(results, dict)
                and results.get("step") == latest)
    return results if parallel.any_process(finished) else None

  def fresh_state(self) -> TrainState:
    """The initial train state of `config.seed` (also the target a checkpoint restores into)."""
    key = jax.random.key_data(jax.random.key(self.config.seed))
    return self.p_init(parallel.replicate(key))

  def initialize(self) -> int:
    """Restores the newest checkpoint, or builds a fresh state. Returns the step reached.

    Records the data's fingerprint in the workdir; call it holding the workdir's lock.
    """
    data.check_fingerprint(self.workdir, self.train_split, write=jax.process_index() == 0)
    if self.data_notice:
      log.warning("%s", self.data_notice)
    self.checkpointer = Checkpointer(self.workdir, keep=self.config.keep_checkpoints,
                                     sharded_keys=INSTANCE_SHARDED_KEYS)
    self.state = self.fresh_state()
    restored = self.checkpointer.restore(self.state, self.meta, compatible=incompatible_fields)
    data_state = None
    if restored is not None:
      self.state, data_state, step = restored
      log.info("resumed from the checkpoint of step %d", step)
    elif self.config.bank_init == "features":
      self.state = self.state.replace(bank=self.features_bank())
    self.iterator = data.TrainIterator(
        self.train_split, global_batch_size=self.config.batch_size, seed=self.config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        image_size=self.config.image_size, host_crop=not self.train_split.fixed_size)
    if data_state is not None:
      self.iterator.set_state(data_state)
    return self.step

  def restore_for_evaluation(self) -> int:
    """Restores the newest checkpoint into `state` without training (for evaluators); returns
    its step. Raises UserError when the workdir has no checkpoint that can be read."""
    checkpointer = Checkpointer(self.workdir, keep=None, sharded_keys=INSTANCE_SHARDED_KEYS,
                                read_only=True)
    try:
      if checkpointer.latest_step() is None:
        raise UserError(f"{self.workdir} has no checkpoint to evaluate; train it first with "
                        "python -m instdisc_jax.main")
      restored = checkpointer.restore(self.fresh_state(), self.meta,
                                      compatible=incompatible_fields)
    finally:
      checkpointer.close()
    if restored is None:
      raise UserError(f"no checkpoint of {self.workdir} could be read (see the warnings above)")
    self.state = restored[0]
    return self.step

  @property
  def step(self) -> int:
    return int(parallel.first_replica(self.state.step))

  # -- evaluation ---------------------------------------------------------------------------------

  def _eval_batches(self, split):
    return data.eval_batches(split, global_batch_size=self.config.eval_batch_size,
                             process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             image_size=self.config.image_size)

  def features_bank(self) -> MemoryBank:
    """A bank holding eval-transform features of every training image under the current net."""
    bank = self.state.bank.replace(rows=jnp.zeros_like(self.state.bank.rows))
    for batch in self._eval_batches(self.train_split):
      bank = self.p_write_features(self.state, bank, parallel.shard_local_batch(batch))
    return bank

  def evaluate_knn(self, bank_rows) -> dict:
    """Weighted kNN top-1/top-5 (%) of the eval split against `bank_rows`."""
    totals = {"top1": 0, "top5": 0, "total": 0}
    for batch in self._eval_batches(self.eval_split):
      batch = {k: batch[k] for k in ("image", "label", "mask")}
      counts = self.p_knn(self.state, parallel.shard_local_batch(batch), bank_rows,
                          self.bank_labels)
      for k, v in counts.items():
        totals[k] += int(parallel.first_replica(v))
    total = max(totals.pop("total"), 1)
    return {k: 100.0 * v / total for k, v in totals.items()}

  # -- checkpoints --------------------------------------------------------------------------------

  def save(self) -> None:
    """Starts checkpointing the current step (unless it already is); returns while the
    checkpoint is written in the background (`Checkpointer.save`)."""
    if self.checkpointer.latest_step() != self.step:
      self.checkpointer.save(self.step, self.state, self.iterator.get_state(), self.meta)

  # -- the loop -----------------------------------------------------------------------------------

  def train(self, stop: Optional[StopSignal] = None) -> dict:
    """Trains to `total_steps` from the current step; returns the final evaluation."""
    config = self.config
    stop = stop or StopSignal()
    writer = MetricWriter(self.workdir, resume_step=self.step)
    step = self.step
    pending = _Pending()
    bar = tqdm.tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True,
                    disable=not (config.progress_bar and jax.process_index() == 0))
    clock = _Throughput(step)
    try:
      while step < self.total_steps:
        batch = next(self.iterator)
        fed = ("image", "index", "label") if self.hp.uses_labels else ("image", "index")
        self.state, metrics = self.p_train_step(
            self.state, parallel.shard_local_batch({k: batch[k] for k in fed}))
        step += 1
        pending.add(step, metrics)
        bar.update(1)
        if not clock.started:                       # the first step compiled: time from here
          jax.block_until_ready(metrics)
          clock.restart(step)
        epoch_done = step % self.steps_per_epoch == 0
        save_now = bool(config.checkpoint_every_steps) and (
            step % config.checkpoint_every_steps == 0)
        flush_now = (step % config.log_every_steps == 0 or epoch_done or save_now
                     or step == self.total_steps)
        signal_name = stop.poll(step, at_sync_point=flush_now)
        if flush_now or signal_name:
          scalars = self._check_and_summarise(pending.fetch(), pending.first_step)
          scalars["images_per_sec"] = clock.rate(step, config.batch_size)
          writer.write(step, scalars)
          bar.set_postfix(loss=f"{scalars['loss']:.4f}",
                          img_s=f"{scalars['images_per_sec']:.0f}", refresh=False)
        epoch = step // self.steps_per_epoch
        if (epoch_done and self.eval_split is not None and config.eval_every_epochs
            and epoch % config.eval_every_epochs == 0 and step < self.total_steps):
          result = self.evaluate_knn(self.state.bank.rows)
          writer.write(step, {f"knn_bank/{k}": v for k, v in result.items()} | {"epoch": epoch})
          if jax.process_index() == 0:
            bar.write(f"epoch {epoch}: kNN on bank features top-1 {result['top1']:.2f}% "
                      f"top-5 {result['top5']:.2f}%")
          clock.restart(step)
        if save_now or signal_name:
          self.save()
          clock.restart(step)
        if signal_name:
          self.checkpointer.wait_until_finished()     # Exit 75 promises a written checkpoint.
          raise Preempted(step, signal_name)
      bar.close()
      self.save()
      results = self.final_evaluation(writer)       # Overlaps the final checkpoint's write.
      self.checkpointer.wait_until_finished()
    finally:
      bar.close()
      writer.close()
    return results

  def _check_and_summarise(self, fetched: list[dict], first_step: int) -> dict:
    """Raises NonFiniteLossError naming the first bad step; else the interval's mean metrics."""
    for offset, metrics in enumerate(fetched):
      if not np.isfinite(metrics["loss"]):
        last = self.checkpointer.latest_step()
        kept = f"the last checkpoint (step {last}) is kept" if last is not None else \
            "no checkpoint was written"
        raise NonFiniteLossError(
            f"loss is {metrics['loss']} at step {first_step + offset}; {kept}; lower "
            "learning_rate or raise temperature, then rerun")
    summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    summary["learning_rate"] = float(fetched[-1]["learning_rate"])
    summary["epoch"] = (first_step + len(fetched) - 1) / self.steps_per_epoch
    return summary

  def final_evaluation(self, writer: MetricWriter) -> dict:
    """kNN on the bank and (if configured) on recomputed features; written to results.json."""
    results = {"step": self.step}
    if self.eval_split is None:
      log.info("no labelled eval split: kNN evaluation skipped")
    else:
      results["knn_bank"] = self.evaluate_knn(self.state.bank.rows)
      if self.config.recompute_features:
        results["knn_recomputed"] = self.evaluate_knn(self.features_bank().rows)
      writer.write(self.step, {f"{name}/{k}": v for name in ("knn_bank", "knn_recomputed")
                               for k, v in results.get(name, {}).items()})
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, RESULTS_NAME), "w") as f:
        json.dump(results, f, indent=2)
    return results

  def close(self) -> None:
    if self.checkpointer is not None:
      self.checkpointer.close()


class _Throughput:
  """Images per second of training, excluding evaluation and checkpoint time."""

  def __init__(self, step: int):
    self.started = False
    self._step, self._time = step, time.perf_counter()

  def restart(self, step: int) -> None:
    self.started = True
    self._step, self._time = step, time.perf_counter()

  def rate(self, step: int, batch_size: int) -> float:
    now = time.perf_counter()
    rate = (step - self._step) * batch_size / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return rate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop: Optional[StopSignal] = None) -> dict:
  """Trains per `config` in `workdir` (resuming what is there) and returns the final kNN.

  Everything that can be wrong with the config, the data or the workdir is found before
  anything is compiled or written to the workdir.
  """
  config_validation.validate(config, num_devices=jax.device_count(),
                             num_processes=jax.process_count())
  trainer = Trainer(config, workdir)     # Loads the data and validates the config against it.
  trainer.check_workdir()
  results = trainer.finished_results()
  if results is not None:
    log.warning("%s has already finished training (step %d of %d); its results are in %s and "
                "nothing was written. Raise num_epochs (or num_train_steps) to train on, or run "
                "python -m instdisc_jax.evaluate --workdir=%s for more evaluations", workdir,
                results["step"], trainer.total_steps, RESULTS_NAME, workdir)
    return results
  create_workdir(workdir)
  with WorkdirLock(workdir):
    save_config(config, workdir)
    try:
      step = trainer.initialize()
      log.info("training %s on %s for %d steps (%d per epoch) from step %d on %d devices",
                   config.model, trainer.train_split.name, trainer.total_steps,
                   trainer.steps_per_epoch, step, jax.device_count())
      return trainer.train(stop)
    finally:
      trainer.close()
