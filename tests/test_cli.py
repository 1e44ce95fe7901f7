"""cli.py as a program: the real `python cli.py` (help, exit status 2 and one sentence for a problem the
user can fix, click's usage errors), and the in-process runner every other test uses gives exactly what
the program gives, and puts the process back as it found it."""

import os

import pytest

from conftest import run_cli, run_cli_process
from pipeline.errors import UserError

COMMANDS = ("shards", "cache-teacher", "inspect-cache", "verify-cache", "train-student", "demo", "cka")


@pytest.mark.slow
def test_the_program_and_the_in_process_runner_agree(tmp_path):
    help_args = ("--help",)
    refused = ("shards", tmp_path / "nope", tmp_path / "out")  # a UserError
    unknown = ("shards", "digits", tmp_path / "out", "--no-such-flag")  # a click usage error
    real = {args: run_cli_process(*args) for args in (help_args, refused, unknown)}

    assert real[help_args].returncode == 0 and all(c in real[help_args].stdout for c in COMMANDS)
    p = real[refused]
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and "nope" in lines[0] and "does not exist" in lines[0]
    assert real[unknown].returncode == 2 and "--no-such-flag" in real[unknown].stderr
    assert "Traceback" not in p.stderr + real[unknown].stderr
    assert not (tmp_path / "out").exists()

    for args, proc in real.items():
        inproc = run_cli(*args)
        assert (inproc.returncode, inproc.stdout, inproc.stderr) == (proc.returncode, proc.stdout, proc.stderr), args


def _fake_shards(monkeypatch, raise_: BaseException | None, seen: dict):
    """Replace the library function behind `cli.py shards` with one that records what it ran in."""
    import pipeline.shards

    def make_shards(src, out, **kw):
        from accelerate.state import PartialState
        PartialState()  # a process-wide singleton, as every Accelerator() makes
        seen.update(var=os.environ.get("OFAKD_RUNNER_TEST"), cwd=os.getcwd())
        print("to stdout")
        os.write(2, b"to file descriptor 2\n")  # as C code or a forked worker would write
        if raise_ is not None:
            raise raise_
        return None

    monkeypatch.setattr(pipeline.shards, "make_shards", make_shards)


def test_in_process_runner_isolates_and_reports_like_a_process(monkeypatch, tmp_path):
    from accelerate.state import PartialState
    seen = {}
    _fake_shards(monkeypatch, UserError("the source is made up"), seen)
    cwd, env = os.getcwd(), dict(os.environ)
    p = run_cli("shards", "src", tmp_path / "out", env={"OFAKD_RUNNER_TEST": "yes"}, cwd=tmp_path)
    assert seen == {"var": "yes", "cwd": str(tmp_path)}  # the call saw its environment and directory...
    assert os.getcwd() == cwd and dict(os.environ) == env  # ...and the test gets its own back
    assert not PartialState._shared_state  # accelerate's singletons are forgotten
    assert p.returncode == 2 and p.stdout == "to stdout\n"
    assert p.stderr == "to file descriptor 2\nerror: the source is made up\n"

    # a bug is not an exit status: it propagates and fails the test, as a traceback would
    _fake_shards(monkeypatch, RuntimeError("a bug"), seen)
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli("shards", "src", tmp_path / "out")
    assert os.getcwd() == cwd and dict(os.environ) == env

    with pytest.raises(ValueError, match="run_cli_process"):  # read at import time: a process is needed
        run_cli("--help", env={"HF_HUB_OFFLINE": "1"})
