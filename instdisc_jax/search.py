r"""Searches a trained run's training images: nearest neighbours of your images, near-duplicates.

  python -m instdisc_jax.search --workdir=W --query=photo.jpg [more.jpg ...]   # or a folder
  python -m instdisc_jax.search --workdir=W --duplicates --threshold=0.95

**Search.** The query images are decoded like the run's eval images (the centre square resized
to `image_size`, or the reference's Resize + CenterCrop for datasets of varying image size),
embedded with the eval transform (`steps.embed`) and compared with every training instance by
cosine similarity s_i = v_i^T f, the metric the network was trained for (the paper's Eq. 2 and
Fig. 5). `knn.nearest_neighbors` finds the k best over the instance-sharded features: each
device searches its own shard and only k candidates per device are gathered, never the bank.

**Near-duplicates.** Every pair of training instances i < j with s_ij >= threshold, found
blockwise over the sharded features, never n x n (`duplicates.similar_pairs`).

The run is opened without its training loop (`restore`): its config, data and newest checkpoint,
read-only.

The training features are the memory bank or features recomputed with the eval transform
(`--features`, default recomputed: identical images then score 1, which the bank's running
averages of augmented views do not). Results are written by process 0 to `--out` (default
`<workdir>/search`): `neighbors.csv` and `neighbors.png`, `duplicates.csv` and `duplicates.png`,
and printed. Bad input (a query that is no image or has another channel count than the run, a
workdir without a checkpoint, a threshold outside (-1, 1]) is one line and exit status 2, before
anything is written.
"""

from __future__ import annotations

import csv
import functools
import os
import sys
from typing import Callable, Optional, Sequence

from absl import flags
import jax
import numpy as np
from PIL import Image

from instdisc_jax import cli
from instdisc_jax import duplicates
from instdisc_jax import knn
from instdisc_jax import parallel
from instdisc_jax import plots
from instdisc_jax import restore
from instdisc_jax import sharding
from instdisc_jax import steps
from instdisc_jax.data import folder
from instdisc_jax.data import images as images_lib
from instdisc_jax.data import sources
from instdisc_jax.errors import UserError
from instdisc_jax.evaluation import features as features_lib
from instdisc_jax.parallel import AXIS
from instdisc_jax.sharding import ShardLayout

FLAGS = flags.FLAGS
FEATURES = ("recomputed", "bank")
NEIGHBORS_CSV = "neighbors.csv"
NEIGHBORS_PNG = "neighbors.png"
DUPLICATES_CSV = "duplicates.csv"
DUPLICATES_PNG = "duplicates.png"
GRID_QUERIES = 32            # rows of neighbors.png (the CSV has every query)
GRID_NEIGHBORS = 20          # columns of neighbors.png (the CSV has all k)


# ------------------------------------------------------------------------------------------------
# Searching a restored run.
# ------------------------------------------------------------------------------------------------


def _search_step(state, images, rows, labels, *, embed, num_instances: int, k: int):
  """Embeds this device's query images; all devices search all queries in their shards."""
  queries = sharding.gather_batch(embed(state, images), AXIS)
  return knn.nearest_neighbors(queries, rows, labels, num_instances=num_instances, k=k,
                               axis_name=AXIS)


def training_rows(run: restore.TrainedRun, features: str = "recomputed") -> jax.Array:
  """The training features searched, as the sharded bank holds them: the memory bank itself,
  or eval-transform features written into a bank of the same layout and dtype."""
  if features not in FEATURES:
    raise UserError(f"--features={features}: must be one of {', '.join(FEATURES)}")
  if features == "bank":
    return run.state.bank.values()
  spec = run.spec
  write = steps.pmapped(steps.write_features_step, donate_argnums=(1,), model=spec.model,
                        hp=spec.hp)
  return features_lib.recomputed_bank(run.state, spec.train_split, write,
                                      batch_size=spec.config.eval_batch_size,
                                      image_size=spec.config.image_size).values()


