"""A view made from an image, as a recipe says: crop (decoding a JPEG no larger than the crop needs), flip,
auto-augment, colour jitter and mixing, each drawn from the view's own streams (`pipeline.augment.draw_rng`); and
the deterministic evaluation view.

Crop, flip, jitter and mixing are drawn here and done with torchvision's functional ops (timm's mixup mixes within
a batch, and the teacher must see the mixed view); auto-augment and erasing are timm's own ops
(`pipeline.augment`). Erasing comes after mixing, in `pipeline.views.shard_views`, as timm's loader does it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from pipeline.augment import DRAW_CROP, DRAW_FLIP, DRAW_INTERP, DRAW_JITTER, DRAW_MIX, Recipe, auto_augment, draw_rng

MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2


def _interp(recipe: Recipe, vseed: int | None = None) -> InterpolationMode:
    """The resize kernel: the recipe's, or for random one drawn per view (bicubic for evaluation, no seed)."""
    name = recipe.interpolation
    if name == "random":
        name = "bicubic" if vseed is None or draw_rng(vseed, DRAW_INTERP).random() < 0.5 else "bilinear"
    return InterpolationMode.BICUBIC if name == "bicubic" else InterpolationMode.BILINEAR


def _rrc_params(rng: np.random.Generator, h: int, w: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling, driven by our generator."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@dataclass
class MixRecord:
    """The replay record of one view; what the cache stores next to the teacher outputs."""

    view_seed: int  # the view's own seed (`vseed`: `pipeline.augment.seed_of_view`), under the record's name for it
    partner: int = -1  # global index of the mixing partner, -1 when not mixed
    lam: float = 1.0  # weight of the sample's own label
    mode: int = MIX_NONE
    box: tuple[int, int, int, int] | None = field(default=None, repr=False)  # cutmix (y0, y1, x0, x1)


DRAFT_MARGIN = 1.25
"""decode="draft" decodes a view's source at 1/r of its size only where the crop, so reduced, still spans at least
DRAFT_MARGIN x the view's side in both directions: the view keeps every pixel of resolution it can hold, and the
antialiased resize after it, not the DCT reduction, sets what detail survives (Pillow's `thumbnail` uses a wider
gap, 2.0, for the same purpose; 1.25 is a chosen margin, not a derived one)."""


def draft_reduction(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """The largest JPEG DCT reduction r in (8, 4, 2) with crop / r >= DRAFT_MARGIN * out on both sides, else 1."""
    for r in (8, 4, 2):
        if crop_h >= r * DRAFT_MARGIN * out_h and crop_w >= r * DRAFT_MARGIN * out_w:
            return r
    return 1


class Decoded:
    """An image already decoded [3, H, W] uint8, standing in for an encoded sample (`pipeline.reader.Sample`),
    which views take so that they can draw the crop from the header size before decoding."""

    reducible = False

    def __init__(self, image: torch.Tensor):
        self.image, self.size = image, (image.shape[-1], image.shape[-2])

    def decoded(self, reduce: int = 1) -> torch.Tensor:
        assert reduce == 1, "a decoded image cannot be decoded smaller"
        return self.image


def _source(image) -> Decoded:
    return Decoded(image) if isinstance(image, torch.Tensor) else image


def _decode_for(src, recipe: Recipe, box: tuple[int, int, int, int], out_h: int, out_w: int):
    """The source decoded for a crop `box` (top, left, h, w in full-size pixels) that will be resized to
    out_h x out_w: (image, box in that image's pixels). Full size unless the recipe decodes drafts, the source
    is a JPEG and the crop leaves room (`draft_reduction`); then the box is scaled and rounded to the reduced
    pixel grid (an offset of at most half a reduced pixel, i.e. under 0.4 of a view pixel)."""
    r = draft_reduction(box[2], box[3], out_h, out_w) if recipe.decode == "draft" and src.reducible else 1
    img = src.decoded(r)
    if r == 1:
        return img, box
    H, W = img.shape[-2:]
    top, left, h, w = box
    y0, x0 = round(top / r), round(left / r)
    y1, x1 = min(H, round((top + h) / r)), min(W, round((left + w) / r))
    return img, (y0, x0, y1 - y0, x1 - x0)


def base_view(image, recipe: Recipe, vseed: int) -> torch.Tensor:
    """Geometric and photometric augmentation of one image -> [3, S, S] uint8 (compact, to keep a shard's views
    for mixing; possibly a strided view): crop, flip, auto-augment, colour jitter. Erasing comes after mixing.

    `image`: a `pipeline.reader.Sample` (decoded here, at the size the crop needs) or a decoded [3, H, W] uint8
    tensor. The crop is drawn from the image's size alone, so it is the same whichever way it is decoded."""
    src = _source(image)
    S = recipe.input_size
    w, h = src.size
    rng = draw_rng(vseed, DRAW_CROP)
    interp = _interp(recipe, vseed)
    if recipe.crop == "rrc":
        img, box = _decode_for(src, recipe, _rrc_params(rng, h, w, recipe.scale, recipe.ratio), S, S)
        img = TF.resized_crop(img, *box, [S, S], interpolation=interp, antialias=True)
    else:
        img, _ = _decode_for(src, recipe, (0, 0, h, w), S, S)
        img = img if tuple(img.shape[-2:]) == (S, S) else TF.resize(img, [S, S], interpolation=interp, antialias=True)
        if recipe.crop == "pad" and recipe.padding > 0:
            p = recipe.padding
            img = F.pad(img, (p, p, p, p))
            top, left = int(rng.integers(0, 2 * p + 1)), int(rng.integers(0, 2 * p + 1))
            img = img[:, top:top + S, left:left + S]
    if recipe.hflip > 0 and draw_rng(vseed, DRAW_FLIP).random() < recipe.hflip:
        img = img.flip(-1)
    if recipe.auto_augment != "none":
        img = auto_augment(img, recipe, vseed)
    if recipe.color_jitter > 0:
        rng = draw_rng(vseed, DRAW_JITTER)
        lo, hi = max(0.0, 1 - recipe.color_jitter), 1 + recipe.color_jitter
        b, c, s = (float(rng.uniform(lo, hi)) for _ in range(3))
        img = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, b), c), s)
    return img  # channels-last after auto-augment: `to_view` lays it out as it converts


