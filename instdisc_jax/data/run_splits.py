"""A run's splits from its config: the training instances, the validation set, the test split.

`load_run_splits` is what training, the evaluator and the other programs read: the training
split without the validation images when `config.validation_size` > 0 (`validation.carve`),
and the labelled split kNN reports, or the notice saying why there is none.
"""

import logging
from typing import NamedTuple

import ml_collections

from instdisc_jax.data import split as split_lib
from instdisc_jax.data import validation as validation_lib
from instdisc_jax.data.sources import check_sizes
from instdisc_jax.data.sources import load_train_and_eval

log = logging.getLogger(__name__)


def load_splits(
    config: ml_collections.ConfigDict,
) -> tuple[split_lib.DatasetSplit, split_lib.DatasetSplit | None]:
  """`load_train_and_eval` from a config; the eval split is None when kNN cannot run.

  Reads `dataset`, `train_split`, `eval_dataset` and `eval_split` ("" for the default),
  `data_dir` ("" for `$TFDS_DATA_DIR`) and `image_size`; logs the one-line notice when kNN
  evaluation is skipped.
  """
  train, evaluation, notice = load_splits_and_notice(config)
  if notice:
    log.warning("%s", notice)
  return train, evaluation


def load_splits_and_notice(
    config: ml_collections.ConfigDict,
) -> tuple[split_lib.DatasetSplit, split_lib.DatasetSplit | None, str | None]:
  """`load_splits` without logging: (train, eval or None, the notice or None), for callers
  that have more to check before they say anything (an error must be the only line).

  The training split is the training instances: without the validation images when
  `config.validation_size` > 0 (`load_run_splits`)."""
  splits = load_run_splits(config)
  return splits.train, splits.evaluation, splits.notice


class RunSplits(NamedTuple):
  """The splits of a run (`load_run_splits`)."""

  train: split_lib.DatasetSplit                    # The training instances (bank rows).
  validation: split_lib.DatasetSplit | None        # Held out of the training split, or None.
  evaluation: split_lib.DatasetSplit | None        # The test split kNN reports, or None.
  notice: str | None                               # Why kNN evaluation is skipped, or None.
  validation_record: dict | None                   # What <workdir>/validation.json holds.


def load_run_splits(config: ml_collections.ConfigDict) -> RunSplits:
  """The training instances, the validation set and the test split of a config.

  With `config.validation_size` > 0, that many stratified images of the training split
  (`validation.carve`, from `validation_seed` only) become the validation set, and the others,
  in ascending record order, the training instances. An unlabelled training split is refused.
  """
  train, evaluation, notice = load_train_and_eval(
      config.dataset, config.eval_dataset or None, train_split=config.train_split,
      eval_split=config.eval_split or None, data_dir=config.data_dir or None,
      image_size=config.image_size)
  check_sizes(train, evaluation, config.image_size)
  validation = record = None
  size = config.get("validation_size", 0)    # Data-only configs (no such field) hold none out.
  if size:
    carved = validation_lib.carve(train, size, config.get("validation_seed", 0))
    train, validation, record = carved.train, carved.validation, carved.record
  return RunSplits(train, validation, None if notice else evaluation, notice, record)


