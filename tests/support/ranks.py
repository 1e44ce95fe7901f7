"""Run real ranks and compare what they leave: the helpers of tests/test_distributed.py (torchrun on CPU, see
tests/support/launch.py; tests/support/probe_cli.py records what each rank's accelerate saw)."""

import hashlib
import json
import os
import signal
import subprocess
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import load_file

from tests.support.launch import free_port, launch_cmd, launch_env, node_cmd
from tests.support.runner import ROOT

PROBE = ROOT / "tests" / "support" / "probe_cli.py"


def run_ranks(n: int, probe: "os.PathLike", *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(launch_cmd(n, PROBE, *args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=launch_env({"PROBE_DIR": str(probe), **(env or {})}))


def start_ranks(n: int, probe, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen(launch_cmd(n, PROBE, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, start_new_session=True,
                            env=launch_env({"PROBE_DIR": str(probe), **(env or {})}))


def ranks_seen(probe) -> list[dict]:
    """What each rank's accelerate reported (one record per rank that exited normally)."""
    return [json.loads(p.read_text()) for p in sorted(probe.glob("rank-*.json"))]


def assert_two_ranks(probe) -> list[dict]:
    seen = ranks_seen(probe)
    assert [(r["rank"], r["world"], r["distributed_type"]) for r in seen] == \
        [(0, 2, "DistributedType.MULTI_CPU"), (1, 2, "DistributedType.MULTI_CPU")], seen
    assert seen[0]["pid"] != seen[1]["pid"]
    return seen


def rank_pid(launcher: subprocess.Popen, rank: int, timeout=120) -> int:
    """The pid of one rank among the launcher's children (read from the child's RANK variable)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        kids = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        for pid in map(int, kids):
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never started")


def kill_rank(launcher: subprocess.Popen, rank: int) -> int:
    """SIGKILL one rank; torchrun then tears the other down. Returns the launcher's exit status."""
    os.kill(rank_pid(launcher, rank), signal.SIGKILL)
    try:
        return launcher.wait(timeout=120)
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)  # nothing of this job may outlive the test
        except ProcessLookupError:
            pass


def wait_for(cond, proc: subprocess.Popen, timeout=300) -> None:
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read()[-3000:]}"
        assert time.time() - t0 < timeout, "kill point never reached"
        time.sleep(0.05)


def same_value(a, b, where: str) -> None:
    """Nested containers of tensors, arrays and plain values equal exactly (tensors: torch.equal)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same_value(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_value(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def assert_same_state(a, b) -> None:
    """The last saved training state of two run directories is the same, file by file: weights, EMA (the custom
    checkpoint), optimizer buffers and learning rates (timm's schedule is a function of the step, so the
    optimizer's param groups hold its state), and every random generator of every rank."""
    (sa,), (sb,) = (list((d / "state").iterdir()) for d in (a, b))
    files = sorted(p.name for p in sa.iterdir())
    assert files == sorted(p.name for p in sb.iterdir()) and {"optimizer.bin", "custom_checkpoint_0.pkl",
                                                               "random_states_0.pkl"} <= set(files), files
    for name in files:
        if name.endswith(".safetensors"):
            va, vb = load_file(sa / name), load_file(sb / name)
        else:
            va, vb = (torch.load(d / name, weights_only=False) for d in (sa, sb))
        same_value(va, vb, name)


def files_of(d) -> dict:
    """Every file under d -> its bytes' sha256."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def assert_same_run(a, b) -> None:
    """Same exported weights and EMA weights (torch.equal) and the same metrics, bar the timings."""
    for name in ("model.safetensors", "model_ema.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    ha, hb = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b))
    timings = ("train_seconds", "images_per_second", "loader_wait_seconds")
    untimed = [[{k: v for k, v in h.items() if k not in timings} for h in x] for x in (ha, hb)]
    assert untimed[0] == untimed[1] and {"train/ofa/stage1", "ema_top1"} <= set(untimed[0][1])


def run_nodes(workdirs: list, *args, timeout=600) -> list[subprocess.CompletedProcess]:
    """The README's many-machines path on this host: one torchrun "machine" per workdir (--nnodes 2,
    --node_rank r, one CPU rank each), each started in its own working directory with its own probe
    directory and temporary folder (node-local paths); what they share is what the arguments name."""
    port = free_port()
    procs = []
    for r, wd in enumerate(workdirs):
        wd.mkdir(parents=True, exist_ok=True)
        if not (wd / "tmp").exists():  # a short path: loader workers make Unix sockets there (at most 107 bytes)
            (wd / "tmp").symlink_to(tempfile.mkdtemp(prefix="ofakd-node-"))
        env = launch_env({"PROBE_DIR": str(wd / "probe"), "TMPDIR": str((wd / "tmp").resolve())})
        procs.append(subprocess.Popen(node_cmd(len(workdirs), r, port, PROBE, *args), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=wd, env=env))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def assert_two_nodes(workdirs) -> list[dict]:
    """Each simulated machine ran one rank of a world of 2: node r holds global rank r, local rank 0."""
    seen = [ranks_seen(wd / "probe") for wd in workdirs]
    assert [[(r["rank"], r["world"], r["node_rank"], r["local_rank"], r["distributed_type"]) for r in s]
            for s in seen] == [[(0, 2, 0, 0, "DistributedType.MULTI_CPU")], [(1, 2, 1, 0, "DistributedType.MULTI_CPU")]]
    return [s[0] for s in seen]
