"""OFA stage heads built from timm's `forward_intermediates()` contract, never per-architecture tables.

Stage selection: hierarchical models (strides change across `feature_info`) use their last four
feature levels; isotropic models (ViT/DeiT, Mixer, ResMLP: one stride throughout) use the blocks at
1/4, 2/4, 3/4 and 4/4 of the depth. `stages` picks among those four (1-based); `block_indices`
overrides with explicit `forward_intermediates` indices.

Heads (training only; the exported student is the bare timm model):
- conv head, for feature maps [B, C, H, W]: per halving of resolution down to the last stage's
  stride, two depthwise-separable convs (dw 3x3 stride 2 then 1, pw 1x1, BN, ReLU) widening to the
  next stage's width; then 1x1 conv to D = max(student width, teacher width), pool, linear.
- token head, for transformers (isotropic or hierarchical, e.g. Swin: `--head-kind auto` picks it
  whenever the model has attention) and MLPs: [B, C, H, W] -> [B, H*W, C]; 2x2 patch merging (concat, LayerNorm,
  linear back to C) while the grid is 14 or larger (down to about 7x7); 3/2/1/1 transformer blocks for
  stage positions 1-4; LayerNorm, token mean, linear. MLP students use this head too. Prefix tokens
  (class/distillation) never reach it: `forward_intermediates` returns only the patch grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from pipeline.errors import UserError

HeadKind = Literal["auto", "conv", "token"]
TOKEN_BLOCKS = (3, 2, 1, 1)


@dataclass
class HeadsConfig:
    """Where the OFA heads go and what they are (an option group of train-student)."""

    stages: list[int] | None = None
    """OFA stages among 1-4, e.g. 1,2,3,4 [default: all]."""
    block_indices: list[int] | None = None
    """Explicit forward_intermediates indices for the heads, e.g. 1,3,9,11."""
    head_kind: HeadKind = "auto"
    """auto: token heads for transformers and MLPs, conv heads otherwise."""


def is_transformer(model: nn.Module) -> bool:
    """Attention anywhere in the model (ViT, Swin and other hierarchical transformers, hybrids): the
    authors give such students token heads, whatever the shape of their stage features."""
    return any("attention" in type(m).__name__.lower() for m in model.modules())


def feature_levels(model: nn.Module) -> tuple[list[int], bool]:
    """The four candidate `forward_intermediates` indices and whether the model is isotropic."""
    info = model.feature_info
    info = info if isinstance(info, list) else info.info  # FeatureInfo objects on some models
    n = len(info)
    reductions = [f["reduction"] for f in info]
    isotropic = len(set(reductions)) == 1
    if isotropic:
        levels = sorted({max(0, round(n * q / 4) - 1) for q in (1, 2, 3, 4)})
    else:
        levels = list(range(max(0, n - 4), n))
    return levels, isotropic


def select_indices(model: nn.Module, stages: list[int] | None = None,
                   block_indices: list[int] | None = None) -> tuple[list[int], list[int]]:
    """-> (intermediate indices, stage positions 0..3 used to size token heads)."""
    levels, _ = feature_levels(model)
    n = len(model.feature_info)
    if block_indices:
        bad = [i for i in block_indices if not 0 <= i < n]
        if bad:
            raise UserError(f"block indices {bad} are out of range for this model (it has {n} feature levels, "
                            f"0..{n - 1}); fix --block-indices")
        idx = sorted(set(block_indices))
        pos = [min(3, int(4 * j / max(1, len(idx)))) for j in range(len(idx))]
        return idx, pos
    stages = stages or list(range(1, len(levels) + 1))
    bad = [s for s in stages if not 1 <= s <= len(levels)]
    if bad:
        raise UserError(f"stages {bad} are out of range: this model has stages 1..{len(levels)}; fix --stages")
    stages = sorted(set(stages))
    return [levels[s - 1] for s in stages], [s - 1 + (4 - len(levels)) for s in stages]


class DSConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConvHead(nn.Module):
    def __init__(self, cin: int, widths: list[int], width: int, num_classes: int):
        super().__init__()
        layers, c = [], cin
        for w in widths:  # one halving of resolution each
            layers += [DSConv(c, w, 2), DSConv(w, w, 1)]
            c = w
        layers += [nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, num_classes]"""
        return self.fc(self.features(x).mean((2, 3)))


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, dim, bias=False)  # width kept: heads stay near the student's size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]"""
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = nn.functional.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class TokenHead(nn.Module):
    def __init__(self, dim: int, grid: int, blocks: int, num_classes: int):
        super().__init__()
        merges = []
        while grid >= 14:
            merges.append(PatchMerging(dim))
            grid = math.ceil(grid / 2)
        self.merges = nn.Sequential(*merges)
        heads = max(1, dim // 64)
        while dim % heads:
            heads -= 1
        self.blocks = nn.Sequential(*[Block(dim, num_heads=heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(blocks)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] patch grid -> [B, num_classes]"""
        x = self.merges(x.permute(0, 2, 3, 1))  # [B, H', W', C']
        x = self.blocks(x.flatten(1, 2))  # [B, L, C']
        return self.fc(self.norm(x).mean(1))


class StudentWithHeads(nn.Module):
    """A timm student plus one head per chosen stage. `forward` returns a dict:
    {"logits": [B, C], "heads": {"stage1": [B, C], ...}}; `self.model` is the bare student."""

    def __init__(self, model: nn.Module, num_classes: int, input_size: int, *, teacher_width: int = 0,
                 stages: list[int] | None = None, block_indices: list[int] | None = None,
                 head_kind: HeadKind = "auto", with_heads: bool = True):
        super().__init__()
        self.model = model
        self.indices, positions = select_indices(model, stages, block_indices) if with_heads else ([], [])
        _, isotropic = feature_levels(model)
        kind = ("token" if isotropic or is_transformer(model) else "conv") if head_kind == "auto" else head_kind
        self.heads = nn.ModuleDict()
        self.names: list[str] = []
        if not self.indices:
            return
        levels, _ = feature_levels(model)
        probe = sorted(set(self.indices) | {levels[-1]})
        was_training = model.training
        model.eval()
        with torch.no_grad():  # one probe forward gives every chosen stage's shape and the last stage's grid
            feats = model.forward_intermediates(torch.zeros(1, 3, input_size, input_size), indices=probe,
                                                intermediates_only=True)
        model.train(was_training)
        shapes = {i: tuple(f.shape[1:]) for i, f in zip(probe, feats, strict=True)}  # index -> (C, H, W)
        last_c, last_h = shapes[levels[-1]][0], shapes[levels[-1]][1]
        width = max(int(getattr(model, "num_features", last_c)), int(teacher_width or 0), last_c)
        level_chans = [shapes.get(lv, (None,))[0] for lv in levels]
        for idx, pos in zip(self.indices, positions, strict=True):
            name = f"stage{pos + 1}" if not block_indices else f"block{idx}"
            c, h = shapes[idx][0], shapes[idx][1]
            if kind == "conv":
                steps = max(0, round(math.log2(max(1, h) / max(1, last_h))))
                later = [ch for lv, ch in zip(levels, level_chans, strict=True) if lv > idx and ch is not None]
                widths = [later[k] if k < len(later) else c * 2 ** (k + 1) for k in range(steps)]
                self.heads[name] = ConvHead(c, widths, width, num_classes)
            else:
                self.heads[name] = TokenHead(c, h, TOKEN_BLOCKS[pos], num_classes)
            self.names.append(name)

    def forward(self, x: torch.Tensor, heads: bool = True) -> dict:
        """x: [B, 3, H, W] (already normalised for the student)."""
        if not (heads and self.indices and self.training):
            return {"logits": self.model(x), "heads": {}}
        final, feats = self.model.forward_intermediates(x, indices=self.indices)
        logits = self.model.forward_head(final)
        return {"logits": logits, "heads": {n: self.heads[n](f) for n, f in zip(self.names, feats, strict=True)}}
