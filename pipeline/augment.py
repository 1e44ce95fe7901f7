"""Augmentation recipes as data, and the random draws that make views replay bit for bit.

A *view* is defined once, in [0, 1] RGB at the recipe's input size (`pipeline.transforms` makes it); each model
then resizes and normalises it its own way (`ModelInput`). Every random decision for the view of sample `index`
in view epoch `view_epoch` comes from generators keyed by

    vseed     = SeedSequence([view seed, view epoch, index]) -> uint32      (`seed_of_view`)
    stage rng = numpy.default_rng([vseed, stage])      (stage: crop, flip, auto-aug, jitter, erase, mix,
                                                       interpolation: `draw_rng`, `DRAW_*`)

so rebuilding a view needs the recipe, the view seed, the view epoch, the index and the shard (mixing
partners are other samples of the same data shard), nothing else: no dependence on process,
worker count, batch size or iteration order.

RandAugment and random erasing are timm's own transforms, so the pixels are the library's: they draw from the
process-global `random`, numpy and torch generators, so each call runs inside `seeded_globals`, which seeds those
from the view's stream and restores them afterwards (a student's dropout and data order do not move).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
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

from pipeline.errors import UserError
from pipeline.spec import fits, type_name

# numbers so that the streams of the existing ones (and the views of recipes that do not use them) stay put
DRAW_CROP, DRAW_FLIP, DRAW_AUTO, DRAW_JITTER, DRAW_ERASE, DRAW_MIX, DRAW_INTERP = range(7)


# ----------------------------------------------------------------------------------- random keys

def seed_of_view(view_seed: int, view_epoch: int, index: int) -> int:
    """The 32-bit seed (`vseed`) of the view of sample `index` in `view_epoch`, from the view seed; stored in the
    cache's replay record (as `view_seed`, the record's name for it)."""
    return int(np.random.SeedSequence([view_seed, view_epoch, index]).generate_state(1, np.uint32)[0])


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
def auto_augment_op(recipe: Recipe):
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
        pil = auto_augment_op(recipe)(pil)
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
                auto_augment_op(self)
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
