"""What made an artifact: the code's commit, the configuration's hash, the machine.

Every run's `config.json`/`metrics.json`, every store's attributes and every benchmark result carry these, so a
table can show that its cells were made by one version of the code, and a benchmark reuses earlier work only
when it was made by the code and configuration it would use now (bench/accuracy.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


OUTPUTS = ("bench/results",)  # what the benchmarks write into the checkout: records of the code, not code


@functools.cache
def code_version() -> dict:
    """{"commit": git commit of this checkout or None (not a git checkout, git missing), "dirty": whether a
    tracked file differs from that commit (untracked files and OUTPUTS do not count: `make bench` writes its
    records into bench/results while it runs, and they must not make the next benchmark's code look changed)}.
    Read once per process."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None
    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != ROOT:  # an installed copy inside some other repository: not ours
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){o}" for o in OUTPUTS))
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def code_label() -> str:
    """The commit as one string (a store's `versions["code"]`): '<sha>', '<sha>-dirty' or 'unknown'."""
    v = code_version()
    return "unknown" if v["commit"] is None else v["commit"] + ("-dirty" if v["dirty"] else "")


def config_hash(config: dict) -> str:
    """sha256 of a configuration as canonical JSON (sorted keys): equal configurations, equal hashes."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The CPU model, its cores, the load average over the last minute (a figure measured on a loaded machine
    says so), torch and Python, and the GPU if any."""
    import torch
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def stamp() -> dict:
    """Code, machine and date, as every artifact records them."""
    return {"code": code_version(), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
