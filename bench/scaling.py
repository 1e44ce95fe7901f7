"""How stage one and stage two grow with dataset size and with top-k, for extrapolating to ImageNet.

    python bench/scaling.py [--data DIR] [--teacher NAME] [--sizes 1 2 4 8] [--topk 5 10 50]

For each size (a number of data shards) and each k: the teacher pass (time, views/s, raw and on-disk
bytes per view), and the cache-dependent part of stage two (one epoch of train-student's loader joined with the
cache, `TrainViews.loader` with 0 workers, plus rebuilding teacher logits and the OFA loss for every batch) per
view handed out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, inputs, md_table, save

from cache.store import CacheStore
from cache.targets import CachedTeacher
from cache.teacher_pass import CacheConfig, cache_teacher
from commands.options import build
from pipeline.augment import get_recipe
from pipeline.manifest import Manifest, load_manifest, write_atomic
from pipeline.reader import ShardReader
from students.losses import ofa_loss


def subset(data: Path, shards: int, dest: Path) -> Path:
    """A dataset directory with the first `shards` shards of `data` (hard links, a new manifest)."""
    m = load_manifest(data)
    sp = m.split("train")
    dest.mkdir(parents=True, exist_ok=True)
    keep = sp.shards[:shards]
    for s in keep:
        (dest / s.name).unlink(missing_ok=True)
        (dest / s.name).hardlink_to(data / s.name)
    sub = Manifest(name=f"{m.name}[:{shards} shards]", classes=m.classes, class_ids=m.class_ids)
    sub.splits["train"] = type(sp)(count=sum(s.count for s in keep), samples_per_shard=sp.samples_per_shard,
                                   class_counts=sp.class_counts, shards=keep, order_seed=sp.order_seed)
    write_atomic(dest / "dataset.json", sub.to_json().encode())
    return dest


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "bench" / "tiny2k")
    ap.add_argument("--teacher", default="resnet18")
    ap.add_argument("--recipe", default="tiny-cnn")
    ap.add_argument("--view-size", type=int, default=32)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--topk", type=int, nargs="+", default=[5, 10, 50])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--name", default="scaling")
    args = ap.parse_args(argv)
    recipe = get_recipe(args.recipe, args.view_size)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = []
    try:
        for shards in args.sizes:
            data = subset(args.data, shards, tmp / f"d{shards}")
            reader = ShardReader(data)
            C = reader.manifest.num_classes
            for k in args.topk:
                store_path = tmp / f"s{shards}-k{k}.zarr"
                s = cache_teacher(build(CacheConfig, data=data, teacher=args.teacher, out=store_path,
                                        recipe=args.recipe, view_size=args.view_size, epochs=args.epochs, topk=k,
                                        batch_size=125, workers=1, progress=False))
                store = CacheStore(store_path)
                cached = CachedTeacher(store_path)
                # train-student's loader, 0 workers; the batch is capped at the epoch (the --small sizes hold under
                # 125 views) because it hands out full batches only
                batch = min(125, reader.split.count)
                logits = torch.randn(batch, C)
                t0, n = time.perf_counter(), 0
                for b in cached.views(reader, 0).loader(0, batch, 0):
                    z = cached.logits(b)
                    ofa_loss(logits, z, b["label"], 1.5)
                    n += len(z)
                s2 = time.perf_counter() - t0
                rows.append({"samples": reader.split.count, "shards": shards, "topk": k, "epochs": args.epochs,
                             "stage_one_s": s["seconds"], "stage_one_views_per_s": s["views_per_second"],
                             "raw_bytes_per_view": store.description.raw_bytes_per_view,
                             "disk_bytes_per_view": store.disk_bytes() / (reader.split.count * args.epochs),
                             "stage_two_cache_side_s": s2, "stage_two_cache_side_ms_per_view": 1000 * s2 / n})
                print(json.dumps(rows[-1]))
                shutil.rmtree(store_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    imagenet_views = 1_281_167 * 300
    k10 = [r for r in rows if r["topk"] == 10] or rows
    big = max(k10, key=lambda r: r["samples"])
    res = {"teacher": args.teacher, "recipe": args.recipe, "view_size": recipe.input_size, "rows": rows,
           "extrapolation_imagenet_300_epochs_k10": {
               "views": imagenet_views,
               "raw_GB": imagenet_views * big["raw_bytes_per_view"] / 1e9,
               "disk_GB_at_measured_compression": imagenet_views * big["disk_bytes_per_view"] / 1e9,
               "note": "stage one time = views / (teacher views/s on the target machine); both stages are linear "
                       "in views (see rows), and k changes bytes, not time"}}
    res["inputs"] = inputs(data=args.data)
    save(args.name, res)
    return res


def table(record: dict) -> str:
    r = record["results"]
    rows = [[x["samples"], x["shards"], x["topk"], x["epochs"], x["stage_one_s"], x["stage_one_views_per_s"],
             x["raw_bytes_per_view"], x["disk_bytes_per_view"], x["stage_two_cache_side_ms_per_view"]]
            for x in r["rows"]]
    e = r["extrapolation_imagenet_300_epochs_k10"]
    return (f"Teacher {r['teacher']}, recipe `{r['recipe']}` at {r['view_size']} px. Stage two's cache side: one "
            "epoch of the loader joined with the cache, teacher logits rebuilt and the OFA loss, per view.\n\n"
            + md_table(["samples", "shards", "k", "epochs", "stage one s", "stage one views/s", "raw B/view",
                        "disk B/view", "stage two cache side ms/view"], rows)
            + f"\n\nImageNet-1k x 300 epochs at k = 10 ({e['views']:,} views), extrapolated from the largest k = 10 "
            f"row: raw {e['raw_GB']:.1f} GB, on disk {e['disk_GB_at_measured_compression']:.1f} GB at the measured "
            f"compression (target: about 25 GB raw). {e['note']}.")


if __name__ == "__main__":
    main()
