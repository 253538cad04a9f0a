"""Search and near-duplicates (issue 16): `duplicates.similar_pairs` against brute force on 8
fake devices, and `python -m instdisc_jax.search` on a tiny trained folder dataset (restored
without a Trainer, `restore.open_run`)."""

import csv
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest
import tiny_run

from instdisc_jax import config_io
from instdisc_jax import duplicates
from instdisc_jax import export_encoder
from instdisc_jax import parallel
from instdisc_jax import plots
from instdisc_jax import restore
from instdisc_jax import search
from instdisc_jax import steps
from instdisc_jax import train
from instdisc_jax.sharding import ShardLayout

AXIS = "devices"


# -- similar_pairs: a pure function over the sharded features -------------------------------------


def planted(n: int = 203, dim: int = 16, seed: int = 0):
  """Random unit vectors with planted near-duplicates: an exact copy, light perturbations, and a
  group of four; returns the features and the planted pairs (i < j)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, dim))
  x[150] = x[7]                                           # exact
  x[199] = x[30] + 0.02 * rng.normal(size=dim)           # lightly perturbed, across shards
  x[31] = x[30] + 0.02 * rng.normal(size=dim)            # and within a shard
  for j in (60, 61, 130, 202):                            # a group: 6 pairs
    x[j] = x[100] + 0.02 * rng.normal(size=dim)
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  return x, x @ x.T


def brute_force(x, threshold):
  sims = x @ x.T
  first, second = np.nonzero(np.triu(sims >= threshold, k=1))
  return {(int(i), int(j)) for i, j in zip(first, second)}, sims


def run_similar_pairs(x, threshold, k, num_shards, **blocks):
  """`similar_pairs` under pmap over `num_shards` devices (None: unsharded), as host Partners
  with a leading shard axis."""
  n = len(x)
  if num_shards is None:
    out = jax.jit(functools.partial(duplicates.similar_pairs, num_instances=n, k=k, **blocks))(
        x, threshold)
    return jax.tree.map(lambda a: np.asarray(a)[None], out), ShardLayout(n)
  layout = ShardLayout(n, num_shards)
  step = jax.pmap(functools.partial(duplicates.similar_pairs, num_instances=n, k=k, axis_name=AXIS,
                                    **blocks), axis_name=AXIS, in_axes=(0, None))
  return jax.tree.map(np.asarray, step(layout.shard_array(x), threshold)), layout


@pytest.mark.parametrize("num_shards,blocks", [
    (None, {}),
    (8, {}),
    (8, {"query_block": 4, "bank_chunk": 5}),   # blocks and chunks that do not divide the shard
    (3, {"query_block": 7, "bank_chunk": 64}),
])
def test_similar_pairs_finds_the_planted_pairs_and_no_others(num_shards, blocks):
  x, _ = planted()
  threshold = 0.99
  expected, sims = brute_force(x, threshold)
  assert expected == {(7, 150), (30, 31), (30, 199), (31, 199)} | {
      (i, j) for i in (60, 61, 100, 130, 202) for j in (60, 61, 100, 130, 202) if i < j}
  assert np.sort(sims[np.triu_indices(len(x), 1)])[-len(expected) - 1] < 0.9  # a clear gap
  partners, layout = run_similar_pairs(x, threshold, 8, num_shards, **blocks)
  pairs = duplicates.pair_list(partners, layout)
  assert set(zip(pairs.first.tolist(), pairs.second.tolist())) == expected
  assert len(pairs) == len(expected)
  np.testing.assert_allclose(pairs.similarity, sims[pairs.first, pairs.second], atol=1e-6)
  assert np.all(np.diff(pairs.similarity) <= 0)                  # most similar first
  counts = layout.unshard_array(partners.counts)
  assert counts.sum() == len(expected) and counts[60] == 4 and counts[202] == 0 and counts[7] == 1


def test_similar_pairs_keeps_the_k_most_similar_and_counts_all():
  x, _ = planted()
  expected, sims = brute_force(x, 0.99)
  partners, layout = run_similar_pairs(x, 0.99, 1, 8, query_block=16, bank_chunk=8)
  counts = layout.unshard_array(partners.counts)
  indices = layout.unshard_array(partners.indices)[:, 0]
  for i in range(len(x)):
    mine = [j for a, j in expected if a == i]
    assert counts[i] == len(mine)
    assert indices[i] == (max(mine, key=lambda j: (sims[i, j], -j)) if mine else -1)


def test_similar_pairs_whole_range_and_ties_go_to_the_lower_index():
  # Threshold -1 admits every pair; identical rows tie, and the lower indices are kept.
  x = np.tile(np.eye(4, dtype=np.float32)[:1], (10, 1))
  partners, layout = run_similar_pairs(x, -1.0, 3, 4, query_block=2, bank_chunk=2)
  counts = layout.unshard_array(partners.counts)
  np.testing.assert_array_equal(counts, 9 - np.arange(10))
  indices = layout.unshard_array(partners.indices)
  np.testing.assert_array_equal(indices[0], [1, 2, 3])
  np.testing.assert_array_equal(indices[7], [8, 9, -1])
  np.testing.assert_array_equal(indices[9], [-1, -1, -1])


# -- the programs on a tiny trained folder dataset ------------------------------------------------

EXACT, NOISY = "class0/zz_exact_copy.png", "class1/zz_noisy_copy.png"
ORIGINALS = {EXACT: "class0/img004.png", NOISY: "class1/img009.png"}


def write_photos(root, n: int = 64):
  """`n` smooth random 16 x 16 grey images (4 x 4 noise, upsampled), image i in folder
  class{i % 2}, plus an exact copy of one and a lightly perturbed copy (pixels moved by at most
  2 levels) of another. Smooth images keep even a barely trained network's features apart."""
  rng = np.random.default_rng(0)
  for i in range(n):
    (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
    small = Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8))
    small.resize((16, 16), Image.BILINEAR).save(root / f"class{i % 2}" / f"img{i:03d}.png")
  for copy, original in ORIGINALS.items():
    pixels = np.asarray(Image.open(root / original), np.int16)
    if copy == NOISY:
      pixels = pixels + rng.integers(-2, 3, pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / copy)
  return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run (4 steps) on a folder of 66 images with two planted duplicates. (At the tiny
  config's learning rate of 0.05 four steps leave every pair of images above 0.9997.)"""
  root = write_photos(tmp_path_factory.mktemp("photos"))
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_run.config("unused", num_epochs=1, learning_rate=0.005)
  config.dataset = f"folder:{root}"
  train.train_and_evaluate(config, str(workdir))
  return root, workdir


def program(name, *flags, timeout=300):
  return subprocess.run([sys.executable, "-m", f"instdisc_jax.{name}", *map(str, flags)],
                        capture_output=True, text=True, env=tiny_run.environment(),
                        cwd=tiny_run.REPO, timeout=timeout)


@pytest.mark.slow
def test_search_finds_the_query_first_and_duplicates_the_planted_pairs(run, restored, tmp_path):
  root, workdir = run
  query = root / "class1" / "img003.png"
  out = tmp_path / "out"
  result = program("search", f"--workdir={workdir}", f"--query={query}", root / "class0",
                   "--k=5", "--duplicates", "--threshold=0.99", f"--out={out}")
  assert result.returncode == 0, result.stderr
  with open(out / search.NEIGHBORS_CSV) as f:
    rows = list(csv.DictReader(f))
  queries = [str(query)] + sorted(str(p) for p in (root / "class0").glob("*.png"))
  assert [r["query"] for r in rows] == [q for q in queries for _ in range(5)]
  assert [int(r["rank"]) for r in rows[:5]] == [1, 2, 3, 4, 5]
  first = rows[0]
  assert first["path"] == str(query) and first["class"] == "class1"
  assert float(first["similarity"]) == pytest.approx(1.0, abs=1e-5)
  paths = search.instance_paths(restored[0].spec.train_split)
  assert paths[int(first["index"])] == str(query)
  with open(out / search.DUPLICATES_CSV) as f:
    pairs = {(os.path.relpath(r["first_path"], root), os.path.relpath(r["second_path"], root))
             for r in csv.DictReader(f)}
  assert pairs == {(original, copy) for copy, original in ORIGINALS.items()}
  for picture in (search.NEIGHBORS_PNG, search.DUPLICATES_PNG):
    with Image.open(out / picture) as image:
      assert image.size[0] > 100
  assert "2 pairs with cosine similarity >= 0.99" in result.stdout


@pytest.mark.slow
def test_searching_the_memory_bank_returns_the_true_top_k(restored):
  run, images, features = restored
  found = search.Searcher.from_run(run, search.training_rows(run, "bank")).nearest(run.state,
                                                                                    images, 4)
  bank = run.spec.layout.unshard_array(parallel.to_global(run.state.bank.rows))
  similarities = features @ bank.T
  np.testing.assert_allclose(found.scores, -np.sort(-similarities, axis=1)[:, :4], atol=1e-5)
  np.testing.assert_allclose(np.take_along_axis(similarities, found.indices, axis=1),
                             found.scores, atol=1e-5)


LOADER = r"""
import importlib.abc
import os
import sys


class NoProject(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] == "instdisc_jax":
      raise ImportError("the exported encoder must not need instdisc_jax")


# Neither the project's folders on sys.path nor an installed copy (the meta path) may be used.
sys.meta_path.insert(0, NoProject())
sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "instdisc_jax"))]
import jax
import numpy as np

directory, images_path, out = sys.argv[1:]
with open(os.path.join(directory, "encoder.jax"), "rb") as f:
  encoder = jax.export.deserialize(bytearray(f.read()))
params = dict(np.load(os.path.join(directory, "params.npz")))
images = np.load(images_path)
np.savez(out, **{str(n): np.asarray(encoder.call(params, images[:n])) for n in (1, 7)})
assert not [name for name in sys.modules if name.startswith("instdisc_jax")]
"""


@pytest.fixture(scope="module")
def restored(run):
  """The tiny run restored in this process, with 7 of its images and their `embed` features."""
  root, workdir = run
  run = restore.open_run(str(workdir))
  files = sorted(str(p) for p in (root / "class1").glob("img*.png"))[:7]
  images = search.load_queries(files, run.spec.train_split, run.spec.config.image_size)
  state = jax.tree.map(parallel.first_replica, run.state)
  features = np.asarray(steps.embed(state, images, model=run.spec.model, hp=run.spec.hp))
  return run, images, features


@pytest.mark.slow
def test_exported_encoder_gives_embed_features_without_the_project(run, restored, tmp_path):
  _, workdir = run
  _, images, expected = restored
  out = tmp_path / "encoder"
  result = program("export_encoder", f"--workdir={workdir}", f"--out={out}")
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(out)) == sorted(export_encoder.OUTPUTS)
  np.save(tmp_path / "images.npy", images)
  loaded = subprocess.run(
      [sys.executable, "-c", LOADER, str(out), str(tmp_path / "images.npy"),
       str(tmp_path / "features.npz")], capture_output=True, text=True, cwd=tmp_path,
      env=tiny_run.environment(), timeout=300)
  assert loaded.returncode == 0, loaded.stderr
  features = np.load(tmp_path / "features.npz")
  for n in (1, 7):
    np.testing.assert_allclose(features[str(n)], expected[:n], atol=1e-5)
  with open(out / export_encoder.INFO_NAME) as f:
    info = json.load(f)
  assert info["input"]["shape"] == ["b", 16, 16, 1] and info["output"]["shape"] == ["b", 16]
  assert "jax.export.deserialize" in (out / export_encoder.README_NAME).read_text()


