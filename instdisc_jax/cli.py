"""What the command-line entry points share: runtime flags, multi-process start-up, and turning
problems into one line on stderr with a distinct exit status."""

from __future__ import annotations

import contextlib
import functools
import logging as pylogging
import os
import sys
from typing import Callable, Optional

from absl import app
from absl import flags
from absl import logging

from instdisc_jax import flag_errors
from instdisc_jax import peers
from instdisc_jax import preemption
from instdisc_jax.errors import EXIT_USER_ERROR
from instdisc_jax.errors import NonFiniteLossError
from instdisc_jax.errors import UserError
from instdisc_jax.errors import one_line
from instdisc_jax.preemption import EXIT_PREEMPTED
from instdisc_jax.preemption import StopSignal

FLAGS = flags.FLAGS
EXIT_FAILURE = 1


def define_runtime_flags() -> None:
  flags.DEFINE_integer("host_devices", 0,
                       "CPU only: XLA devices to split the host into; 0 = one per core (a "
                       "divisor of the batch sizes), 1 = a single device.", lower_bound=0)
  flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for multi-process runs outside TPU VMs "
                      "(default: $JAX_COORDINATOR_ADDRESS).")
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run "
                       "(default: $JAX_NUM_PROCESSES).")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run "
                       "(default: $JAX_PROCESS_ID).")


def _exit(message: str, status: int) -> None:
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(status)


def _parse_flags(argv, takes_arguments: bool = False):
  """absl flag parsing, with bad flags, config files or overrides as one line, exit 2."""
  try:
    return flag_errors.parse(argv, FLAGS, takes_arguments=takes_arguments)
  except UserError as e:
    _exit(str(e), EXIT_USER_ERROR)


def configure_logging() -> None:
  """Our INFO messages on stderr; other libraries (orbax, absl, jax) only from WARNING up."""
  logging.set_verbosity(logging.WARNING)
  pylogging.getLogger("instdisc_jax").setLevel(pylogging.INFO)


def run(main, define_flags: Optional[Callable[[list[str]], None]] = None, *,
        takes_arguments: bool = False) -> None:
  """`app.run(main)` with every flag problem as one line, exit 2.

  `define_flags(argv)`, if given, defines the program's flags first; a problem it finds with the
  command line (a `UserError`) is one line too. Positional arguments reach `main(argv)` only if
  `takes_arguments`; otherwise each is refused in one line.
  """
  configure_logging()
  with peers.reporting_exit():
    if define_flags is not None:
      try:
        define_flags(sys.argv)
      except UserError as e:
        _exit(str(e), EXIT_USER_ERROR)
    app.run(main, flags_parser=functools.partial(_parse_flags, takes_arguments=takes_arguments))


def require(value, flag: str, fix: str) -> None:
  if value in (None, ""):
    raise UserError(f"missing {flag}: {fix}")


@contextlib.contextmanager
def user_errors_exit():
  """UserError -> exit 2, preemption -> exit 75, non-finite loss -> exit 1; one line each."""
  try:
    yield
  except NonFiniteLossError as e:               # before UserError, which it subclasses
    if FLAGS.verbose:
      raise
    _exit(str(e), EXIT_FAILURE)
  except UserError as e:
    if FLAGS.verbose:
      raise
    _exit(str(e), EXIT_USER_ERROR)
  except preemption.Preempted as e:
    print(one_line(str(e)), file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)


# Environment variables standing in for the multi-process flags (a flag wins over its variable).
# jax.distributed.initialize reads JAX_COORDINATOR_ADDRESS itself, but not the other two.
DISTRIBUTED_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
                   "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def _distributed_setting(name: str):
  """--name, else its environment variable (an int for the counts), else None."""
  if FLAGS[name].value is not None:
    return FLAGS[name].value
  variable = DISTRIBUTED_ENV[name]
  value = os.environ.get(variable, "").strip()
  if not value or name == "coordinator_address":
    return value or None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"{variable}={value!r} must be a whole number (or pass --{name})") from None


HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"
# XLA:CPU aborts the process when one device's thread reaches a collective 40 s after another
# (its default); on an overloaded host a starved thread can lag that much (seen at load 16 on 2
# cores: a training run killed at step 8,000 of 9,360). The devices of one CPU host cannot
# deadlock each other, so they are given as long as a slow machine may need.
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"
COLLECTIVE_TIMEOUT_SECONDS = 1800


def host_device_count(requested: int, cores: int, batch_sizes) -> int:
  """`requested`, or for 0 the most devices <= `cores` that divide every batch size."""
  if requested:
    return requested
  return max(d for d in range(1, cores + 1) if all(b % d == 0 for b in batch_sizes))


def split_cpu_into_devices(batch_sizes, requested: int = 0) -> None:
  """On a CPU, makes one XLA device per core (up to a divisor of every batch size).

  XLA runs the small convolutions of one CPU device on about one core; with one device per core
  the pmapped step is data-parallel over the cores (measured 2x on 2 cores for the default job).
  Only the CPU platform's device count changes, so GPU and TPU runs are unaffected; an explicit
  XLA_FLAGS setting of the device count wins. Must run before JAX initialises its backends.
  """
  flags_now = os.environ.get("XLA_FLAGS", "")
  if HOST_DEVICE_FLAG in flags_now:
    return
  devices = host_device_count(requested, len(os.sched_getaffinity(0)), batch_sizes)
  if devices > 1:
    added = f"{HOST_DEVICE_FLAG}={devices}"
    if COLLECTIVE_TIMEOUT_FLAG not in flags_now:
      added += f" {COLLECTIVE_TIMEOUT_FLAG}={COLLECTIVE_TIMEOUT_SECONDS}"
    os.environ["XLA_FLAGS"] = f"{flags_now} {added}".strip()


def start_runtime_of_run(workdir: str):
  """The saved config of the training run in `workdir`, with the runtime started as that run's.

  For the programs that use a run (evaluate, search, export_encoder): as many CPU devices as the
  run trained on (its checkpoints hold one bank shard per device), then `jax.distributed` for a
  multi-process run. Must come before anything initialises JAX's backends.
  """
  from instdisc_jax import config_io  # pylint: disable=g-import-not-at-top
  run_config = config_io.load_config(workdir)
  split_cpu_into_devices((run_config.batch_size, run_config.eval_batch_size),
                         flags.FLAGS.host_devices)
  initialize_runtime()
  return run_config


def initialize_runtime() -> None:
  """Starts `jax.distributed` for multi-process runs; single-process runs need nothing.

  The processes find each other through --coordinator_address, --num_processes and
  --process_id, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; on a
  multi-host TPU VM slice JAX detects what is not given.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from instdisc_jax import parallel  # pylint: disable=g-import-not-at-top
  settings = {name: _distributed_setting(name) for name in DISTRIBUTED_ENV}
  if None not in settings.values() or _on_multihost_tpu():
    jax.distributed.initialize(**settings)
    parallel.join_collectives()
    peers.start()
  elif any(value is not None for value in settings.values()):
    missing = [f"--{name} (or {DISTRIBUTED_ENV[name]})" for name, value in settings.items()
               if value is None]
    raise UserError(f"a multi-process run also needs {' and '.join(missing)}")
  if jax.process_count() > 1:     # (one process: the trainer's first line names the devices)
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
      choice = results.get("knn_choice", {}).get(name.removeprefix("knn_"))
      if choice:          # (k, tau) chosen on the validation set; the line below is the test's.
        print(f"validation weighted kNN ({title}): k={choice['k']}, tau={choice['temperature']:g} "
              f"chosen, top-1 {choice['top1']:.2f}%  top-5 {choice['top5']:.2f}%", flush=True)
      where = "test" if choice else "final"
      print(f"{where} weighted kNN ({title}): top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%",
            flush=True)
