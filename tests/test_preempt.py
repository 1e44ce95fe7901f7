"""pipeline/preempt.py: the stop flag, repeats, and what a second signal does (a real process for the kill)."""

import os
import signal
import subprocess
import sys
import textwrap

from conftest import ROOT
from pipeline.preempt import EXIT_PREEMPTED, StopSignals, active, ignore_stop_signals


def test_the_first_signal_sets_the_flag_and_a_quick_repeat_is_the_same_stop():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # within REPEAT_WINDOW_S: ignored, the process lives on
        assert stop.requested and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers put back


def test_a_later_second_signal_stops_the_process_as_without_a_handler():
    script = textwrap.dedent("""
        import os, signal, time
        from pipeline.preempt import active
        with active() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2.5)  # longer than REPEAT_WINDOW_S
            assert stop.requested
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        raise SystemExit(3)  # not reached: the second SIGTERM kills
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == -signal.SIGTERM


def test_loader_workers_ignore_stop_signals_and_the_status_is_ex_tempfail():
    assert EXIT_PREEMPTED == 75
    with active():
        pid = os.fork()
        if pid == 0:  # a stand-in for a DataLoader worker: torch's handler dies on SIGTERM, then worker_init_fn
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            ignore_stop_signals(0)
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
