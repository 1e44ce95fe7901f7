"""Cost of the per-step stop-signal agreement (students.train.stop_agreed: one max all-reduce of one number and
its read-back) on CPU ranks (gloo), against the 2-rank training step it is added to.

    python bench/stop_check.py            (starts 2 CPU ranks with torchrun; writes bench/results/stop_check.json)
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rank_main(reps: int = 1000, steps: int = 10) -> None:
    import timm
    import torch
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model, opt = acc.prepare(model, opt)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))  # the tests' student, batch 16, 32 px
    flag = torch.zeros(1)
    check, step = [], []
    for _ in range(5):  # interleaved rounds, best of: the machine is shared
        acc.wait_for_everyone()
        t0 = time.perf_counter()
        for _ in range(reps):
            bool(acc.reduce(flag, reduction="max").item())
        check.append((time.perf_counter() - t0) / reps)
        acc.wait_for_everyone()
        t0 = time.perf_counter()
        for _ in range(steps):
            acc.backward(torch.nn.functional.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
        step.append((time.perf_counter() - t0) / steps)
    if acc.is_main_process:
        print(json.dumps({"seconds_per_check_best": min(check), "seconds_per_check_median": sorted(check)[2],
                          "seconds_per_step_best": min(step), "seconds_per_step_median": sorted(step)[2],
                          "check_over_step_best": min(check) / min(step),
                          "step": "test_resnet, batch 16 per rank, 32 px, DDP forward + backward + SGD step"}))


if __name__ == "__main__":
    if os.environ.get("RANK") is not None:
        rank_main()
        sys.exit(0)
    sys.path.insert(0, str(ROOT))
    from tests.support.launch import launch_cmd, launch_env
    cmd = launch_cmd(2, __file__)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), cwd=ROOT, check=True)
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    out = {"command": "python bench/stop_check.py", "ranks": 2, "backend": "gloo (CPU)",
           "cpu": "2-core Intel Xeon, shared with other jobs (machine loaded: other helpers' tests running)",
           **result}
    (ROOT / "bench" / "results" / "stop_check.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