@pytest.mark.slow
def test_a_fixed_batch_export_takes_that_batch_only(restored):
  run, images, expected = restored
  variables = export_encoder.flat_variables(run.state)
  exported = export_encoder.export(run.spec.model, run.spec.augment_config, variables,
                                   batch_size=7, channels=1, platforms=("cpu",))
  assert exported.in_avals[-1].shape == (7, 16, 16, 1)
  np.testing.assert_allclose(exported.call(variables, images), expected, atol=1e-5)
  with pytest.raises(ValueError):
    exported.call(variables, images[:1])


def write_rgb(path):
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
  return path


@pytest.mark.slow
@pytest.mark.parametrize("case,message", [
    ("not_an_image", "is not an image"),
    ("no_checkpoint", "has no checkpoint"),
    ("threshold_high", "must be a cosine similarity in (-1, 1]"),
    ("threshold_low", "must be a cosine similarity in (-1, 1]"),
    ("other_channels", "is colour (3 channels) but the run was trained on grey"),
])
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, case, message):
  root, workdir = run
  query = root / "class0" / "img000.png"
  flags = {"threshold_high": ["--duplicates", "--threshold=1.5"],
           "threshold_low": ["--duplicates", "--threshold=-1"]}.get(case, [])
  if case == "not_an_image":
    query = tmp_path / "notes.png"
    query.write_text("not an image")
  elif case == "other_channels":
    query = write_rgb(tmp_path / "colour.png")
  elif case == "no_checkpoint":
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(workdir / config_io.CONFIG_NAME, empty)
    workdir = empty
  out = tmp_path / "out"
  result = program("search", f"--workdir={workdir}", f"--query={query}", f"--out={out}", *flags)
  assert result.returncode == 2, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, result.stderr
  assert not out.exists()


