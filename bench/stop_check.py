"""Cost of the per-step stop-signal agreement (students.train.stop_agreed: one max all-reduce of one number and
its read-back) on CPU ranks (gloo), against the 2-rank training step it is added to.

    python bench/stop_check.py [--reps 1000] [--steps 10] [--rounds 5] [--name stop_check]

Starts 2 CPU ranks with torchrun (tests/support/launch.py); each round times `--reps` agreements and `--steps`
DDP steps of test_resnet (batch 16 per rank, 32 px); best and median over the interleaved rounds.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from common import ROOT, md_table, save


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=1000, help="agreements timed per round")
    ap.add_argument("--steps", type=int, default=10, help="training steps timed per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--name", default="stop_check")
    return ap.parse_args(argv)


def rank_main(reps: int, steps: int, rounds: int) -> None:
    from types import SimpleNamespace

    import timm
    import torch
    from accelerate import Accelerator

    from students.train import stop_agreed
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model, opt = acc.prepare(model, opt)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))  # the tests' student, batch 16, 32 px
    run = SimpleNamespace(accelerator=acc)  # all of a Run that stop_agreed reads
    check, step = [], []
    for _ in range(rounds):  # interleaved rounds, best of: the machine is shared
        acc.wait_for_everyone()
        t0 = time.perf_counter()
        for _ in range(reps):
            stop_agreed(run, None)
        check.append((time.perf_counter() - t0) / reps)
        acc.wait_for_everyone()
        t0 = time.perf_counter()
        for _ in range(steps):
            acc.backward(torch.nn.functional.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
        step.append((time.perf_counter() - t0) / steps)
    if acc.is_main_process:
        print(json.dumps({"seconds_per_check_best": min(check), "seconds_per_check_median": sorted(check)[rounds // 2],
                          "seconds_per_step_best": min(step), "seconds_per_step_median": sorted(step)[rounds // 2],
                          "check_over_step_best": min(check) / min(step),
                          "step": "test_resnet, batch 16 per rank, 32 px, DDP forward + backward + SGD step"}))
    acc.wait_for_everyone()
    acc.end_training()  # closes the process group: a rank exiting with gloo's threads alive can abort


def main(argv=None) -> dict:
    args = parse(argv)
    from tests.support.launch import launch_cmd, launch_env
    cmd = launch_cmd(2, __file__, "--reps", args.reps, "--steps", args.steps, "--rounds", args.rounds)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"the 2 ranks failed (status {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    res = {"ranks": 2, "backend": "gloo (CPU)", "reps": args.reps, "steps": args.steps, "rounds": args.rounds,
           **result}
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
        rank_main(a.reps, a.steps, a.rounds)
        sys.exit(0)
    main()
