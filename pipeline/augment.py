"""Augmentation recipes as data, and views that replay bit for bit.

A *view* is defined once, in [0, 1] RGB at the recipe's input size; each model then resizes and
normalises it its own way (`ModelInput`). Every random decision for the view of sample `index`
in `epoch` comes from generators keyed by

    view_seed = SeedSequence([run seed, epoch, index]) -> uint32
    stage rng = numpy.default_rng([view_seed, stage])      (stage: crop, flip, auto-aug, jitter, erase, mix,
                                                          interpolation)

so rebuilding a view needs the recipe, the seed, the epoch, the index and the shard (mixing
partners are other samples of the same data shard), nothing else: no dependence on process,
worker count, batch size or iteration order.

Crop, flip, jitter and mixing are drawn here and done with torchvision's functional ops (timm's
mixup mixes within a batch, and the teacher must see the mixed view). RandAugment and random
erasing are timm's own transforms, so the pixels are the library's: they draw from the process-global
`random`, numpy and torch generators, so each call runs inside `seeded_globals`, which seeds those
from the view's stream and restores them afterwards (a student's dropout and data order do not move).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import (
    augment_and_mix_transform,
    auto_augment_transform,
    posterize,
    rand_augment_transform,
)
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp
from torchvision.transforms import InterpolationMode

from pipeline.errors import UserError
from pipeline.spec import fits, type_name

# one independent random stream per augmentation step of a view, keyed (view seed, step); new steps get new
# numbers so that the streams of the existing ones (and the views of recipes that do not use them) stay put
DRAW_CROP, DRAW_FLIP, DRAW_AUTO, DRAW_JITTER, DRAW_ERASE, DRAW_MIX, DRAW_INTERP = range(7)
MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2


# ----------------------------------------------------------------------------------- random keys

def view_seed(seed: int, epoch: int, index: int) -> int:
    """The 32-bit seed of one view; stored in the cache's replay record."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint32)[0])


def draw_rng(vseed: int, step: int) -> np.random.Generator:
    """The random stream of one augmentation step (`DRAW_*`) of the view with seed `vseed`."""
    return np.random.default_rng([vseed, step])


# ------------------------------------------------------------------------ timm's ops, replayable

_preserving = False  # inside preserved_globals: the states are saved once, for the whole block


@contextmanager
def preserved_globals():
    """Save the global `random`, numpy and torch (CPU) generator states and restore them on exit, whatever
    happens inside; nested blocks (and `seeded_globals` inside one) leave the saving to the outermost. A shard's
    views seed timm's ops two or three times each: saving once per shard rather than once per op saves about
    0.1 ms a view (numpy's get_state/set_state pair alone costs 0.09 ms)."""
    global _preserving
    if _preserving:
        yield
        return
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    _preserving = True
    try:
        yield
    finally:
        _preserving = False
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.default_generator.set_state(torch_state)


def global_seed(rng: np.random.Generator) -> int:
    """The seed `seeded_globals(rng)` gives the global generators (its first draw from `rng`)."""
    return int(rng.integers(0, 2**32))


@contextmanager
def seeded_globals(rng: np.random.Generator):
    """Run timm's random transforms as a function of `rng`: the global `random`, numpy and torch (CPU)
    generators they draw from are seeded from it, and restored on exit (or at the end of the enclosing
    `preserved_globals` block), whatever happens inside.

    Process-global state: call it from one thread at a time (the views are built in the data-loader workers
    or the main thread, never in two threads of one process)."""
    seed = global_seed(rng)
    with preserved_globals():
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would reseed CUDA too
        yield


def _aa_hparams(recipe: Recipe) -> dict:
    """The hyper-parameters timm's transform factory gives its auto-augment (transforms_imagenet_train)."""
    hp = {"translate_const": int(recipe.input_size * 0.45),
          "img_mean": tuple(min(255, round(255 * x)) for x in recipe.norm_mean)}
    if recipe.interpolation != "random":  # random: each geometric op picks bilinear or bicubic
        hp["interpolation"] = str_to_pil_interp(recipe.interpolation)
    if recipe.auto_augment.startswith("augmix"):
        hp["translate_pct"] = 0.3
    return hp


