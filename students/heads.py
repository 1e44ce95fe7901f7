"""OFA stage heads as the authors build them (Hao et al., NeurIPS 2023), from timm's
`forward_intermediates()` and `feature_info` contract instead of per-architecture tables.

Which features get heads:
- hierarchical students (strides change across `feature_info`: ResNet, ConvNeXt, Swin, ...): the last
  four feature levels, i.e. the outputs of the four stages;
- isotropic students (one stride throughout: ViT/DeiT, Mixer, ResMLP): the ends of a Swin-style split
  of the depth d into stages of (2, 2, d - 6, 2) blocks, i.e. blocks 1, 3, d - 3, d - 1 (0-based):
  1, 3, 9, 11 for the 12-block models and 1, 3, 21, 23 for the 24-block BEiT-L that the authors list;
  for d < 7 (no such split) the ends of four equal quarters.
`stages` picks among those four (1-based); `block_indices` overrides with explicit indices.

What the heads are (the authors' `distillers/ofa.py` and `distillers/utils.py`):
- conv head, for CNN students, features [B, C, H, W]: one `SepConv` per halving of resolution down to
  the last stage (4 - stage of them for four-stage CNNs), each doubling the width, the last one out to
  D = max(student width, teacher width); the last stage instead gets a 1x1 conv (with bias) to D; then
  global average pool and a linear classifier.
- token head, for transformer (isotropic or hierarchical, e.g. Swin) and MLP students: the patch grid
  is merged 2x2 down to 7x7 (floor(log2(grid / 7)) merges), the first merge projecting to the student's
  final width W with GELU (later merges W -> W, GELU but for the last); then max(4 - stage, 1) ViT
  blocks of width W with 4 heads and no qkv bias; read out through the class token when the student
  has one (its prefix tokens bypass the merges and join the blocks), else the mean of the tokens; then
  a linear classifier. (The authors' released code finds the class token through `num_tokens`, which their
  own timm pin, 0.6.5, no longer has, and crashes on DeiT students; reading the class token is what it
  evidently intends.)
- their initialisation: convs Kaiming-normal (fan out, ReLU), BatchNorm 1/0, linears truncated normal
  (std 0.02) with zero bias; LayerNorms and the 1x1 conv's bias keep PyTorch's defaults.

Heads exist only in training: `StudentWithHeads.model` is the bare timm student that is evaluated and
exported.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from pipeline.errors import UserError

HeadKind = Literal["auto", "conv", "token", "token-lite"]
FINAL_GRID = 7  # token heads merge patches down to a 7x7 grid (49 tokens), as the authors' heads do
TOKEN_HEADS = 4  # attention heads of the token heads' ViT blocks


@dataclass
class HeadsConfig:
    """Where the OFA heads go and what they are (an option group of train-student)."""

    stages: list[int] | None = None
    """OFA stages among 1-4, e.g. 1,2,3,4 [default: all]."""
    block_indices: list[int] | None = None
    """Explicit forward_intermediates indices for the heads, e.g. 1,3,9,11."""
    head_kind: HeadKind = "auto"
    """auto: the authors' token heads for transformers and MLPs, their conv heads otherwise; conv or
    token forces one kind; token-lite: smaller token heads at each stage's own width (tiny students)."""


def is_transformer(model: nn.Module) -> bool:
    """Attention anywhere in the model (ViT, Swin and other hierarchical transformers, hybrids): the
    authors give such students token heads, whatever the shape of their stage features."""
    return any("attention" in type(m).__name__.lower() for m in model.modules())


def isotropic_blocks(depth: int) -> list[int]:
    """The authors' blocks for an isotropic student of `depth` blocks (see the module docstring)."""
    if depth >= 7:
        return [1, 3, depth - 3, depth - 1]
    return sorted({max(0, round(depth * q / 4) - 1) for q in (1, 2, 3, 4)})


def feature_levels(model: nn.Module) -> tuple[list[int], bool]:
    """The (up to) four candidate `forward_intermediates` indices and whether the model is isotropic."""
    info = model.feature_info
    info = info if isinstance(info, list) else info.info  # FeatureInfo objects on some models
    n = len(info)
    isotropic = len({f["reduction"] for f in info}) == 1
    return (isotropic_blocks(n) if isotropic else list(range(max(0, n - 4), n))), isotropic


