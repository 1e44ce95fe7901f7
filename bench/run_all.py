"""`make bench`: every performance benchmark, one after another, then bench/results/README.md.

    python bench/run_all.py [--work DIR] [--small] [--only NAME ...]

Each benchmark writes bench/results/<name>.json (or to $OFAKD_BENCH_RESULTS); this script then records what it
ran, with each benchmark's seconds (run_all.json), and regenerates README.md from every record there
(bench/report.py). Sizes are chosen for 2 CPU cores; every script takes its sizes as arguments, so a GPU
machine can run the same code bigger. The Tiny-ImageNet benchmarks run when ../shared/data holds its tarball.
`--small` runs every benchmark with the same options at tiny sizes on a slice of the digits (a check of the
scripts themselves, its figures meaningless), writing to <work>/results unless $OFAKD_BENCH_RESULTS names a
folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import RESULTS_ENV, ROOT, md_table, results_dir, save


@dataclass
class Bench:
    name: str
    script: str
    args: list = field(default_factory=list)
    data: str | None = None
    """The dataset it runs on (`--data`): digits, tiny400 or tiny2k (Tiny-ImageNet val slices); None: its own."""
    small: list = field(default_factory=list)
    """Appended with --small: tiny sizes (a repeated option's last value wins)."""


BENCHES = [
    Bench("stage_one", "stage_one.py", ["--teacher", "resnet50", "--recipe", "imagenet-vit", "--batch-size", 50,
                                        "--repeats", 1], "tiny400", ["--teacher", "test_resnet"]),
    Bench("stage_one_small", "stage_one.py", ["--teacher", "resnet18", "--recipe", "digits-mix"], "digits",
          ["--teacher", "test_resnet", "--repeats", 1]),
    Bench("stage_two", "stage_two.py", [], "digits", ["--student", "test_resnet", "--teacher", "test_convnext",
                                                      "--steps", 2, "--rounds", 2, "--batch-size", 16]),
    Bench("loader_tiny", "stage_two.py", ["--recipe", "tiny-vit", "--loader-only"], "tiny2k",
          ["--teacher", "test_resnet", "--rounds", 1]),
    Bench("scaling", "scaling.py", [], "tiny2k", ["--teacher", "test_resnet", "--sizes", 1, 2, "--topk", 5, 10]),
    Bench("loader_vs_timm", "loader_vs_timm.py", ["--images", 192, "--rounds", 6], None,
          ["--images", 8, "--shard-size", 4, "--rounds", 1, "--recipes", "imagenet-cnn@64", "imagenet-vit@64"]),
    Bench("loader_memory", "loader_memory.py", [], None, ["--shard-sizes", 4, "--per-decode", 2,
                                                          "--recipe", "imagenet-cnn"]),
    Bench("multi_teacher", "multi_teacher.py", ["--workers", 0, "--shards", 8], "tiny2k",
          ["--shards", 2, "--repeats", 1, "--view-size", 32]),
    Bench("multi_student", "multi_student.py", ["--rounds", 9], "digits",
          ["--steps", 1, "--rounds", 1, "--students", 2, "--view-size", 32]),
    Bench("object_store", "object_store.py", ["--rounds", 3, "--workers", "0,2"], "digits",
          ["--rounds", 1, "--workers", "0", "--latency-ms", 1]),
    Bench("stop_check", "stop_check.py", [], "digits", ["--reps", 20, "--steps", 2, "--rounds", 1]),
]


def ensure_data(work: Path, small: bool) -> dict[str, Path]:
    """The benchmarks' datasets in `work`: the embedded digits, and slices of Tiny-ImageNet val when ../shared/data
    has it; with `small`, one slice of the digits (192 training images in 4 shards) stands for all three."""
    from pipeline.shards import digits_source, make_shards, read_class_names, scan_image_folder, write_split
    if small:
        out = work / "digits-small"
        if not (out / "dataset.json").exists():
            classes, splits = digits_source()
            write_split(out, "train", classes, splits["train"][:192], name="digits-small", shard_size=48,
                        progress=False)
            write_split(out, "val", classes, splits["val"][:48], name="digits-small", shard_size=48, progress=False)
        return dict.fromkeys(("digits", "tiny400", "tiny2k"), out)
    out = {"digits": work / "digits"}
    if not (out["digits"] / "dataset.json").exists():
        make_shards("digits", out["digits"], progress=False)
    tar = ROOT.parent / "shared" / "data" / "tiny-imagenet-200.tar.gz"
    raw = work / "raw" / "tiny-imagenet-200"
    if tar.exists() and not (raw / "val").exists():  # extracted aside, renamed when whole: never half a folder
        partial = work / "raw.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        subprocess.run(["tar", "xzf", str(tar), "-C", str(partial), "tiny-imagenet-200/val",
                        "tiny-imagenet-200/words.txt"], check=True)
        raw.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(raw, ignore_errors=True)
        (partial / "tiny-imagenet-200").rename(raw)
    if (raw / "val").exists():
        ids, samples = scan_image_folder(raw / "val")
        names = read_class_names(raw / "words.txt", ids)
        for name, step, shard in (("tiny2k", 5, 250), ("tiny400", 25, 100)):
            out[name] = work / name
            if not (out[name] / "dataset.json").exists():
                write_split(out[name], "train", names, samples[::step], name=f"tiny-imagenet val [::{step}]",
                            shard_size=shard, class_ids=ids, progress=False)
    return out


