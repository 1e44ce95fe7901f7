"""A run directory: its configuration, its trusted state (an epoch's end or a step inside one), resuming from it,
its metrics, and the exported student.

    config.json     every option (a --config file that reproduces the run), what was resolved, what made it
    state/NAME/     accelerate's state (weights, optimizer, EMA, every RNG) + each rank's position in the epoch
    progress.json   written last: names the trusted state and the epoch (and step) it stands at
    metrics.*       per-epoch metrics; metrics.json at the end with the summary and the run's provenance
    model.safetensors (model_ema.safetensors)  the bare student, loadable by timm

The run directory keeps only the newest trusted state: accelerate's own rotation cannot tie its checkpoints to
our progress record. A position inside an epoch is (epoch, micro-steps taken): the view stream replays from any
batch (`TrainViews.loader(start=...)`), so a step checkpoint holds no data-loader buffer. The learning-rate
schedule needs no state of its own: it is a function of the update count, which the position gives.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.manifest import write_atomic
from pipeline.provenance import code_version, config_hash, machine, stamp
from students.config import RunConfig, StreamConfig, TrainConfig
from students.run import Run, get_rng, own_rng
from students.stream import Stream

STATE_VERSION = 2  # progress.json's layout; a run directory of another version is not resumed
RUN_LOCAL = ("out", "resume", "progress", "log_with", "runs")  # where a run writes and how it is watched
OUTPUT_ONLY = ("resolved", "made_by")  # keys open_run writes into config.json for reading, ignored on input
# Free to change when a run is resumed: where its data and caches are mounted, how many loader workers feed it
# (inside an epoch the layout check refuses that), how often it checks for a signal and saves. Every other option
# is what the run computes, and a resume that changes it is refused.
RESUME_MAY_CHANGE = (*RUN_LOCAL, "data", "cache", "workers", "check_signal_every", "save_every_steps")


@dataclass
class Position:
    """How far an epoch has got: micro-steps taken (a whole number of optimizer steps) and this rank's running
    sums of the loss terms, which a step checkpoint keeps so the epoch's metrics come out as if never stopped."""

    epoch: int
    micro: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # on the device: no host sync in the step
    seen: int = 0
    seconds: float = 0.0
    waited: float = 0.0  # of those seconds, waiting for the loader


def layout(stream: StreamConfig, run: RunConfig, processes: int) -> dict:
    """What a mid-epoch position means: the same step number is another point of the epoch under another
    batch size, worker count, process count or accumulation."""
    return {"batch_size": stream.batch_size, "workers": stream.workers, "processes": processes,
            "grad_accum": stream.grad_accum, "max_steps_per_epoch": stream.max_steps_per_epoch, "seed": run.seed,
            "order_seed": stream.order_seed, "epochs_per_decode": stream.epochs_per_decode}


def check_new(cfg: RunConfig) -> None:
    """A run directory a new (not resumed) run may use: one that holds no run."""
    if (cfg.out / "progress.json").exists() or (cfg.out / "metrics.json").exists():
        raise UserError(f"run directory {cfg.out} already holds a run; pass --resume to continue it or "
                        f"choose another --out")


def open_run(run: Run, stream: Stream, resolved: dict) -> tuple[int, Position | None]:
    """Start or resume the run directory -> (first epoch to run, where that epoch stands if a step checkpoint
    stopped inside it); a resumed run's history is restored into `run.history`."""
    cfg, accelerator = run.cfg, run.accelerator
    progress = cfg.out / "progress.json"
    if stream.cfg.resume and progress.is_file():
        return resume(run, stream, json.loads(progress.read_text()), resolved)
    check_new(cfg)
    if accelerator.is_main_process:
        try:
            cfg.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run directory {cfg.out} ({e.strerror or e}); "
                            f"choose a writable --out") from e
        config = TrainConfig(stream.cfg, cfg).to_dict()
        write_atomic(cfg.out / "config.json", json.dumps({**config, "resolved": resolved, "made_by": stamp()},
                                                         indent=1, default=str).encode())
    accelerator.wait_for_everyone()
    return 0, None


