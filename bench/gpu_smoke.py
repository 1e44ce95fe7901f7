"""`make gpu-smoke`: the whole two-stage path on CIFAR-10 with real-size models, for a one-GPU machine.

    python bench/gpu_smoke.py [--teacher resnet50] [--student deit_tiny_patch16_224] [--shards 10] [--steps 200]
                              [--data DIR] [--students 4] [--small]

Shards a slice of CIFAR-10 (from ../shared/data), runs the teacher pass at 224 px, then measures, for `--steps`
steps each: the stage-two loader alone (views + cached targets, no model), the student with plain CE, with OFA from
the cache and with OFA and the teacher online, and `--students N` OFA students (seeds 0..N-1) trained from one
view stream (`train-student --runs`); images/s of each and the share of the step time spent waiting for the
loader. For the N students: the stream's views/s, the student-images/s (N per view), and the wall time of the
one stream against N separate cached-OFA runs at the measured single-run rate. `--channels-last` and
`--compile` pass through to train-student. Under 5 minutes on one H100; `--small` runs tiny models on a CPU to
check the script itself; `--data DIR` uses a shards directory of your own (train and val splits) instead of
CIFAR-10.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from common import ROOT, md_table, save

sys.path.insert(0, str(ROOT))


def cifar_shards(dest: Path, shards: int) -> Path:
    """CIFAR-10 as shards, the first `shards` training shards kept (the run stays short). Made in a temporary
    folder and renamed when complete, one folder per `shards`: an interrupted run, or another --shards, never
    leaves a folder that a later run would take for this one."""
    from pipeline.shards import make_shards
    data = dest / f"cifar10-{shards}shards"
    if (data / "dataset.json").exists():
        return data
    tar = ROOT.parent / "shared" / "data" / "cifar10.tar.gz"
    if not tar.exists():
        sys.exit(f"{tar} is missing: the smoke test needs the shared CIFAR-10 tarball")
    raw, partial = dest / "raw", dest / f"cifar10-{shards}shards.partial"
    if not (raw / "cifar10" / "test").exists():
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(dest / "raw.partial", ignore_errors=True)
        with tarfile.open(tar) as t:
            t.extractall(dest / "raw.partial", filter="data")
        (dest / "raw.partial").rename(raw)
    shutil.rmtree(partial, ignore_errors=True)
    make_shards(str(raw / "cifar10" / "train"), partial, split="train", progress=False)
    make_shards(str(raw / "cifar10" / "test"), partial, split="val", progress=False)
    m = json.loads((partial / "dataset.json").read_text())
    keep = m["splits"]["train"]["shards"][:shards]
    m["splits"]["train"]["shards"] = keep
    m["splits"]["train"]["count"] = sum(s["count"] for s in keep)
    (partial / "dataset.json").write_text(json.dumps(m))
    partial.rename(data)
    return data


def loader_rate(store: Path, data: Path, batch_size: int, workers: int, steps: int) -> float:
    """Views/s of the stage-two loader alone: the training stream over the cache (decode, augment, replay
    checks, cached targets), as train-student builds it, with no model."""
    from cache.targets import CachedTeacher
    teacher = CachedTeacher(store)
    views = teacher.views(data)
    loader = views.loader(0, batch_size, workers, pin_memory=True)
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if i >= steps:
            break
        n += len(batch["label"])
    return n / (time.perf_counter() - t0)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="default resnet50 (test_resnet with --small)")
    ap.add_argument("--student", help="default deit_tiny_patch16_224 (test_vit with --small)")
    ap.add_argument("--view-size", type=int, help="default 224 (32 with --small)")
    ap.add_argument("--data", type=Path, help="a shards directory with train and val splits, instead of CIFAR-10")
    ap.add_argument("--shards", type=int, help="CIFAR-10 training shards to keep (default 10)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, help="default 256 (32 with --small)")
    ap.add_argument("--workers", type=int, help="default 8 (1 with --small)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "gpu-smoke")
    ap.add_argument("--channels-last", action="store_true", help="pass --channels-last to train-student")
    ap.add_argument("--compile", action="store_true", help="pass --compile to train-student")
    ap.add_argument("--students", type=int, default=4, help="OFA students trained from one view stream (0: skip)")
    ap.add_argument("--small", action="store_true", help="tiny models at 32 px, for a CPU check of this script")
    args = ap.parse_args(argv)
    if args.data is not None and args.shards is not None:
        ap.error("--shards keeps CIFAR-10 shards; with --data, pass a directory of the shards you want")
    defaults = {"teacher": ("resnet50", "test_resnet"), "student": ("deit_tiny_patch16_224", "test_vit"),
                "view_size": (224, 32), "batch_size": (256, 32), "workers": (8, 1)}
    for name, (full, small) in defaults.items():  # what the user gave stands, --small or not
        if getattr(args, name) is None:
            setattr(args, name, small if args.small else full)
    return args


def cli(*a) -> str:
    """`python cli.py ARGS --quiet`; its stdout."""
    cmd = [sys.executable, str(ROOT / "cli.py"), *map(str, a), "--quiet"]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True).stdout
    print(out.strip(), f"[{time.perf_counter() - t0:.1f} s]", flush=True)
    return out


def one_student(args, data: Path, store: Path, step: list) -> dict:
    """CE, cached OFA and online OFA, one run each: images/s and the share of the step spent waiting."""
    res = {}
    online = ["--teacher-online", args.teacher, "--recipe", "imagenet-cnn", "--view-size", args.view_size,
              "--view-epochs", 1]
    for mode, src in (("ce", ["--method", "ce", "--recipe", "imagenet-cnn", "--view-size", args.view_size]),
                      ("cached_ofa", ["--method", "ofa", "--cache", store]),
                      ("online_ofa", ["--method", "ofa", *online])):
        run = args.work / f"student-{mode}"
        shutil.rmtree(run, ignore_errors=True)
        cli("train-student", "--data", data, "--student", args.student, *src, "--epochs", 1,
            "--batch-size", args.batch_size, "--optimizer", "adamw", "--lr", 5e-4, "--workers", args.workers,
            "--max-steps-per-epoch", args.steps, *step, "--out", run)
        h = json.loads((run / "metrics.json").read_text())["history"][0]
        res[f"{mode}_images_per_s"] = h["images_per_second"]
        res[f"{mode}_loader_wait_fraction"] = h["loader_wait_seconds"] / h["train_seconds"]
    res["cached_over_online_speedup"] = res["cached_ofa_images_per_s"] / res["online_ofa_images_per_s"]
    return res


def many_students(args, data: Path, store: Path, step: list, single_rate: float) -> dict:
    """`--students` OFA students from one view stream (`train-student --runs`)."""
    n, group = args.students, args.work / "students"
    shutil.rmtree(group, ignore_errors=True)
    group.mkdir(parents=True)
    (group / "runs.json").write_text(json.dumps([{"out": f"s{i}", "seed": i} for i in range(n)]))
    cli("train-student", "--data", data, "--student", args.student, "--method", "ofa", "--cache", store,
        "--epochs", 1, "--batch-size", args.batch_size, "--optimizer", "adamw", "--lr", 5e-4, "--workers",
        args.workers, "--max-steps-per-epoch", args.steps, *step, "--runs", group / "runs.json", "--out", group)
    h = json.loads((group / "s0" / "metrics.json").read_text())["history"][0]  # the stream's: same in every run
    # wall of one stream over N separate runs at the single cached-OFA rate (same steps, same batches)
    return {f"students{n}_stream_views_per_s": h["images_per_second"],
            f"students{n}_student_images_per_s": n * h["images_per_second"],
            f"students{n}_loader_wait_fraction": h["loader_wait_seconds"] / h["train_seconds"],
            f"students{n}_over_separate_wall": (1 / h["images_per_second"]) / (n / single_rate)}


def main(argv=None) -> dict:
    args = parse(argv)
    data = args.data or cifar_shards(args.work, args.shards or 10)
    store = args.work / "teacher.zarr"
    shutil.rmtree(store, ignore_errors=True)
    out = cli("cache-teacher", "--data", data, "--teacher", args.teacher, "--recipe", "imagenet-cnn", "--view-size",
              args.view_size, "--epochs", 1, "--topk", 10, "--batch-size", args.batch_size, "--workers", args.workers,
              "--out", store)
    res = {"teacher": args.teacher, "student": args.student, "view_size": args.view_size, "steps": args.steps,
           "batch_size": args.batch_size, "data": str(data),
           "teacher_pass_views_per_s": float(re.search(r"([0-9.]+) views/s", out).group(1))}
    res["loader_views_per_s"] = loader_rate(store, data, args.batch_size, args.workers, args.steps)
    step = [*(["--channels-last"] if args.channels_last else []), *(["--compile"] if args.compile else [])]
    res |= one_student(args, data, store, step)
    if args.students > 0:
        res |= many_students(args, data, store, step, res["cached_ofa_images_per_s"])
    res |= {"channels_last": args.channels_last, "compile": args.compile, "students": args.students}
    save("gpu_smoke" if not args.small else "gpu_smoke_cpu_check", res)
    return res


def table(record: dict) -> str:
    r = record["results"]
    rows = [["teacher pass, views/s", r["teacher_pass_views_per_s"]], ["stage-two loader alone, views/s",
                                                                      r["loader_views_per_s"]]]
    for mode, what in (("ce", "plain CE"), ("cached_ofa", "OFA from the cache"), ("online_ofa", "OFA, teacher online")):
        rows.append([f"{what}: images/s (share of the step waiting for the loader)",
                     f"{r[f'{mode}_images_per_s']:.4g} ({r[f'{mode}_loader_wait_fraction']:.2f})"])
    rows.append(["cached OFA / online OFA, images/s", r["cached_over_online_speedup"]])
    n = r["students"]
    if n > 0:
        rows += [[f"{n} OFA students from one stream: views/s, student-images/s (waiting share)",
                  f"{r[f'students{n}_stream_views_per_s']:.4g}, {r[f'students{n}_student_images_per_s']:.4g} "
                  f"({r[f'students{n}_loader_wait_fraction']:.2f})"],
                 [f"wall of one stream / {n} separate cached-OFA runs", r[f"students{n}_over_separate_wall"]]]
    flags = ", ".join(f for f in ("channels_last", "compile") if r[f]) or "no --channels-last or --compile"
    return (f"Teacher {r['teacher']}, student {r['student']} at {r['view_size']} px, batch {r['batch_size']}, "
            f"{r['steps']} steps per run, {flags}. No target: the throughput a GPU run reports (with `--small`, "
            "tiny models on a CPU: a check of the script, meaningless as throughput).\n\n"
            + md_table(["what", "measured"], rows))


if __name__ == "__main__":
    main()
