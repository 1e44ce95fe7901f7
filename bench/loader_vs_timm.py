"""Training views per CPU-second: this project's view builder against timm's own loader transforms.

    python bench/loader_vs_timm.py [--images 192] [--shard-size 16] [--rounds 6] [--recipes NAME[@SIZE] ...]

Data: ImageNet-size real photos. The sample photos that ship inside matplotlib's and scikit-learn's wheels
(grace_hopper.jpg 512x600, china.jpg and flower.jpg 640x427) are cut into distinct ~500x375 crops (different
offsets, scales and flips; downscaled, never upsampled), saved as JPEG quality 90 and written as shards with
`cli.py shards` code (and once more with `--max-size`, see below).

Variants, all on one core (torch.set_num_threads(1)), timed with time.process_time (CPU seconds of this
process), in interleaved rounds whose order rotates, so that the load of the shared machine falls on every
variant alike and the ratios are fair even where the absolute rates are not:
- ours:        stage two's loader as train-student takes it, `TrainViews(...).loader(epoch, --shard-size, 0)`
               (0 workers: this process does a loader worker's work) over the shards: tar parsing, decode, crop,
               flip, auto-augment, mixing, erasing, the pixel fingerprint, each shard's permutation, collation into
               batches; full decode: the recipe as it is
- ours_draft:  the same with the recipe's `decode="draft"` (reduced-size JPEG decoding where the crop allows)
- timm:        timm's `ImageDataset` over the same JPEG files (each opened, decoded by PIL, converted to RGB) with
               `timm.data.create_transform(is_training=True, ...)` at the recipe's settings, and for the vit
               recipe timm's `Mixup` (mixup 0.8, cutmix 1.0) on batches of `--shard-size`
- ours_g4, ours_draft_g4: the same loader (full, draft decode) with G = `--per-decode` (4) epochs per decode,
               `TrainViews(epochs_per_decode=G)` (each shard read and decoded once, G epochs' views of it, the
               shuffle buffer); a round is then one group of G epochs
Each round is one epoch (epoch = round number, so crops differ between rounds) over every image for every
variant (G epochs for the _g variants); the rates are views per CPU-second, so a G-epoch round counts G views
per image. How the draft views were decoded is counted after the timing, in a pass of its own over the draft
G-epoch rounds, from the product's own calls (`draft_reduction`'s answers, `decode_image`'s calls).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import md_table, save
from PIL import Image

from pipeline.augment import get_recipe, pillow_compatible
from pipeline.reader import ShardReader
from pipeline.shards import make_shards
from pipeline.views import TrainViews

PHOTOS = [("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"), ("sklearn", "datasets/images/china.jpg"),
          ("sklearn", "datasets/images/flower.jpg")]


def photo_paths() -> list[Path]:
    import matplotlib
    import sklearn
    roots = {"matplotlib": Path(matplotlib.__file__).parent, "sklearn": Path(sklearn.__file__).parent}
    return [roots[pkg] / rel for pkg, rel in PHOTOS]


def make_images(folder: Path, n: int, classes: int = 4, size=(500, 375), seed: int = 0) -> None:
    """`n` distinct crops of the shipped photos as an ImageFolder tree of JPEGs (quality 90). Each crop takes
    a random box of at least the output size (so it is only ever downscaled), a random orientation
    (landscape 500x375 or portrait 375x500 where the photo is tall enough) and a random flip."""
    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in photo_paths()]
    for i in range(n):
        im = photos[i % len(photos)]
        W, H = im.size
        w, h = size if rng.random() < 0.75 or H < size[0] else size[::-1]
        k = rng.uniform(1.0, min(W / w, H / h))  # box = k x the output size, fits in the photo
        bw, bh = int(w * k), int(h * k)
        x, y = int(rng.integers(0, W - bw + 1)), int(rng.integers(0, H - bh + 1))
        crop = im.crop((x, y, x + bw, y + bh)).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out = folder / f"c{i % classes}" / f"img{i:04d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        crop.save(out, quality=90)


def timm_transform(recipe):
    """timm's training transform with the recipe's settings (what timm's train.py builds for it)."""
    from timm.data import create_transform
    tf = create_transform(recipe.input_size, is_training=True, scale=recipe.scale, ratio=recipe.ratio,
                            hflip=recipe.hflip, vflip=0.0, color_jitter=recipe.color_jitter or None,
                            auto_augment=None if recipe.auto_augment == "none" else recipe.auto_augment,
                            interpolation=recipe.interpolation, mean=recipe.norm_mean, std=recipe.norm_std,
                            re_prob=recipe.erase_prob, re_mode=recipe.erase_mode or "pixel", re_count=1)
    for t in tf.transforms:  # timm's posterize at 0 bits crashes on Pillow 13: the same fix as ours
        pillow_compatible(t)
    return tf


def group_views(views: TrainViews, batch_size: int, group: int) -> int:
    """One group of G epochs (G = 1: one epoch) of stage two's loader as train-student takes it
    (`TrainViews.loader`), in-process; returns the views it handed out."""
    return sum(len(b["label"]) for b in views.loader(group * views.per_decode, batch_size, 0))


def timm_views(dataset, batch_size: int, mixer, epoch: int) -> int:
    """One epoch of timm's views of the same files: its `ImageDataset` (opens each file, decodes it with PIL,
    runs the transform), mixed per batch as timm's train.py does with `Mixup`."""
    n = 0
    for first in range(0, len(dataset), batch_size):
        batch = [dataset[i][0] for i in range(first, min(first + batch_size, len(dataset)))]
        x = torch.stack(batch)
        if mixer is not None:
            x, _ = mixer(x, torch.zeros(len(batch), dtype=torch.long))
        n += len(batch)
    return n


def draft_counts(views: TrainViews, groups) -> dict:
    """How stage two decoded the views of these groups of its stream, counted in the product's own calls while it
    makes them (untimed): the share of views at each JPEG reduction (1 = full; `draft_reduction`'s answers, and
    1 for a view whose source it is not asked about: not a JPEG, or a recipe that decodes whole) and the JPEG
    decodes per image per group (`decode_image`'s calls: an image is decoded once per reduction its G crops ask
    for, `Sample.decoded` keeps it for the others)."""
    import pipeline.reader
    import pipeline.transforms
    real_reduction, real_decode = pipeline.transforms.draft_reduction, pipeline.reader.decode_image
    answers, decodes, views_made = [], [0], 0

    def reduction(*args, **kwargs):
        answers.append(real_reduction(*args, **kwargs))
        return answers[-1]

    def decode(*args, **kwargs):
        decodes[0] += 1
        return real_decode(*args, **kwargs)

    pipeline.transforms.draft_reduction, pipeline.reader.decode_image = reduction, decode
    try:
        for g in groups:  # the stream itself: every view it makes, those of a last partial batch too
            views.set_epoch(g * views.per_decode)
            views_made += sum(1 for _ in views)
    finally:
        pipeline.transforms.draft_reduction, pipeline.reader.decode_image = real_reduction, real_decode
    seen = {r: answers.count(r) for r in set(answers)}
    seen[1] = seen.get(1, 0) + views_made - len(answers)
    return {"reductions": {f"1/{r}": seen[r] / views_made for r in sorted(seen) if seen[r]},
            "decodes_per_image": decodes[0] * views.per_decode / views_made}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--recipes", nargs="+", default=["imagenet-cnn", "imagenet-vit", "imagenet-cnn@112"],
                   help="presets, NAME@SIZE for another view size")
    p.add_argument("--per-decode", type=int, default=4, help="G of the _g variants (epochs per decode)")
    p.add_argument("--name", default="loader_vs_timm")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ofakd-loader-vs-timm-") as d:
        results = measure(Path(d), args)
    save(args.name, results)
    return results


