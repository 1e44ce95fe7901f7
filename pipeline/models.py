"""Building timm models (teachers and students) from a name, keyword arguments and weights: a local
state dict of exactly the model, or timm's own pretrained loader (hub tags, hf-hub: names, local files).

Both stages build models here, so neither imports the other; importing this module also registers
the small MLP students of `pipeline.zoo` with timm.
"""

from __future__ import annotations

import ast
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
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
            raise UserError(f"model keyword argument {item!r} must look like name=value, e.g. img_size=32")
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
    hint = (" (a teacher trained on other classes: map the dataset's classes with --teacher-classes)"
            if role == "teacher" and bad_shape else "")
    raise UserError(f"{role} checkpoint {path} does not match {name} ({'; '.join(parts)}); pass the "
                    f"checkpoint of this architecture, class count and --model-kwargs{hint}")


@dataclass(frozen=True)
class Weights:
    """Where a model's weights come from: at most one of a local state dict of exactly this model
    (`checkpoint`) and timm's pretrained loader (`pretrained`: the hub; `pretrained_file`: a local
    file through the same loader). Neither: timm's random init, seeded."""

    checkpoint: Path | None = None
    """A state dict of exactly this architecture, class count and model kwargs (.safetensors or torch; strict load)."""
    pretrained: bool = False
    """timm's pretrained weights of the name (a tag such as convnext_tiny.fb_in1k, or hf-hub:ORG/REPO), from the
    Hugging Face hub."""
    pretrained_file: Path | None = None
    """timm's pretrained loader from this local weights file instead of the hub (implies pretrained)."""

    def __post_init__(self):
        if self.checkpoint and (self.pretrained or self.pretrained_file):
            raise UserError("weights come from a checkpoint (a state dict of exactly this model) or from timm's "
                            "pretrained loader (--pretrained / --pretrained-file), not both; drop one of the two")

    @property
    def from_timm(self) -> bool:
        """True when timm's pretrained loader decides the weights (and, by default, the class count)."""
        return bool(self.pretrained or self.pretrained_file)


@dataclass
class ModelSpec:
    """A timm model as a command names it: the name, where its weights come from, its keyword arguments
    and input size (the option group behind --student, --teacher, --model-a, ...)."""

    name: str | None = None
    """timm model name."""
    weights: Weights = field(default_factory=Weights)
    model_kwargs: dict = field(default_factory=dict)
    """timm keyword arguments, e.g. img_size=32."""
    input_size: int | None = None
    """Input size [default: the model's fixed size, else the view size]."""
    mean: list[float] | None = None
    """Normalise the input with this per-channel (RGB) mean instead of the model's own [default: its config's].

    Weights trained with another normalisation than timm's config for the name need their own: the authors'
    CIFAR teachers, say, were trained with the CIFAR-100 mean (0.5071, 0.4865, 0.4409)."""
    std: list[float] | None = None
    """Normalise the input with this per-channel (RGB) standard deviation [default: its config's]."""

    def __post_init__(self):
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and (len(v) != 3 or (name == "std" and min(v) <= 0)):
                raise UserError(f"--{name} needs 3 values (R, G, B){', each > 0' if name == 'std' else ''}, got {v}")


def _classifier_key(name: str) -> str | None:
    """The state-dict key of the classifier weight of a timm name, from its pretrained config."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # hf-hub: names and unregistered models have no local config
        cfg = None
    clf = getattr(cfg, "classifier", None)
    if isinstance(clf, tuple | list):
        clf = clf[0] if clf else None
    return f"{clf}.weight" if clf else None


def _file_num_classes(name: str, path: Path) -> int | None:
    """Outputs of the classifier stored in a weights file, None when it cannot be told."""
    key = _classifier_key(name)
    if key is None:
        return None
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:  # reads the header only
            return int(f.get_slice(key).get_shape()[0]) if key in f.keys() else None
    state = timm.models.load_state_dict(str(path), use_ema=False)
    return int(state[key].shape[0]) if key in state else None


def _hub_file(cfg: dict) -> Path | None:
    """The local file timm's pretrained loader read for a model built with pretrained=True: the Hugging
    Face cache entry it downloaded (safetensors first, as timm tries them), else torch's url cache."""
    from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives, hf_split
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache
        repo, revision = hf_split(cfg["hf_hub_id"])
        filename = cfg.get("hf_hub_filename") or HF_WEIGHTS_NAME
        names = [filename] if filename.endswith(".safetensors") else [*_get_safe_alternatives(filename), filename]
        for fn in names:
            hit = try_to_load_from_cache(repo, fn, revision=revision)
            if isinstance(hit, str):
                return Path(hit)
    if cfg.get("url"):
        from urllib.parse import urlparse
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg["url"]).path).name
        return path if path.is_file() else None
    return None


