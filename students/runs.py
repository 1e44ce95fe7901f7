"""`train-student --runs FILE`: several students (architectures, methods, losses, optimizers, seeds) trained
from ONE view stream, so that each view is decoded and augmented once for all of them.

The file is a YAML/JSON list; each entry is a mapping of options, written as in a --config file (nested by
group or flat by flag name), over the base configuration that the flags and --config give:

    - {out: vit-ce, student: test_vit, method: ce, model_kwargs: {img_size: 32, patch_size: 4}}
    - {out: convnext-kd, student: test_convnext, method: kd, optimizer: adamw, lr: 1.0e-3}
    - {out: resnet-ofa, student: test_resnet, method: ofa, stages: [1, 2, 3, 4], ema_decay: 0.9}

A relative `out` is taken under the base --out (default: run-<i>). Each run keeps its own optimizer,
schedule, EMA, RNG stream, checkpoints, metrics and exports in its own directory, and ends with the weights it
would have had alone: a separate `train-student` with the flags of that run's config.json gives the same
tensors (tests/test_runs.py).

A separate command would have had to repeat every option of train-student; a runs file over the same
options keeps one vocabulary, and a run's config.json is a complete configuration of its own.
"""

from __future__ import annotations

from pathlib import Path

from commands.options import flags_of, override
from pipeline.errors import UserError

# Options that shape the view stream (which views, in which order, in which batches), or that the runs share
# in one process (the accelerator's precision, resume, the stop/save cadence, progress bars): set once for all.
# The order seed is one of them: `seed` stays per run (initialisation and dropout), and a run's config.json
# records the order seed it was trained with, so a separate run with that config reproduces it.
STREAM = ("data", "cache", "cache_teacher", "teacher.classes", "views", "view_epochs", "epochs_per_decode",
          "eval_crop_pct", "epochs", "batch_size", "workers", "train_split", "val_split", "on_error",
          "max_steps_per_epoch", "optim.grad_accum", "order_seed", "mixed_precision", "resume", "save_every_steps",
          "check_signal_every", "progress", "runs")


def read_runs(path: Path) -> list[dict]:
    """The entries of a runs file (a list of option mappings)."""
    import yaml  # not commands.options.read_file: that one wants a mapping, a runs file is a list
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"runs file {path} does not exist; pass an existing --runs") from None
    except yaml.YAMLError as e:
        raise UserError(f"runs file {path} is not valid YAML/JSON ({e}); fix it") from e
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise UserError(f"runs file {path} must hold a non-empty list of option mappings, one per run")
    return data


def expand_runs(base) -> list:
    """The configurations of `base.runs` (a TrainConfig with --runs), or [base] without it. A run that sets a
    stream option (STREAM) to another value than the base's is refused, naming the run and the option."""
    if base.runs is None:
        return [base]
    from dataclasses import replace
    entries = read_runs(base.runs)
    flags = {f.path: f for f in flags_of(type(base))}
    base = replace(base, order_seed=base.order_seed if base.order_seed is not None else base.seed)
    runs, outs = [], {}
    for i, entry in enumerate(entries):
        name = f"run {i} of {base.runs}"
        cfg = override(replace(base, runs=None, out=base.out / f"run-{i}"), entry, name)
        if not Path(cfg.out).is_absolute() and "out" in entry:
            cfg.out = base.out / cfg.out
        for path, flag in flags.items():
            dotted = ".".join(path)
            if any(dotted == s or dotted.startswith(s + ".") for s in STREAM) and path != ("runs",):
                if _get(cfg, path) != _get(base, path):
                    raise UserError(f"{name} sets {flag.option}, which shapes the one view stream all runs share; "
                                    f"set it for all runs (flags or --config), or train that run apart")
        if cfg.out in outs:
            raise UserError(f"{name} writes to {cfg.out} as run {outs[cfg.out]} does; give each run its own out")
        outs[cfg.out] = i
        runs.append(cfg)
    return runs


def _get(cfg, path: tuple[str, ...]):
    for p in path:
        cfg = getattr(cfg, p)
    return cfg
