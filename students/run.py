"""One student on a stream: its accelerator, task (student + heads + teacher + loss), optimizer, schedule, EMA and
its own random stream, so that runs sharing one view stream each end exactly as they would alone."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from cache.teacher import Teacher
from pipeline.errors import UserError
from pipeline.models import create_model, model_input
from students.config import RunConfig, ScheduleConfig, StreamConfig
from students.heads import StudentWithHeads
from students.stream import Stream
from students.task import DistillationTask, online


@dataclass
class Run:
    """What the loop works with for one student, set up once by `set_up_run`."""

    cfg: RunConfig
    accelerator: Any
    prepared: torch.nn.Module  # the task as accelerate prepared it (DDP-wrapped on several processes): the step's
    optimizer: Any
    scheduler: Any
    ema: Any = None  # timm ModelEmaV3 of the evaluated model, or None
    history: list[dict] = field(default_factory=list)  # metrics of the finished epochs
    rng: tuple | None = None  # the run's torch (CPU, CUDA) RNG states: its dropout stream (see `own_rng`)

    @property
    def task(self) -> DistillationTask:
        """The task itself, without DDP's wrapper: what is evaluated, exported and described."""
        return self.accelerator.unwrap_model(self.prepared)


def accelerator_for(cfg: RunConfig, stream: StreamConfig):
    """One Accelerator per run, not one for all: `save_state`/`load_state` save and load everything registered
    with an accelerator, so one per run keeps each run's checkpoint in its own directory, whole, in accelerate's
    own format. They share accelerate's process-wide state (device, process group, precision; GradientState,
    whose sync flag each run's `accumulate` sets before its own step: the stream's --grad-accum)."""
    from accelerate import Accelerator
    mp = stream.mixed_precision
    mp = mp if mp != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    return Accelerator(gradient_accumulation_steps=stream.grad_accum, mixed_precision=mp,
                       log_with=trackers(cfg.log_with), project_dir=str(cfg.out))


def set_up_run(cfg: RunConfig, stream: Stream, accelerator) -> Run:
    """The task, optimizer and schedule, one `accelerator.prepare`, an EMA."""
    from accelerate.utils import set_seed
    set_seed(cfg.seed)
    task = build_task(cfg, stream, accelerator.device)
    optimizer = build_optimizer(cfg, task)
    updates_per_epoch = max(1, round(sum(stream.steps) / stream.cfg.epochs))
    scheduler = build_scheduler(cfg.schedule, stream.cfg.epochs, optimizer, updates_per_epoch)
    prepared, optimizer = accelerator.prepare(task, optimizer)
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(task.eval_model, decay=cfg.ema_decay).to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    return Run(cfg, accelerator, prepared, optimizer, scheduler, ema)


def build_task(cfg: RunConfig, stream: Stream, device) -> DistillationTask:
    """Student + heads, the teacher source (the stream's cache, or the online teacher) and the loss."""
    C, teacher, teacher_width, about_teacher = stream.num_classes, None, 0, None
    spec = stream.cfg.teacher
    if spec.name:  # each run runs its own instance (--channels-last is a run option that converts it too)
        t = Teacher.from_spec(spec, stream.train.manifest, stream.recipe.input_size, device=device)
        if cfg.channels_last:
            t.to_channels_last()
        teacher, teacher_width = online(t), t.num_features
        about_teacher = {"name": t.name, "weights": t.weights,
                         "classes": t.class_map.to_dict() if t.class_map else None}
    elif stream.cached is not None:
        teacher = stream.cached.source(cfg.loss.T, cfg.loss.standardize, cfg.loss.teacher_nonlinearity)
        teacher_width = stream.cached.width
    s = cfg.student
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        bare = create_model(s.name, C, weights=s.weights, model_kwargs=s.model_kwargs, role="student",
                            init_seed=cfg.seed)
        s_input = model_input(bare, stream.recipe.input_size, s.input_size, s.mean, s.std)
        student = StudentWithHeads(bare, C, s_input.size, teacher_width=teacher_width, stages=cfg.heads.stages,
                                   block_indices=cfg.heads.block_indices, head_kind=cfg.heads.head_kind,
                                   with_heads=cfg.loss.method == "ofa")
    if cfg.channels_last:
        student.to(memory_format=torch.channels_last)
        s_input = dataclasses.replace(s_input, channels_last=True)
    if cfg.compile:
        # in place (nn.Module.compile): the module tree, its state_dict keys and so checkpoints stay as they are
        student.compile(backend=cfg.compile_backend)
    return DistillationTask(student, s_input, cfg.loss, C, teacher,
                            provenance={"student_weights": bare.loaded_weights, "online_teacher": about_teacher})


def build_optimizer(cfg: RunConfig, task: DistillationTask):
    """timm's optimizer factory (no weight decay on norms and biases)."""
    import timm.optim
    o = cfg.optim
    return timm.optim.create_optimizer_v2(task.trainable(), opt=o.optimizer, lr=o.lr, weight_decay=o.weight_decay,
                                          momentum=o.momentum)


def build_scheduler(sched: ScheduleConfig, epochs: int, optimizer, updates_per_epoch: int):
    """timm's scheduler factory, stepped per optimizer update (`step_update(n)` after update n) or per epoch
    (`step(e + 1)` after epoch e); each call is a no-op for a scheduler of the other kind."""
    import timm.scheduler
    scheduler = timm.scheduler.create_scheduler_v2(
        optimizer, sched=sched.sched, num_epochs=epochs, warmup_epochs=sched.warmup_epochs,
        warmup_lr=sched.warmup_lr, min_lr=sched.min_lr, decay_epochs=sched.decay_epochs, decay_rate=sched.decay_rate,
        step_on_epochs=sched.sched_step == "epoch", updates_per_epoch=updates_per_epoch)
    return scheduler[0] if isinstance(scheduler, tuple) else scheduler  # some timm versions add the epoch count


def trackers(log_with: str | None) -> list[str] | None:
    """accelerate tracker names for --log-with; a tracker that is not installed is refused, never dropped."""
    if log_with is None:
        return None
    from accelerate.utils import is_tensorboard_available, is_wandb_available
    names = ["tensorboard", "wandb"] if log_with == "all" else [log_with]
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    missing = [n for n in names if not available[n]()]
    if missing:
        raise UserError(f"--log-with {log_with} needs {' and '.join(missing)}, which is not installed; "
                        f"pip install '.[{missing[0]}]' (or {missing[0]}) or drop --log-with")
    if "wandb" in names and "WANDB_API_KEY" not in os.environ:
        os.environ.setdefault("WANDB_MODE", "offline")  # no account configured: log to files, sync later
    return names


def flat_hparams(d: dict, prefix: str = "") -> dict:
    """Nested configuration -> {"loss/gamma": "[1.5]", ...}: the scalar types trackers accept."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flat_hparams(v, f"{prefix}{k}/")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def own_rng(run: Run):
    """Run the block on `run`'s torch RNG stream (dropout, drop-path: CPU and CUDA), then put the process's back.
    Runs that share a view stream each keep their own stream, so each draws what it would draw alone; the
    loader's draws (its workers' base seed) stay on the process's stream, out of every run's."""
    device = run.accelerator.device
    devices = [device] if device.type == "cuda" else []

    @contextlib.contextmanager
    def swapped():
        with torch.random.fork_rng(devices=devices):
            set_rng(run.rng, device)
            yield
            run.rng = get_rng(device)
    return swapped()


def get_rng(device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng(state: tuple, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def seeded_rng(seed: int, device) -> tuple:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return get_rng(device)