@contextmanager
def _load_report():
    """Collect what timm's pretrained loader reports about the keys it did not load (it logs them, and with
    a replaced classifier it loads non-strictly, so a file of another architecture would load nothing)."""
    keys = {"missing": [], "unexpected": []}

    class Collect(logging.Handler):
        def emit(self, record):
            m = re.match(r"(Missing|Unexpected) keys \((.*)\) (discovered|found) while loading", record.getMessage())
            if m:
                keys[m.group(1).lower()] += [k for k in m.group(2).split(", ") if k]

    log = logging.getLogger("timm.models._builder")
    handler, level, propagate = Collect(logging.INFO), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # our one sentence replaces timm's page of keys
    try:
        yield keys
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def _pretrained(name: str, weights: Weights, kwargs: dict, role: str) -> torch.nn.Module:
    """timm's pretrained loader, from the hub or (pretrained_file) a local file. A file's own class count
    goes into the overlay, so that a file fine-tuned to N classes keeps its classifier at N classes."""
    overlay = None
    where = "from the hub"
    if weights.pretrained_file:
        path = Path(weights.pretrained_file)
        where = f"file {path}"
        if not path.is_file():
            raise UserError(f"{role} pretrained file {path} does not exist; pass a timm weights file "
                            f"(.safetensors, .pth or .bin)")
        overlay = {"file": str(path)}
        n = _file_num_classes(name, path)
        if n is not None:
            overlay["num_classes"] = n
    try:
        with _load_report() as keys:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except TypeError:
        raise
    except Exception as e:  # torch, safetensors, huggingface_hub and network errors all end here
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        if weights.pretrained_file:
            raise UserError(f"{role} pretrained {where} cannot be loaded into {name} ({why}); pass timm weights "
                            f"of this architecture and --model-kwargs") from e
        raise UserError(f"{role} '{name}': timm could not load its pretrained weights from the hub ({why}); "
                        f"without the hub, download the weights file elsewhere and pass --pretrained-file PATH") from e
    clf = model.pretrained_cfg.get("classifier") or ()
    replaced = {f"{c}.{p}" for c in ((clf,) if isinstance(clf, str) else clf) for p in ("weight", "bias")}
    missing = [k for k in keys["missing"] if k not in replaced]
    if missing or keys["unexpected"]:
        what = (f"{len(missing)} model keys are not in the weights (e.g. {missing[0]})" if missing else
                f"{len(keys['unexpected'])} keys of the weights are not in the model (e.g. {keys['unexpected'][0]})")
        raise UserError(f"{role} pretrained {where} does not fit {name}: {what}; pass weights of this "
                        f"architecture and --model-kwargs")
    return model


def create_model(name: str, num_classes: int | None, *, weights: Weights | None = None,
                 model_kwargs: dict | None = None, role: str = "model", init_seed: int = 0) -> torch.nn.Module:
    """timm model with `num_classes` outputs and its weights (see `Weights`).

    With timm's pretrained weights, timm replaces the classifier when `num_classes` differs from the
    weights' (fine-tuning); `num_classes=None` keeps the weights' own classifier. The model's
    `loaded_weights` records what was loaded: source, tag, file and the sha256 of that file.
    """
    weights = weights or Weights()
    if num_classes is None and not weights.from_timm:
        raise ValueError("num_classes=None (the weights' own classes) needs pretrained weights")
    if not name.startswith(("hf-hub:", "local-dir:")) and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UserError(f"{role} '{name}' is not a timm model name{hint}; see timm.list_models()")
    kwargs = {**(model_kwargs or {}), **({"num_classes": num_classes} if num_classes is not None else {})}
    try:
        # the weights timm does not load (all of them at random init, a replaced classifier when fine-tuning)
        # are made reproducible by a fixed seed, without touching the global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            if weights.from_timm:
                model = _pretrained(name, weights, kwargs, role)
            else:
                model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise UserError(f"{role} '{name}' does not accept the keyword arguments {model_kwargs} ({e}); "
                        f"fix --model-kwargs") from e
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    tag = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("architecture") and cfg.get("tag") else None
    if weights.checkpoint:
        path = Path(weights.checkpoint)
        if not path.is_file():
            raise UserError(f"{role} checkpoint {path} does not exist; pass a .safetensors or torch file")
        try:  # timm's loader: safetensors or torch, 'state_dict'/'model' wrappers, 'module.' prefixes
            state = timm.models.load_state_dict(str(path), use_ema=False)
        except Exception as e:
            raise UserError(f"{role} checkpoint {path} cannot be read ({e}); pass a .safetensors or "
                            f"torch state dict") from e
        _check_state(state, model, name, num_classes, path, role)
        model.load_state_dict(state, strict=True)
        record = {"source": "checkpoint", "file": str(path), "sha256": file_sha256(path)}
    elif weights.pretrained_file:
        record = {"source": "file", "tag": tag, "file": str(weights.pretrained_file),
                  "sha256": file_sha256(weights.pretrained_file)}
    elif weights.pretrained:
        hub = _hub_file(cfg)
        record = {"source": "hub" if cfg.get("hf_hub_id") else "url", "tag": tag, "hf_hub_id": cfg.get("hf_hub_id"),
                  "file": str(hub) if hub else None, "sha256": file_sha256(hub)}
    else:
        record = {"source": "init", "init_seed": init_seed}
    if weights.from_timm:  # the classes of the loaded classifier; differs from num_classes when timm replaced it
        record["weights_num_classes"] = cfg.get("num_classes")
    model.loaded_weights = record
    return model


def fixed_input_size(model: torch.nn.Module) -> int | None:
    """The input size a model was built for when it cannot take another (ViT-style patch grids)."""
    pe = getattr(model, "patch_embed", None) or getattr(model, "stem", None)
    size = getattr(pe, "img_size", None)
    if size is None or getattr(model, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True):
        return None
    return int(size[0] if isinstance(size, tuple | list) else size)


def model_input(model: torch.nn.Module, view_size: int, size: int | None = None, mean=None, std=None) -> ModelInput:
    """The model's own resize and normalisation of a view: an explicit size, else the size a
    fixed-grid model was built for, else the view size; mean/std as given, else from the model's config."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return ModelInput(size=int(size or fixed_input_size(model) or view_size),
                      mean=tuple(mean or cfg.get("mean", IMAGENET_MEAN)),
                      std=tuple(std or cfg.get("std", IMAGENET_STD)))
