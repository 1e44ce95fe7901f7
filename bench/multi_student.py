"""N students from one view stream (`train-student --runs`) against the same N students run one after another.

    python bench/multi_student.py [--data DIR] [--recipe imagenet-vit] [--view-size 160] [--input-size 32]
                                  [--steps 6] [--batch-size 32] [--workers 0] [--rounds 3] [--threads 1]
                                  [--students 4]

Every run is the real command in its own process (`python cli.py train-student ...`, CE, one epoch of --steps
optimizer steps and its evaluation), so process start-up is in the wall time of each, as a user pays it. The
setting is one where the loader matters: small timm `test_*` students at --input-size, views made at
--view-size by a heavy recipe (RandAugment, random erasing), so decoding + augmenting a batch costs about as much
as a student step; the loader's share of a step is measured, not assumed: `loader_wait_seconds /
train_seconds` of the separate runs (with --workers 0 the loader runs in the step's process, so its time adds to
the step's). The group and the separate runs alternate, round by round, in their order too (the machine is
shared). Besides wall time it records the CPU seconds (user + system) of the processes, which other jobs
on a shared machine disturb far less than wall time (one thread per process by default, so on an idle
machine the two agree), and the training loop's own seconds (`train_seconds`: no start-up, no evaluation).
Target: 4 students from one stream take <= 0.75x the wall time of 4 separate runs where the loader
is at least a third of a step. Bound: with loader time L and step time S per batch and start-up + eval
E per process, one stream costs E' + L + N S against N (E + L + S): the saving is the N - 1 loaders (and
start-ups, and val decodes); it cannot beat (L + N S) / (N (L + S)).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, inputs, md_table, save
from stage_one import ensure_digits

STUDENTS = [("test_resnet", {}), ("test_convnext", {}), ("test_efficientnet", {}),
            ("test_vit", {"img_size": "INPUT", "patch_size": 4})]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--recipe", default="imagenet-vit")
    p.add_argument("--view-size", type=int, default=160)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--students", type=int, default=len(STUDENTS), choices=range(2, len(STUDENTS) + 1),
                   help=f"how many of the students {[s for s, _ in STUDENTS]} (the first N)")
    p.add_argument("--name", default="multi_student")
    return p.parse_args(argv)


class Cli:
    """`python cli.py train-student` with the benchmark's common options; counts the CPU seconds it spends."""

    def __init__(self, a: argparse.Namespace, data: Path):
        self.common = ["train-student", "--data", data, "--method", "ce", "--recipe", a.recipe, "--view-size",
                       a.view_size, "--epochs", 1, "--max-steps-per-epoch", a.steps, "--batch-size", a.batch_size,
                       "--workers", a.workers, "--quiet"]
        # one thread per process: its CPU time then tracks its wall time on an idle machine
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.threads)}
        self.spent = 0.0

    def __call__(self, out: Path, *args) -> float:
        """Wall seconds of one command; its CPU seconds (user + system) are added to self.spent."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        cmd = [sys.executable, str(ROOT / "cli.py"), *map(str, self.common), "--out", str(out), *map(str, args)]
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd[1:])} failed (status {proc.returncode}):\n{proc.stderr[-3000:]}")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.spent += after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return time.perf_counter() - t0


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["history"][0]


def group(cli: Cli, runs: list[dict], runs_file: Path, out: Path) -> dict:
    """All students from one stream (`--runs`)."""
    cli.spent = 0.0
    wall = cli(out, "--student", runs[0]["student"], "--runs", runs_file)
    m = metrics(out / runs[0]["out"])  # the stream's times: the same in every run
    return {"group_wall": wall, "group_cpu": cli.spent, "group_train_seconds": m["train_seconds"],
            "group_loader_wait": m["loader_wait_seconds"]}


def separate(cli: Cli, runs: list[dict], out: Path) -> dict:
    """The same students one after another, each its own process and stream."""
    walls, train, wait = [], [], []
    cli.spent = 0.0
    for run in runs:
        kw = [x for k, v in run["model_kwargs"].items() for x in ("--model-kwargs", f"{k}={v}")]
        walls.append(cli(out / run["out"], "--student", run["student"], "--input-size", run["input_size"], *kw))
        m = metrics(out / run["out"])
        train.append(m["train_seconds"])
        wait.append(m["loader_wait_seconds"])
    return {"separate_walls": walls, "separate_wall": sum(walls), "separate_cpu": cli.spent,
            "separate_train_seconds": sum(train), "separate_loader_wait": sum(wait),
            "separate_loader_share": [w / t for w, t in zip(wait, train, strict=True)]}


def one_round(cli: Cli, runs: list[dict], tmp: Path, r: int) -> dict:
    """Round r: the group and the separate runs, in alternating order (the machine is shared)."""
    rec = {"load_before": os.getloadavg()[0]}
    steps = [lambda: group(cli, runs, tmp / "runs.yaml", tmp / f"g{r}"), lambda: separate(cli, runs, tmp / f"s{r}")]
    for step in steps if r % 2 == 0 else steps[::-1]:
        rec |= step()
    rec["wall_ratio"] = rec["group_wall"] / rec["separate_wall"]
    rec["cpu_ratio"] = rec["group_cpu"] / rec["separate_cpu"]
    rec["train_ratio"] = rec["group_train_seconds"] / rec["separate_train_seconds"]
    # the loops split into waiting for views (L) and the rest (the steps, S): the bound assumes the group's steps
    # cost what the separate runs' did and its loader what one of theirs did; these say where that fails
    n, sep_l, sep_t = len(runs), rec["separate_loader_wait"], rec["separate_train_seconds"]
    rec["bound_loop_ratio"] = (sep_l / n + sep_t - sep_l) / sep_t
    rec["step_ratio"] = (rec["group_train_seconds"] - rec["group_loader_wait"]) / (sep_t - sep_l)
    rec["loader_ratio"] = rec["group_loader_wait"] / (sep_l / n)
    rec["load_after"] = os.getloadavg()[0]
    print(json.dumps(rec), flush=True)
    return rec


def main(argv=None) -> dict:
    a = parse(argv)
    data = a.data or ensure_digits(ROOT / "runs" / "bench" / "digits")
    runs = [{"out": name, "student": name, "input_size": a.input_size,
             "model_kwargs": {k: a.input_size if v == "INPUT" else v for k, v in kw.items()}}
            for name, kw in STUDENTS[:a.students]]
    cli = Cli(a, data)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "runs.yaml").write_text(json.dumps(runs))
        rounds = [one_round(cli, runs, tmp, r) for r in range(a.rounds)]
    share = statistics.mean(s for rec in rounds for s in rec["separate_loader_share"])
    wall = statistics.median(rec["wall_ratio"] for rec in rounds)
    n = len(runs)
    numbers = {
        "setting": {"students": [x["student"] for x in runs], "method": "ce", "recipe": a.recipe,
                    "view_size": a.view_size, "input_size": a.input_size, "steps": a.steps,
                    "batch_size": a.batch_size, "workers": a.workers, "data": str(data),
                    "threads_per_process": a.threads},
        "rounds": rounds,
        "loader_share_of_step": share,
        "wall_ratio_median": wall,
        "cpu_ratio_median": statistics.median(rec["cpu_ratio"] for rec in rounds),
        "train_loop_ratio_median": statistics.median(rec["train_ratio"] for rec in rounds),
        "bound_loop_ratio": (share + n * (1 - share)) / n,  # (L + N S) / (N (L + S)) with L = share, S = 1 - share
        # the same bound from each round's summed times (the mean of shares above weighs a fast run like a slow one)
        "bound_loop_ratio_median": statistics.median(rec["bound_loop_ratio"] for rec in rounds),
        # the group's steps / the separate runs' steps, and its loader wait / one separate run's (1: as assumed)
        "step_ratio_median": statistics.median(rec["step_ratio"] for rec in rounds),
        "loader_ratio_median": statistics.median(rec["loader_ratio"] for rec in rounds),
        "target": "wall_ratio <= 0.75 where the loader is >= 1/3 of a step",
        "target_met": bool(wall <= 0.75 and share >= 1 / 3),
    }
    numbers["inputs"] = inputs(data=data)
    save(a.name, numbers)
    return numbers


def table(record: dict) -> str:
    r = record["results"]
    st = r["setting"]
    rows = [["loader share of a step (separate runs)", r["loader_share_of_step"], ">= 1/3"],
            ["wall: one stream / separate runs (median of rounds)", r["wall_ratio_median"], "<= 0.75"],
            ["CPU seconds: one stream / separate runs", r["cpu_ratio_median"], ""],
            ["training loops: one stream / separate runs", r["train_loop_ratio_median"],
             f"bound {r['bound_loop_ratio']:.3g}"],
            *([["bound from each round's summed times (median)", r["bound_loop_ratio_median"], ""],
               ["one stream's steps / separate runs' steps (median)", r["step_ratio_median"], "1 in the bound"],
               ["one stream's loader wait / one separate run's (median)", r["loader_ratio_median"], "1 in the bound"]]
              if "step_ratio_median" in r else []),
            ["target met", r["target_met"], ""]]
    return (f"{len(st['students'])} CE students ({', '.join(st['students'])}) at {st['input_size']} px, views at "
            f"{st['view_size']} px (`{st['recipe']}`), {st['steps']} steps of {st['batch_size']}, {st['workers']} "
            f"loader workers, {st['threads_per_process']} thread a process, {len(r['rounds'])} rounds; load average "
            f"{min(x['load_before'] for x in r['rounds']):.1f} to {max(x['load_after'] for x in r['rounds']):.1f} "
            "during the rounds.\n\n" + md_table(["what", "measured", "target"], rows))


if __name__ == "__main__":
    main()
