"""Building timm models (teachers and students) from a name, keyword arguments and local weights.

Both stages build models here, so neither imports the other; importing this module also registers
the small MLP students of `pipeline.zoo` with timm.
"""

from __future__ import annotations

import ast
from pathlib import Path

import timm
import torch

from pipeline import zoo  # noqa: F401  (registers the small MLP students with timm)
from pipeline.augment import ModelInput
from pipeline.errors import UserError
from pipeline.manifest import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_kwargs(items: list[str] | None) -> dict:
    """['img_size=32', 'patch_size=4', 'act_layer=gelu'] -> {'img_size': 32, ...}: Python literals, else strings."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"model keyword argument '{item}' must look like name=value, e.g. img_size=32")
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = {"true": True, "false": False}.get(v.lower(), v)  # bare words: strings (and lower-case bools)
    return out


def file_sha256(path: str | Path | None) -> str | None:
    """sha256 of a checkpoint file, None when there is none."""
    return sha256_file(Path(path)) if path else None


def _check_state(state: dict, model: torch.nn.Module, name: str, num_classes: int, path: Path, role: str) -> None:
    """One sentence naming the first mismatch, instead of torch's multi-page strict-load error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or bad_shape):
        return
    parts = []
    if bad_shape:
        k = bad_shape[0]
        parts.append(f"shape of {k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} "
                     f"in {name} with {num_classes} classes")
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
    raise UserError(f"{role} checkpoint {path} does not match {name} ({'; '.join(parts)}); pass the "
                    f"checkpoint of this architecture, class count and --model-kwargs")


def create_model(name: str, num_classes: int, *, checkpoint: str | Path | None = None,
                 model_kwargs: dict | None = None, role: str = "model", init_seed: int = 0) -> torch.nn.Module:
    """timm model with `num_classes` outputs and, if given, local weights that must match exactly."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UserError(f"{role} '{name}' is not a timm model name{hint}; see timm.list_models()")
    try:
        # without a checkpoint the weights are timm's random init, made reproducible by a fixed seed
        # (so that a cache from an untrained teacher can still be verified), without touching global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, **(model_kwargs or {}))
    except TypeError as e:
        raise UserError(f"{role} '{name}' does not accept the keyword arguments {model_kwargs} ({e}); "
                        f"fix --model-kwargs") from e
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise UserError(f"{role} checkpoint {path} does not exist; pass a .safetensors or torch file")
        try:  # timm's loader: safetensors or torch, 'state_dict'/'model' wrappers, 'module.' prefixes
            state = timm.models.load_state_dict(str(path), use_ema=False)
        except Exception as e:
            raise UserError(f"{role} checkpoint {path} cannot be read ({e}); pass a .safetensors or "
                            f"torch state dict") from e
        _check_state(state, model, name, num_classes, path, role)
        model.load_state_dict(state, strict=True)
    return model


def fixed_input_size(model: torch.nn.Module) -> int | None:
    """The input size a model was built for when it cannot take another (ViT-style patch grids)."""
    pe = getattr(model, "patch_embed", None) or getattr(model, "stem", None)
    size = getattr(pe, "img_size", None)
    if size is None or getattr(model, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True):
        return None
    return int(size[0] if isinstance(size, tuple | list) else size)


def model_input(model: torch.nn.Module, view_size: int, size: int | None = None) -> ModelInput:
    """The model's own resize and normalisation of a view: an explicit size, else the size a
    fixed-grid model was built for, else the view size; mean/std from the model's config."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return ModelInput(size=int(size or fixed_input_size(model) or view_size),
                      mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)))
