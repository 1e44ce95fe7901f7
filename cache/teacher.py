"""The one teacher path: a frozen timm teacher as both stages run it.

Stage one runs it over every view to fill the cache; stage two's `--teacher-online` runs the same
object over the same views in the loop. Because both go through `Teacher.__call__`, the cached and
online teachers cannot drift apart (resize, normalisation, precision and the teacher's label space
are decided here once).

A teacher trained on other classes than the dataset's (an ImageNet-1k teacher on Tiny-ImageNet) gets a
`ClassMap`: dataset class c is teacher output `indices[c]`. The teacher's classifier is cut to those
rows, in dataset order, before anything sees a logit, so its top-k, log-sum-exp and label logits are
over the dataset's classes, exactly as if the teacher had been built with that sliced classifier.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.manifest import Manifest
from pipeline.models import ModelSpec, Weights, create_model, model_input


@dataclass
class TeacherSpec(ModelSpec):
    """A teacher as a command names it: a model (`ModelSpec`) and the label space of its outputs
    (used by cache-teacher, verify-cache's recorded teacher and train-student's --teacher-online)."""

    classes: str | None = None
    """The teacher's label space, to map the dataset's classes onto its outputs by class id: imagenet-1k
    (timm's synsets) or a file with one class id per line in output order."""


def teacher_class_ids(spec: str) -> list[str]:
    """The teacher's class ids in output order: a file with one id per line, or a timm ImageNet subset
    ('imagenet-1k': timm's 1000 synsets, as its ImageNet classifiers order their outputs)."""
    path = Path(spec)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
        except UnicodeDecodeError as e:
            raise UserError(f"--teacher-classes {spec} is not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                            f"UTF-8, one class id per line") from None
        ids = [line.strip() for line in lines]
        if "" in ids:
            raise UserError(f"--teacher-classes {spec}: line {ids.index('') + 1} is empty; give one class id per "
                            f"line, in the teacher's output order")
        return ids
    from timm.data import ImageNetInfo
    try:
        return list(ImageNetInfo(spec).label_names())
    except AssertionError:
        raise UserError(f"--teacher-classes {spec} is neither a file nor a timm ImageNet label set; pass "
                        f"imagenet-1k (or imagenet-12k, imagenet-22k) or a file with one class id per line in the "
                        f"teacher's output order") from None


@dataclass(frozen=True)
class ClassMap:
    """Dataset class c is the teacher's output `indices[c]`, out of `num_outputs`."""

    source: str
    """What --teacher-classes named: imagenet-1k or a file."""
    num_outputs: int
    indices: tuple[int, ...]

    @classmethod
    def resolve(cls, spec: str, manifest: Manifest) -> ClassMap:
        """Match each dataset class by its id (`dataset.json` class_ids, else classes), else its name."""
        teacher = teacher_class_ids(spec)
        where: dict[str, int] = {}
        for i, t in enumerate(teacher):
            if t in where:
                raise UserError(f"--teacher-classes {spec} lists class {t!r} twice (lines {where[t] + 1} and "
                                f"{i + 1}); give each teacher output once")
            where[t] = i
        ids = manifest.class_ids or manifest.classes
        indices, missing = [], []
        for cid, name in zip(ids, manifest.classes, strict=True):
            j = where.get(cid, where.get(name))
            (missing.append(cid) if j is None else indices.append(j))
        if missing:
            raise UserError(
                f"{len(missing)} of the {len(ids)} classes of dataset '{manifest.name}' have no teacher output in "
                f"--teacher-classes {spec} (e.g. {', '.join(missing[:5])}); the teacher never saw them: fine-tune "
                f"it on this dataset first (`train-student --method ce --pretrained`) or pass its own class list")
        return cls(spec, len(teacher), tuple(indices))

    def to_dict(self) -> dict:
        return {"source": self.source, "num_outputs": self.num_outputs, "indices": list(self.indices)}

    @classmethod
    def from_dict(cls, d: dict | None) -> ClassMap | None:
        return cls(d["source"], int(d["num_outputs"]), tuple(int(i) for i in d["indices"])) if d else None


def restrict_outputs(model: torch.nn.Module, indices: tuple[int, ...]) -> bool:
    """Cut timm's classifier (`get_classifier()`: Linear or 1x1 conv, one or a tuple) to these output rows,
    in this order. False when the classifier is of another kind (the caller then selects logits)."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = heads if isinstance(heads, tuple) else (heads,)
    if not all(isinstance(h, torch.nn.Linear | torch.nn.Conv2d) for h in heads):
        return False
    rows = torch.tensor(indices, dtype=torch.long)
    for h in heads:
        h.weight = torch.nn.Parameter(h.weight.detach()[rows.to(h.weight.device)].clone(), requires_grad=False)
        if h.bias is not None:
            h.bias = torch.nn.Parameter(h.bias.detach()[rows.to(h.bias.device)].clone(), requires_grad=False)
        if isinstance(h, torch.nn.Linear):
            h.out_features = len(rows)
        else:
            h.out_channels = len(rows)
    model.num_classes = len(rows)
    return True


def _outputs(model: torch.nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    return int(n) if n is not None else None


class Teacher:
    """A view batch [B, 3, S, S] in [0, 1] -> teacher logits [B, C] float32 over the dataset's C classes,
    no gradients."""

    def __init__(self, model: torch.nn.Module, view_size: int, input_size: int | None = None,
                 class_map: ClassMap | None = None, mean=None, std=None):
        self.model = model.eval()
        self.input = model_input(model, view_size, input_size, mean, std)  # before any cut: its own pretrained_cfg
        self.class_map = class_map
        self.select = None  # logits to keep after the forward, when the classifier could not be cut
        if class_map is not None:
            if _outputs(model) not in (None, class_map.num_outputs):
                raise UserError(f"the teacher has {_outputs(model)} outputs but --teacher-classes {class_map.source} "
                                f"lists {class_map.num_outputs} classes; pass the class list of these weights")
            if not restrict_outputs(model, class_map.indices):
                self.select = torch.tensor(class_map.indices, dtype=torch.long)
        self.name = None
        self.weights = getattr(model, "loaded_weights", None) or {}  # set by pipeline.models.create_model
        self.checkpoint_sha256 = self.weights.get("sha256")

    @classmethod
    def build(cls, name: str, num_classes: int, view_size: int, *, weights: Weights | None = None,
              class_map: ClassMap | None = None, model_kwargs: dict | None = None, input_size: int | None = None,
              device="cpu", mean=None, std=None) -> Teacher:
        """`num_classes`: the dataset's. The teacher has the outputs of its weights (timm's pretrained loader),
        else of the class map, else `num_classes`; they must be the class map's, else the dataset's."""
        weights = weights or Weights()
        want = class_map.num_outputs if class_map else num_classes
        model = create_model(name, None if weights.from_timm else want, weights=weights,
                             model_kwargs=model_kwargs, role="teacher")
        have = _outputs(model)
        if class_map is None and have is not None and have != num_classes:
            raise UserError(f"teacher {name} has {have} outputs but the dataset has {num_classes} classes; pass "
                            f"--teacher-classes imagenet-1k (or a file of its class ids in output order) to map the "
                            f"dataset's classes onto its outputs, or fine-tune it on this dataset first")
        t = cls(model.to(device), view_size, input_size, class_map, mean, std)
        t.name = name
        return t

    @classmethod
    def from_spec(cls, spec: TeacherSpec, manifest: Manifest, view_size: int, device="cpu") -> Teacher:
        """The teacher a spec names, over the classes of a dataset (`spec.classes` maps them)."""
        class_map = ClassMap.resolve(spec.classes, manifest) if spec.classes else None
        return cls.build(spec.name, manifest.num_classes, view_size, weights=spec.weights, class_map=class_map,
                         model_kwargs=spec.model_kwargs, input_size=spec.input_size, device=device, mean=spec.mean,
                         std=spec.std)

    @property
    def num_features(self) -> int:
        return int(getattr(self.model, "num_features", 0))

    def to_channels_last(self) -> Teacher:
        """Weights and inputs in channels-last memory format (the same logits, faster convolutions on GPUs)."""
        self.model.to(memory_format=torch.channels_last)
        self.input = dataclasses.replace(self.input, channels_last=True)
        return self

    @torch.no_grad()
    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        x = self.input(views)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            logits = self.model(x).float()
        return logits if self.select is None else logits[:, self.select.to(logits.device)]
