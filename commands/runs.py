"""`train-student --runs FILE`: several students (architectures, methods, losses, optimizers, seeds) trained
from ONE view stream, so that each view is decoded and augmented once for all of them.

The file is a YAML/JSON list; each entry is a mapping of run options (students.config.RunConfig), written as in a
--config file (nested by group or flat by flag name), over the run that the flags and --config give:

    - {out: vit-ce, student: test_vit, method: ce, model_kwargs: {img_size: 32, patch_size: 4}}
    - {out: convnext-kd, student: test_convnext, method: kd, optimizer: adamw, lr: 1.0e-3}
    - {out: resnet-ofa, student: test_resnet, method: ofa, stages: [1, 2, 3, 4], ema_decay: 0.9}

A relative `out` is taken under the base --out (default: run-<i>). A stream option (students.config.StreamConfig:
the data, the teacher, the views and their order, epochs, batches, precision, checkpoint cadence) is the same for
every run: an entry that sets one is refused, naming it. Each run keeps its own optimizer, schedule, EMA, RNG
stream, checkpoints, metrics and exports in its own directory, and ends with the weights it would have had alone:
a separate `train-student` with the flags of that run's config.json gives the same tensors (tests/test_runs.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from commands.options import file_values, flags_of, override
from pipeline.errors import UserError
from students.config import RunConfig, StreamConfig, TrainConfig, teacher_problem


def read_runs(path: Path) -> list[dict]:
    """The entries of a runs file (a list of option mappings)."""
    import yaml  # not commands.options.read_file: that one wants a mapping, a runs file is a list
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"runs file {path} does not exist; pass an existing --runs") from None
    except yaml.YAMLError as e:
        raise UserError(f"runs file {path} is not valid YAML/JSON ({' '.join(str(e).split())}); fix it") from e
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise UserError(f"runs file {path} must hold a non-empty list of option mappings, one per run")
    return data


def expand_runs(cfg: TrainConfig) -> tuple[StreamConfig, list[RunConfig]]:
    """The stream and the runs of `cfg`: its own run, or with --runs the runs of the file over it."""
    stream, base = cfg.split()
    if cfg.runs is None:
        return stream, [base]
    flags = flags_of(TrainConfig)
    runs, outs = [], {}
    for i, entry in enumerate(read_runs(cfg.runs)):
        name = f"run {i} of {cfg.runs}"
        given = file_values(entry, flags, name)  # {option path: value}, unknown keys refused
        shared = [f.option for f in flags if f.path in given and f.path[0] != "run"]
        if shared:
            raise UserError(f"{name} sets {shared[0]}, which shapes the one view stream all runs share (or names "
                            f"another runs file); set it for all runs (flags or --config), or train that run apart")
        run = override(replace(base, out=base.out / f"run-{i}"), entry, name)
        if "out" in entry and not Path(run.out).is_absolute():
            run.out = base.out / run.out
        if problem := teacher_problem(stream, run):
            raise UserError(f"{name}: {problem}")
        if run.out in outs:
            raise UserError(f"{name} writes to {run.out} as run {outs[run.out]} does; give each run its own out")
        outs[run.out] = i
        runs.append(run)
    return stream, runs
