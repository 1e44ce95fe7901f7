"""Stage two: train timm students, with OFA stage heads, from the teacher cache or online, on one view stream.

    set-up: one accelerator per run; the stream (data, views and the teacher's cached targets, the evaluation
            loader, the steps of each epoch); per run the task (student + heads + teacher + loss), optimizer,
            schedule, EMA, one accelerator.prepare
    loop:   for epoch: each batch is made once -> every run: task(batch) -> accelerator.backward -> step;
            evaluate the bare students; save each run's state, then the progress records that make them trusted
            (SIGTERM/SIGINT or --save-every-steps: the same inside an epoch)
    end:    export each bare student as safetensors; metrics.json

One loop for every method (ce, kd, dkd, ofa), cached or online teacher, one or many processes, one run or
several on one stream (--runs): each run steps on its own RNG stream (`students.run.own_rng`) with its own
accelerator, so that each ends exactly as it would alone; one run is the list of one.
The loaders are not passed to `accelerator.prepare` on purpose: each rank already reads its own shards, and a view
must not depend on how batches are split (`pipeline.reader.assign_shards`).
"""

from __future__ import annotations

import dataclasses
import time
from itertools import islice

import torch

from pipeline import collectives, preempt
from pipeline.errors import UserError
from pipeline.preempt import EXIT_PREEMPTED, Preempted
from pipeline.progress import Bar
from students.checkpoint import Position, check_new, export_run, open_run, save_epoch, save_step
from students.config import RunConfig, StreamConfig, TrainConfig, teacher_problem
from students.evaluate import evaluate
from students.run import Run, accelerator_for, flat_hparams, own_rng, seeded_rng, set_up_run
from students.stream import Stream, open_stream


def train_student(cfg: TrainConfig) -> dict:
    """One run (the summary of its export); `train` for several on one stream."""
    stream, run = cfg.split()
    return train(stream, [run])[0]


def train(stream_cfg: StreamConfig, run_cfgs: list[RunConfig]) -> list[dict]:
    """Set up, then the canonical loop: an epoch of steps, evaluation, a saved state; then the exports.
    On SIGTERM/SIGINT: save at the next optimizer step and exit with status 75 (`pipeline.preempt`)."""
    problems = [p for c in run_cfgs if (p := teacher_problem(stream_cfg, c))]
    if problems:
        raise UserError(problems[0])
    if not stream_cfg.resume:  # refused before anything is written, for every run
        for c in run_cfgs:
            check_new(c)
    with preempt.active() as stop:  # before any loader starts: its workers inherit the handler
        accelerators = [accelerator_for(c, stream_cfg) for c in run_cfgs]
        lead = accelerators[0]
        stream = open_stream(stream_cfg, lead.process_index, lead.num_processes, lead.print)
        runs = [set_up_run(c, stream, a) for c, a in zip(run_cfgs, accelerators, strict=True)]
        try:
            return train_loop(stream, runs, stop)
        except Preempted as e:
            where = ", ".join(str(c.out) for c in run_cfgs)
            lead.print(f"stopped by {stop.name} in {e.what}: state saved in {where}; run the same command with "
                       f"--resume to continue (exit status {EXIT_PREEMPTED})")
            for run in runs:
                run.accelerator.end_training()
            raise


def start(stream: Stream, runs: list[Run]) -> tuple[int, list[Position] | None]:
    """Open (or resume) every run directory -> the first epoch and, mid-epoch, each run's position in it."""
    starts = []
    for run in runs:
        cfg, accelerator = run.cfg, run.accelerator
        resolved = {**stream.describe(), "loss": {**dataclasses.asdict(cfg.loss), "T": cfg.loss.T},
                    "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
                    **run.task.describe()}
        if len(runs) > 1:  # the runs trained from the same view stream (--runs)
            resolved["stream_runs"] = [str(r.cfg.out) for r in runs]
        starts.append(open_run(run, stream, resolved))
        if cfg.log_with:
            hparams = {**TrainConfig(stream.cfg, cfg).to_dict(), "processes": accelerator.num_processes}
            accelerator.init_trackers(cfg.out.name, config=flat_hparams(hparams))
    if len({(s, at.micro if at else 0) for s, at in starts}) > 1:  # a stop between the runs' progress records
        raise UserError("the runs stopped at different positions (" + ", ".join(
            f"{r.cfg.out}: epoch {s + 1} step {(at.micro if at else 0) // stream.cfg.grad_accum}"
            for r, (s, at) in zip(runs, starts, strict=True)) + "); resume them apart, each with its own --resume")
    return starts[0][0], [at for _, at in starts] if starts[0][1] is not None else None


