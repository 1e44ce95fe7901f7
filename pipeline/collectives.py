"""The collectives this code issues itself (sums, maxima, a broadcast), made safe to fork loader workers after.

Written by hand because no library does it: a gloo (or NCCL) collective's work object keeps the tensors it ran
on, and the library's own thread usually drops the last reference to it once the operation is done. Freeing a
tensor that Python has seen takes the GIL, so that thread creates a Python thread state, holding the runtime's
head lock for a moment without the GIL. A process forked in that moment makes a child that never starts: CPython
3.11 (3.11.7 here and in CI) takes that lock in the child before resetting it (gh-112275, fixed in 3.12), and
the data loader forks its workers right after evaluation's collectives. Seen in CI and here as a 2-rank run
stuck at an epoch's end: a rank's evaluation worker hung in PyOS_AfterFork_Child, the other rank in the next
all-reduce.

Here each work is waited on and then kept, at least `HOLD_SECONDS` and until `HELD` newer ones were, so that the
last reference is this thread's and the tensors are freed here, long after the library's thread let go of them:
that thread can still hold its reference after it signals completion, and one the OS stalls there (a loaded
machine) can hold it while the library's other threads run many more collectives, hence the time too. The
collectives of torch's own C++ (DDP's gradient all-reduce and buffer broadcast) run on tensors Python never saw and
need nothing.
tests/test_distributed.py checks where the tensors are freed."""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist

HELD = 64  # a work is dropped once this many newer ones are kept ...
HOLD_SECONDS = 2.0  # ... and it completed this long ago
_held: deque = deque()  # (when it completed, work), oldest first

_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def distributed() -> bool:
    """Whether a process group of more than one rank is running (else every collective is the identity)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce(tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """A copy of `tensor` summed ("sum"), averaged ("mean") or maximized ("max") over the ranks (the copy
    itself where there is one process): accelerate's `Accelerator.reduce`, with the work kept."""
    out = tensor.clone()
    if distributed():
        _wait(dist.all_reduce(out, op=_OPS[reduction], async_op=True))
        if reduction == "mean":
            out /= dist.get_world_size()
    return out


def broadcast(tensor: torch.Tensor, src: int = 0) -> None:
    """`tensor` on every rank set to rank `src`'s, in place."""
    if distributed():
        _wait(dist.broadcast(tensor, src=src, async_op=True))


def _wait(work) -> None:
    work.wait()
    now = time.monotonic()
    _held.append((now, work))
    while len(_held) > HELD and now - _held[0][0] > HOLD_SECONDS:
        _held.popleft()  # the last reference, dropped by this thread (see the module docstring)
