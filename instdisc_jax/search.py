r"""Searches a trained run's training images: nearest neighbours of your images, near-duplicates.

  python -m instdisc_jax.search --workdir=W --query=photo.jpg [more.jpg ...]   # or a folder
  python -m instdisc_jax.search --workdir=W --duplicates --threshold=0.95

**Search.** The query images are decoded like the run's eval images (the centre square resized
to `image_size`, or the reference's Resize + CenterCrop for datasets of varying image size),
embedded with the eval transform (`steps.embed`) and compared with every training instance by
cosine similarity s_i = v_i^T f, the metric the network was trained for (the paper's Eq. 2 and
Fig. 5). `knn.nearest_neighbors` finds the k best over the instance-sharded features: each
device searches its own shard and only k candidates per device are gathered, never the bank.

**Near-duplicates.** Every pair of training instances i < j with s_ij >= threshold, found by
`similar_pairs`: a pure, blockwise function over the sharded features. Each device takes a block
of its own rows, the block is all-gathered (blocks, not shards), every device scores it against
its shard in chunks, and per row only the k most similar partners above the threshold and their
count are kept; memory is O(block * chunk + n * k / D) per device, never n x n. The counts are
exact, so the caller knows when k was too small and runs again with a larger one.

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
import dataclasses
import logging
import os
import sys
from typing import Optional, Sequence

from absl import flags
import flax.struct
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from instdisc_jax import cli
from instdisc_jax import knn
from instdisc_jax import parallel
from instdisc_jax import plots
from instdisc_jax import sharding
from instdisc_jax import steps
from instdisc_jax import train
from instdisc_jax.data import folder
from instdisc_jax.data import images as images_lib
from instdisc_jax.data import sources
from instdisc_jax.errors import UserError
from instdisc_jax.evaluation import features as features_lib
from instdisc_jax.parallel import AXIS
from instdisc_jax.sharding import AxisName
from instdisc_jax.sharding import ShardLayout

log = logging.getLogger(__name__)

FLAGS = flags.FLAGS
FEATURES = ("recomputed", "bank")
NEIGHBORS_CSV = "neighbors.csv"
NEIGHBORS_PNG = "neighbors.png"
DUPLICATES_CSV = "duplicates.csv"
DUPLICATES_PNG = "duplicates.png"
GRID_QUERIES = 32            # rows of neighbors.png (the CSV has every query)
GRID_NEIGHBORS = 20          # columns of neighbors.png (the CSV has all k)
_NONE = -jnp.inf


# ------------------------------------------------------------------------------------------------
# Near-duplicates: a pure function over the instance-sharded features.
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Partners:
  """For each row i of this shard: rows j > i with s_ij >= threshold, most similar first.

  Outside a mapped step each field has a leading device axis, like the bank.
  """

  scores: jax.Array    # float32 (rows_per_shard, k); -inf past the partners
  indices: jax.Array   # int32 (rows_per_shard, k), global instance index; -1 past the partners
  counts: jax.Array    # int32 (rows_per_shard,): how many partners row i has (may exceed k)


def _top_k(values, ids, k):
  """The k largest values of each row (padded with -inf when fewer), with their ids."""
  if values.shape[1] < k:
    pad = ((0, 0), (0, k - values.shape[1]))
    values = jnp.pad(values, pad, constant_values=_NONE)
    ids = jnp.pad(ids, pad, constant_values=-1)
  best, pos = lax.top_k(values, k)
  return best, jnp.take_along_axis(ids, pos, axis=1)


def _shard_partners(queries, query_ids, rows, row_ids, real, threshold, k, bank_chunk):
  """This shard's partners of the queries: (values, ids) (Q, k) and the counts (Q,).

  A partner of query i is a real row j > i with s_ij >= threshold. Chunks of `bank_chunk` rows
  are scored in index order and merged into a running top k, whose ties keep the earlier (lower)
  index, as in `knn`.
  """
  num_rows = rows.shape[0]
  num_chunks = -(-num_rows // bank_chunk)
  chunk = -(-num_rows // num_chunks)
  pad = num_chunks * chunk - num_rows
  rows = jnp.pad(rows, ((0, pad), (0, 0))).reshape(num_chunks, chunk, -1)
  row_ids = jnp.pad(row_ids, (0, pad), constant_values=-1).reshape(num_chunks, chunk)
  real = jnp.pad(real, (0, pad)).reshape(num_chunks, chunk)

  def step(carry, chunk_data):
    best, best_ids, counts = carry
    chunk_rows, chunk_ids, chunk_real = chunk_data
    sims = queries @ chunk_rows.T
    partner = (chunk_real & (chunk_ids[None, :] > query_ids[:, None])) & (sims >= threshold)
    counts = counts + jnp.sum(partner, axis=1, dtype=jnp.int32)
    values, ids = _top_k(jnp.where(partner, sims, _NONE),
                         jnp.broadcast_to(chunk_ids, sims.shape), k)
    best, best_ids = _top_k(jnp.concatenate([best, values], axis=1),
                            jnp.concatenate([best_ids, ids], axis=1), k)
    return (best, best_ids, counts), None

  num_queries = queries.shape[0]
  init = (jnp.full((num_queries, k), _NONE, jnp.float32),
          jnp.full((num_queries, k), -1, jnp.int32), jnp.zeros((num_queries,), jnp.int32))
  (best, best_ids, counts), _ = lax.scan(step, init, (rows, row_ids, real))
  return best, best_ids, counts


def similar_pairs(rows: jax.Array, threshold, *, num_instances: int, k: int,
                  axis_name: AxisName = None, query_block: int = 128,
                  bank_chunk: int = 16384) -> Partners:
  """Near-duplicate partners of this shard's rows over all shards (see the module docstring).

  Row i's partners are the real rows j > i (so each pair is reported once, by its lower index)
  whose cosine similarity s_ij = v_i^T v_j is at least `threshold`; the k most similar are kept,
  ties to the lower index, and `counts` says how many there are in all.

  Args:
    rows: this shard's (rows_per_shard, d) L2-normalised features (any float dtype).
    threshold: the similarity a pair needs (a traced scalar: changing it does not recompile).
    num_instances: n, the number of real rows over all shards.
    k: partners kept per row.
    axis_name: mapped axis the rows are sharded over, or None.
    query_block: rows of each shard scored at once; a step all-gathers D * query_block rows.
    bank_chunk: rows of the shard each block is scored against at once.
  """
  layout = ShardLayout(num_instances, sharding.num_shards(axis_name))
  per_shard = layout.rows_per_shard
  rows = rows.astype(jnp.float32)
  real = sharding.real_row_mask(layout, axis_name)
  shard = sharding.shard_index(axis_name)
  ids = shard * per_shard + jnp.arange(per_shard, dtype=jnp.int32)
  threshold = jnp.asarray(threshold, jnp.float32)

  query_block = min(query_block, per_shard)
  num_blocks = -(-per_shard // query_block)
  pad = num_blocks * query_block - per_shard
  blocks = jnp.pad(rows, ((0, pad), (0, 0))).reshape(num_blocks, query_block, -1)
  block_ids = jnp.pad(ids, (0, pad), constant_values=num_instances).reshape(num_blocks, -1)

  def one_block(block):
    queries, query_ids = block
    if axis_name is not None:
      # Every device's block, in shard order: (D * query_block, d).
      queries, query_ids = (lax.all_gather(x, axis_name, tiled=True) for x in block)
    values, partner_ids, counts = _shard_partners(queries, query_ids, rows, ids, real, threshold,
                                                  k, bank_chunk)
    if axis_name is not None:
      # Candidates of all shards in shard order, i.e. in global index order, then this
      # device's own block.
      counts = lax.psum(counts, axis_name)
      values, partner_ids = (lax.all_gather(x, axis_name, axis=1, tiled=True)
                             for x in (values, partner_ids))
      values, partner_ids = _top_k(values, partner_ids, k)
      mine = lambda x: lax.dynamic_slice_in_dim(x, shard * query_block, query_block)
      values, partner_ids, counts = mine(values), mine(partner_ids), mine(counts)
    return values, partner_ids, counts

  values, partner_ids, counts = lax.map(one_block, (blocks, block_ids))
  values, partner_ids, counts = (x.reshape((-1,) + x.shape[2:])[:per_shard]
                                 for x in (values, partner_ids, counts))
  return Partners(scores=values,
                  indices=jnp.where(values > _NONE, partner_ids, -1),
                  counts=jnp.where(real, counts, 0))


@dataclasses.dataclass(frozen=True)
class Pairs:
  """Pairs of training instances, most similar first (ties: by first, then second index)."""

  first: np.ndarray        # int (P,), the lower instance index
  second: np.ndarray       # int (P,), the higher one
  similarity: np.ndarray   # float32 (P,)

  def __len__(self) -> int:
    return len(self.first)


def pair_list(partners: Partners, layout: ShardLayout) -> Pairs:
  """The pairs held by host `Partners` of every shard ((D, rows_per_shard, ...) arrays)."""
  indices = layout.unshard_array(partners.indices)
  scores = layout.unshard_array(partners.scores)
  first, column = np.nonzero(indices >= 0)
  second = indices[first, column]
  similarity = scores[first, column]
  order = np.lexsort((second, first, -similarity))
  return Pairs(first=first[order], second=second[order], similarity=similarity[order])


# ------------------------------------------------------------------------------------------------
# The steps, under pmap over every device.
# ------------------------------------------------------------------------------------------------


def _search_step(state, images, rows, labels, *, model, hp, k: int):
  """Embeds this device's query images; all devices search all queries in their shards."""
  queries = sharding.gather_batch(steps.embed(state, images, model=model, hp=hp), AXIS)
  return knn.nearest_neighbors(queries, rows, labels, num_instances=hp.layout.num_instances,
                               k=k, axis_name=AXIS)