def train_loop(stream: Stream, runs: list[Run], stop) -> list[dict]:
    lead, epochs = runs[0], stream.cfg.epochs
    first, ats = start(stream, runs)
    for epoch in range(first, epochs):
        metrics = train_epoch(stream, runs, epoch, stop, ats)
        ats = None
        for run in runs:  # a per-epoch schedule sets the next epoch's rate now, so that the epoch's save holds it
            run.scheduler.step(epoch + 1)
        for m, e in zip(metrics, evaluate(runs, stream.eval_loader), strict=True):
            m |= e
        emas = [run for run in runs if run.ema is not None]
        for run, e in zip(emas, evaluate(emas, stream.eval_loader, ema=True) if emas else [], strict=True):
            metrics[runs.index(run)] |= {f"ema_{k}": v for k, v in e.items()}
        for run, m in zip(runs, metrics, strict=True):
            run.history.append(m)
            name = f"{run.cfg.out.name}: " if len(runs) > 1 else ""
            lead.accelerator.print(f"{name}epoch {epoch + 1}: loss {m['train/loss']:.4f} top1 {m['top1']:.2f} top5 "
                                   f"{m['top5']:.2f} ece {m['ece']:.2f} ({m['images_per_second']:.0f} img/s, "
                                   f"{m['loader_wait_seconds']:.1f} of {m['train_seconds']:.1f} s waiting for "
                                   f"views)")
            run.accelerator.log(m, step=epoch + 1)  # no-op without --log-with
        save_epoch(runs, epoch)
        if epoch + 1 < epochs and stop_agreed(lead, stop):  # the signal came during evaluation or the save
            raise Preempted(f"the end of epoch {epoch + 1}")
    summaries = [export_run(run, stream) for run in runs]
    for run in runs:
        run.accelerator.end_training()  # closes the trackers (and the process group): last
    return summaries


class Waited:
    """Iterates a loader and adds up the seconds the loop waited for its batches (`waited`): the part of an
    epoch the views, not the step, took. On a GPU the step runs asynchronously, so this is the time the host
    had nothing to queue."""

    def __init__(self, loader, waited: float = 0.0):
        self.loader, self.waited = loader, waited

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            self.waited += time.perf_counter() - t0
            if batch is None:
                return
            yield batch


