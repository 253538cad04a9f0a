"""`StopSignal`: SIGTERM and SIGINT are recorded for the training loop, not fatal.

The end-to-end behaviour (finish the step, checkpoint, exit 75, resume) is tested with real
processes in test_resume.py.
"""

import os
import signal

import pytest

from instdisc_jax import cli
from instdisc_jax import preemption
from instdisc_jax.preemption import EXIT_PREEMPTED
from instdisc_jax.preemption import StopSignal


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_recorded_and_polled(sig):
  with StopSignal() as stop:
    assert stop.poll(step=3, at_sync_point=False) is None
    os.kill(os.getpid(), sig)
    assert stop.received == sig.name
    assert stop.poll(step=4, at_sync_point=False) == sig.name


def test_handlers_are_restored_on_exit():
  before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
  with StopSignal():
    assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
  assert {sig: signal.getsignal(sig) for sig in before} == before


def test_first_signal_wins_and_a_second_ctrl_c_interrupts():
  with StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.received == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)


def test_preempted_exits_with_its_own_status(capsys):
  with pytest.raises(SystemExit) as exit_info:
    with cli.user_errors_exit():
      raise preemption.Preempted(7, "SIGTERM")
  assert exit_info.value.code == EXIT_PREEMPTED == 75
  assert capsys.readouterr().err == (
      "stopped by SIGTERM after step 7; checkpoint written, rerun the same command to resume\n")
