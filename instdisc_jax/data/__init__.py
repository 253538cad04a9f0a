"""Datasets (tfds, image folders, .npz files) and the grain input pipeline.

`load_dataset`, `load_train_and_eval` and `load_splits` give `DatasetSplit`s, where `split[i]` is instance i;
`TrainIterator` and `eval_batches` turn them into host batches; `check_fingerprint` makes sure a
resumed run reads the same data; `validation` holds a stratified validation set out of the training
split (`load_run_splits`). `python -m instdisc_jax.data.prepare` prepares tfds datasets.
"""

from instdisc_jax.data.pipeline import BatchPlan
from instdisc_jax.data.pipeline import TrainIterator
from instdisc_jax.data.pipeline import epoch_permutation
from instdisc_jax.data.pipeline import eval_batches
from instdisc_jax.data.pipeline import num_eval_batches
from instdisc_jax.data.run_splits import RunSplits
from instdisc_jax.data.run_splits import load_run_splits
from instdisc_jax.data.run_splits import load_splits
from instdisc_jax.data.run_splits import load_splits_and_notice
from instdisc_jax.data.sources import DEFAULT_DATASET
from instdisc_jax.data.sources import DatasetSpec
from instdisc_jax.data.sources import load_dataset
from instdisc_jax.data.sources import load_train_and_eval
from instdisc_jax.data.split import DatasetSplit
from instdisc_jax.data.split import check_fingerprint
from instdisc_jax.data.split import pixel_stats
