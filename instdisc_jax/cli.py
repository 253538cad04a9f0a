"""What the command-line entry points share: runtime flags, multi-process start-up, and turning
problems into one line on stderr with a distinct exit status."""

from __future__ import annotations

import contextlib
import logging as pylogging
import os
import sys
from typing import Optional

from absl import app
from absl import flags
from absl import logging

from instdisc_jax.errors import EXIT_USER_ERROR, UserError
from instdisc_jax.preemption import EXIT_PREEMPTED, StopSignal

FLAGS = flags.FLAGS
EXIT_FAILURE = 1


def define_runtime_flags() -> None:
  flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for multi-process runs outside TPU VMs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def _one_line(message: str) -> str:
  return " ".join(str(message).split())


def _exit(message: str, status: int) -> None:
  print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(status)


def _parse_flags(argv):
  """absl flag parsing, with bad flags or config overrides reported as one line, exit 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _exit(f"{e}; see --helpfull", EXIT_USER_ERROR)
  except (KeyError, AttributeError, TypeError, ValueError) as e:   # config overrides
    _exit(f"bad --config override: {e}", EXIT_USER_ERROR)


def configure_logging() -> None:
  """Our INFO messages on stderr; other libraries (orbax, absl, jax) only from WARNING up."""
  logging.set_verbosity(logging.WARNING)
  pylogging.getLogger("instdisc_jax").setLevel(pylogging.INFO)


def run(main) -> None:
  configure_logging()
  app.run(main, flags_parser=_parse_flags)


def require(value, flag: str, fix: str) -> None:
  if value in (None, ""):
    raise UserError(f"missing {flag}: {fix}")


@contextlib.contextmanager
def user_errors_exit():
  """UserError -> exit 2, preemption -> exit 75, non-finite loss -> exit 1; one line each."""
  from instdisc_jax import train  # pylint: disable=g-import-not-at-top
  try:
    yield
  except UserError as e:
    if FLAGS.verbose:
      raise
    _exit(str(e), EXIT_USER_ERROR)
  except train.NonFiniteLossError as e:
    if FLAGS.verbose:
      raise
    _exit(str(e), EXIT_FAILURE)
  except train.Preempted as e:
    print(_one_line(str(e)), file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)


def initialize_runtime() -> None:
  """Starts `jax.distributed` for multi-process runs; single-process runs need nothing."""
  import jax  # pylint: disable=g-import-not-at-top
  explicit = FLAGS.coordinator_address is not None
  if explicit:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      raise UserError("--coordinator_address needs --num_processes and --process_id too")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif _on_multihost_tpu():
    jax.distributed.initialize()
  pylogging.getLogger(__name__).info(
      "process %d of %d; %d local and %d global devices (%s)", jax.process_index(),
      jax.process_count(), jax.local_device_count(), jax.device_count(),
      jax.devices()[0].platform)


def _on_multihost_tpu() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


@contextlib.contextmanager
def stop_signal():
  with StopSignal() as stop:
    yield stop


def print_results(results: Optional[dict]) -> None:
  """The final kNN accuracies, on stdout, from process 0."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0 or not results:
    return
  for name, title in (("knn_bank", "bank features"),
                      ("knn_recomputed", "recomputed features")):
    if name in results:
      r = results[name]
      print(f"final weighted kNN ({title}): top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%",
            flush=True)