def train_step(task, batch: dict, optimizer, accelerator, clip_grad: float | None = None) -> dict:
    """One (micro-)step exactly as the loop runs it; returns the task's loss terms (on the device)."""
    with accelerator.accumulate(task):
        result = task(batch)
        accelerator.backward(result["loss"])
        if accelerator.sync_gradients and clip_grad:
            accelerator.clip_grad_norm_(task.parameters(), clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return result


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def step_runs(runs: list[Run], ats: list[Position], batch: dict, epoch: float, update: int) -> tuple[dict, bool]:
    """Every run's step on one batch, each on its own RNG stream -> (the lead run's loss terms, whether the
    optimizers updated: the same for every run, which share --grad-accum and the batches)."""
    shown, synced = None, False
    for run, pos in zip(runs, ats, strict=True):
        with own_rng(run):
            run.task.set_progress(epoch)  # for loss warm-ups (DKD)
            result = train_step(run.prepared, batch, run.optimizer, run.accelerator, run.cfg.optim.clip_grad)
            synced = run.accelerator.sync_gradients  # accelerate's GradientState: the flag this step set
            if synced:
                run.scheduler.step_update(num_updates=update + 1)
                if run.ema is not None:
                    run.ema.update(run.task.eval_model)
        for k, v in result.items():
            pos.sums[k] = pos.sums.get(k, 0.0) + v.detach().double()
        pos.seen += len(batch["label"])
        shown = shown or result
    return shown, synced


def train_epoch(stream: Stream, runs: list[Run], epoch: int, stop=None,
                ats: list[Position] | None = None) -> list[dict]:
    """One epoch of `stream.steps[epoch]` optimizer steps for every run (from `ats`, their step checkpoint, if
    given): each batch is made once and every run takes its step on it. Returns each run's mean loss terms and
    throughput. Raises Preempted after saving if a stop signal came."""
    cfg, accelerator = stream.cfg, runs[0].accelerator
    world, device, ga = accelerator.num_processes, accelerator.device, cfg.grad_accum
    if ats is None:
        ats = [Position(epoch) for _ in runs]
        for run in runs:  # dropout: a function of (the run's seed, epoch, rank)
            run.rng = seeded_rng(run.cfg.seed * 100_003 + epoch * 101 + accelerator.process_index, device)
    # else: mid-epoch, each run goes on with the RNG state restored with its step checkpoint
    at, micro = ats[0], stream.steps[epoch] * ga  # the stream's position: every run's micro, seconds are the same
    # --epochs-per-decode: the group's epochs share one stream, positions counted from the group's first epoch
    before = sum(stream.steps[stream.views.group(epoch).start:epoch]) * ga
    loader = stream.views.loader(epoch, cfg.batch_size, cfg.workers, pin_memory=device.type == "cuda",
                                 start=before + at.micro)
    for run in runs:
        run.prepared.train()
    update, t0, saved = sum(stream.steps[:epoch]) + at.micro // ga, time.perf_counter() - at.seconds, at.micro
    batches = Waited(loader, at.waited)
    what = runs[0].cfg.loss.method if len(runs) == 1 else f"{len(runs)} runs"
    with Bar(cfg.progress and accelerator.is_local_main_process, micro * cfg.batch_size * world,
             f"epoch {epoch + 1}/{cfg.epochs} {what}") as bar:
        bar.advance(at.micro * cfg.batch_size * world)
        # exactly the epoch's batches, not one more: with --epochs-per-decode the next belongs to the next epoch
        for i, batch in enumerate(islice(batches, micro - at.micro), start=at.micro):
            shown, synced = step_runs(runs, ats, to_device(batch, device), epoch + i / micro, update)
            update += synced
            # reading the loss syncs with the device: only every 25 steps, for the progress bar
            bar.advance(len(batch["label"]) * world,
                        info=f"loss {float(shown['loss'].detach()):.3f}" if bar.enabled and i % 25 == 0 else None)
            if (i + 1) % ga:
                continue  # mid-accumulation: not a position a checkpoint can hold
            for pos in ats:
                pos.micro, pos.seconds, pos.waited = i + 1, time.perf_counter() - t0, batches.waited
            if cfg.save_every_steps and update % cfg.save_every_steps == 0 and at.micro < micro:
                save_step(runs, ats, cfg)  # the epoch's last step is saved by the epoch's save
                saved = at.micro
            if update % cfg.check_signal_every == 0 and stop_agreed(runs[0], stop):
                if saved != at.micro:
                    save_step(runs, ats, cfg)
                raise Preempted(f"epoch {epoch + 1}, step {at.micro // ga} of {micro // ga}")
    return epoch_metrics(runs, ats, epoch, micro, time.perf_counter() - t0, batches.waited)


def epoch_metrics(runs: list[Run], ats: list[Position], epoch: int, micro: int, elapsed: float,
                  waited: float) -> list[dict]:
    """Each run's mean loss terms over the epoch (averaged over ranks), learning rate and throughput."""
    accelerator, out = runs[0].accelerator, []
    world = accelerator.num_processes
    for run, pos in zip(runs, ats, strict=True):
        sums = pos.sums
        terms = collectives.reduce(torch.stack([sums[k] for k in sorted(sums)]) / max(1, micro), "mean")
        out.append({"epoch": epoch + 1,
                    **{f"train/{k}": float(v) for k, v in zip(sorted(sums), terms.tolist(), strict=True)},
                    "lr": run.optimizer.param_groups[0]["lr"], "train_seconds": elapsed,
                    "images_per_second": pos.seen * world / elapsed if elapsed > 0 else 0.0,
                    "loader_wait_seconds": waited})
    return out


def stop_agreed(run: Run, stop) -> bool:
    """Whether any rank got a stop signal. Every rank calls this at the same step and all get the same answer
    (one all-reduce of one number), so they save the same position and none is left waiting in a collective.
    Measured on 2 CPU ranks (gloo): see bench/results/stop_check.json."""
    asked = stop is not None and stop.requested
    if run.accelerator.num_processes == 1:
        return asked
    flag = collectives.reduce(torch.tensor([float(asked)], device=run.accelerator.device), "max")
    return bool(flag.item())