@pytest.mark.slow
def test_export_refuses_an_out_that_holds_an_export_and_a_workdir_without_checkpoint(
    run, tmp_path):
  _, workdir = run
  out = tmp_path / "encoder"
  out.mkdir()
  (out / export_encoder.PARAMS_NAME).write_text("mine")
  result = program("export_encoder", f"--workdir={workdir}", f"--out={out}")
  assert result.returncode == 2 and "already holds params.npz" in result.stderr
  assert (out / export_encoder.PARAMS_NAME).read_text() == "mine"
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(workdir / config_io.CONFIG_NAME, empty)
  result = program("export_encoder", f"--workdir={empty}", f"--out={tmp_path / 'new'}")
  assert result.returncode == 2 and "has no checkpoint" in result.stderr.splitlines()[-1]
  assert not (tmp_path / "new").exists()


def test_pair_grid_draws_pairs_and_the_empty_case(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
  size = plots.pair_grid(str(tmp_path / "pairs.png"), images, images[::-1], list("abcde"),
                         list("vwxyz"), title="5 pairs")
  with Image.open(tmp_path / "pairs.png") as picture:
    assert picture.size == size == (4 * 2 * 72 + 3 * 16, 18 + 2 * (72 + 14))
  empty = np.zeros((0, 16, 16, 1), np.uint8)
  plots.pair_grid(str(tmp_path / "none.png"), empty, empty, [], [], title="no pairs")
  assert os.path.exists(tmp_path / "none.png")