def _posterize_0_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, where keeping 0 bits gives a black image as older Pillow did (Pillow 13 refuses 0 bits,
    which timm's PosterizeIncreasing reaches at magnitude 10, e.g. m9 plus noise: a crash on ~0.4% of views)."""
    return Image.new(img.mode, img.size) if bits_to_keep <= 0 else posterize(img, bits_to_keep, **kwargs)


def pillow_compatible(transform):
    """Point the Posterize ops of a timm auto-augment transform (its `ops`, or AutoAugment's `policy`) at
    `_posterize_0_bits`; nothing else changes."""
    ops = list(getattr(transform, "ops", [])) + [op for sub in getattr(transform, "policy", []) for op in sub]
    for op in ops:
        if op.aug_fn is posterize:
            op.aug_fn = _posterize_0_bits
    return transform


@functools.lru_cache(maxsize=16)
def _auto_augment(recipe: Recipe):
    """timm's auto-augment transform (PIL image -> PIL image) for the recipe's config string."""
    name, hp = recipe.auto_augment, _aa_hparams(recipe)
    if name.startswith("rand"):
        return pillow_compatible(rand_augment_transform(name, hp))
    if name.startswith("augmix"):
        return pillow_compatible(augment_and_mix_transform(name, hp))
    return pillow_compatible(auto_augment_transform(name, hp))


@functools.lru_cache(maxsize=16)
def _random_erasing(recipe: Recipe) -> RandomErasing:
    return RandomErasing(probability=recipe.erase_prob, mode=recipe.erase_mode, device="cpu")


def auto_augment(img: torch.Tensor, recipe: Recipe, vseed: int) -> torch.Tensor:
    """timm's auto-augment of a uint8 [3, S, S] view, drawn from the view's DRAW_AUTO stream (the uint8 <-> PIL
    round trip is exact, so the pixels are the ones timm's transform makes of this image)."""
    # planes -> interleaved RGB in Pillow's own loop: ~7x faster than numpy's strided copy of the permuted tensor
    pil = Image.merge("RGB", [Image.fromarray(plane) for plane in img.numpy()])
    with seeded_globals(draw_rng(vseed, DRAW_AUTO)):
        pil = _auto_augment(recipe)(pil)
    return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1)  # channels-last; base_view packs it


def erases(recipe: Recipe, vseed: int) -> bool:
    """Whether timm's RandomErasing erases the view of `vseed` at all. Its first draw decides it: no box when
    `random.random() > probability` (timm.data.random_erasing.RandomErasing._erase), drawn from the global stream
    `seeded_globals` seeds; reading that one number from a private generator seeded the same way skips the
    canvas (a full-size allocation, the noise, the scan for the box: ~0.5 ms at 224 px) for the views that are
    not erased, 1 - erase_prob of them. Written by hand because timm only erases in place; tests/test_augment.py
    checks it against the full path, so a timm that drew otherwise fails there, not silently here."""
    return random.Random(global_seed(draw_rng(vseed, DRAW_ERASE))).random() <= recipe.erase_prob


