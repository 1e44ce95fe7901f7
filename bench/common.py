"""Shared helpers for benchmark scripts: machine description and result files.

Every result file holds the numbers, the exact command that produced them, the commit of the code that ran
(and whether the checkout was dirty), the machine with its load, and the date.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def machine() -> dict:
    """The CPU model, cores, load average, torch, Python (and GPU): `pipeline.provenance.machine`."""
    from pipeline.provenance import machine as describe
    return describe()


def save(name: str, numbers: dict, out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    from pipeline.provenance import code_version
    rec = {"name": name, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
           "code": code_version(), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "results": numbers}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(numbers, indent=1))
    return path


def timed(fn, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls (best-of filters out noise from the shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best
