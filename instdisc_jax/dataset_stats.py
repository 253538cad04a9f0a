"""Per-channel pixel statistics of the known datasets, for `transforms.Normalize(mean, std)`.

The reference normalises with fixed published statistics (cifar.py and main.py of
lemniscate.pytorch); the same values are used here, so that an encoder trained by this package
sees the inputs the reference's does. A dataset that is not listed (an image folder, an npz
file) is normalised with statistics measured on a sample of its own training split
(`instdisc_jax.data.pixel_stats`).
"""

from typing import NamedTuple


class Stats(NamedTuple):
  """Per-channel mean and standard deviation of a dataset's pixels in [0, 1]."""
  mean: tuple[float, ...]
  std: tuple[float, ...]


_CIFAR = Stats(mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))  # reference cifar.py
_IMAGENET = Stats(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # reference main.py

DATASET_STATS: dict[str, Stats] = {
    # Over all 60,000 x 28 x 28 training pixels (train-images-idx3-ubyte.gz):
    # mean 0.286041, std 0.353024.
    "fashion_mnist": Stats(mean=(0.2860,), std=(0.3530,)),
    "cifar10": _CIFAR,
    "cifar100": _CIFAR,
    # STL-10 images are drawn from ImageNet; the ImageNet statistics are used.
    "stl10": _IMAGENET,
    "imagenet2012": _IMAGENET,
}