def resume(run: Run, stream: Stream, prog: dict, resolved: dict) -> tuple[int, Position | None]:
    cfg, accelerator = run.cfg, run.accelerator
    if prog.get("version") != STATE_VERSION:
        raise UserError(f"{cfg.out} was saved by another version of this tool (run state version "
                        f"{prog.get('version', 1)}, this one reads {STATE_VERSION}); start it again in another --out, "
                        f"or resume it with the version that made it")
    step = prog.get("step")
    now = layout(stream.cfg, cfg, accelerator.num_processes)
    if step and step["layout"] != now:
        was = step["layout"]
        diff = ", ".join(f"{k} {was.get(k)} (now {now[k]})" for k in now if now[k] != was.get(k))
        raise UserError(f"{cfg.out} stopped inside epoch {step['epoch'] + 1} with {diff}; resume with the same "
                        f"settings (a position inside an epoch depends on them)")
    check_same_options(cfg.out, TrainConfig(stream.cfg, cfg), resolved)
    state = cfg.out / "state" / prog["state"]
    accelerator.load_state(str(state))  # weights, optimizer, EMA, and every RNG of this process
    run.history = prog["history"]
    if not step:
        accelerator.print(f"resuming {cfg.out} after epoch {prog['epoch'] + 1} of {stream.cfg.epochs}")
        return prog["epoch"] + 1, None
    run.rng = get_rng(accelerator.device)  # the run's dropout stream at the step (see own_rng)
    mine = torch.load(state / f"position-{accelerator.process_index}.pt")
    at = Position(step["epoch"], step["micro"], {k: v.to(accelerator.device) for k, v in mine["sums"].items()},
                  mine["seen"], mine["seconds"], mine["waited"])
    accelerator.print(f"resuming {cfg.out} in epoch {at.epoch + 1} of {stream.cfg.epochs}, after optimizer step "
                      f"{at.micro // stream.cfg.grad_accum}")
    return at.epoch, at


PATHS = ("checkpoint", "file", "pretrained_file")  # files, compared by their sha256 in `resolved`, not by path
WHERE = ("resolved.processes", "resolved.stream_runs")  # how many processes, where a group's runs write


def check_same_options(out: Path, now: TrainConfig, resolved: dict) -> None:
    """A resumed run computes what it started computing: its options (RESUME_MAY_CHANGE aside) are those its
    config.json records, and so is what they resolved to (the data and caches by their hashes, the teacher's
    weights by sha256, the recipe, the view seed, the number of classes, ...), or the resume is refused naming
    each one that differs. A key the run did not record (an option added to the tool since) is not compared."""
    def flat(d: dict, prefix: str = "", skip=RESUME_MAY_CHANGE) -> dict:
        out = {}
        for k, v in d.items():
            if (prefix == "" and k in skip) or k in PATHS:
                continue
            out |= flat(v, f"{prefix}{k}.", ()) if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    def differences(was: dict, now: dict) -> list[str]:
        return [f"{k} {was[k]} (now {now.get(k, '(unset)')})" for k in was if was[k] != now.get(k) and k not in WHERE]
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{out} holds progress.json but no readable config.json ({e}); it cannot be resumed: start "
                        f"the run again in another --out") from None
    diff = differences(flat({k: v for k, v in config.items() if k not in OUTPUT_ONLY}),
                       flat(json.loads(json.dumps(now.to_dict(), default=str))))
    if not diff:  # the same options, resolved to other things (a teacher file replaced, other data at that path)
        diff = differences(flat(config.get("resolved", {}), "resolved.", ()),
                           flat(json.loads(json.dumps(resolved, default=str)), "resolved.", ()))
    if diff:
        raise UserError(f"{out} was started with {', '.join(diff)}; resume with the same settings (its config.json "
                        f"holds them), or start a new run in another --out")