def select_indices(model: nn.Module, stages: list[int] | None = None,
                   block_indices: list[int] | None = None) -> tuple[list[int], list[int]]:
    """-> (intermediate indices, stage positions 0..3: position p gets max(3 - p, 1) blocks in a token head)."""
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


class SepConv(nn.Sequential):
    """Two depthwise-separable convs, the first with stride 2: [B, cin, H, W] -> [B, cout, H/2, W/2]."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False), nn.Conv2d(cin, cin, 1, bias=False),
            nn.BatchNorm2d(cin), nn.ReLU(),
            nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU())


class ConvHead(nn.Sequential):
    """[B, C, H, W] -> [B, num_classes]: `halvings` SepConvs doubling the width, the last out to `width`
    (none: a 1x1 conv to `width`), then pool and linear."""

    def __init__(self, cin: int, halvings: int, width: int, num_classes: int):
        if halvings == 0:
            blocks = [nn.Conv2d(cin, width, 1)]
        else:
            blocks = [SepConv(cin * 2 ** i, width if i == halvings - 1 else cin * 2 ** (i + 1))
                      for i in range(halvings)]
        super().__init__(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class PatchMerging(nn.Module):
    """[B, H, W, cin] -> [B, ceil(H/2), ceil(W/2), cout]: 2x2 neighbours concatenated, LayerNorm, linear
    (no bias), activation. Odd grids are zero-padded (the authors' code needs even ones; at 224 px every
    grid it meets is even)."""

    def __init__(self, cin: int, cout: int, act: bool):
        super().__init__()
        self.norm = nn.LayerNorm(4 * cin)
        self.reduction = nn.Linear(4 * cin, cout, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = nn.functional.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x)))


def merges_to_final_grid(grid: int) -> int:
    """floor(log2(grid / 7)), at least 0: 14 -> 1, 28 -> 2, 56 -> 3, 7 -> 0."""
    m = 0
    while FINAL_GRID * 2 ** (m + 1) <= grid:
        m += 1
    return m


class TokenHead(nn.Module):
    """Patch grid [B, C, H, W] (+ prefix tokens [B, P, width]) -> [B, num_classes]."""

    def __init__(self, cin: int, grid: int, width: int, blocks: int, num_classes: int, class_token: bool):
        super().__init__()
        m = merges_to_final_grid(grid)
        self.merges = nn.Sequential(*[PatchMerging(cin if i == 0 else width, width, act=i == 0 or i < m - 1)
                                      for i in range(m)])
        if m == 0 and cin != width:  # grid already <= 7x7 but narrower than the final width (not at 224 px)
            self.merges = nn.Linear(cin, width, bias=False)
        # timm's ViT block as timm 0.6.5 (the authors' pin) made it: no qkv bias, torch's LayerNorm (eps 1e-5)
        self.blocks = nn.Sequential(*[Block(width, num_heads=math.gcd(TOKEN_HEADS, width), qkv_bias=False,
                                            norm_layer=nn.LayerNorm) for _ in range(blocks)])
        self.class_token = class_token
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W] patch grid; prefix: [B, P, width] class (and other prefix) tokens or None."""
        x = self.merges(x.permute(0, 2, 3, 1)).flatten(1, 2)  # [B, H'*W', width]
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)  # [B, P + H'*W', width]: prefix tokens bypass the merges
        x = self.blocks(x)
        return self.fc(x[:, 0] if self.class_token else x.mean(1))


