"""Two ways to run the CLI in a test, with one signature and one result type (CompletedProcess).

run_cli          the typer app in this process: no interpreter start, no second import of torch, timm
                 and accelerate (4-5 s each on the CI machines). Use it unless the process itself matters.
run_cli_process  the real `python cli.py` in a subprocess: for what only a process shows (its exit
                 status and stderr as a shell sees them, environment read at import time, kills).

run_cli behaves like the process as far as a test can see:
  * stdout and stderr are captured at the file descriptors, so output of C code and of forked
    data-loader workers is caught too, as a subprocess's pipes would catch it;
  * the exit status is the program's: a UserError is status 2 with `error: <sentence>` on stderr (as
    cli.main() prints it), click usage errors their own status (2), typer.Exit its code, success 0;
  * any other exception propagates into the test, so a traceback fails it as a non-zero status would;
  * what one call changes in this process is put back before the next test: the environment (`env=` is
    set for the call only), the working directory, sys.argv, the random generators of Python, NumPy and
    torch, torch's thread count, warning filters, sys.excepthook (typer sets it), and accelerate's
    singletons (AcceleratorState, PartialState, GradientState), which are also cleared before the call.
"""

from __future__ import annotations

import functools
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = "200"  # rich and click wrap at the terminal width: one wide line per message, as before

# variables that libraries read once, when they are imported: setting them for one call in this process
# would silently do nothing, so a test that needs them runs the real process (run_cli_process)
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "ACCELERATE_", "OMP_", "MKL_", "CUDA_", "TORCH_",
                   "PYTORCH_", "TIMM_", "PYTHON")


def run_cli_process(*args, check=False, timeout=600, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess: `python cli.py ARGS`."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": COLUMNS, **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"cli {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@functools.cache
def _command():
    """The click command typer builds from cli.app (what `cli.app(argv)` builds anew on every call, once per
    process when it runs as `python cli.py`): built once here, which saves each call the build."""
    import typer

    import cli
    return typer.main.get_command(cli.app)


def run_cli(*args, check=False, timeout=600, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    """The CLI in this process (see the module docstring): the typer app as `python cli.py ARGS` runs it."""
    from pipeline.errors import UserError
    argv = [str(a) for a in args]
    late = sorted(k for k in (env or {}) if k.startswith(IMPORT_TIME_ENV))
    if late:
        raise ValueError(f"{late} are read when libraries are imported; use run_cli_process for this call")
    returncode = 0
    with _restored_process_state(), _captured() as out, _deadline(timeout, argv):
        os.environ.update({"COLUMNS": COLUMNS, **{k: str(v) for k, v in (env or {}).items()}})
        os.chdir(cwd)
        sys.argv = [str(ROOT / "cli.py"), *argv]
        try:
            _command()(argv, prog_name="cli.py")  # standalone: click ends every run with sys.exit, as in a process
        except SystemExit as e:
            returncode = _exit_status(e.code)
        except UserError as e:  # what cli.main() does with it (test_cli checks the two agree)
            print(f"error: {e}", file=sys.stderr)
            returncode = 2
    proc = subprocess.CompletedProcess(["cli.py", *argv], returncode, out["stdout"], out["stderr"])
    if check and proc.returncode != 0:
        raise AssertionError(f"cli {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _exit_status(code) -> int:
    """What the interpreter makes of sys.exit(code): None is 0, an int itself, anything else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def reset_accelerate() -> None:
    """Forget accelerate's process-wide singletons: the next Accelerator() starts from the environment."""
    if "accelerate" not in sys.modules:
        return
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@contextmanager
def _restored_process_state():
    import numpy as np
    import torch
    saved_env, saved_cwd, saved_argv, saved_hook = dict(os.environ), os.getcwd(), sys.argv, sys.excepthook
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    threads = torch.get_num_threads()
    reset_accelerate()
    try:
        with warnings.catch_warnings():
            yield
    finally:
        reset_accelerate()
        torch.set_num_threads(threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        sys.argv, sys.excepthook = saved_argv, saved_hook
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


@contextmanager
def _captured():
    """Point file descriptors 1 and 2 (and sys.stdout/sys.stderr on top of them) at temporary files;
    on exit put everything back and fill the yielded dict with what was written, decoded."""
    result = {}
    sys.stdout.flush()
    sys.stderr.flush()
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    saved_fds = [os.dup(1), os.dup(2)]
    saved_streams = sys.stdout, sys.stderr
    try:
        for fd, f in zip((1, 2), files, strict=True):
            os.dup2(f.fileno(), fd)
        # line-buffered text streams on the redirected descriptors, as an interpreter's own would be
        sys.stdout, sys.stderr = (open(fd, "w", encoding="utf-8", errors="backslashreplace", buffering=1,
                                       closefd=False) for fd in (1, 2))
        yield result
    except BaseException:
        result["failed"] = True
        raise
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except ValueError:  # closed by the code under test
                pass
        sys.stdout, sys.stderr = saved_streams
        for fd, saved in zip((1, 2), saved_fds, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        for name, f in zip(("stdout", "stderr"), files, strict=True):
            f.seek(0)
            result[name] = io.TextIOWrapper(f, encoding="utf-8", errors="replace").read()
            f.close()
        if result.pop("failed", False):  # the exception fails the test: show what the call printed before it
            sys.stdout.write(result["stdout"])
            sys.stderr.write(result["stderr"])


@contextmanager
def _deadline(seconds, argv):
    """Fail the call (TimeoutError) after `seconds`, as subprocess.run(timeout=) would (main thread only)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"cli {argv} ran longer than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def set_up_one(cfg):
    """A train-student configuration set up as `students.train.train` sets up its runs, without training:
    (stream, run) for tests that look inside a run or step it by hand (students.train.train_epoch)."""
    from students.run import accelerator_for, set_up_run
    from students.stream import open_stream
    stream_cfg, run_cfg = cfg.split()
    accelerator = accelerator_for(run_cfg, stream_cfg)
    stream = open_stream(stream_cfg, accelerator.process_index, accelerator.num_processes)
    return stream, set_up_run(run_cfg, stream, accelerator)
