"""Prepares a tfds dataset for training, in ArrayRecord format.

  python -m instdisc_jax.data.prepare --dataset=fashion_mnist --data_dir=DIR [--source_dir=...]

`fashion_mnist` is written offline from the Debian package `dataset-fashion-mnist`, without
TensorFlow. Any other tfds name runs the stock tfds builder's `download_and_prepare`; some
builders need TensorFlow for that (`pip install 'instdisc_jax[prepare]'`), and imagenet2012 needs
the ILSVRC2012 tars in `--manual_dir`. A dataset already prepared is left as it is.
"""

import argparse
from collections.abc import Sequence
import sys
import time

import tensorflow_datasets as tfds

from instdisc_jax.data import fashion_mnist
from instdisc_jax.data import sources
from instdisc_jax.errors import EXIT_USER_ERROR
from instdisc_jax.errors import DataError
from instdisc_jax.errors import UserError

_NEEDS_PREPARE_EXTRA = "pip install 'instdisc_jax[prepare]'"


def _offline_fashion_mnist(data_dir: str | None, source_dir: str) -> tfds.core.DatasetBuilder:
  """The offline builder; a DataError when it has nothing to read."""
  builder = fashion_mnist.FashionMnistOffline(
      data_dir=data_dir, file_format="array_record", source_dir=source_dir)
  if not builder.is_prepared():
    missing = fashion_mnist.missing_source_files(source_dir)
    if missing:
      raise DataError(
          f"the Fashion-MNIST files are not in {source_dir} (missing {missing[0]}): install them "
          f"with `sudo apt-get install -y {fashion_mnist.APT_PACKAGE}` or pass --source_dir")
  return builder


def _stock_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """tfds's own builder of `name`, writing ArrayRecord files."""
  try:
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as error:
    raise DataError(f"tfds has no dataset {name!r}") from error


def prepare(dataset: str, data_dir: str | None = None,
            source_dir: str = fashion_mnist.DEFAULT_SOURCE_DIR,
            manual_dir: str | None = None) -> str:
  """Prepares `dataset` in `data_dir` unless it already is; returns what was done, in one line."""
  kind = sources.DatasetSpec.parse(dataset).kind
  if kind != "tfds":
    return f"{dataset} is read as it is: there is nothing to prepare"
  if dataset == "fashion_mnist":
    builder = _offline_fashion_mnist(data_dir, source_dir)
  else:
    builder = _stock_builder(dataset, data_dir)
  if builder.is_prepared():
    return f"{dataset} is already prepared in {builder.data_dir}"
  if dataset == "imagenet2012" and not manual_dir:
    hint = sources.prepare_hint(dataset, str(builder.data_dir_root))
    raise DataError(f"imagenet2012 cannot be downloaded: {hint}")
  if dataset != "fashion_mnist":
    print(f"Preparing {dataset} with its stock tfds builder; some builders need TensorFlow "
          f"({_NEEDS_PREPARE_EXTRA})", file=sys.stderr)
  start = time.perf_counter()
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except ImportError as error:
    needed = error.name or "TensorFlow"
    raise DataError(f"preparing {dataset} needs {needed}: {_NEEDS_PREPARE_EXTRA}") from error
  except AssertionError as error:  # How tfds reports a missing or empty manual_dir.
    reason = str(error).strip().splitlines()[0]
    raise DataError(f"preparing {dataset} failed: {reason}") from error
  return f"prepared {dataset} in {builder.data_dir} in {time.perf_counter() - start:.0f} s"


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m instdisc_jax.data.prepare", description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", default=sources.DEFAULT_DATASET, help="a tfds name")
  parser.add_argument("--data_dir", default=None,
                      help="tfds data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--source_dir", default=fashion_mnist.DEFAULT_SOURCE_DIR,
                      help="where the Fashion-MNIST idx .gz files are")
  parser.add_argument("--manual_dir", default=None,
                      help="manually downloaded files (imagenet2012: the ILSVRC2012 tars)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  try:
    print(prepare(args.dataset, args.data_dir, args.source_dir, args.manual_dir))
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    return EXIT_USER_ERROR
  return 0


if __name__ == "__main__":
  sys.exit(main())
