"""Accuracy evidence: CE vs KD vs DKD vs OFA (cache) vs OFA (online teacher, same views) for
heterogeneous teacher/student pairs, several seeds, on a dataset slice sized for 2 CPU cores.

    python bench/accuracy.py [--data runs/data/cifar10] [--train-shards 10] [--val-shards 2] [--epochs 6]
        [--seeds 0 1 2] [--pairs cnn-vit vit-cnn]
    # Tiny-ImageNet slice (first 50 classes, sharded as in the README), downsampled to 32 px:
    python bench/accuracy.py --data runs/data/tiny50 --val-split val --train-shards 25 --val-shards 3 \
        --work runs/accuracy-tiny50 --name accuracy_tiny50 --label "Tiny-ImageNet, first 50 classes" \
        --seeds 0 --pairs cnn-vit

    # several epochs per decode (issue 20): G = 1 vs G = 4, OFA from the cache, 2 seeds (about an hour on an
    # idle 2-core machine; runs already made with the same --work are reused):
    python bench/accuracy.py --data runs/data/tiny50 --val-split val --train-shards 25 --val-shards 3 \
        --work runs/accuracy-tiny50 --name accuracy_tiny50_per_decode --label "Tiny-ImageNet, first 50 classes" \
        --seeds 0 1 --pairs cnn-vit --methods ofa --epochs-per-decode 1 4

    # what the cache keeps (issue 21): full logits (k = C) vs top-10 vs top-5 + 4 sampled tail classes (about
    # top-10's bytes; drawn at T = 1, the temperature OFA trains at), OFA, 2 seeds, same student and views; with
    # G = 4 beside them (issue 20) in one table:
    python bench/accuracy.py --data runs/data/tiny50 --val-split val --train-shards 25 --val-shards 3 \
        --work runs/accuracy-tiny50 --name accuracy_tiny50_cache_contents --label "Tiny-ImageNet, first 50 classes" \
        --seeds 0 1 --pairs cnn-vit --variants ofa ofa-g4 ofa@top50 ofa@top5+s4t1

Runs are resumable (a finished run is not redone); results go to bench/results/<name>.{json,md,png}. A variant
is METHOD[-gG][@STORE]: METHOD at G epochs per decode (default 1) from a cache holding STORE (topK, or
topK+sM[tT]: top-k plus M sampled tail classes drawn at temperature T, by default cache-teacher's; default
top10). Its run directory is VARIANT-seedS.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, save

sys.path.insert(0, str(ROOT))

from pipeline.augment import get_recipe  # noqa: E402
from pipeline.manifest import Manifest, load_manifest, write_atomic  # noqa: E402

VIT = ["--model-kwargs", "img_size=32", "--model-kwargs", "patch_size=4"]
PAIRS = {  # name -> teacher (name, kwargs, lr, opt), student (name, kwargs, lr, opt)
    "cnn-vit": (("resnet18", [], 0.1, "sgd"), ("test_vit", VIT, 2e-3, "adamw")),
    "vit-cnn": (("test_vit", VIT, 2e-3, "adamw"), ("test_resnet", [], 0.1, "sgd")),
}
METHODS = ("ce", "kd", "dkd", "ofa", "ofa-online")
DEFAULT_STORE = "top10"
VARIANT = re.compile(r"(?P<method>[a-z-]+?)(?:-g(?P<g>\d+))?(?:@(?P<store>top\d+(?:\+s\d+(?:t[\d.]+)?)?))?")
STORE = re.compile(r"top(?P<k>\d+)(?:\+s(?P<m>\d+)(?:t(?P<t>[\d.]+))?)?")


def parse_variant(text: str) -> tuple[str, int, str]:
    """'ofa-g4@top5+s4' -> ('ofa', 4, 'top5+s4')."""
    m = VARIANT.fullmatch(text)
    if m is None or m["method"] not in METHODS:
        raise SystemExit(f"--variants: '{text}' is not METHOD[-gG][@topK[+sM[tT]]] with METHOD one of "
                         f"{', '.join(METHODS)}")
    return m["method"], int(m["g"] or 1), m["store"] or DEFAULT_STORE


def store_flags(store: str) -> list:
    m = STORE.fullmatch(store)
    return (["--topk", int(m["k"])] + (["--tail-samples", int(m["m"])] if m["m"] else [])
            + (["--tail-draw-temperature", m["t"]] if m["t"] else []))


def store_path(work: Path, t_name: str, store: str) -> Path:
    # the default store keeps its old name, so runs made before variants existed are reused
    return work / (f"teacher-{t_name}.zarr" if store == DEFAULT_STORE else f"teacher-{t_name}-{store}.zarr")


def slice_dataset(src: Path, dest: Path, train_shards: int, val_shards: int, val_split: str) -> Path:
    m = load_manifest(src)
    dest.mkdir(parents=True, exist_ok=True)
    sub = Manifest(name=f"{m.name} slice", classes=m.classes, class_ids=m.class_ids)
    for split, new, n in (("train", "train", train_shards), (val_split, "val", val_shards)):
        info = m.split(split)
        if n > len(info.shards):
            raise SystemExit(f"{src}: split '{split}' has {len(info.shards)} shards, fewer than the {n} asked for")
        keep = info.shards[:n]
        for s in keep:
            if not (dest / s.name).exists():
                (dest / s.name).hardlink_to(src / s.name)
        sub.splits[new] = type(info)(count=sum(s.count for s in keep), samples_per_shard=info.samples_per_shard,
                                     class_counts=info.class_counts, shards=keep, order_seed=info.order_seed)
    # the val split's shards keep their own names (e.g. test-*.tar): the reader resolves names from the manifest
    write_atomic(dest / "dataset.json", sub.to_json().encode())
    return dest


def cli(*args) -> None:
    cmd = [sys.executable, str(ROOT / "cli.py"), *map(str, args), "--quiet"]
    print("$", " ".join(map(str, cmd[1:])), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "data" / "cifar10")
    ap.add_argument("--val-split", default="test", help="split of --data evaluated on (CIFAR-10: test)")
    ap.add_argument("--label", default="CIFAR-10 (shared JPEGs)", help="dataset description for the report")
    ap.add_argument("--name", default="accuracy", help="results file stem under bench/results/")
    ap.add_argument("--recipe", default="cifar", help="augmentation preset (cifar: resize to 32, pad 4 + crop + flip)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "accuracy")
    ap.add_argument("--train-shards", type=int, default=10)
    ap.add_argument("--val-shards", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--teacher-epochs", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS))
    ap.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(METHODS)}")
    ap.add_argument("--epochs-per-decode", type=int, nargs="+", default=None,
                    help="run each method at each of these --epochs-per-decode (G > 1 reported as METHOD-gG)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="explicit runs METHOD[-gG][@topK[+sM[tT]]] instead of --methods x --epochs-per-decode")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.variants is None:
        args.variants = [label(m, g, DEFAULT_STORE) for g in args.epochs_per_decode or [1]
                         for m in args.methods or METHODS]
    elif args.methods or args.epochs_per_decode:
        ap.error("--variants names every run; drop --methods/--epochs-per-decode, or drop --variants")
    variants = [parse_variant(v) for v in args.variants]
    data = slice_dataset(args.data, args.work / "data", args.train_shards, args.val_shards, args.val_split)
    common = ["--data", data, "--recipe", args.recipe, "--batch-size", 64, "--workers", 1]
    if not args.report_only:
        for pair in args.pairs:
            (t_name, t_kw, t_lr, t_opt), _ = PAIRS[pair]
            tdir = args.work / f"teacher-{t_name}"
            if not (tdir / "metrics.json").exists():
                cli("train-student", *common, "--student", t_name, *t_kw, "--method", "ce", "--epochs",
                    args.teacher_epochs, "--lr", t_lr, "--optimizer", t_opt, "--weight-decay",
                    5e-4 if t_opt == "sgd" else 0.05, "--warmup-epochs", 1, "--out", tdir)
            for store_kind in dict.fromkeys(st for method, _, st in variants if method not in ("ce", "ofa-online")):
                store = store_path(args.work, t_name, store_kind)
                if not (store / "_units").exists() or len(list((store / "_units").glob("*.json"))) < args.train_shards:
                    cli("cache-teacher", "--data", data, "--teacher", t_name,
                        *t_kw, "--checkpoint",
                        tdir / "model.safetensors", "--recipe", args.recipe, "--epochs", args.epochs,
                        *store_flags(store_kind), "--batch-size", 250, "--workers", 1, "--out", store)
        for seed in args.seeds:  # seeds outermost: every finished seed is a complete comparison
            for pair in args.pairs:
                (t_name, t_kw, _, _), (s_name, s_kw, s_lr, s_opt) = PAIRS[pair]
                tdir = args.work / f"teacher-{t_name}"
                for method, g, store_kind in variants:
                    run = args.work / pair / f"{label(method, g, store_kind)}-seed{seed}"
                    if (run / "metrics.json").exists():
                        continue
                    if method == "ofa-online":
                        src = ["--method", "ofa", "--teacher-online", t_name, "--teacher-checkpoint",
                               tdir / "model.safetensors", "--view-epochs", args.epochs,
                               *[x.replace("--model-kwargs", "--teacher-model-kwargs") for x in t_kw]]
                    elif method == "ce":
                        src = ["--method", "ce"]
                    else:
                        src = ["--method", method, "--cache", store_path(args.work, t_name, store_kind)]
                    cli("train-student", *common, "--student", s_name, *s_kw, *src, "--epochs", args.epochs,
                        "--lr", s_lr, "--optimizer", s_opt, "--weight-decay", 5e-4 if s_opt == "sgd" else 0.05,
                        "--warmup-epochs", 1, "--seed", seed, "--epochs-per-decode", g, "--out", run)
    return report(args)


def label(method: str, per_decode: int, store: str = DEFAULT_STORE) -> str:
    return method + (f"-g{per_decode}" if per_decode != 1 else "") + (f"@{store}" if store != DEFAULT_STORE else "")


def report(args) -> dict:
    m = load_manifest(args.work / "data")
    args.methods = [label(*parse_variant(v)) for v in args.variants]
    out = {"setup": {"data": args.label, "classes": len(m.classes), "train_images": m.split("train").count,
                     "val_images": m.split("val").count, "resolution": get_recipe(args.recipe).input_size,
                     "student_epochs": args.epochs,
                     "teacher_epochs": args.teacher_epochs, "recipe": args.recipe,
                     "stores": {st: {"flags": " ".join(map(str, store_flags(st))),
                                     "raw_bytes_per_view": _bytes(st, len(m.classes))}
                                for st in dict.fromkeys(s for _, _, s in map(parse_variant, args.variants))}},
           "pairs": {}}
    lines = ["| pair (teacher -> student) | teacher top-1 | " + " | ".join(args.methods) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in args.methods) + " |"]
    curves = {}
    for pair in args.pairs:
        (t_name, _, _, _), (s_name, _, _, _) = PAIRS[pair]
        tm = args.work / f"teacher-{t_name}" / "metrics.json"
        t_top1 = json.loads(tm.read_text())["top1"] if tm.exists() else float("nan")
        cells, res = [], {"teacher": t_name, "student": s_name, "teacher_top1": t_top1, "methods": {}}
        for method in args.methods:
            runs = sorted((args.work / pair).glob(f"{method}-seed*/metrics.json"))
            vals = [json.loads(r.read_text())["top1"] for r in runs]
            hist = [[h["top1"] for h in json.loads(r.read_text())["history"]] for r in runs]
            res["methods"][method] = {"top1": vals, "mean": float(np.mean(vals)) if vals else None,
                                      "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                                      "seconds": [json.loads(r.read_text())["train_seconds"] for r in runs]}
            if vals:
                spread = f" ± {np.std(vals, ddof=1):.2f}" if len(vals) > 1 else ""
                cells.append(f"{np.mean(vals):.2f}{spread} (n={len(vals)})")
                curves[(f"{t_name} -> {s_name}", method)] = np.mean(np.array(hist), 0)
            else:
                cells.append("-")
        out["pairs"][pair] = res
        lines.append(f"| {t_name} -> {s_name} | {t_top1:.2f} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (RESULTS / f"{args.name}.md").write_text(md)
    print(md)
    _plot(curves, RESULTS / f"{args.name}.png", args.label)
    save(args.name, out)
    return out


def _bytes(store: str, num_classes: int) -> int:
    from cache.format import raw_bytes_per_view
    m = STORE.fullmatch(store)
    k, samples = int(m["k"]), int(m["m"] or 0)
    return raw_bytes_per_view(k, num_classes, samples, 1 if samples else 0)  # one extra temperature (T = 4) by default


def _plot(curves: dict, path: Path, label: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = sorted({p for p, _ in curves})
    if not pairs:
        return
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4.2), squeeze=False)
    for ax, pair in zip(axes[0], pairs, strict=True):
        for (p, method), c in curves.items():
            if p == pair:
                ax.plot(range(1, len(c) + 1), c, marker="o", label=method)
        ax.set_title(f"{label}: {pair} (mean over seeds)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
