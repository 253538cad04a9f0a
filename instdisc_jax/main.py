r"""Trains instance discrimination: flags only, then `train.train_and_evaluate`.

  python -m instdisc_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/fmnist
  python -m instdisc_jax.main --config=configs/cifar10_resnet18.py --workdir=gs://b/run \
      --config.objective=softmax

Multi-process (other than TPU VMs, where it is automatic): --coordinator_address=host:port
--num_processes=P --process_id=i on every process.

Exit status: 0 done (also for a run that had already finished: it says so, prints its results
and writes nothing); 2 a problem to fix before training can run: a bad flag, config value,
dataset or workdir (one line on stderr, nothing written to the workdir; --verbose for the
traceback); 1 training diverged (NaN or infinite loss, one line naming the step; the last good
checkpoint is kept); 75 stopped by SIGTERM/SIGINT after writing a checkpoint (rerun the same
command to resume).
"""

import sys

from absl import flags
from ml_collections import config_flags

from instdisc_jax import cli

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs (gs:// ok).")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
cli.define_runtime_flags()


def main(argv):
  del argv  # cli.run refuses positional arguments.
  with cli.user_errors_exit():
    cli.require(_WORKDIR.value, "--workdir", "give a directory for checkpoints and logs")
    cli.require(FLAGS.config, "--config", "give a config file, e.g. configs/fashion_mnist.py")
    # The fields read below, before JAX starts, must exist: a config file that builds its own
    # ConfigDict may leave them out. (train_and_evaluate validates again, knowing the devices.)
    from instdisc_jax import config_validation  # pylint: disable=g-import-not-at-top
    config_validation.validate(FLAGS.config)
    cli.split_cpu_into_devices((FLAGS.config.batch_size, FLAGS.config.eval_batch_size),
                               FLAGS.host_devices)
    cli.initialize_runtime()
    from instdisc_jax import train  # pylint: disable=g-import-not-at-top
    with cli.stop_signal() as stop:
      results = train.train_and_evaluate(FLAGS.config, _WORKDIR.value, stop=stop)
    cli.print_results(results)


if __name__ == "__main__":
  sys.exit(cli.run(main))
