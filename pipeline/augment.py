"""Augmentation recipes as data, and views that replay bit for bit.

A *view* is defined once, in [0, 1] RGB at the recipe's input size; each model then resizes and
normalises it its own way (`ModelInput`). Every random decision for the view of sample `index`
in `epoch` comes from generators keyed by

    view_seed = SeedSequence([run seed, epoch, index]) -> uint32
    stage rng = numpy.default_rng([view_seed, stage])      (stage: crop, flip, auto-aug, jitter, erase, mix)

so rebuilding a view needs the recipe, the seed, the epoch, the index and the shard (mixing
partners are other samples of the same data shard), nothing else: no dependence on process,
worker count, batch size or iteration order.

Hand-written on purpose: torchvision's and timm's random transforms draw from the global torch RNG
(and timm's mixup mixes within a batch), so a view would depend on the worker, the batch and the
order; here the draws are ours and the pixel operations are torchvision's functional ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from pipeline.errors import UserError

# one independent random stream per augmentation step of a view, keyed (view seed, step)
DRAW_CROP, DRAW_FLIP, DRAW_AUTO, DRAW_JITTER, DRAW_ERASE, DRAW_MIX = range(6)
MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a training view. Stored verbatim in every cache."""

    input_size: int = 224
    """Side of the square view, in pixels."""
    crop: Literal["rrc", "pad", "none"] = "rrc"
    """rrc: random resized crop (scale, ratio); pad: resize, zero-pad by `padding`, random crop; none: resize."""
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    padding: int = 4
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = "none"
    ra_n: int = 2
    """RandAugment: operations per view."""
    ra_m: int = 9
    """RandAugment: magnitude out of 10."""
    color_jitter: float = 0.0
    """Brightness, contrast and saturation factors uniform in [1 - x, 1 + x]."""
    erase_prob: float = 0.0
    """Random erasing probability (one box filled with uniform noise)."""
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    """Probability that a view is mixed at all (when an alpha is > 0)."""
    switch_prob: float = 0.5
    """Probability of cutmix rather than mixup when both alphas are > 0."""
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    eval_crop_pct: float = 0.875
    """Evaluation: resize the short side to input_size / eval_crop_pct, centre crop."""

    def __post_init__(self):
        problems = []
        if self.input_size < 8:
            problems.append(f"input_size must be at least 8, got {self.input_size}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            problems.append(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            problems.append(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        for name in ("hflip", "erase_prob", "mix_prob", "switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            problems.append("mixup_alpha and cutmix_alpha must be >= 0")
        if not 0 <= self.ra_m <= 10 or self.ra_n < 0:
            problems.append(f"RandAugment needs n >= 0 and 0 <= m <= 10, got n={self.ra_n} m={self.ra_m}")
        if not 0 < self.eval_crop_pct <= 1:
            problems.append(f"eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}")
        if self.crop not in ("rrc", "pad", "none"):
            problems.append(f"crop must be rrc, pad or none, got {self.crop}")
        if self.auto_augment not in ("none", "randaugment", "trivialaugment"):
            problems.append(f"auto_augment must be none, randaugment or trivialaugment, got {self.auto_augment}")
        if problems:
            raise UserError("invalid augmentation recipe: " + "; ".join(problems))

    @property
    def mixes(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def to_dict(self) -> dict:
        """JSON-normal form (lists, not tuples), so it compares equal to what a store's attributes hold."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @staticmethod
    def from_dict(d: dict) -> Recipe:
        d = dict(d)
        for k in ("scale", "ratio"):
            if k in d:
                d[k] = tuple(d[k])
        known = {f.name for f in dataclasses.fields(Recipe)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown recipe fields: {', '.join(sorted(unknown))}")
        return Recipe(**d)


PRESETS: dict[str, Recipe] = {
    # CIFAR-style: pad 4 + random 32x32 crop + flip (the paper's CIFAR-100 recipe)
    "cifar": Recipe(input_size=32, crop="pad", padding=4, eval_crop_pct=1.0),
    # the embedded 8x8 digits upscaled to 32: small shifts, no flip (digits are not mirror-symmetric)
    "digits": Recipe(input_size=32, crop="pad", padding=3, hflip=0.0, eval_crop_pct=1.0),
    # `make demo`: the digits at 16x16 (2x their native 8x8, a quarter of the pixels of `digits`) so that
    # tiny students converge in minutes on 2 CPU cores; shifts of up to 1 px (half a native pixel), no flip
    "digits-demo": Recipe(input_size=16, crop="pad", padding=1, hflip=0.0, eval_crop_pct=1.0),
    # digits with mixing: exercises mixup/cutmix replay on the embedded data
    "digits-mix": Recipe(input_size=32, crop="pad", padding=3, hflip=0.0, eval_crop_pct=1.0,
                         mixup_alpha=0.8, cutmix_alpha=1.0),
    # the paper's ImageNet CNN recipe: random resized crop + flip
    "imagenet-cnn": Recipe(input_size=224, crop="rrc"),
    # the paper's ViT/MLP recipe (DeiT-style): RandAugment m9, mixup 0.8, cutmix 1.0, erasing 0.25
    "imagenet-vit": Recipe(input_size=224, crop="rrc", auto_augment="randaugment", ra_n=2, ra_m=9,
                           erase_prob=0.25, mixup_alpha=0.8, cutmix_alpha=1.0, interpolation="bicubic"),
    # Tiny-ImageNet at its native 64x64
    "tiny-cnn": Recipe(input_size=64, crop="rrc", scale=(0.35, 1.0), eval_crop_pct=1.0),
    "tiny-vit": Recipe(input_size=64, crop="rrc", scale=(0.35, 1.0), auto_augment="randaugment", ra_m=9,
                       erase_prob=0.25, mixup_alpha=0.8, cutmix_alpha=1.0, eval_crop_pct=1.0),
}


def get_recipe(name: str, input_size: int | None = None) -> Recipe:
    if name not in PRESETS:
        raise UserError(f"unknown recipe '{name}'; choose one of: {', '.join(PRESETS)}")
    r = PRESETS[name]
    return dataclasses.replace(r, input_size=input_size) if input_size else r


@dataclass
class ViewSpec:
    """Which views a command makes (the option group behind --recipe, --view-size and the view seed)."""

    recipe: str | Recipe | None = None
    """Augmentation preset (or, in a config file, the recipe's fields)."""
    view_size: int | None = None
    """Override the recipe's view size."""
    seed: int | None = None
    """Seed of the views (with the recipe, it decides every view)."""

    def __post_init__(self):
        self.get()  # an unknown preset or a bad recipe is refused now, not at the first view

    def get(self) -> Recipe | None:
        """The recipe (None when none is named), at --view-size when given."""
        r = self.recipe
        if r is None:
            return None
        if isinstance(r, str):
            return get_recipe(r, self.view_size)
        if isinstance(r, dict):
            r = Recipe.from_dict(r)
        return dataclasses.replace(r, input_size=self.view_size) if self.view_size else r

    @property
    def name(self) -> str:
        """The preset's name, or 'custom' for a recipe given by its fields."""
        return self.recipe if isinstance(self.recipe, str) else "custom"


# ----------------------------------------------------------------------------------- random keys

def view_seed(seed: int, epoch: int, index: int) -> int:
    """The 32-bit seed of one view; stored in the cache's replay record."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint32)[0])


def draw_rng(vseed: int, step: int) -> np.random.Generator:
    """The random stream of one augmentation step (`DRAW_*`) of the view with seed `vseed`."""
    return np.random.default_rng([vseed, step])


# -------------------------------------------------------------------------------- auto-augment ops

_FILL = [128, 128, 128]


def _signed(rng: np.random.Generator, v: float) -> float:
    return -v if rng.random() < 0.5 else v


def _op(img: torch.Tensor, name: str, mag: float, rng: np.random.Generator) -> torch.Tensor:
    """One RandAugment/TrivialAugment op on a uint8 [3, H, W] image; `mag` in [0, 1]."""
    h, w = img.shape[-2:]
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return TF.autocontrast(img)
    if name == "Equalize":
        return TF.equalize(img)
    if name == "Rotate":
        return TF.rotate(img, _signed(rng, 30.0 * mag), fill=_FILL)
    if name == "Solarize":
        return TF.solarize(img, threshold=int(256 - 256 * mag))
    if name == "Posterize":
        return TF.posterize(img, bits=max(1, 8 - int(4 * mag)))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = max(0.0, 1.0 + _signed(rng, 0.9 * mag))
        fn = {"Color": TF.adjust_saturation, "Contrast": TF.adjust_contrast,
              "Brightness": TF.adjust_brightness, "Sharpness": TF.adjust_sharpness}[name]
        return fn(img, factor)
    if name in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(_signed(rng, 0.3 * mag)))
        shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, fill=_FILL)
    if name in ("TranslateX", "TranslateY"):
        t = int(round(_signed(rng, 0.45 * mag) * (w if name == "TranslateX" else h)))
        tr = [t, 0] if name == "TranslateX" else [0, t]
        return TF.affine(img, angle=0.0, translate=tr, scale=1.0, shear=[0.0, 0.0], fill=_FILL)
    raise ValueError(name)


AUG_OPS = ("Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Posterize", "Color", "Contrast",
           "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY")


# ------------------------------------------------------------------------------------------ views

def _interp(recipe: Recipe) -> InterpolationMode:
    return InterpolationMode.BICUBIC if recipe.interpolation == "bicubic" else InterpolationMode.BILINEAR


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
class BaseView:
    """A sample's own augmented view before erasing and mixing (uint8, compact to keep per shard)."""

    image: torch.Tensor  # [3, S, S] uint8
    erase: tuple[int, int, int, int, int] | None = None  # (top, left, h, w, noise seed)


@dataclass
class MixRecord:
    """The replay record of one view; what the cache stores next to the teacher outputs."""

    view_seed: int
    partner: int = -1  # global index of the mixing partner, -1 when not mixed
    lam: float = 1.0  # weight of the sample's own label
    mode: int = MIX_NONE
    box: tuple[int, int, int, int] | None = field(default=None, repr=False)  # cutmix (y0, y1, x0, x1)


def base_view(image: torch.Tensor, recipe: Recipe, vseed: int) -> BaseView:
    """Geometric and photometric augmentation of one decoded image [3, H, W] uint8."""
    S = recipe.input_size
    h, w = image.shape[-2:]
    rng = draw_rng(vseed, DRAW_CROP)
    if recipe.crop == "rrc":
        top, left, ch, cw = _rrc_params(rng, h, w, recipe.scale, recipe.ratio)
        img = TF.resized_crop(image, top, left, ch, cw, [S, S], interpolation=_interp(recipe), antialias=True)
    else:
        img = image if (h, w) == (S, S) else TF.resize(image, [S, S], interpolation=_interp(recipe),
                                                       antialias=True)
        if recipe.crop == "pad" and recipe.padding > 0:
            p = recipe.padding
            img = F.pad(img, (p, p, p, p))
            top, left = int(rng.integers(0, 2 * p + 1)), int(rng.integers(0, 2 * p + 1))
            img = img[:, top:top + S, left:left + S]
    if recipe.hflip > 0 and draw_rng(vseed, DRAW_FLIP).random() < recipe.hflip:
        img = img.flip(-1)
    if recipe.auto_augment != "none":
        rng = draw_rng(vseed, DRAW_AUTO)
        if recipe.auto_augment == "randaugment":
            for _ in range(recipe.ra_n):
                img = _op(img, AUG_OPS[int(rng.integers(len(AUG_OPS)))], recipe.ra_m / 10.0, rng)
        else:  # TrivialAugment: one op, magnitude uniform over 31 levels
            name = AUG_OPS[int(rng.integers(len(AUG_OPS)))]
            img = _op(img, name, int(rng.integers(0, 31)) / 30.0, rng)
    if recipe.color_jitter > 0:
        rng = draw_rng(vseed, DRAW_JITTER)
        lo, hi = max(0.0, 1 - recipe.color_jitter), 1 + recipe.color_jitter
        b, c, s = (float(rng.uniform(lo, hi)) for _ in range(3))
        img = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, b), c), s)
    erase = None
    if recipe.erase_prob > 0:
        rng = draw_rng(vseed, DRAW_ERASE)
        if rng.random() < recipe.erase_prob:
            for _ in range(10):
                area = S * S * rng.uniform(0.02, 1 / 3)
                ar = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
                eh, ew = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
                if eh < S and ew < S:
                    erase = (int(rng.integers(0, S - eh + 1)), int(rng.integers(0, S - ew + 1)), eh, ew,
                             int(rng.integers(0, 2**31 - 1)))
                    break
    return BaseView(img.contiguous(), erase)


