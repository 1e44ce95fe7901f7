"""CKA evidence for the OFA motivation: stage features agree within a family and differ across families.

    python bench/cka_evidence.py [--work runs/accuracy] [--samples 2000] [--pairs cnn_vs_vit ...]

Uses the CE-trained models of bench/accuracy.py (same CIFAR-10 slice, `--work`/data): ResNet-18 and test_resnet
(CNNs), two test_vit ViTs trained from different seeds; writes cka/<pair>/cka.{png,csv,json} (`cli.py cka`) and
cka_evidence.json (each pair's diagonal: stage i against stage i) to bench/results (or $OFAKD_BENCH_RESULTS).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import ROOT, md_table, results_dir, save

VIT = ["img_size=32", "patch_size=4"]
PAIRS = {"cnn_vs_vit": ("resnet18", "test_vit (a)"), "cnn_vs_cnn": ("resnet18", "test_resnet"),
         "vit_vs_vit": ("test_vit (a)", "test_vit (b)"), "cnn_vs_vit_2": ("test_resnet", "test_vit (b)")}


def models(work: Path) -> dict:
    """name -> (timm model, its keyword arguments, checkpoint) of bench/accuracy.py's CE runs in `work`."""
    return {"resnet18": ("resnet18", [], work / "teacher-resnet18" / "model.safetensors"),
            "test_resnet": ("test_resnet", [], work / "vit-cnn" / "ce-seed0" / "model.safetensors"),
            "test_vit (a)": ("test_vit", VIT, work / "teacher-test_vit" / "model.safetensors"),
            "test_vit (b)": ("test_vit", VIT, work / "cnn-vit" / "ce-seed0" / "model.safetensors")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "accuracy")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    args = ap.parse_args(argv)
    found = models(args.work)
    summary = {}
    for name in args.pairs:
        a, b = PAIRS[name]
        (na, ka, ca), (nb, kb, cb) = found[a], found[b]
        if not (ca.exists() and cb.exists()):
            print(f"skip {name}: {ca if not ca.exists() else cb} missing (run bench/accuracy.py first)")
            continue
        out = results_dir() / "cka" / name
        cmd = [sys.executable, str(ROOT / "cli.py"), "cka", "--model-a", na, "--checkpoint-a", ca, "--model-b", nb,
               "--checkpoint-b", cb, "--data", args.work / "data", "--recipe", "cifar", "--samples", args.samples,
               "--batch-size", 100, "--out", out]
        cmd += [x for kv in ka for x in ("--model-kwargs-a", kv)] + [x for kv in kb for x in ("--model-kwargs-b", kv)]
        subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)
        mat = json.loads((out / "cka.json").read_text())["matrix"]
        diag = [mat[i][i] for i in range(min(len(mat), len(mat[0])))]
        summary[name] = {"a": a, "b": b, "diagonal": diag, "mean_diagonal": sum(diag) / len(diag)}
    save("cka_evidence", {"samples": args.samples, "pairs": summary})
    return summary


def table(record: dict) -> str:
    r = record["results"]
    rows = [[name, p["a"], p["b"], ", ".join(f"{d:.2f}" for d in p["diagonal"]), p["mean_diagonal"]]
            for name, p in r["pairs"].items()]
    samples = f"{r['samples']:,} samples" if r.get("samples") else "samples not recorded"
    return (f"Linear CKA of the stage features, {samples}; the full matrices and plots are in `cka/<pair>/`. No "
            "target: within a family the stages agree more than across families.\n\n"
            + md_table(["pair", "model a", "model b", "CKA, stage i vs stage i", "mean"], rows))


if __name__ == "__main__":
    main()
