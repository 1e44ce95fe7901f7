"""Start N real CPU ranks of a script: the one launcher of the multi-process tests and bench/chaos.py.

`accelerate launch --cpu --num_processes N` starts ONE process with accelerate 1.15 (the simple
launcher ignores --num_processes under --cpu). torchrun with ACCELERATE_USE_CPU=true starts N ranks
that accelerate sees as DistributedType.MULTI_CPU:

    ACCELERATE_USE_CPU=true torchrun --nproc_per_node N --master_port PORT cli.py ...

`node_cmd` starts one of several simulated machines instead (--nnodes N --node_rank R, one rank each).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port the OS says is free now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(processes: int, script: str | Path, *args) -> list[str]:
    """Command line that runs `script args` on `processes` CPU ranks (a plain interpreter for 1)."""
    if processes == 1:
        return [sys.executable, str(script), *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--nnodes", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *map(str, args)]


def node_cmd(nodes: int, node_rank: int, port: int, script: str | Path, *args) -> list[str]:
    """Command line of one of `nodes` simulated machines on this host, one CPU rank each: what
    `accelerate launch --num_machines N --machine_rank R --main_process_ip ... --main_process_port P` starts on
    machine R (torchrun's static rendezvous on 127.0.0.1:port; every node must be started, each with its own
    node_rank, before any of them gets past the rendezvous)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node_rank),
            "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), str(script),
            *map(str, args)]


def launch_env(extra: dict | None = None) -> dict:
    """Environment for launch_cmd: CPU ranks, one thread each (the machine's cores are shared)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
            "COLUMNS": "200", **(extra or {})}
