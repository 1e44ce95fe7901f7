"""CKA evidence for the OFA motivation: stage features agree within a family and differ across families.

    python bench/cka_evidence.py [--work runs/accuracy] [--samples 2000]

Uses the CE-trained models of bench/accuracy.py (same CIFAR-10 slice): ResNet-18 and test_resnet (CNNs),
two test_vit ViTs trained from different seeds; writes bench/results/cka/<pair>/cka.{png,csv,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import RESULTS, ROOT

VIT = ["img_size=32", "patch_size=4"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "accuracy")
    ap.add_argument("--samples", type=int, default=2000)
    args = ap.parse_args(argv)
    w = args.work
    models = {
        "resnet18": ("resnet18", [], w / "teacher-resnet18" / "model.safetensors"),
        "test_resnet": ("test_resnet", [], w / "vit-cnn" / "ce-seed0" / "model.safetensors"),
        "test_vit (a)": ("test_vit", VIT, w / "teacher-test_vit" / "model.safetensors"),
        "test_vit (b)": ("test_vit", VIT, w / "cnn-vit" / "ce-seed0" / "model.safetensors"),
    }
    pairs = {"cnn_vs_vit": ("resnet18", "test_vit (a)"), "cnn_vs_cnn": ("resnet18", "test_resnet"),
             "vit_vs_vit": ("test_vit (a)", "test_vit (b)"), "cnn_vs_vit_2": ("test_resnet", "test_vit (b)")}
    summary = {}
    for name, (a, b) in pairs.items():
        (na, ka, ca), (nb, kb, cb) = models[a], models[b]
        if not (ca.exists() and cb.exists()):
            print(f"skip {name}: {ca if not ca.exists() else cb} missing (run bench/accuracy.py first)")
            continue
        out = RESULTS / "cka" / name
        cmd = [sys.executable, str(ROOT / "cli.py"), "cka", "--model-a", na, "--checkpoint-a", ca, "--model-b", nb,
               "--checkpoint-b", cb, "--data", w / "data", "--recipe", "cifar", "--samples", args.samples,
               "--batch-size", 100, "--out", out]
        for kv in ka:
            cmd += ["--model-kwargs-a", kv]
        for kv in kb:
            cmd += ["--model-kwargs-b", kv]
        subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)
        m = json.loads((out / "cka.json").read_text())
        mat = m["matrix"]
        diag = [mat[i][i] for i in range(min(len(mat), len(mat[0])))]
        summary[name] = {"a": a, "b": b, "diagonal": diag, "mean_diagonal": sum(diag) / len(diag)}
    (RESULTS / "cka" / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
