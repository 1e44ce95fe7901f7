"""CKA evidence for the OFA motivation: stage features agree within a family and differ across families.

    python bench/cka_evidence.py --plan bench/plans/tiny50.yaml --work runs/accuracy-tiny50 [--samples 2000]

Reads the models an accuracy plan trained (bench/accuracy.py, same `--work`): its CE teacher and its student's CE
runs of seeds 0 and 1 (two models of one family from different seeds), and the default OFA run of seed 0. Pairs:
teacher-vs-ce0 and teacher-vs-ce1 (across families for tiny50: ResNet-18 against test_vit), ce0-vs-ce1 (within
the student's family), teacher-vs-ofa0 (does OFA's head loss make the student's stages more like the teacher's?).
Every model must be finished and made as the plan asks (options, data, teacher, store) by the commit that made the
plan's teacher (bench/accuracy.py's check); a missing or stale one stops the script in one sentence. Writes
cka/<pair>/cka.{png,csv,json} (`cli.py cka`, on the plan's validation slice and recipe) and cka_evidence.json
(each pair's diagonal: stage i against stage i) to bench/results (or $OFAKD_BENCH_RESULTS).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from accuracy import Stale, UserError, Work, load_plan, run_state
from common import ROOT, md_table, results_dir, save

# pair -> (model a, model b), each "teacher" or "<variant>-seed<n>" of the plan
PAIRS = {"teacher-vs-ce0": ("teacher", "ce-seed0"), "teacher-vs-ce1": ("teacher", "ce-seed1"),
         "ce0-vs-ce1": ("ce-seed0", "ce-seed1"), "teacher-vs-ofa0": ("teacher", "ofa-seed0")}


def model_kwargs(flags: list) -> list[str]:
    return [str(flags[i + 1]) for i, f in enumerate(flags) if f == "--model-kwargs"]


def models(w: Work, names: set[str]) -> dict:
    """name -> {model, kwargs, checkpoint} for the plan's runs named, each finished and made as the plan asks (its
    options, data, teacher and store) by the commit that made the plan's teacher; refuses any other."""
    if not (w.teacher_dir / "metrics.json").exists():
        raise SystemExit(f"{w.teacher_dir} holds no finished teacher: run `python bench/accuracy.py --plan ... "
                         f"--work {w.work}` first")
    code = json.loads((w.teacher_dir / "metrics.json").read_text())["provenance"]["code"]
    found = {}
    for name in sorted(names):
        if name == "teacher":
            run, argv, spec, flags = w.teacher_dir, w.teacher_argv(), w.plan["teacher"], "model_flags"
        else:
            variant, seed = name.rsplit("-seed", 1)
            if variant not in w.plan["variants"] or int(seed) not in w.plan["seeds"]:
                raise SystemExit(f"plan {w.plan['name']} makes no run {name}: choose --pairs whose models it "
                                 f"trains ({', '.join(p for p, ms in PAIRS.items() if name not in ms)})")
            run, argv, spec, flags = w.work / name, w.run_argv(variant, int(seed)), w.plan["student"], "flags"
        if not (run / "model.safetensors").exists() or not (run / "metrics.json").exists():
            raise SystemExit(f"{run / 'model.safetensors'} is missing: run `python bench/accuracy.py --plan ... "
                             f"--work {w.work}` until {run.name} is finished")
        try:
            run_state(run, w.expected(argv), code)
        except UserError as e:
            raise SystemExit(f"{run} cannot be checked against the plan: {e}") from None
        except Stale as e:
            raise SystemExit(f"{e}: not the plan's model (run bench/accuracy.py with --replace-stale)") from None
        found[name] = {"model": spec["name"], "kwargs": model_kwargs(spec.get(flags, [])),
                       "checkpoint": run / "model.safetensors"}
    return found, code


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", type=Path, required=True, help="the accuracy plan whose models to compare")
    ap.add_argument("--work", type=Path, help="the plan's work folder [default: the plan's, under the repo]")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    args = ap.parse_args(argv)
    plan = load_plan(args.plan)
    work = (args.work or ROOT / plan["work"]).resolve()  # as bench/accuracy.py spells it: runs record their paths
    if not (work / "data" / "dataset.json").exists():
        raise SystemExit(f"{work / 'data'} holds no dataset: run bench/accuracy.py with this --work first")
    w = Work(plan, work / "data", work)
    found, code = models(w, {m for p in args.pairs for m in PAIRS[p]})
    summary = {}
    for name in args.pairs:
        a, b = (found[m] for m in PAIRS[name])
        out = results_dir() / "cka" / name
        cmd = [sys.executable, ROOT / "cli.py", "cka", "--model-a", a["model"], "--checkpoint-a", a["checkpoint"],
               "--model-b", b["model"], "--checkpoint-b", b["checkpoint"], "--data", w.data, "--split", "val",
               "--recipe", plan["recipe"], "--samples", args.samples, "--batch-size", 100, "--out", out]
        cmd += [x for kv in a["kwargs"] for x in ("--model-kwargs-a", kv)]
        cmd += [x for kv in b["kwargs"] for x in ("--model-kwargs-b", kv)]
        subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)
        mat = json.loads((out / "cka.json").read_text())["matrix"]
        diag = [mat[i][i] for i in range(min(len(mat), len(mat[0])))]
        summary[name] = {"a": PAIRS[name][0], "b": PAIRS[name][1], "model_a": a["model"], "model_b": b["model"],
                         "diagonal": diag, "mean_diagonal": sum(diag) / len(diag)}
    models_commit = code["commit"] + (" (dirty)" if code["dirty"] else "")
    save("cka_evidence", {"plan": plan["name"], "samples": args.samples, "models_commit": models_commit,
                          "pairs": summary})
    return summary


def table(record: dict) -> str:
    r = record["results"]
    rows = [[name, f"{p['a']} ({p['model_a']})", f"{p['b']} ({p['model_b']})",
             ", ".join(f"{d:.2f}" for d in p["diagonal"]), p["mean_diagonal"]] for name, p in r["pairs"].items()]
    return (f"Linear CKA of the stage features on {r['samples']:,} validation images of plan {r['plan']} (models "
            f"trained by commit {r['models_commit'][:12]}); the full matrices and plots are in `cka/<pair>/`. No "
            "target: within a family the stages agree more than across families.\n\n"
            + md_table(["pair", "model a", "model b", "CKA, stage i vs stage i", "mean"], rows))


if __name__ == "__main__":
    main()