def measure(tmp: Path, args) -> dict:
    from timm.data import ImageDataset, Mixup

    make_images(tmp / "src", args.images)
    make_shards(str(tmp / "src"), tmp / "data", shard_size=args.shard_size, progress=False)
    reader = ShardReader(tmp / "data")
    blobs = [p.read_bytes() for p in sorted((tmp / "src").rglob("*.jpg"))]
    sizes = [Image.open(io.BytesIO(b)).size for b in blobs]

    results = {"images": len(blobs), "image_sizes": sorted({f"{w}x{h}" for w, h in sizes}),
               "jpeg_quality": 90, "bytes_per_image": float(np.mean([len(b) for b in blobs])),
               "shard_size": args.shard_size, "rounds": args.rounds, "threads": 1, "per_decode": args.per_decode,
               "recipes": {}}
    for name in args.recipes:
        preset, _, size = name.partition("@")
        recipe = get_recipe(preset, int(size) if size else None)
        draft = dataclasses.replace(recipe, decode="draft") if hasattr(recipe, "decode") else None
        tf = timm_transform(recipe)
        mixer = Mixup(mixup_alpha=recipe.mixup_alpha, cutmix_alpha=recipe.cutmix_alpha, prob=recipe.mix_prob,
                      switch_prob=recipe.switch_prob, num_classes=1000) if recipe.mixes else None

        B, G = args.shard_size, args.per_decode
        variants = {"ours": functools.partial(group_views, TrainViews(reader, recipe, 0), B),
                    "timm": functools.partial(timm_views, ImageDataset(str(tmp / "src"), transform=tf),
                                              args.shard_size, mixer)}
        if draft is not None:
            variants["ours_draft"] = functools.partial(group_views, TrainViews(reader, draft, 0), B)
        variants[f"ours_g{G}"] = functools.partial(group_views, TrainViews(reader, recipe, 0, epochs_per_decode=G), B)
        if draft is not None:
            variants[f"ours_draft_g{G}"] = functools.partial(group_views, TrainViews(reader, draft, 0,
                                                                                     epochs_per_decode=G), B)
        cpu = {k: 0.0 for k in variants}
        count = {k: 0 for k in variants}
        names = list(variants)
        for rnd in range(args.rounds + 1):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for k in order:
                t0 = time.process_time()
                n = variants[k](rnd)
                if rnd > 0:  # round 0 warms up (imports, timm's op tables, first-touch allocations)
                    cpu[k] += time.process_time() - t0
                    count[k] += n
        rate = {k: count[k] / cpu[k] for k in names}
        rec = {f"{k}_views_per_cpu_s": rate[k] for k in names}
        for k in names:
            if k.startswith("ours"):
                rec[f"{k}_over_timm"] = rate[k] / rate["timm"]
        if draft is not None:
            counted = draft_counts(TrainViews(reader, draft, 0, epochs_per_decode=G), range(1, args.rounds + 1))
            rec["draft_reductions"] = counted["reductions"]
            rec[f"draft_decodes_per_image_g{G}"] = counted["decodes_per_image"]
        results["recipes"][name] = rec
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}, flush=True)
    return results