class LitePatchMerging(nn.Module):
    """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]: 2x2 neighbours concatenated, LayerNorm, linear back
    to the same width (no projection to the student's final width)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = nn.functional.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class LiteTokenHead(nn.Module):
    """`--head-kind token-lite`: a smaller token head for tiny students (bench/plans/tiny50.yaml compares it with
    the authors' on a 0.26M-parameter ViT). It keeps the stage's width, merges while the grid is 14 or more, uses
    width/64 attention heads with qkv bias, a final LayerNorm and the token mean, and PyTorch's default
    initialisation."""

    def __init__(self, dim: int, grid: int, blocks: int, num_classes: int):
        super().__init__()
        merges = []
        while grid >= 14:
            merges.append(LitePatchMerging(dim))
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
        x = self.merges(x.permute(0, 2, 3, 1))
        x = self.blocks(x.flatten(1, 2))
        return self.fc(self.norm(x).mean(1))


def init_weights(module: nn.Module) -> None:
    """The authors' initialisation of the heads (LayerNorms and conv biases keep PyTorch's defaults)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def reads_class_token(model: nn.Module) -> bool:
    """The student has a class token and `forward_intermediates` can return it (`return_prefix_tokens`,
    e.g. timm's VisionTransformer); students without either are read out through the token mean."""
    has_cls = getattr(model, "cls_token", None) is not None and getattr(model, "num_prefix_tokens", 0) > 0
    return has_cls and "return_prefix_tokens" in inspect.signature(model.forward_intermediates).parameters


class StudentWithHeads(nn.Module):
    """A timm student plus one head per chosen stage. `forward` returns a dict:
    {"logits": [B, C], "heads": {"stage1": [B, C], ...}}; `self.model` is the bare student."""

    def __init__(self, model: nn.Module, num_classes: int, input_size: int, *, teacher_width: int = 0,
                 stages: list[int] | None = None, block_indices: list[int] | None = None,
                 head_kind: HeadKind = "auto", with_heads: bool = True):
        super().__init__()
        self.model = model
        self.indices, positions = select_indices(model, stages, block_indices) if with_heads else ([], [])
        levels, isotropic = feature_levels(model)
        self.kind = ("token" if isotropic or is_transformer(model) else "conv") if head_kind == "auto" else head_kind
        self.prefix = self.kind == "token" and reads_class_token(model)
        self.heads = nn.ModuleDict()
        self.names: list[str] = []
        if not self.indices:
            return
        was_training = model.training
        model.eval()
        with torch.no_grad():  # one probe forward gives every chosen stage's width and grid
            feats = model.forward_intermediates(torch.zeros(1, 3, input_size, input_size), indices=self.indices,
                                                intermediates_only=True)
        model.train(was_training)
        info = model.feature_info
        info = info if isinstance(info, list) else info.info
        final = int(getattr(model, "num_features", info[levels[-1]]["num_chs"]))  # the student's final width
        for idx, pos, f in zip(self.indices, positions, feats, strict=True):
            name = f"stage{pos + 1}" if not block_indices else f"block{idx}"
            c, h = f.shape[1], f.shape[2]
            if self.kind == "token-lite":
                self.heads[name] = LiteTokenHead(c, h, max(3 - pos, 1), num_classes)
            elif self.kind == "conv":
                halvings = round(math.log2(info[levels[-1]]["reduction"] / info[idx]["reduction"]))
                self.heads[name] = ConvHead(c, halvings, max(final, int(teacher_width or 0)), num_classes)
            else:
                if self.prefix and c != final:
                    raise UserError(f"block {idx} of this student is {c} wide but its class token head would be "
                                    f"{final} wide; choose blocks of the final width (--block-indices)")
                self.heads[name] = TokenHead(c, h, final, max(3 - pos, 1), num_classes, class_token=self.prefix)
            self.names.append(name)
        if self.kind != "token-lite":
            init_weights(self.heads)

    def forward(self, x: torch.Tensor, heads: bool = True) -> dict:
        """x: [B, 3, H, W] (already normalised for the student)."""
        if not (heads and self.indices and self.training):
            return {"logits": self.model(x), "heads": {}}
        kw = {"return_prefix_tokens": True} if self.prefix else {}
        final, feats = self.model.forward_intermediates(x, indices=self.indices, **kw)
        logits = self.model.forward_head(final)
        feats = [f if self.prefix else (f,) for f in feats]  # (grid [B, C, H, W], prefix tokens [B, P, C]?)
        return {"logits": logits, "heads": {n: self.heads[n](*f) for n, f in zip(self.names, feats, strict=True)}}
