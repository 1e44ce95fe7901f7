"""Run by tests/test_distributed.py on 2 ranks (torchrun): which thread frees the tensors of a collective.

    PROBE_OUT=FILE python tests/support/free_thread_probe.py

Each rank broadcasts and all-reduces 100 fresh tensors twice: with pipeline.collectives, then with
torch.distributed's blocking calls for comparison. It lets go of each tensor at once and records the thread
that freed it (a weakref.finalize runs there). pipeline.collectives drops its works as a run does: once
`HOLD_SECONDS` have passed and `HELD` newer collectives were made. Rank 0 writes the record as JSON:
{"world", "ours", "plain"}."""

import json
import os
import threading
import time
import weakref

import torch
import torch.distributed as dist

from pipeline import collectives


def probe(plain: bool) -> list[str]:
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
        if plain:
            dist.all_reduce(s)
            out = s
        else:
            out = collectives.reduce(s, "sum")
        assert out.tolist() == [float(dist.get_world_size())] * 4
        weakref.finalize(out, where)
        del s, out
    if not plain:  # the works ours kept are dropped by the next collectives, as in a run
        time.sleep(collectives.HOLD_SECONDS + 0.5)
        for _ in range(collectives.HELD + 1):
            collectives.reduce(torch.zeros(1))
    dist.barrier()
    deadline = time.monotonic() + 10
    while len(freed) < 200 and time.monotonic() < deadline:  # plain: gloo's thread frees the last ones when it
        time.sleep(0.01)  # gets to them, after the barrier at times
    dist.barrier()
    return list(freed)


dist.init_process_group("gloo")
record = {"world": dist.get_world_size(), "ours": probe(plain=False), "plain": probe(plain=True)}
if dist.get_rank() == 0:
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump(record, f)
dist.destroy_process_group()