def table(record: dict) -> str:
    r = record["results"]
    G = r.get("per_decode")
    variants = ["ours", "ours_draft"] + ([f"ours_g{G}", f"ours_draft_g{G}"] if G else [])
    label = {"ours": "G = 1, full", "ours_draft": "G = 1, draft", f"ours_g{G}": f"G = {G}, full",
             f"ours_draft_g{G}": f"G = {G}, draft"}
    rows = []
    for name, x in r["recipes"].items():
        reduced = 1 - x["draft_reductions"].get("1/1", 0.0) if "draft_reductions" in x else None
        rows.append([f"`{name}`", x["timm_views_per_cpu_s"], *(x.get(f"{v}_over_timm") for v in variants),
                     reduced, *([x.get(f"draft_decodes_per_image_g{G}")] if G else [])])
    head = ["recipe", "timm views/CPU-s", *(f"ours / timm, {label[v]}" for v in variants),
            "share of draft views decoded reduced", *([f"draft decodes per image per group of {G}"] if G else [])]
    return (f"{r['images']} JPEG photos ({', '.join(r['image_sizes'])}, quality {r['jpeg_quality']}, "
            f"{r['bytes_per_image'] / 1000:.0f} KB each) in shards of {r['shard_size']}, {r['rounds']} rounds, "
            f"{r['threads']} thread; training views per CPU-second.\n\n" + md_table(head, rows)
            + "\n\nTargets: at least on par with timm at G = 1; at G = 4 epochs per decode >= 2x timm for "
            "`imagenet-cnn`, >= 1.5x for `imagenet-vit`.")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
