"""Shared helpers for benchmark scripts: machine description, result files and their markdown.

Every result file holds the numbers, the exact command that produced them, the commit of the code that ran
(and whether the checkout was dirty), the machine with its load, and the date. Results go to bench/results/,
or to the folder named by $OFAKD_BENCH_RESULTS (the tests' smoke runs write to a temporary one, so that they
never overwrite committed results). Every script that saves records also defines `table(record) -> str`, the
markdown of one of its records, which bench/report.py gathers into bench/results/README.md.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RESULTS_ENV = "OFAKD_BENCH_RESULTS"
sys.path.insert(0, str(ROOT))


def results_dir() -> Path:
    """Where results are written: $OFAKD_BENCH_RESULTS when set, else bench/results."""
    return Path(os.environ.get(RESULTS_ENV) or RESULTS)


def machine() -> dict:
    """The CPU model, cores, load average, torch, Python (and GPU): `pipeline.provenance.machine`."""
    from pipeline.provenance import machine as describe
    return describe()


def command() -> str:
    """This process's command line as a user in the repository root would type it (the script's path relative
    to the root when it lies inside)."""
    argv = list(sys.argv)
    script = Path(argv[0]).resolve()
    if script.is_relative_to(ROOT):
        argv[0] = script.relative_to(ROOT).as_posix()
    return "python " + " ".join(shlex.quote(a) for a in argv)


def _code_now() -> dict:
    """The checkout's commit and state, read now; a script that is not committed makes the record dirty."""
    from pipeline.provenance import code_version
    code = dict(code_version.__wrapped__())
    script = Path(sys.argv[0]).resolve()
    if code["commit"] and script.is_relative_to(ROOT / "bench") and script.suffix == ".py":
        import subprocess
        tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--error-unmatch", str(script)],
                                 capture_output=True).returncode == 0
        code["dirty"] = code["dirty"] or not tracked
    return code


CODE_AT_START = _code_now()  # a benchmark records the code it started with, and refuses to save under another


def save(name: str, numbers: dict, out_dir: Path | None = None) -> Path:
    """Write `<out_dir or results_dir()>/<name>.json`: the numbers with the command, code, machine and date.
    Refused when the checkout changed while the benchmark ran: its figures would be recorded under a commit that
    did not make them (or made only part of them, through the subprocesses started after the change)."""
    now = _code_now()
    if now != CODE_AT_START:
        raise SystemExit(f"the checkout changed while this benchmark ran (from {CODE_AT_START} to {now}): its "
                         f"figures are not saved as {name}.json; run it again on one commit")
    out_dir = out_dir or results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = {"name": name, "command": command(), "code": CODE_AT_START, "machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": numbers}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(numbers, indent=1))
    return path


def inputs(**paths) -> dict:
    """What a record's figures were computed from, beyond the code: per named file (a checkpoint, a dataset's
    folder) its sha256 (a dataset: of its dataset.json, which holds every shard's checksum) and, for a checkpoint
    a run made, that run's provenance (commit, configuration hash); a file replaced later no longer matches."""
    from pipeline.manifest import sha256_file
    out = {}
    for key, path in paths.items():
        if path is None:
            continue
        path = Path(path)
        file = path / "dataset.json" if path.is_dir() else path
        entry = {"path": str(path), "sha256": sha256_file(file)}
        metrics = path.parent / "metrics.json"
        if path.is_file() and metrics.exists():
            p = json.loads(metrics.read_text()).get("provenance") or {}
            entry |= {"made_by": p.get("code"), "config_hash": p.get("config_hash")}
        out[key] = entry
    return out


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


def fmt(x, digits: int = 3) -> str:
    """A table cell: floats to `digits` significant figures, but `digits` decimals from 0.1 to 10 (ratios against
    their targets) and whole from 1,000 up (thousands separated); None as '-'."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if 0.1 <= abs(x) < 10:
            return f"{x:.{digits}f}"
        return f"{x:.{digits}g}"
    if isinstance(x, int) and abs(x) >= 1000:
        return f"{x:,}"
    return str(x)


def md_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; cells that are not strings go through `fmt`."""
    cell = [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in cell]
    return "\n".join(lines)
