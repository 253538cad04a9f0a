r"""Search and near-duplicates at the default run's size, through `instdisc_jax.search`'s code.

  python -m benchmarks.search [--queries=100] [--repeats=5] [--duplicates] [--recompute]

Builds the default run (`configs/fashion_mnist.py`: 60,000 training images, small ResNet,
128-d features, the bank sharded over one XLA device per CPU core as training splits the host)
with its initial state instead of a checkpoint: the cost of a search depends on the shapes,
not on the weights, and no trained 60k workdir is needed. Times, after compilation:

* `search`: `Searcher.nearest` for `--queries` test images, k = 10, over the 60,000 x 128 memory
  bank (embedding the queries with the eval transform, the sharded kNN, fetching the result);
* `recompute` (with --recompute): `search.training_rows(run, "recomputed")`, the pass over the
  training set that `--features=recomputed` (the CLI's default) makes once per run of the program;
* `duplicates` (with --duplicates): `duplicates.PairFinder.find` at threshold 0.95 over the bank.

Prints one JSON line per measurement (median and every repeat). Needs the Fashion-MNIST dataset
prepared (`python -m instdisc_jax.data.prepare --dataset=fashion_mnist`).
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks import common
from instdisc_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--queries", type=int, default=100)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--duplicates", action="store_true")
  parser.add_argument("--recompute", action="store_true")
  args = parser.parse_args()

  from instdisc_jax import default_config  # pylint: disable=g-import-not-at-top
  config = default_config.load_config_file(os.path.join(REPO, "configs", "fashion_mnist.py"))
  cli.split_cpu_into_devices((config.batch_size, config.eval_batch_size))
  import numpy as np  # pylint: disable=g-import-not-at-top

  from instdisc_jax import duplicates  # pylint: disable=g-import-not-at-top
  from instdisc_jax import restore  # pylint: disable=g-import-not-at-top
  from instdisc_jax import search  # pylint: disable=g-import-not-at-top
  from instdisc_jax.evaluation import features  # pylint: disable=g-import-not-at-top

  spec = restore.RunSpec.from_config(config)            # nothing is written
  state = spec.fresh_state()
  run = restore.TrainedRun(spec=spec, workdir="/nonexistent-benchmark-workdir", state=state,
                           step=0)
  picks = np.linspace(0, spec.eval_split.num_examples - 1, args.queries).astype(int)
  images = features.load_images(spec.eval_split, picks, config.image_size)
  searcher = search.Searcher.from_run(run, search.training_rows(run, "bank"))
  record = {"environment": common.environment(), "bank_rows": spec.layout.num_instances,
            "dim": config.low_dim, "queries": args.queries, "k": args.k}

  _, compile_s = common.timed(lambda: searcher.nearest(state, images, args.k))
  timing = common.time_calls(lambda i: searcher.nearest(state, images, args.k),
                             repeats=args.repeats, warmup=0)
  print(json.dumps({**record, "what": "search", "first_call_s": compile_s,
                    **timing.to_json()}), flush=True)
  if args.recompute:
    timing = common.time_calls(lambda i: search.training_rows(run, "recomputed"), repeats=1,
                               warmup=1)
    print(json.dumps({**record, "what": "recompute", **timing.to_json()}), flush=True)
  if args.duplicates:
    finder, found = duplicates.PairFinder(spec.layout), []
    timing = common.time_calls(lambda i: found.append(finder.find(searcher.rows, 0.95, 10**6)),
                               repeats=1, warmup=1)
    print(json.dumps({**record, "what": "duplicates", "threshold": 0.95,
                      "pairs": len(found[-1]), **timing.to_json()}), flush=True)


if __name__ == "__main__":
  main()
