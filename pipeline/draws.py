"""The random draws of a view, and timm's random ops run on them so that they replay bit for bit.

Every random decision for the view of sample `index` in view epoch `view_epoch` comes from generators keyed by

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

import functools
import random
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import (
    augment_and_mix_transform,
    auto_augment_transform,
    posterize,
    rand_augment_transform,
)
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp

if TYPE_CHECKING:
    from pipeline.augment import Recipe

# one independent random stream per augmentation step of a view, keyed (vseed, step); new steps get new
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
