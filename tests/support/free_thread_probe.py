"""Run by tests/test_distributed.py on 2 ranks (torchrun): which thread frees the tensors of a collective.

    PROBE_OUT=FILE PROBE_PLAIN=0|1 python tests/support/free_thread_probe.py

Each rank broadcasts and all-reduces 100 fresh tensors, with pipeline.collectives (or, with PROBE_PLAIN=1,
torch.distributed's blocking calls, for comparison), lets go of them, and records for each the thread that
freed it (a weakref.finalize runs there). Rank 0 writes the record as JSON."""

import json
import os
import threading
import weakref

import torch
import torch.distributed as dist

from pipeline import collectives

dist.init_process_group("gloo")
plain = os.environ.get("PROBE_PLAIN") == "1"
freed: list[str] = []


def where() -> None:
    freed.append("main" if threading.current_thread() is threading.main_thread() else "other")


for i in range(100):
    t = torch.full((8,), float(dist.get_rank() + i))
    weakref.finalize(t, where)
    if plain:
        dist.broadcast(t, src=0)
    else:
        collectives.broadcast(t, src=0)
    del t
    s = torch.full((4,), 1.0)
    r = dist.all_reduce(s) if plain else None
    out = s if plain else collectives.reduce(s, "sum")
    assert out.tolist() == [float(dist.get_world_size())] * 4
    weakref.finalize(out, where)
    del s, out, r
dist.barrier()
collectives.release()
dist.barrier()
if dist.get_rank() == 0:
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump({"world": dist.get_world_size(), "freed": freed}, f)
dist.destroy_process_group()
