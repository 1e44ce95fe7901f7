"""Memory of stage two's view stream per loader process: peak RSS growth of one group of G epochs per decode.

    python bench/loader_memory.py [--shard-sizes 64 192] [--per-decode 1 2 4] [--recipe imagenet-vit]

For each shard size, real ~500x375 JPEG photos (bench/loader_vs_timm.py's crops) are sharded into 3 shards; for
each G, a fresh process builds `TrainViews(epochs_per_decode=G)` over them and iterates one group in-process (the
work of one loader worker), and reports its peak resident memory above what it held just before iterating
(`ru_maxrss`, a high-water mark: it includes what the allocator keeps after a free). Beside it, the sum of what
`TrainViews` says it holds: views (one shard's at G = 1, at most two at G > 1, float32 [3, S, S] each), one
shard's decoded images (uint8 H x W x 3, once per reduction) and base views (uint8 [3, S, S]), and the encoded
bytes of two shards (the one being made and the next one read). G = 1 makes a shard's views in chunks, so it
stays well under its term.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, md_table, save

sys.path.insert(0, str(ROOT))


def child(data: str, recipe_name: str, per_decode: int) -> dict:
    """One group of `per_decode` epochs over `data`, in this process: peak RSS growth in MB."""
    import torch
    torch.set_num_threads(1)
    from pipeline.augment import get_recipe
    from pipeline.reader import ShardReader
    from pipeline.views import TrainViews
    reader = ShardReader(data)
    views = TrainViews(reader, get_recipe(recipe_name), 0, epochs_per_decode=per_decode)
    views.set_epoch(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    n = sum(1 for _ in views)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"views": n, "peak_growth_mb": (peak - before) / 1024}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shard-sizes", type=int, nargs="+", default=[64, 192])
    ap.add_argument("--per-decode", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--recipe", default="imagenet-vit")
    ap.add_argument("--name", default="loader_memory")
    ap.add_argument("--child", nargs=3, metavar=("DATA", "RECIPE", "G"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return {}
    from loader_vs_timm import make_images

    from pipeline.augment import get_recipe
    from pipeline.shards import make_shards
    S = get_recipe(args.recipe).input_size
    res = {"recipe": args.recipe, "view_size": S, "image_size": "500x375 / 375x500", "shards": 3, "rows": []}
    with tempfile.TemporaryDirectory(prefix="ofakd-loader-memory-") as d:
        for n in args.shard_sizes:
            src, data = Path(d) / f"src{n}", Path(d) / f"data{n}"
            make_images(src, 3 * n)
            make_shards(str(src), data, shard_size=n, progress=False)
            for g in args.per_decode:
                out = subprocess.run([sys.executable, __file__, "--child", str(data), args.recipe, str(g)],
                                     check=True, capture_output=True, text=True, cwd=ROOT).stdout
                r = json.loads(out.strip().splitlines()[-1])
                held = 1 if g == 1 else 2  # shards' float views TrainViews may hold
                encoded = max(f.stat().st_size for f in data.glob("*.tar"))  # a shard's bytes, read whole
                bound = (held * n * 3 * S * S * 4 + n * 500 * 375 * 3 + n * 3 * S * S + 2 * encoded) / 2**20
                row = {"shard_size": n, "per_decode": g, **r, "accounted_mb": bound}
                res["rows"].append(row)
                print(row, flush=True)
    save(args.name, res)
    return res


def table(record: dict) -> str:
    r = record["results"]
    rows = [[x["shard_size"], x["per_decode"], x["views"], x["peak_growth_mb"], x["accounted_mb"]] for x in r["rows"]]
    return (f"Recipe `{r['recipe']}` at {r['view_size']} px, {r['shards']} shards of {r['image_size']} JPEGs; one "
            "loader process iterating one group of G epochs. No target: the figure the advice on shard sizes "
            "(docs/design.md) rests on.\n\n"
            + md_table(["images a shard", "G", "views", "peak RSS growth MB", "TrainViews' stated terms MB"], rows))


if __name__ == "__main__":
    main()