def _pairs_step(rows, threshold, *, num_instances: int, k: int):
  return similar_pairs(rows, threshold, num_instances=num_instances, k=k, axis_name=AXIS)


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
# Searching a restored run.
# ------------------------------------------------------------------------------------------------


class Searcher:
  """The searches over one restored run (`trainer.state`), its features chosen by `features`.

  `rows` are the training features as the sharded bank holds them: the memory bank itself, or
  eval-transform features written into a bank of the same layout (`Trainer.features_bank`).
  """

  def __init__(self, trainer, features: str = "recomputed"):
    if features not in FEATURES:
      raise UserError(f"--features={features}: must be one of {', '.join(FEATURES)}")
    self.trainer = trainer
    self.features = features
    self.rows = (trainer.state.bank.values() if features == "bank"
                 else trainer.features_bank().values())
    self._search = {}
    self._pairs = {}

  def nearest(self, images: np.ndarray, k: int) -> knn.Neighbors:
    """The k nearest training instances of each query image (host arrays, (Q, k) each)."""
    trainer = self.trainer
    n = trainer.layout.num_instances
    k = min(k, n)
    if k not in self._search:
      self._search[k] = steps.pmapped(_search_step, model=trainer.model, hp=trainer.hp, k=k)
    # Global batches of at most the run's eval batch, as small as the queries allow (a whole
    # number per device), so a few queries are not padded to a thousand.
    devices = jax.device_count()
    batch = min(trainer.config.eval_batch_size, -(-len(images) // devices) * devices)
    local = batch // jax.process_count()
    start = jax.process_index() * local
    found = []
    for begin in range(0, len(images), batch):
      chunk = images[begin:begin + batch]
      padded = np.zeros((batch,) + images.shape[1:], images.dtype)
      padded[:len(chunk)] = chunk
      out = self._search[k](trainer.state,
                            parallel.shard_local_batch(padded[start:start + local]),
                            self.rows, trainer.bank_labels)
      found.append(jax.tree.map(lambda x: parallel.first_replica(x)[:len(chunk)], out))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *found)

  def duplicates(self, threshold: float, max_pairs: int, k: int = 16) -> Pairs:
    """Every pair i < j with s_ij >= threshold. Starts with k partners per row and, should a
    row have more, runs again with room for all of them.

    Raises UserError when there are more than `max_pairs` pairs (a threshold too low).
    """
    layout = self.trainer.layout
    threshold_array = parallel.replicate(np.float32(threshold))
    while True:
      if k not in self._pairs:
        self._pairs[k] = steps.pmapped(_pairs_step, num_instances=layout.num_instances, k=k)
      partners = self._pairs[k](self.rows, threshold_array)
      counts = _all_shards(partners.counts, layout)
      total = int(counts.sum())
      if total > max_pairs:
        raise UserError(f"--threshold={threshold} makes {total} pairs, more than "
                        f"--max_pairs={max_pairs}; raise --threshold (or --max_pairs)")
      most = int(counts.max(initial=0))
      if most <= k:
        return pair_list(jax.tree.map(lambda x: _all_shards(x, layout, flat=False), partners),
                         layout)
      log.info("an instance has %d partners above the threshold; searching again with room "
               "for all", most)
      k = 1 << (most - 1).bit_length()


def _all_shards(x: jax.Array, layout: ShardLayout, flat: bool = True) -> np.ndarray:
  """Host copy of an instance-sharded (D, rows_per_shard, ...) value, from every process."""
  x = parallel.to_global(x)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  x = np.asarray(x)
  return layout.unshard_array(x) if flat else x


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


def write_pairs_csv(path: str, pairs: Pairs, paths: Optional[Sequence[str]]) -> None:
  """first, second (instance indices), similarity, and their files for folder datasets."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["first", "second", "similarity", "first_path", "second_path"])
    for i, j, s in zip(pairs.first, pairs.second, pairs.similarity):
      writer.writerow([int(i), int(j), f"{s:.6f}", paths[i] if paths else "",
                       paths[j] if paths else ""])


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


def pair_lines(pairs: Pairs, paths: Optional[Sequence[str]], threshold: float,
               shown: int) -> list[str]:
  """The console report: how many pairs, then the `shown` most similar, one per line."""
  lines = [f"{len(pairs)} pairs with cosine similarity >= {threshold}"]
  for i, j, s in zip(pairs.first[:shown], pairs.second[:shown], pairs.similarity[:shown]):
    where = f"  {paths[i]}  {paths[j]}" if paths else ""
    lines.append(f"  {s:.4f}  #{int(i)} #{int(j)}{where}")
  if len(pairs) > shown:
    lines.append(f"  ... and {len(pairs) - shown} more")
  return lines


def _training_images(trainer, indices: np.ndarray) -> np.ndarray:
  """uint8 images of the training instances `indices` (any shape), as the eval pass sees them."""
  flat = np.asarray(indices).reshape(-1)
  if not flat.size:
    return np.zeros(np.shape(indices) + trainer.image_shape, np.uint8)
  images = features_lib.load_images(trainer.train_split, flat, trainer.config.image_size)
  return images.reshape(np.shape(indices) + images.shape[1:])


def draw_neighbors(path: str, trainer, images: np.ndarray, queries: Sequence[str],
                   neighbors: knn.Neighbors) -> None:
  """neighbors.png: the first GRID_QUERIES queries with their first GRID_NEIGHBORS neighbours,
  captioned with their similarity."""
  rows, columns = min(len(queries), GRID_QUERIES), min(neighbors.indices.shape[1], GRID_NEIGHBORS)
  indices = neighbors.indices[:rows, :columns]
  plots.retrieval_grid(
      path, images[:rows], np.full((rows,), -1), _training_images(trainer, indices),
      np.full(indices.shape, -1), neighbors.scores[:rows, :columns],
      title=f"top-{columns} nearest training images (cosine similarity)",
      query_captions=[os.path.basename(q)[:14] for q in queries[:rows]])


def draw_pairs(path: str, trainer, pairs: Pairs, num: int) -> None:
  """duplicates.png: the `num` most similar pairs (a picture saying so when there are none)."""
  shown = min(len(pairs), num)
  first, second = pairs.first[:shown], pairs.second[:shown]
  plots.pair_grid(path, _training_images(trainer, first), _training_images(trainer, second),
                  [f"#{int(i)}" for i in first],
                  [f"#{int(j)}  {s:.3f}" for j, s in zip(second, pairs.similarity[:shown])],
                  title=(f"the {shown} most similar of {len(pairs)} pairs" if len(pairs) else
                         "no pairs above the threshold"))


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
    trainer = train.Trainer(run_config, FLAGS.workdir)
    try:
      images = (load_queries(query_files, trainer.train_split, run_config.image_size)
                if query_files else None)
      trainer.restore_for_evaluation()
      searcher = Searcher(trainer, FLAGS.features)
      neighbors = searcher.nearest(images, FLAGS.k) if query_files else None
      pairs = (searcher.duplicates(FLAGS.threshold, FLAGS.max_pairs) if FLAGS.duplicates
               else None)
    finally:
      trainer.close()
    if jax.process_index() != 0:
      return
    out = FLAGS.out or os.path.join(FLAGS.workdir, "search")
    os.makedirs(out, exist_ok=True)
    paths = instance_paths(trainer.train_split)
    if neighbors is not None:
      write_neighbors_csv(os.path.join(out, NEIGHBORS_CSV), query_files, neighbors, paths,
                          trainer.train_split)
      draw_neighbors(os.path.join(out, NEIGHBORS_PNG), trainer, images, query_files, neighbors)
      print("\n".join(neighbor_lines(query_files, neighbors, paths)), flush=True)
      print(f"wrote {os.path.join(out, NEIGHBORS_CSV)} and {NEIGHBORS_PNG}", flush=True)
    if pairs is not None:
      write_pairs_csv(os.path.join(out, DUPLICATES_CSV), pairs, paths)
      draw_pairs(os.path.join(out, DUPLICATES_PNG), trainer, pairs, FLAGS.show_pairs)
      print("\n".join(pair_lines(pairs, paths, FLAGS.threshold, FLAGS.show_pairs)), flush=True)
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
