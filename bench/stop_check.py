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


def rank_main(reps: int = 2000) -> None:
    import torch
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    flag = torch.zeros(1)
    times = []
    for _ in range(5):  # rounds: best of, the machine is shared
        acc.wait_for_everyone()
        t0 = time.perf_counter()
        for _ in range(reps):
            bool(acc.reduce(flag, reduction="max").item())
        times.append((time.perf_counter() - t0) / reps)
    if acc.is_main_process:
        print(json.dumps({"seconds_per_check_best": min(times), "seconds_per_check_median": sorted(times)[2]}))


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