class Searcher:
  """The k nearest training instances of new images, over the sharded training `rows`.

  embed: `(state, images) -> features` of this device's images (`steps.embed` of the run);
  rows, labels: the training features and labels in the bank's `layout`; batch_size: the most
  query images embedded at once (global).
  """

  def __init__(self, embed: Callable, rows: jax.Array, labels: jax.Array, *,
               layout: ShardLayout, batch_size: int):
    self.embed = embed
    self.rows = rows
    self.labels = labels
    self.layout = layout
    self.batch_size = batch_size
    self._search = {}

  @classmethod
  def from_run(cls, run: restore.TrainedRun, rows: jax.Array) -> "Searcher":
    """The searcher of a restored run over `rows` (`training_rows`), in batches of the run's
    eval batch."""
    spec = run.spec
    return cls(functools.partial(steps.embed, model=spec.model, hp=spec.hp), rows,
               spec.bank_labels, layout=spec.layout, batch_size=spec.config.eval_batch_size)

  def nearest(self, state: steps.TrainState, images: np.ndarray, k: int) -> knn.Neighbors:
    """The k nearest training instances of each query image (host arrays, (Q, k) each)."""
    n = self.layout.num_instances
    k = min(k, n)
    if k not in self._search:
      self._search[k] = steps.pmapped(_search_step, embed=self.embed, num_instances=n, k=k)
    # Global batches of at most `batch_size`, as small as the queries allow (a whole number
    # per device), so a few queries are not padded to a thousand.
    devices = jax.device_count()
    batch = min(self.batch_size, -(-len(images) // devices) * devices)
    local = batch // jax.process_count()
    start = jax.process_index() * local
    found = []
    for begin in range(0, len(images), batch):
      chunk = images[begin:begin + batch]
      padded = np.zeros((batch,) + images.shape[1:], images.dtype)
      padded[:len(chunk)] = chunk
      out = self._search[k](state, parallel.shard_local_batch(padded[start:start + local]),
                            self.rows, self.labels)
      found.append(jax.tree.map(lambda x: parallel.first_replica(x)[:len(chunk)], out))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *found)


# ------------------------------------------------------------------------------------------------
# Outputs.
# ------------------------------------------------------------------------------------------------


def _class_name(split, label: int) -> str:
  if label < 0:
    return ""
  names = split.class_names
  return str(names[label]) if names is not None and label < len(names) else str(label)


def write_neighbors_csv(path: str, queries: Sequence[str], neighbors: knn.Neighbors,
                        paths: Optional[Sequence[str]], split) -> None:
  """query, rank (1 = nearest), instance index, similarity, path (folders), class (labelled)."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["query", "rank", "index", "similarity", "path", "class"])
    for q, query in enumerate(queries):
      for rank, (index, score, label) in enumerate(zip(
          neighbors.indices[q], neighbors.scores[q], neighbors.labels[q]), start=1):
        writer.writerow([query, rank, int(index), f"{score:.6f}",
                         paths[index] if paths else "", _class_name(split, int(label))])


def neighbor_lines(queries: Sequence[str], neighbors: knn.Neighbors,
                   paths: Optional[Sequence[str]]) -> list[str]:
  """The console report: each query, then one line per neighbour."""
  lines = []
  for q, query in enumerate(queries):
    lines.append(query)
    for rank, (index, score) in enumerate(zip(neighbors.indices[q], neighbors.scores[q]), 1):
      where = f"  {paths[index]}" if paths else ""
      lines.append(f"  {rank:3d}  {score:.4f}  #{int(index)}{where}")
  return lines


def _training_images(split, image_size: int, indices: np.ndarray) -> np.ndarray:
  """uint8 images of the training instances `indices` (any shape), as the eval pass sees them."""
  flat = np.asarray(indices).reshape(-1)
  if not flat.size:
    return np.zeros(np.shape(indices) + (image_size, image_size, split.channels), np.uint8)
  images = features_lib.load_images(split, flat, image_size)
  return images.reshape(np.shape(indices) + images.shape[1:])


def draw_neighbors(path: str, split, image_size: int, images: np.ndarray,
                   queries: Sequence[str], neighbors: knn.Neighbors) -> None:
  """neighbors.png: the first GRID_QUERIES queries with their first GRID_NEIGHBORS neighbours
  (training instances of `split`), captioned with their similarity."""
  rows, columns = min(len(queries), GRID_QUERIES), min(neighbors.indices.shape[1], GRID_NEIGHBORS)
  indices = neighbors.indices[:rows, :columns]
  plots.retrieval_grid(
      path, images[:rows], np.full((rows,), -1), _training_images(split, image_size, indices),
      np.full(indices.shape, -1), neighbors.scores[:rows, :columns],
      title=f"top-{columns} nearest training images (cosine similarity)",
      query_captions=[os.path.basename(q)[:14] for q in queries[:rows]])


def draw_pairs(path: str, split, image_size: int, pairs: duplicates.Pairs, num: int) -> None:
  """duplicates.png: the `num` most similar pairs (a picture saying so when there are none)."""
  shown = min(len(pairs), num)
  first, second = pairs.first[:shown], pairs.second[:shown]
  plots.pair_grid(path, _training_images(split, image_size, first),
                  _training_images(split, image_size, second), [f"#{int(i)}" for i in first],
                  [f"#{int(j)}  {s:.3f}" for j, s in zip(second, pairs.similarity[:shown])],
                  title=(f"the {shown} most similar of {len(pairs)} pairs" if len(pairs) else
                         "no pairs above the threshold"))


# ------------------------------------------------------------------------------------------------
# Query images.
# ------------------------------------------------------------------------------------------------


def find_queries(paths: Sequence[str]) -> list[str]:
  """The image files named by `paths`: files as given, folders searched like `folder:` data."""
  found = []
  for path in paths:
    if os.path.isdir(path):
      images, _ = folder.scan(path)
      if not images:
        raise UserError(f"--query={path} is a folder without images (looked for "
                        f"{', '.join(folder.IMAGE_EXTENSIONS)}); give image files or a folder "
                        "of them")
      found += [os.path.join(path, name) for name in images]
    elif os.path.isfile(path):
      found.append(path)
    else:
      raise UserError(f"--query={path}: no such file or folder; give image files or a folder "
                      "of them")
  return found


def load_queries(paths: Sequence[str], split, image_size: int) -> np.ndarray:
  """uint8 (Q, image_size, image_size, C) query images, decoded as the run's eval images.

  Raises UserError for a file that is not an image, or whose channel count (1 grey, 3 colour)
  is not the run's.
  """
  box = images_lib.center_box if split.fixed_size else images_lib.eval_box
  kind = {1: "grey (1 channel)", 3: "colour (3 channels)"}
  images = []
  for path in paths:
    try:
      with Image.open(path) as image:
        channels = images_lib.channels_of_mode(image.mode)
      if channels != split.channels:
        raise UserError(
            f"--query {path} is {kind[channels]} but the run was trained on "
            f"{kind[split.channels]} images; convert it (e.g. PIL "
            f"Image.convert('{'L' if split.channels == 1 else 'RGB'}')) or query another run")
      images.append(images_lib.decode_box(path, channels, image_size, box))
    except images_lib.DECODE_ERRORS as error:
      raise UserError(f"--query {path} is not an image that can be read ({error}); give image "
                      "files (jpg, png, webp, ...)") from None
  return np.stack(images)


def instance_paths(split) -> Optional[list[str]]:
  """The file of each training instance for `folder:` datasets, else None."""
  if split.manifest is None or not split.name.startswith(sources.FOLDER_PREFIX):
    return None
  root = split.name[len(sources.FOLDER_PREFIX):]
  return [os.path.join(root, path) for path, _ in split.manifest]


# ------------------------------------------------------------------------------------------------
# The program.
# ------------------------------------------------------------------------------------------------


def check_threshold(threshold: float) -> None:
  if not -1.0 < threshold <= 1.0:
    raise UserError(f"--threshold={threshold}: must be a cosine similarity in (-1, 1], e.g. "
                    "--threshold=0.95")


def check_flags(queries: Sequence[str]) -> None:
  """Everything about the flags that is wrong whatever the run (one line, exit 2)."""
  cli.require(FLAGS.workdir, "--workdir", "give the directory of a training run")
  if not queries and not FLAGS.duplicates:
    raise UserError("nothing to do: give --query=PATH (image files or a folder) and/or "
                    "--duplicates")
  if FLAGS.k < 1:
    raise UserError(f"--k={FLAGS.k}: must be at least 1")
  if FLAGS.max_pairs < 1:
    raise UserError(f"--max_pairs={FLAGS.max_pairs}: must be at least 1")
  check_threshold(FLAGS.threshold)


def main(argv):
  with cli.user_errors_exit():
    query_args = list(FLAGS.query or []) + list(argv[1:])
    check_flags(query_args)
    query_files = find_queries(query_args)
    run_config = cli.start_runtime_of_run(FLAGS.workdir)
    spec = restore.RunSpec.from_config(run_config)
    split, image_size = spec.train_split, run_config.image_size
    images = load_queries(query_files, split, image_size) if query_files else None
    state, step = restore.restore_newest(FLAGS.workdir, spec.meta, spec.fresh_state)
    run = restore.TrainedRun(spec=spec, workdir=FLAGS.workdir, state=state, step=step)
    rows = training_rows(run, FLAGS.features)
    neighbors = (Searcher.from_run(run, rows).nearest(state, images, FLAGS.k)
                 if query_files else None)
    pairs = (duplicates.PairFinder(spec.layout).find(rows, FLAGS.threshold, FLAGS.max_pairs)
             if FLAGS.duplicates else None)
    if jax.process_index() != 0:
      return
    out = FLAGS.out or os.path.join(FLAGS.workdir, "search")
    os.makedirs(out, exist_ok=True)
    paths = instance_paths(split)
    if neighbors is not None:
      write_neighbors_csv(os.path.join(out, NEIGHBORS_CSV), query_files, neighbors, paths, split)
      draw_neighbors(os.path.join(out, NEIGHBORS_PNG), split, image_size, images, query_files,
                     neighbors)
      print("\n".join(neighbor_lines(query_files, neighbors, paths)), flush=True)
      print(f"wrote {os.path.join(out, NEIGHBORS_CSV)} and {NEIGHBORS_PNG}", flush=True)
    if pairs is not None:
      duplicates.write_pairs_csv(os.path.join(out, DUPLICATES_CSV), pairs, paths)
      draw_pairs(os.path.join(out, DUPLICATES_PNG), split, image_size, pairs, FLAGS.show_pairs)
      print("\n".join(duplicates.pair_lines(pairs, paths, FLAGS.threshold, FLAGS.show_pairs)),
            flush=True)
      print(f"wrote {os.path.join(out, DUPLICATES_CSV)} and {DUPLICATES_PNG}", flush=True)


def define_flags() -> None:
  """The program's flags; defined only when it runs, so importing the module defines none."""
  flags.DEFINE_string("workdir", None, "A workdir written by instdisc_jax.main.")
  flags.DEFINE_multi_string("query", [], "Query image files or folders of them (further paths "
                            "may follow as arguments).")
  flags.DEFINE_integer("k", 10, "Nearest training instances per query.")
  flags.DEFINE_enum("features", "recomputed", FEATURES,
                    "Training features searched: recomputed with the eval transform, or the "
                    "memory bank.")
  flags.DEFINE_bool("duplicates", False, "List the pairs of training instances with cosine "
                    "similarity >= --threshold.")
  flags.DEFINE_float("threshold", 0.95, "Cosine similarity of a near-duplicate pair, in (-1, 1].")
  flags.DEFINE_integer("max_pairs", 1_000_000, "Refuse thresholds that make more pairs.")
  flags.DEFINE_integer("show_pairs", 16, "Most similar pairs printed and drawn in "
                       "duplicates.png (the CSV has all).")
  flags.DEFINE_string("out", None, "Output folder (default: <workdir>/search).")
  cli.define_runtime_flags()


if __name__ == "__main__":
  define_flags()
  sys.exit(cli.run(main, takes_arguments=True))