def erase(view: torch.Tensor, recipe: Recipe, vseed: int) -> torch.Tensor:
    """timm's RandomErasing of a float view [3, S, S] in [0, 1], drawn from the view's DRAW_ERASE stream.

    timm erases the normalised tensor; here it erases a NaN canvas, so that the box and its noise are exactly
    timm's while the pixels outside the box stay bit for bit; the noise z is mapped back to the view's space
    as norm_mean + norm_std * z (a model normalising by (norm_mean, norm_std) sees z again, to float rounding).
    Erased pixels may fall outside [0, 1], as they do in timm. A view that is not erased comes back as the same
    tensor object (`shard_views` relies on it)."""
    if recipe.erase_prob <= 0 or not erases(recipe, vseed):
        return view
    canvas = torch.full_like(view, float("nan"))
    with seeded_globals(draw_rng(vseed, DRAW_ERASE)):
        _random_erasing(recipe)(canvas)
    # timm writes one box through every channel (count 1): find it on channel 0 and write only it
    rows, cols = (~canvas[0].isnan()).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return view
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols.min()), int(cols.max()) + 1
    mean = torch.tensor(recipe.norm_mean, dtype=view.dtype).view(3, 1, 1)
    std = torch.tensor(recipe.norm_std, dtype=view.dtype).view(3, 1, 1)
    out = view.clone()
    out[:, y0:y1, x0:x1] = mean + std * canvas[:, y0:y1, x0:x1]
    return out


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
    auto_augment: str = "none"
    """timm's auto-augment config string, run by timm (e.g. "rand-m9-mstd0.5-inc1": RandAugment, 2 ops each
    applied with probability 0.5, magnitude 9 with noise of std 0.5, the increasing op set; "original", "v0":
    AutoAugment policies; "augmix-..."), or "none"."""
    color_jitter: float = 0.0
    """Brightness, contrast and saturation factors uniform in [1 - x, 1 + x]."""
    erase_prob: float = 0.0
    """Random erasing probability (timm's RandomErasing `re_prob`, one box), applied after mixing as timm's
    loader does it (on the batch, after the collate's mixup)."""
    erase_mode: Literal["pixel", "rand", "const"] | None = None
    """timm's `re_mode`, required when erase_prob > 0: pixel: per-pixel N(0, 1) noise, rand: one N(0, 1)
    colour per channel, const: 0, each in the space normalised by (norm_mean, norm_std)."""
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    """Probability that a view is mixed at all (when an alpha is > 0)."""
    switch_prob: float = 0.5
    """Probability of cutmix rather than mixup when both alphas are > 0."""
    interpolation: Literal["bilinear", "bicubic", "random"] = "bilinear"
    """Resize kernel of the crop; random: bilinear or bicubic with equal odds per view (timm's
    `interpolation='random'`, which also lets each geometric auto-augment op pick its own). Evaluation uses
    bicubic for random."""
    norm_mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    norm_std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    """The normalisation timm's augmentations assume (its data config `mean`, `std`): auto-augment fills with
    round(255 * norm_mean), erasing noise is N(0, 1) after normalising by (norm_mean, norm_std). Each model
    still normalises the views its own way."""
    eval_crop_pct: float = 0.875
    """Evaluation: resize the short side to input_size / eval_crop_pct, centre crop."""
    decode: Literal["full", "draft"] = "full"
    """JPEG decoding: full size, or draft: at 1/2, 1/4 or 1/8 of the size (libjpeg's DCT scaling) where the
    view's crop, drawn from the header size before decoding, still covers DRAFT_MARGIN x the view's side in
    both directions after the reduction (so no view loses resolution it holds). Draft views differ in pixels
    from full ones wherever a reduction is taken, so a cache records it (a record without it means full)."""

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
        if self.erase_prob > 0 and self.erase_mode not in ("pixel", "rand", "const"):
            problems.append(f"erase_prob > 0 needs erase_mode pixel, rand or const (timm's re_mode), got "
                            f"{self.erase_mode} (a cache made before erase_mode existed erased otherwise: rebuild it)")
        if not 0 < self.eval_crop_pct <= 1:
            problems.append(f"eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}")
        if self.crop not in ("rrc", "pad", "none"):
            problems.append(f"crop must be rrc, pad or none, got {self.crop}")
        if self.decode not in ("full", "draft"):
            problems.append(f"decode must be full or draft, got {self.decode}")
        if self.interpolation not in ("bilinear", "bicubic", "random"):
            problems.append(f"interpolation must be bilinear, bicubic or random, got {self.interpolation}")
        if self.auto_augment != "none":
            try:
                _auto_augment(self)
            except Exception as e:  # timm asserts on a config string it cannot parse
                problems.append(f"auto_augment must be none or a timm auto-augment config string (e.g. "
                                f"rand-m9-mstd0.5-inc1), got {self.auto_augment!r} ({type(e).__name__}: {e})")
        if problems:
            raise UserError("invalid augmentation recipe: " + "; ".join(problems))

    @property
    def mixes(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def to_dict(self) -> dict:
        """JSON-normal form (lists, not tuples), so it compares equal to what a store's attributes hold. decode
        is left out when full, so the records of caches made before it existed keep meaning what they meant."""
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        if d["decode"] == "full":
            del d["decode"]
        return d

    @staticmethod
    def from_dict(d: dict) -> Recipe:
        d = dict(d)
        hints = typing.get_type_hints(Recipe)
        wrong = [f"{k} {v!r} is not {type_name(hints[k])}" for k, v in d.items()
                 if k in hints and not fits(v, hints[k])]
        if wrong:  # a config file's recipe fields: refused here, not as a TypeError in __post_init__
            raise UserError(f"invalid augmentation recipe: {'; '.join(wrong)}")
        for k in ("scale", "ratio", "norm_mean", "norm_std"):
            if k in d:
                d[k] = tuple(d[k])
        known = {f.name for f in dataclasses.fields(Recipe)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown recipe fields: {', '.join(sorted(unknown))} (a cache made by an older version "
                            f"of the augmentation? rebuild it)")
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
    # the paper's ViT/MLP recipe (the authors' configs/*/vit_mlp.yaml on timm's train.py defaults): random resized
    # crop + flip with random interpolation, RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0, erasing 0.25
    # in pixel mode
    "imagenet-vit": Recipe(input_size=224, crop="rrc", auto_augment="rand-m9-mstd0.5-inc1", erase_prob=0.25,
                           erase_mode="pixel", mixup_alpha=0.8, cutmix_alpha=1.0, interpolation="random"),
    # Tiny-ImageNet at its native 64x64
    "tiny-cnn": Recipe(input_size=64, crop="rrc", scale=(0.35, 1.0), eval_crop_pct=1.0),
    "tiny-vit": Recipe(input_size=64, crop="rrc", scale=(0.35, 1.0), auto_augment="rand-m9-mstd0.5-inc1",
                       erase_prob=0.25, erase_mode="pixel", mixup_alpha=0.8, cutmix_alpha=1.0,
                       interpolation="random", eval_crop_pct=1.0),
}


def get_recipe(name: str, input_size: int | None = None) -> Recipe:
    if name not in PRESETS:
        raise UserError(f"unknown recipe {name!r}; choose one of: {', '.join(PRESETS)}")
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
    decode: Literal["full", "draft"] | None = None
    """Override the recipe's JPEG decoding: full, or draft (reduced-size decoding where the crop allows it;
    other pixels than full, recorded in the cache)."""

    def __post_init__(self):
        if self.decode is not None and self.recipe is None:  # it would have no recipe to change
            raise UserError(f"--decode {self.decode} changes a recipe's views: name the recipe too (--recipe), "
                            f"or omit --decode")
        self.get()  # an unknown preset or a bad recipe is refused now, not at the first view

    def get(self) -> Recipe | None:
        """The recipe (None when none is named), at --view-size when given."""
        r = self.recipe
        if r is None:
            return None
        r = get_recipe(r) if isinstance(r, str) else Recipe.from_dict(r) if isinstance(r, dict) else r
        if self.view_size:
            r = dataclasses.replace(r, input_size=self.view_size)
        return dataclasses.replace(r, decode=self.decode) if self.decode else r

    @property
    def name(self) -> str:
        """The preset's name, or 'custom' for a recipe given by its fields."""
        return self.recipe if isinstance(self.recipe, str) else "custom"


# ------------------------------------------------------------------------------------------ views

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

    view_seed: int
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


# ----------------------------------------------------------------------------------- model inputs

@dataclass(frozen=True)
class ModelInput:
    """How one model sees a view: its own input size and normalisation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels_last: bool = False  # hand the model channels-last tensors (its weights are converted with it)

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        """views: [B, 3, S, S] in [0, 1] -> [B, 3, size, size] normalised, on the views' device."""
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        if views.shape[-1] != self.size or views.shape[-2] != self.size:
            views = F.interpolate(views, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                  antialias=True)
        mean = torch.tensor(self.mean, device=views.device, dtype=views.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=views.device, dtype=views.dtype).view(1, 3, 1, 1)
        return (views - mean) / std
