"""`cli.py` with recorders, for the multi-process tests: run it as the script that tests/support/launch.py starts.

    PROBE_DIR=DIR [PROBE_BATCHES=1] [PROBE_STALL=EPOCH,STEP] python tests/support/probe_cli.py COMMAND ARGS...

(with PYTHONPATH=<repo root>, as launch_env sets it). At exit each rank writes DIR/rank-<rank>.json: the
rank, world size, distributed type and local rank accelerate saw, the node rank torchrun gave (GROUP_RANK),
the cache units this rank wrote, the run files it wrote (students.checkpoint.write_atomic) and the stores it
created. PROBE_BATCHES=1 also saves every training batch this rank stepped on (views, joined cache targets, indices) to
DIR/batches-<rank>.pt. PROBE_STALL=E,S makes training step S of epoch E write DIR/stalled-<rank> (the rank's pid)
and sleep (only on the ranks in PROBE_STALL_RANKS=R,..., where it is set),
so that a test can kill it mid-epoch; the stall ends when a stop signal reaches the command (SIGTERM/SIGINT,
pipeline.preempt), so that the signal lands during a known step. PROBE_STALL_EVAL=E does the same at the start of
epoch E's evaluation (DIR/stalled-eval-<rank>). Each rank's record also holds its exit status.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

import cli
import pipeline.preempt as preempt
import students.checkpoint as checkpoint_mod
import students.task as task_mod
import students.train as train_mod
import tests.support.chaos_cli  # noqa: F401  (OFAKD_CHAOS_SLOW_WRITES: slowed zarr writes, for kills mid-unit)
from cache.store import CacheStore
from cache.targets import TEACHER_KEY
from pipeline.views import TrainViews

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ["PROBE_DIR"])
RANK = int(os.environ.get("RANK", "0"))
state = {"units": [], "epoch": None, "step": 0, "batches": [], "writes": [], "stores_built": 0}

real_write, real_set_epoch, real_losses = CacheStore.write_unit, TrainViews.set_epoch, task_mod.distill_losses


def write_unit(self, unit):
    real_write(self, unit)
    state["units"].append(int(unit.shard))


def set_epoch(self, epoch):
    state["epoch"], state["step"] = epoch, 0
    real_set_epoch(self, epoch)


def distill_losses(out, teacher_logits, batch, cfg, num_classes, **kw):
    stall = os.environ.get("PROBE_STALL")
    stalling = os.environ.get("PROBE_STALL_RANKS")  # only these ranks stall [default: every rank]
    if stall and [int(v) for v in stall.split(",")] == [state["epoch"], state["step"]] and \
            (not stalling or str(RANK) in stalling.split(",")):
        stall_until_stopped(f"stalled-{RANK}")
    if os.environ.get("PROBE_BATCHES"):
        keep = ("view", "label", "partner_label", "lam", "index", "view_seed", "partner")
        rec = {"epoch": state["epoch"], **{k: batch[k].cpu().clone() for k in keep if k in batch}}
        if TEACHER_KEY in batch:  # the cached targets joined to these views
            t = batch[TEACHER_KEY]
            rec |= {"t_values": t.values.cpu().clone(), "t_indices": t.indices.cpu().clone(),
                    "t_lse": t.lse.cpu().clone(), "t_label_log_odds": t.label_log_odds.cpu().clone()}
        state["batches"].append(rec)
    state["step"] += 1
    return real_losses(out, teacher_logits, batch, cfg, num_classes, **kw)


def stall_until_stopped(name: str) -> None:
    (OUT / name).write_text(str(os.getpid()))  # the pid, for a signal to this rank only
    t0 = time.monotonic()
    while time.monotonic() - t0 < 600 and not (preempt.current and preempt.current.requested):
        time.sleep(0.02)


real_evaluate = train_mod.evaluate


def evaluate(runs, eval_loader, ema=False):
    stall = os.environ.get("PROBE_STALL_EVAL")
    if stall and int(stall) == state["epoch"] and not ema:
        stall_until_stopped(f"stalled-eval-{RANK}")
    return real_evaluate(runs, eval_loader, ema=ema)


CacheStore.write_unit, TrainViews.set_epoch, task_mod.distill_losses = write_unit, set_epoch, distill_losses
train_mod.evaluate = evaluate

# files only the main process may write: the run's own files (students.checkpoint.write_atomic) and a new store's
# metadata (CacheStore._build, which writes the group's attributes)
real_train_write, real_build = checkpoint_mod.write_atomic, CacheStore._build


def train_write(path, data):
    state["writes"].append(Path(path).name)
    real_train_write(path, data)


def build(where, description):
    state["stores_built"] += 1
    real_build(where, description)


checkpoint_mod.write_atomic, CacheStore._build = train_write, staticmethod(build)

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    sys.argv = [str(ROOT / "cli.py"), *sys.argv[1:]]
    status = 1
    try:
        cli.main()
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    finally:
        from accelerate.state import PartialState
        s = PartialState()
        record = {"rank": s.process_index, "world": s.num_processes, "distributed_type": str(s.distributed_type),
                  "env_rank": RANK, "units_written": state["units"], "pid": os.getpid(), "exit": status,
                  "node_rank": int(os.environ.get("GROUP_RANK", "0")), "local_rank": s.local_process_index,
                  "writes": state["writes"], "stores_built": state["stores_built"]}
        (OUT / f"rank-{s.process_index}.json").write_text(json.dumps(record))
        if state["batches"]:
            torch.save(state["batches"], OUT / f"batches-{s.process_index}.pt")