def to_view(base: BaseView) -> torch.Tensor:
    """uint8 base view -> float [3, S, S] in [0, 1], with its random-erasing box filled."""
    x = base.image.to(torch.float32) / 255.0
    if base.erase is not None:
        top, left, eh, ew, nseed = base.erase
        g = torch.Generator().manual_seed(nseed)
        x[:, top:top + eh, left:left + ew] = torch.rand((3, eh, ew), generator=g)
    return x


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


def mix(own: torch.Tensor, partner: torch.Tensor | None, rec: MixRecord) -> torch.Tensor:
    if rec.mode == MIX_NONE or partner is None:
        return own
    if rec.mode == MIX_CUTMIX:
        y0, y1, x0, x1 = rec.box
        out = own.clone()
        out[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
        return out
    return own * rec.lam + partner * (1.0 - rec.lam)


def eval_view(image: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """Deterministic evaluation view: resize the short side, centre crop, [3, S, S] float in [0, 1]."""
    S = recipe.input_size
    short = int(math.floor(S / recipe.eval_crop_pct))
    img = TF.resize(image, short, interpolation=_interp(recipe), antialias=True)
    img = TF.center_crop(img, [S, S])
    return img.to(torch.float32) / 255.0


# ----------------------------------------------------------------------------------- model inputs

@dataclass(frozen=True)
class ModelInput:
    """How one model sees a view: its own input size and normalisation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        """views: [B, 3, S, S] in [0, 1] -> [B, 3, size, size] normalised, on the views' device."""
        if views.shape[-1] != self.size or views.shape[-2] != self.size:
            views = F.interpolate(views, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                  antialias=True)
        mean = torch.tensor(self.mean, device=views.device, dtype=views.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=views.device, dtype=views.dtype).view(1, 3, 1, 1)
        return (views - mean) / std