def trust_state(out: Path, name: str, record: dict, accelerator) -> None:
    """After every rank has written state/`name`: the progress record that makes it trusted on resume (written
    atomically), then every other state goes. Killed before the record, the previous state stays trusted."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_atomic(out / "progress.json", json.dumps({"version": STATE_VERSION, **record, "state": name}).encode())
        for old in (out / "state").iterdir():
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_epoch(runs: list[Run], epoch: int) -> None:
    """Each run's state first, then the progress records that make them trusted on resume; older states go.
    All states are written before any record, so a kill leaves the runs at one position but for the moment
    between their records (then --resume refuses, naming them: see `students.train.start`)."""
    name = f"epoch-{epoch:04d}"
    for run in runs:
        with own_rng(run):
            run.accelerator.save_state(str(run.cfg.out / "state" / name))
        if run.accelerator.is_main_process:
            write_metrics(run.cfg.out, run.history)
    for run in runs:
        trust_state(run.cfg.out, name, {"epoch": epoch, "history": run.history}, run.accelerator)


def save_step(runs: list[Run], ats: list[Position], stream: StreamConfig) -> None:
    """A state inside an epoch, per run: accelerate's (weights, optimizer, EMA, the run's RNG stream and the
    process's other RNGs) and each rank's running sums, then the progress records that make them trusted."""
    name = f"step-{ats[0].epoch:04d}-{ats[0].micro:07d}"
    for run, at in zip(runs, ats, strict=True):
        with own_rng(run):  # save_state saves the process's RNGs: let them be the run's
            run.accelerator.save_state(str(run.cfg.out / "state" / name))
        torch.save({"sums": {k: v.cpu() for k, v in at.sums.items()}, "seen": at.seen, "seconds": at.seconds,
                    "waited": at.waited},
                   run.cfg.out / "state" / name / f"position-{run.accelerator.process_index}.pt")
    for run, at in zip(runs, ats, strict=True):
        step = {"epoch": at.epoch, "micro": at.micro,
                "layout": layout(stream, run.cfg, run.accelerator.num_processes)}
        trust_state(run.cfg.out, name, {"epoch": at.epoch - 1, "history": run.history, "step": step},
                    run.accelerator)


def run_config_hash(cfg: TrainConfig) -> str:
    """The hash of what a run computes: every option (the order seed resolved) but where it writes and how it is
    watched (RUN_LOCAL)."""
    return config_hash({k: v for k, v in TrainConfig(*cfg.split()).to_dict().items() if k not in RUN_LOCAL})


def started_config_hash(out: Path) -> str:
    """run_config_hash of the run `out` holds, read from the config.json it was started with."""
    config = json.loads((out / "config.json").read_text())
    return config_hash({k: v for k, v in config.items() if k not in RUN_LOCAL and k not in OUTPUT_ONLY})


def provenance(run: Run, stream: Stream, final: dict) -> dict:
    """What made the run's numbers, for a reader (or a benchmark deciding whether to reuse it) to check: the code's
    commit (also the one that started it, when it was resumed under another), the configuration's hash, the data
    (split hashes, validation samples evaluated), the teacher's weights and the caches, the machine."""
    cfg, s = run.cfg, stream.cfg
    try:
        started = json.loads((cfg.out / "config.json").read_text()).get("made_by", {}).get("code")
    except (OSError, ValueError):
        started = None
    online = run.task.provenance.get("online_teacher")
    teachers = ([online["weights"].get("sha256")] if online else
                [i["teacher_sha256"] for i in stream.cached.identity()] if stream.cached else [])
    return {"code": code_version(), "code_at_start": started, "config_hash": run_config_hash(TrainConfig(s, cfg)),
            "data": {"train": stream.train.manifest.split_hash(s.train_split),
                     "val": stream.val.manifest.split_hash(s.val_split)},
            "val_samples": final.get("val_samples"), "teacher_sha256": teachers,
            "caches": stream.cached.identity() if stream.cached else [], "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def export_run(run: Run, stream: Stream) -> dict:
    """Export the evaluated model (and its EMA) and write the run's summary (metrics.json)."""
    cfg, accelerator, ema, history = run.cfg, run.accelerator, run.ema, run.history
    final = history[-1] if history else {}
    summary = {"student": cfg.student.name, "method": cfg.loss.method, "epochs": stream.cfg.epochs,
               "top1": final.get("top1"), "top5": final.get("top5"), "ece": final.get("ece"),
               "best_top1": max((h["top1"] for h in history), default=None),
               "val_samples": final.get("val_samples"),
               "train_seconds": sum(h["train_seconds"] for h in history),
               "provenance": provenance(run, stream, final), "history": history}
    if ema is not None:
        summary |= {k: final.get(k) for k in ("ema_top1", "ema_top5", "ema_ece")}
    if accelerator.is_main_process:
        export(run.task.eval_model, cfg.out / "model.safetensors")
        if ema is not None:
            export(ema.module, cfg.out / "model_ema.safetensors")
        write_atomic(cfg.out / "metrics.json", json.dumps(summary, indent=1).encode())
    accelerator.wait_for_everyone()
    return summary


def export(model: torch.nn.Module, path: Path) -> None:
    """The bare student's weights as safetensors (what timm.create_model(..., checkpoint_path=) loads)."""
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def write_metrics(out: Path, history: list[dict]) -> None:
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "epoch", k))
    with open(out / "metrics.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    (out / "metrics.csv.tmp").replace(out / "metrics.csv")
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode())