def command(bench: Bench, data: dict[str, Path], small: bool) -> list[str]:
    """The benchmark's command line (its results named `bench.name`)."""
    args = [*bench.args, *(["--data", data[bench.data]] if bench.data else []), "--name", bench.name,
            *(bench.small if small else [])]
    return [sys.executable, str(ROOT / "bench" / bench.script), *map(str, args)]


def run(bench: Bench, data: dict[str, Path], small: bool) -> dict:
    """One benchmark in its own process; what it ran and how long it took."""
    cmd = command(bench, data, small)
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return {"script": bench.script, "file": f"{bench.name}.json", "seconds": time.perf_counter() - t0}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="where the datasets are made (default: runs/bench, "
                    "or runs/bench-small with --small)")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a check of the scripts, not a measurement")
    ap.add_argument("--only", nargs="+", choices=[b.name for b in BENCHES], help="run only these benchmarks (the "
                    "README is still made from every record in the results folder)")
    args = ap.parse_args(argv)
    work = args.work or ROOT / "runs" / ("bench-small" if args.small else "bench")
    if args.small and not os.environ.get(RESULTS_ENV):
        os.environ[RESULTS_ENV] = str(work / "results")  # never over the committed results
    print(f"results in {results_dir()}", flush=True)
    data = ensure_data(work, args.small)
    ran, skipped = {}, {}
    for bench in BENCHES:
        if args.only and bench.name not in args.only:
            continue
        if bench.data and bench.data not in data:
            skipped[bench.name] = f"no {bench.data} data: ../shared/data/tiny-imagenet-200.tar.gz is absent"
            print(f"skip {bench.name}: {skipped[bench.name]}", flush=True)
            continue
        ran[bench.name] = run(bench, data, args.small)
    res = {"small": args.small, "only": args.only, "ran": ran, "skipped": skipped}
    save("run_all", res)
    import report
    report.main(["--results", str(results_dir())])
    return res


def table(record: dict) -> str:
    r = record["results"]
    rows = [[name, f"`{x['file']}`", f"bench/{x['script']}", x["seconds"]] for name, x in r["ran"].items()]
    rows += [[name, "-", "skipped", why] for name, why in r["skipped"].items()]
    size = "`--small`: tiny sizes, a check of the scripts" if r["small"] else "full sizes"
    size += f", `--only {' '.join(r['only'])}`" if r.get("only") else ""
    return f"The last `make bench` ({size}): what it ran.\n\n" + md_table(["benchmark", "file", "script", "seconds"],
                                                                          rows)


if __name__ == "__main__":
    main()
