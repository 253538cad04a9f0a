"""The training loop: `Trainer` builds a run from its config, restores it and trains it.

The step itself (`instdisc_jax.steps`) is pure; this module feeds it batches, writes metrics and
checkpoints, runs the periodic and final kNN, and stops cleanly on a signal.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from etils import epath
import jax
import ml_collections
import numpy as np
import tqdm

from instdisc_jax import config_validation
from instdisc_jax import data
from instdisc_jax import parallel
from instdisc_jax.checkpointing import CHECKPOINTS_DIR
from instdisc_jax.checkpointing import Checkpointer
from instdisc_jax.checkpointing import check_compatible
from instdisc_jax.config_io import RESULTS_NAME
from instdisc_jax.config_io import incompatible_fields
from instdisc_jax.config_io import save_config
from instdisc_jax.data import validation as validation_lib
from instdisc_jax.errors import NonFiniteLossError
from instdisc_jax.evaluation import features as features_lib
from instdisc_jax.evaluation import knn_sweep
from instdisc_jax.evaluation import selection
from instdisc_jax.memory_bank import MemoryBank
from instdisc_jax.metric_writers import MetricWriter
from instdisc_jax.metric_writers import PendingMetrics
from instdisc_jax.metric_writers import Throughput
from instdisc_jax.preemption import Preempted
from instdisc_jax.preemption import StopSignal
from instdisc_jax.restore import RunSpec
from instdisc_jax.restore import restore_newest
from instdisc_jax.steps import INSTANCE_SHARDED_KEYS
from instdisc_jax.steps import TrainState
from instdisc_jax.steps import knn_eval_step
from instdisc_jax.steps import knn_sweep_step
from instdisc_jax.steps import pmapped
from instdisc_jax.steps import train_step
from instdisc_jax.steps import write_features_step
from instdisc_jax.workdir import WorkdirLock
from instdisc_jax.workdir import create_workdir

log = logging.getLogger(__name__)


class Trainer:
  """Builds the run from a config, restores it from the workdir, and trains it.

  The pieces (`state`, `p_train_step`, `evaluate_knn`, ...) are attributes so that tests can
  use them. What the run is comes from `restore.RunSpec`, which the evaluators and the programs
  that use a trained run build without a Trainer.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    # The notice that kNN is skipped waits for `initialize`: a refusal must be the only line.
    # What the run is (data, layout, encoder, transforms, step config), as evaluators see it.
    spec = self.spec = RunSpec.from_config(config)
    self.train_split, self.eval_split = spec.train_split, spec.eval_split
    self.data_notice = spec.data_notice
    self.layout, self.num_classes = spec.layout, spec.num_classes
    self.image_shape = spec.image_shape
    self.steps_per_epoch, self.total_steps = spec.steps_per_epoch, spec.total_steps
    self.model, self.augment_config, self.hp = spec.model, spec.augment_config, spec.hp
    self.bank_labels, self.meta = spec.bank_labels, spec.meta
    self.learning_rate_fn, self.tx = spec.optimizer()
    # Held out of the training split (config.validation_size > 0): what (k, tau) is chosen on.
    self.validation_split, self.validation_record = spec.validation_split, spec.validation_record

    static = dict(model=self.model, hp=self.hp)
    self.p_init = spec.initializer(self.tx)
    self.p_train_step = pmapped(train_step, donate_argnums=(0,), tx=self.tx,
                                learning_rate_fn=self.learning_rate_fn, **static)
    self.p_knn = pmapped(knn_eval_step, **static)
    self.p_write_features = pmapped(write_features_step, donate_argnums=(1,), **static)
    self._p_sweeps = {}
    self.checkpointer = None      # Made by `initialize`: building a Trainer writes nothing.
    self.state = None
    self.iterator = None

  # -- set-up -------------------------------------------------------------------------------------

  def check_workdir(self) -> None:
    """Refuses a workdir holding another run (other data, or a different n, d, model, ...).

    Reads only, so it can run before the workdir is locked or anything is written to it. The
    data are compared first: when only they changed, the fix is the data, not the config.
    """
    validation_lib.check_record(self.workdir, self.validation_record)
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
    return self.spec.fresh_state(self.p_init)

  def initialize(self) -> int:
    """Restores the newest checkpoint, or builds a fresh state. Returns the step reached.

    Records the data's fingerprint in the workdir; call it holding the workdir's lock.
    """
    data.check_fingerprint(self.workdir, self.train_split, write=jax.process_index() == 0)
    if jax.process_index() == 0:
      validation_lib.write_record(self.workdir, self.validation_record)
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
    """Restores the newest checkpoint into `state` without training; returns its step. Raises
    UserError when the workdir has no checkpoint that can be read (`restore.restore_newest`)."""
    self.state, step = restore_newest(self.workdir, self.meta, self.fresh_state)
    return step

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
    return features_lib.recomputed_bank(self.state, self.train_split, self.p_write_features,
                                        batch_size=self.config.eval_batch_size,
                                        image_size=self.config.image_size)

  @property
  def knn_split(self):
    """The split the periodic kNN scores: the validation set if there is one, else the test."""
    return self.validation_split if self.validation_split is not None else self.eval_split

  def evaluate_knn(self, bank_rows, split=None) -> dict:
    """Weighted kNN top-1/top-5 (%) of `split` (default: the eval split) against `bank_rows`,
    with the config's k and tau."""
    totals = {"top1": 0, "top5": 0, "total": 0}
    for batch in self._eval_batches(self.eval_split if split is None else split):
      batch = {k: batch[k] for k in ("image", "label", "mask")}
      counts = self.p_knn(self.state, parallel.shard_local_batch(batch), bank_rows,
                          self.bank_labels)
      for k, v in counts.items():
        totals[k] += int(parallel.first_replica(v))
    total = max(totals.pop("total"), 1)
    return {k: 100.0 * v / total for k, v in totals.items()}

  def knn_sweep(self, bank_rows, split, ks: tuple, temperatures: tuple) -> dict:
    """Top-1/top-5 (%) of `split` against `bank_rows` for every (k, tau) of the grids, from one
    neighbour search per batch: {selection.Setting: {"top1", "top5"}, "hits": top-1 counts}."""
    key = (ks, temperatures)
    if key not in self._p_sweeps:
      self._p_sweeps[key] = pmapped(knn_sweep_step, model=self.model, hp=self.hp,
                                    sweep_counts=knn_sweep.sweep_counts, ks=ks,
                                    temperatures=temperatures)
    names = {knn_sweep.setting_name(k, t): selection.Setting(k, t)
             for k in ks for t in temperatures}
    hits = {setting: {"top1": 0, "top5": 0} for setting in names.values()}
    total = 0
    for batch in self._eval_batches(split):
      batch = {k: batch[k] for k in ("image", "label", "mask")}
      counts, real = self._p_sweeps[key](self.state, parallel.shard_local_batch(batch), bank_rows,
                                         self.bank_labels)
      total += int(parallel.first_replica(real))
      for name, by_top in counts.items():
        for top, value in by_top.items():
          hits[names[name]][top] += int(parallel.first_replica(value))
    return {setting: {top: 100.0 * count / max(total, 1) for top, count in by_top.items()}
            | {"hits": by_top["top1"]} for setting, by_top in hits.items()}

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
    pending = PendingMetrics()
    bar = tqdm.tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True,
                    disable=not (config.progress_bar and jax.process_index() == 0))
    clock = Throughput(step)
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
          # With a validation set, the test split is not looked at before the end.
          on_validation = self.validation_split is not None
          result = self.evaluate_knn(self.state.bank.values(), self.knn_split)
          prefix = "validation/knn_bank" if on_validation else "knn_bank"
          writer.write(step, {f"{prefix}/{k}": v for k, v in result.items()} | {"epoch": epoch})
          if jax.process_index() == 0:
            bar.write(f"epoch {epoch}: kNN on bank features"
                      f"{' (validation)' if on_validation else ''} top-1 {result['top1']:.2f}% "
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
    """kNN on the bank and (if configured) on recomputed features; written to results.json.

    With a validation set, (k, tau) is chosen on it first (`select_and_test`).
    """
    results = {"step": self.step}
    if self.eval_split is None:
      log.info("no labelled eval split: kNN evaluation skipped")
    elif self.validation_split is not None:
      results |= self.select_and_test()
      writer.write(self.step, {
          f"{prefix}knn_{kind}/{k}": v
          for kind, choice in results["knn_choice"].items()
          for prefix, scores in (("", results["test"][kind]), ("validation/", choice))
          for k, v in scores.items() if k in ("top1", "top5")})
    else:
      results["knn_bank"] = self.evaluate_knn(self.state.bank.values())
      if self.config.recompute_features:
        results["knn_recomputed"] = self.evaluate_knn(self.features_bank().values())
      writer.write(self.step, {f"{name}/{k}": v for name in ("knn_bank", "knn_recomputed")
                               for k, v in results.get(name, {}).items()})
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, RESULTS_NAME), "w") as f:
        json.dump(results, f, indent=2)
    return results

  def select_and_test(self) -> dict:
    """(k, tau) per feature kind chosen on the validation set, then the test split scored once
    (`selection.select_and_test`)."""
    config, n = self.config, self.layout.num_instances
    kinds = {"bank": self.state.bank.values()}
    if config.recompute_features:
      kinds["recomputed"] = self.features_bank().values()
    return selection.select_and_test(
        kinds, self.knn_sweep, self.validation_split, self.eval_split,
        *selection.grid(config.knn_select_k, config.knn_select_temperatures, n),
        preferred=selection.Setting(min(config.knn_k, n), float(config.knn_temperature)))

  def close(self) -> None:
    if self.checkpointer is not None:
      self.checkpointer.close()


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
