"""Cost of the per-step stop-signal agreement (students.train.stop_agreed: one max all-reduce of one number and
its read-back) on CPU ranks (gloo), against the 2-rank training step it is added to.

    python bench/stop_check.py [--data DIR] [--reps 1000] [--steps 30] [--rounds 5] [--name stop_check]

Starts 2 CPU ranks with torchrun (tests/support/launch.py). The agreement: each of `--rounds` rounds times `--reps`
calls of stop_agreed itself; best and median over the rounds. The step: `--rounds` real `train-student` runs on
the same 2 ranks (test_resnet, CE, `digits` recipe at 32 px, batch 16 per rank, `--steps` optimizer steps, 0
loader workers), each step's seconds being the run's `train_seconds` less its `loader_wait_seconds` over its steps
(the loop's own time: forward, backward, optimizer, the agreement itself, bookkeeping); best and median.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, inputs, md_table, save
from stage_one import ensure_digits


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="the digits shards (made under runs/bench if absent)")
    ap.add_argument("--reps", type=int, default=1000, help="agreements timed per round")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of each training run (at most)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--name", default="stop_check")
    return ap.parse_args(argv)


def rank_main(reps: int, rounds: int) -> None:
    from types import SimpleNamespace

    from accelerate import Accelerator

    from students.train import stop_agreed
    acc = Accelerator(cpu=True)
    run = SimpleNamespace(accelerator=acc)  # all of a Run that stop_agreed reads
    check = []
    for _ in range(rounds):
        acc.wait_for_everyone()
        t0 = time.perf_counter()
        for _ in range(reps):
            stop_agreed(run, None)
        check.append((time.perf_counter() - t0) / reps)
    if acc.is_main_process:
        print(json.dumps({"seconds_per_check_best": min(check),
                          "seconds_per_check_median": sorted(check)[rounds // 2]}))
    acc.wait_for_everyone()
    acc.end_training()  # closes the process group: a rank exiting with gloo's threads alive can abort


RANKS, BATCH = 2, 16  # the ranks of every launch here; a training run's batch per rank


def ranks(*args) -> str:
    """Run `args` on RANKS CPU ranks; their stdout."""
    from tests.support.launch import launch_cmd, launch_env
    proc = subprocess.run(launch_cmd(RANKS, *args), capture_output=True, text=True, env=launch_env(), cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"the {RANKS} ranks failed (status {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def step_seconds(data: Path, steps: int, out: Path) -> tuple[float, int]:
    """Seconds per optimizer step of one real 2-rank `train-student` run's loop, its waits for views left out; and
    the images the run says it trained on."""
    ranks(ROOT / "cli.py", "train-student", "--data", data, "--student", "test_resnet", "--method", "ce", "--recipe",
          "digits", "--epochs", 1, "--max-steps-per-epoch", steps, "--batch-size", BATCH, "--workers", 0, "--out", out,
          "--quiet")
    h = json.loads((out / "metrics.json").read_text())["history"][0]
    images = round(h["images_per_second"] * h["train_seconds"])
    # the steps it made: fewer than --steps where a rank's share of the epoch is shorter
    return (h["train_seconds"] - h["loader_wait_seconds"]) / (images / (BATCH * RANKS)), images


def main(argv=None) -> dict:
    args = parse(argv)
    data = args.data or ensure_digits(ROOT / "runs" / "bench" / "digits")
    out = ranks(__file__, "--reps", args.reps, "--rounds", args.rounds)
    result = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    with tempfile.TemporaryDirectory() as tmp:
        runs = [step_seconds(data, args.steps, Path(tmp) / f"run{r}") for r in range(args.rounds)]
    step = sorted(s for s, _ in runs)
    res = {"ranks": RANKS, "backend": "gloo (CPU)", "reps": args.reps, "steps": args.steps, "rounds": args.rounds,
           **result, "seconds_per_step_best": step[0], "seconds_per_step_median": step[len(step) // 2],
           "check_over_step_best": result["seconds_per_check_best"] / step[0],
           "images_per_run": sorted({n for _, n in runs}),
           "step": "train-student's loop: test_resnet, CE, batch 16 per rank, 32 px, 0 loader workers, waits for views "
                   "left out"}
    res["inputs"] = inputs(data=data)
    save(args.name, res)
    return res


def table(record: dict) -> str:
    r = record["results"]
    rows = [["stop agreement (one max all-reduce + read-back), s", f"{r['seconds_per_check_best']:.3g} best, "
             f"{r['seconds_per_check_median']:.3g} median"],
            ["training step, s", f"{r['seconds_per_step_best']:.3g} best, {r['seconds_per_step_median']:.3g} median"],
            ["agreement / step (best of each)", r["check_over_step_best"]]]
    return (f"{r['ranks']} ranks, {r['backend']}; step: {r['step']}. No target: the cost the README's preemption "
            "section states.\n\n"
            + md_table(["what", "measured"], rows))


if __name__ == "__main__":
    if os.environ.get("RANK") is not None:
        a = parse()
        rank_main(a.reps, a.rounds)
        sys.exit(0)
    main()