def to_view(image: torch.Tensor) -> torch.Tensor:
    """uint8 base view (any memory layout) -> float [3, S, S] in [0, 1], contiguous: one pass that converts and
    lays out at once (the same float32 values as .float() / 255)."""
    return torch.div(image, 255.0, out=torch.empty(image.shape, dtype=torch.float32))


def mix_record(recipe: Recipe, vseed: int, index: int, first: int, count: int) -> MixRecord:
    """Whether and how the view of `index` mixes with a partner from its shard [first, first + count)."""
    rec = MixRecord(vseed)
    if not recipe.mixes or count < 2:
        return rec
    rng = draw_rng(vseed, DRAW_MIX)
    if rng.random() >= recipe.mix_prob:
        return rec
    use_cutmix = recipe.cutmix_alpha > 0 and (recipe.mixup_alpha == 0 or rng.random() < recipe.switch_prob)
    alpha = recipe.cutmix_alpha if use_cutmix else recipe.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    rec.partner = first + (index - first + 1 + int(rng.integers(0, count - 1))) % count
    if use_cutmix:
        S = recipe.input_size
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(S * cut), int(S * cut)
        cy, cx = int(rng.integers(0, S)), int(rng.integers(0, S))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, S)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, S)
        rec.box = (y0, y1, x0, x1)
        rec.lam = 1.0 - (y1 - y0) * (x1 - x0) / float(S * S)
        rec.mode = MIX_CUTMIX
    else:
        rec.lam, rec.mode = lam, MIX_MIXUP
    return rec


def mix(own: torch.Tensor, partner: torch.Tensor | None, rec: MixRecord, inplace: bool = False) -> torch.Tensor:
    """The mixed view: `own` float [3, S, S]; `partner` its float view or its uint8 base view (then only the part
    the mix uses is converted: the cutmix box). `inplace`: the mix may write into `own`."""
    if rec.mode == MIX_NONE or partner is None:
        return own
    if rec.mode == MIX_CUTMIX:
        y0, y1, x0, x1 = rec.box
        out = own if inplace else own.clone()
        box = partner[:, y0:y1, x0:x1]
        out[:, y0:y1, x0:x1] = to_view(box) if box.dtype == torch.uint8 else box
        return out
    # own * lam + partner * (1 - lam), the same float32 operations, without two temporaries of the view's size
    other = to_view(partner).mul_(1.0 - rec.lam) if partner.dtype == torch.uint8 else partner * (1.0 - rec.lam)
    return (own.mul_(rec.lam) if inplace else own * rec.lam).add_(other)


def eval_view(image, recipe: Recipe) -> torch.Tensor:
    """Deterministic evaluation view: resize the short side, centre crop, [3, S, S] float in [0, 1].
    `image`: a `pipeline.reader.Sample` or a decoded [3, H, W] uint8 tensor, as for `base_view`."""
    src = _source(image)
    S = recipe.input_size
    short = int(math.floor(S / recipe.eval_crop_pct))
    w, h = src.size
    img, _ = _decode_for(src, recipe, (0, 0, min(h, w), min(h, w)), short, short)  # the short side -> `short`
    img = TF.resize(img, short, interpolation=_interp(recipe), antialias=True)
    img = TF.center_crop(img, [S, S])
    return img.to(torch.float32) / 255.0
