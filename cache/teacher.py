"""The one teacher path: a frozen timm teacher as both stages run it.

Stage one runs it over every view to fill the cache; stage two's `--teacher-online` runs the same
object over the same views in the loop. Because both go through `Teacher.__call__`, the cached and
online teachers cannot drift apart (resize, normalisation, precision are decided here once).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.models import create_model, file_sha256, model_input


class Teacher:
    """A view batch [B, 3, S, S] in [0, 1] -> teacher logits [B, C] float32, no gradients."""

    def __init__(self, model: torch.nn.Module, view_size: int, input_size: int | None = None):
        self.model = model.eval()
        self.input = model_input(model, view_size, input_size)

    @classmethod
    def build(cls, name: str, num_classes: int, view_size: int, *, checkpoint: str | Path | None = None,
              model_kwargs: dict | None = None, input_size: int | None = None, device="cpu") -> Teacher:
        model = create_model(name, num_classes, checkpoint=checkpoint, model_kwargs=model_kwargs, role="teacher")
        t = cls(model.to(device), view_size, input_size)
        t.name, t.checkpoint_sha256 = name, file_sha256(checkpoint)
        return t

    @property
    def num_features(self) -> int:
        return int(getattr(self.model, "num_features", 0))

    @torch.no_grad()
    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        x = self.input(views)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            return self.model(x).float()
