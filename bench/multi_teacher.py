"""Teachers side by side: one `cache-teacher` pass with two teachers against two single-teacher passes.

    python bench/multi_teacher.py [--data DIR] [--shards N] [--teachers A,B] [--recipe R] [--view-size S]

Times, interleaved in one process, best of --repeats (wall seconds of `cache_teacher`, set-up included):
the 2-teacher pass (`--add-teacher`), each teacher's single pass, the views alone (decode + augment,
`UnitViews`, as the pass builds them) and each teacher's bare inference on those views prebuilt in memory.
Target: 2-teacher pass <= 1.1 x (views + inference A + inference B); the saving against two
single passes is one decode + augment (also reported: 2-teacher pass / (two single passes - views), which keeps
each teacher's own pass overheads: set-up, summarize, zarr writes). The default teachers are small (timm's test_
models, random weights) so that decode + augment is a visible share of a pass on CPU. The data is the first
--shards train shards of a shards directory (Tiny-ImageNet-50 JPEGs by default), linked into a temporary slice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from common import ROOT, inputs, md_table, save, timed
from torch.utils.data import DataLoader

from cache.teacher import Teacher
from cache.teacher_pass import CacheConfig, cache_teacher
from commands.options import build
from pipeline.augment import get_recipe
from pipeline.reader import ShardReader
from pipeline.views import UnitViews


def slice_of(data: Path, shards: int, out: Path) -> Path:
    """The first `shards` train shards of `data` as a dataset of their own (the tar files linked, not copied)."""
    import tarfile
    m = json.loads((data / "dataset.json").read_text())
    train = m["splits"]["train"]
    train["shards"] = train["shards"][:shards]
    counts = [0] * len(m["classes"])
    for s in train["shards"]:
        (out / s["name"]).symlink_to((data / s["name"]).resolve())
        with tarfile.open(data / s["name"]) as tar:  # the labels, for the manifest's class counts
            for member in tar:
                if member.name.endswith(".cls"):
                    counts[int(tar.extractfile(member).read())] += 1
    train["count"], train["class_counts"] = sum(s["count"] for s in train["shards"]), counts
    m["splits"] = {"train": train}
    (out / "dataset.json").write_text(json.dumps(m))
    return out


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "bench" / "tiny2k", help="shards (make bench makes "
                    "runs/bench/tiny2k)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--teachers", default="test_resnet,test_convnext")
    ap.add_argument("--recipe", default="imagenet-cnn")
    ap.add_argument("--view-size", type=int, default=64)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name", default="multi_teacher")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    a, b = args.teachers.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench-mt-"))
    try:
        data = slice_of(args.data, args.shards, tmp)
        reader = ShardReader(data)
        recipe = get_recipe(args.recipe, args.view_size)
        n = reader.split.count
        units = list(range(reader.num_shards))
        common = dict(data=data, recipe=args.recipe, view_size=args.view_size, topk=args.topk,
                      batch_size=args.batch_size, workers=args.workers, progress=False, overwrite=True)

        def views():
            return [v["view"] for v in DataLoader(UnitViews(reader, recipe, 0, 1, units), batch_size=args.batch_size,
                                                  num_workers=args.workers)]

        batches = views()
        teachers = {t: Teacher.build(t, reader.manifest.num_classes, recipe.input_size) for t in (a, b)}

        def bare(t):
            for v in batches:
                teachers[t](v).topk(args.topk, 1)

        def single(t):
            cache_teacher(build(CacheConfig, teacher=t, out=tmp / f"{t}.zarr", **common))

        def both():
            cache_teacher(build(CacheConfig, teacher=a, add_teacher=[b], out=tmp / "both", **common))

        best = dict.fromkeys(("views", f"infer_{a}", f"infer_{b}", f"single_{a}", f"single_{b}", "both"),
                             float("inf"))
        for _ in range(args.repeats):  # interleaved: each round measures everything once
            for key, fn in (("views", views), (f"infer_{a}", lambda: bare(a)), (f"infer_{b}", lambda: bare(b)),
                            (f"single_{a}", lambda: single(a)), (f"single_{b}", lambda: single(b)), ("both", both)):
                best[key] = min(best[key], timed(fn))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    floor = best["views"] + best[f"infer_{a}"] + best[f"infer_{b}"]
    singles = best[f"single_{a}"] + best[f"single_{b}"]
    res = {"teachers": [a, b], "views": n, "view_size": args.view_size, "recipe": args.recipe,
           "batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats,
           "seconds": best, "views_once_plus_both_inference_s": floor, "two_single_passes_s": singles,
           "both_over_floor": best["both"] / floor, "target_both_over_floor": 1.1,
           "both_over_two_singles": best["both"] / singles,
           # the singles' own overheads (set-up, summarize, zarr writes) kept, one decode + augment removed
           "both_over_two_singles_less_one_views": best["both"] / (singles - best["views"]),
           "views_share_of_single_passes": 2 * best["views"] / singles,
           "torch_threads": torch.get_num_threads()}
    res["inputs"] = inputs(data=args.data)
    save(args.name, res)
    return res


def table(record: dict) -> str:
    r = record["results"]
    a, b = r["teachers"]
    s = r["seconds"]
    rows = [["views alone (decode + augment), s", s["views"], ""],
            [f"bare inference {a}, {b}, s", f"{s[f'infer_{a}']:.3g}, {s[f'infer_{b}']:.3g}", ""],
            [f"single pass {a}, {b}, s", f"{s[f'single_{a}']:.3g}, {s[f'single_{b}']:.3g}", ""],
            ["2-teacher pass, s", s["both"], ""],
            ["2-teacher pass / (views + both inferences)", r["both_over_floor"], f"<= {r['target_both_over_floor']}"],
            ["2-teacher pass / two single passes", r["both_over_two_singles"], ""],
            ["2-teacher pass / (two single passes - views)", r["both_over_two_singles_less_one_views"], ""]]
    return (f"{r['views']:,} views at {r['view_size']} px (`{r['recipe']}`), batch {r['batch_size']}, "
            f"{r['workers']} loader worker(s), best of {r['repeats']}, {r['torch_threads']} torch threads.\n\n"
            + md_table(["what", "measured", "target"], rows))


if __name__ == "__main__":
    main()
