"""An offline tfds builder for Fashion-MNIST that reads the Debian `dataset-fashion-mnist` files.

The builder writes the tfds dataset `fashion_mnist` (version 3.0.1, the stock builder's features:
`image` PNG (28, 28, 1) and `label` with the ten class names) in ArrayRecord format, without
downloading anything and without TensorFlow. Shuffling is disabled, so record i of a split is the
i-th image of its idx file: the instance index of a training image is its position in the file.

The class is not registered with tfds (the stock `fashion_mnist` builder keeps its name); the
prepared directory is read back with the standard reader, `tfds.data_source('fashion_mnist',
data_dir=...)`, which takes the file format and split sizes from the written `dataset_info.json`.
"""

from collections.abc import Iterator
import gzip
import io
import os

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
APT_PACKAGE = "dataset-fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Split name -> (images file, labels file), as shipped by Debian (and by the dataset's authors).
SOURCE_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_UBYTE = 0x08


def missing_source_files(source_dir: str) -> list[str]:
  """Returns the idx files absent from `source_dir` (empty when all four are there)."""
  paths = [os.path.join(source_dir, name) for pair in SOURCE_FILES.values() for name in pair]
  return [path for path in paths if not os.path.isfile(path)]


def read_idx(path: str) -> np.ndarray:
  """Reads a gzipped idx file of unsigned bytes (the MNIST format) into an array of its shape."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
    raise ValueError(f"{path} is not an idx file of unsigned bytes")
  rank = data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=rank, offset=4))
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * rank)
  if body.size != np.prod(shape):
    raise ValueError(f"{path} holds {body.size} values, its header says {shape}")
  return body.reshape(shape)


def encode_png(image: np.ndarray) -> bytes:
  """Encodes a (H, W) or (H, W, 1) uint8 image as PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(image.reshape(image.shape[:2])).save(buffer, format="PNG")
  return buffer.getvalue()


class FashionMnistOffline(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Fashion-MNIST from local idx files; same name, version and features as the stock builder."""

  name = "fashion_mnist"
  VERSION = tfds.core.Version("3.0.1")
  RELEASE_NOTES = {"3.0.1": "Written offline from the Debian idx files, in file order."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file; tfds's default lookup imports `importlib_resources`, absent on Python >= 3.9."""
    return epath.Path(__file__)

  def __init__(self, *, source_dir: str = DEFAULT_SOURCE_DIR, **kwargs):
    self._source_dir = source_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Fashion-MNIST: 28x28 greyscale images of Zalando articles in 10 classes, "
            "60,000 for training and 10,000 for testing. Records are in idx file order."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing is downloaded.
    return {
        split: self._generate_examples(
            os.path.join(self._source_dir, images), os.path.join(self._source_dir, labels))
        for split, (images, labels) in SOURCE_FILES.items()
    }

  def _generate_examples(self, images_path: str, labels_path: str) -> Iterator[tuple[int, dict]]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
      raise ValueError(
          f"{images_path} {images.shape} and {labels_path} {labels.shape} do not pair up")
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": encode_png(image), "label": int(label)}
