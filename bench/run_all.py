"""`make bench`: every benchmark, results in bench/results/<name>.json and a summary in bench/results/SUMMARY.md.

Sizes are chosen for 2 CPU cores (a few minutes in all); every script takes its sizes as arguments
so a GPU machine can run the same code bigger.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def ensure_data() -> dict[str, Path]:
    """Bench datasets: the embedded digits, and slices of Tiny-ImageNet val when ../shared/data has it."""
    from pipeline.shards import make_shards, read_class_names, scan_image_folder, write_split
    out = {"digits": ROOT / "runs" / "bench" / "digits"}
    if not (out["digits"] / "dataset.json").exists():
        make_shards("digits", out["digits"], progress=False)
    tar = ROOT.parent / "shared" / "data" / "tiny-imagenet-200.tar.gz"
    raw = ROOT / "runs" / "raw" / "tiny-imagenet-200"
    if tar.exists() and not (raw / "val").exists():
        raw.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xzf", str(tar), "-C", str(raw.parent), "tiny-imagenet-200/val",
                        "tiny-imagenet-200/words.txt"], check=True)
    if (raw / "val").exists():
        ids, samples = scan_image_folder(raw / "val")
        names = read_class_names(raw / "words.txt", ids)
        for name, step, shard in (("tiny2k", 5, 250), ("tiny400", 25, 100)):
            out[name] = ROOT / "runs" / "bench" / name
            if not (out[name] / "dataset.json").exists():
                write_split(out[name], "train", names, samples[::step], name=f"tiny-imagenet val [::{step}]",
                            shard_size=shard, class_ids=ids, progress=False)
    return out


def run(script: str, *args) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / script), *map(str, args)]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    name = args[args.index("--name") + 1] if "--name" in args else script.removesuffix(".py")
    return json.loads((RESULTS / f"{name}.json").read_text())


def main() -> None:
    if "--summary-only" in sys.argv:  # rebuild SUMMARY.md from the JSON files already there
        out = {p.stem: json.loads(p.read_text()) for p in RESULTS.glob("*.json")}
        (RESULTS / "SUMMARY.md").write_text(summary(out))
        print((RESULTS / "SUMMARY.md").read_text())
        return
    data = ensure_data()
    out = {}
    if "tiny400" in data:  # ImageNet-like stage one: ResNet-50 at 224 px on the ViT recipe
        out["stage_one"] = run("stage_one.py", "--data", data["tiny400"], "--teacher", "resnet50", "--recipe",
                               "imagenet-vit", "--batch-size", 50, "--repeats", 1, "--name", "stage_one")
    out["stage_one_small"] = run("stage_one.py", "--data", data["digits"], "--teacher", "resnet18", "--recipe",
                                 "digits-mix", "--name", "stage_one_small")
    out["stage_two"] = run("stage_two.py", "--data", data["digits"], "--name", "stage_two")
    if "tiny2k" in data:
        out["loader_tiny"] = run("stage_two.py", "--data", data["tiny2k"], "--recipe", "tiny-vit", "--loader-only",
                                 "--name", "loader_tiny")
        out["scaling"] = run("scaling.py", "--data", data["tiny2k"], "--name", "scaling")
    out["loader_vs_timm"] = run("loader_vs_timm.py", "--name", "loader_vs_timm")
    out["loader_memory"] = run("loader_memory.py", "--name", "loader_memory")
    (RESULTS / "SUMMARY.md").write_text(summary(out))
    print((RESULTS / "SUMMARY.md").read_text())


def _fmt(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def summary(out: dict) -> str:
    lines = ["# Benchmark summary", "", "Written by `make bench` (`python bench/run_all.py`); each row's JSON file "
             "holds the exact command and the machine.", "",
             "| benchmark | measured | target | file |", "| --- | --- | --- | --- |"]

    def row(name, what, value, target):
        rec = json.loads((RESULTS / f"{name}.json").read_text())
        m = rec["machine"]
        gpu = f", {m['gpu']}" if "gpu" in m else ""
        lines.append(f"| {what} | {_fmt(value)} | {target} | `{name}.json` ({m['cpu']}, {m['cores']} cores{gpu}) |")

    if "stage_one" in out:
        r = out["stage_one"]["results"]
        row("stage_one", f"stage one / bare teacher throughput ({r['teacher']}, {r['view_size']} px views)",
            r["pass_over_bare"], ">= 0.90")
    r = out["stage_one_small"]["results"]
    row("stage_one_small", f"stage one / bare teacher throughput ({r['teacher']}, {r['view_size']} px views, CPU-bound "
        f"views)", r["pass_over_bare"], ">= 0.90 (see note)")
    row("stage_one_small", f"raw bytes per (epoch, sample), k = {r['topk']}", r["raw_bytes_per_view"],
        f"<= {r['raw_budget_4k_plus_24']}")
    r = out["stage_two"]["results"]
    row("stage_two", f"cached OFA step / free-teacher OFA step ({r['student']} + heads, the real train_step)",
        r["cached_over_free"], "<= 1.05")
    row("stage_two", "pixel fingerprint / loader time", r["digest_share_of_loader_time"], "<= 0.02")
    row("stage_two", f"online-teacher saving: measured {r['saving_measured']:.3f} vs predicted "
        f"{r['saving_predicted']:.3f} ({r['teacher']} teacher), relative error", r["saving_relative_error"], "<= 0.10")
    row("stage_two", "loader with cache / without (digits 32 px, 0.3 ms views)", r["loader_with_over_without"],
        ">= 0.95")
    if "loader_tiny" in out:
        r = out["loader_tiny"]["results"]
        row("loader_tiny", "loader with cache / without (Tiny-ImageNet 64 px JPEG, tiny-vit recipe)",
            r["loader_with_over_without"], ">= 0.95")
    if "scaling" in out:
        r = out["scaling"]["results"]
        for x in r["rows"]:
            if x["topk"] == 10:
                lines.append(f"| scaling: {x['samples']} samples, k = 10: stage one {x['stage_one_s']:.1f} s, "
                             f"{x['disk_bytes_per_view']:.1f} B/view on disk, stage two loader + teacher rebuild + "
                             f"loss "
                             f"{x['stage_two_cache_side_ms_per_view']:.3f} ms/view | | linear | `scaling.json` |")
        e = r["extrapolation_imagenet_300_epochs_k10"]
        lines.append(f"| ImageNet-1k x 300 epochs at k = 10: raw {e['raw_GB']:.1f} GB, on disk "
                     f"{e['disk_GB_at_measured_compression']:.1f} GB | | <= 25 GB raw | `scaling.json` |")
    if "loader_vs_timm" in out:
        for name, r in out["loader_vs_timm"]["results"]["recipes"].items():
            row("loader_vs_timm", f"training views per CPU-second, ours / timm's create_transform (+ Mixup), {name}, "
                f"G = 1, full decode", r["ours_over_timm"], ">= 1")
            if "ours_draft_over_timm" in r:
                full = r["draft_reductions"].get("1/1", 0.0)
                row("loader_vs_timm", f"the same with draft decode (share of views decoded at full size: {full:.2f})",
                    r["ours_draft_over_timm"], "")
            g = out["loader_vs_timm"]["results"]["per_decode"]
            if f"ours_g{g}_over_timm" in r:
                row("loader_vs_timm", f"the same at G = {g} epochs per decode, full decode", r[f"ours_g{g}_over_timm"],
                    {"imagenet-cnn": ">= 2", "imagenet-vit": ">= 1.5"}.get(name, "") if g == 4 else "")
    if "loader_memory" in out:
        for r in out["loader_memory"]["results"]["rows"]:
            row("loader_memory", f"peak RSS growth of one loader process over one group, G = {r['per_decode']}, "
                f"{r['shard_size']} images a shard (MB)", r["peak_growth_mb"], "")
    lines += ["", "Notes:",
              "- The ratio targets are about the machinery around a teacher or student that dominates the cost, as on "
              "a GPU node where data-loader workers run on other cores. On 2 CPU cores everything shares the same "
              "cores: with a 32 px teacher that costs 0.4 ms per view, decoding and building the view (about 0.5 ms) "
              "is as expensive as the teacher, so stage one reaches only the `stage_one_small` ratio; with an "
              "ImageNet-size teacher (`stage_one`) the pass keeps >= 0.9 of the bare teacher.",
              "- Likewise the loader ratio on digits (views that cost 0.3 ms) is below 0.95 because reading one cache "
              "unit per shard (6 small zarr reads) is a visible fraction of so little work; on 64 px JPEG views "
              "(`loader_tiny`) it was 0.97 before the redesign of 2026-11-29 and is 0.93 after it (not yet "
              "explained: the join now also checks each unit's pixel fingerprint and builds one TeacherTargets "
              "per view).",
              "- Step-time ratios are medians of per-round ratios over interleaved, rotated rounds on the same "
              "batches.",
              "- `loader_vs_timm`: CPU-seconds of one process on one thread, variants interleaved in rotating rounds "
              "on the same 500x375 JPEG photos (timm through its ImageDataset on the files), so the load of "
              "other jobs on the machine falls on all alike; G = 1 (one decode per view). Draft decode reduces no "
              "224 px view of 500x375 photos (a reduction needs a crop of 560 px a side); see the README's "
              "Performance section for what bounds each ratio."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
