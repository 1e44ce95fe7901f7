"""Accuracy evidence from a declared plan: every cell of a table made by one commit, with intervals.

    python bench/accuracy.py --plan bench/plans/tiny50.yaml --data runs/data/tiny50 [--jobs 2]
    python bench/accuracy.py --plan bench/plans/tiny50.yaml --data runs/data/tiny50 --report-only

A plan (YAML, committed before its runs start) names the data slice, the teacher, the student, the stores, the
variants (a method with its flags and teacher source: a store, the online teacher, or none), the seeds, the
tables and the comparisons each table reports, and the text written before any result was seen (hypotheses, the
rule that picks the demo's settings). The script trains the teacher (CE), caches it, trains every (variant, seed)
and writes bench/results/<name>.{json,md,png}: per variant the mean and sample standard deviation of top-1,
top-5 and calibration error over seeds; per comparison the paired difference over seeds with a 95% t-interval,
resolved only when the interval excludes 0.

Work is reused only when it was made by this commit from a clean checkout, with the configuration a run would
have now (its hash), on the same data (split hashes, validation count), from the same teacher weights and store:
otherwise the script stops naming the difference (pass --replace-stale to delete and redo such work). An
interrupted run is resumed (`--resume`) under the same commit. `--report-only` renders the tables from finished
runs, which must all come from one commit. With --jobs N, N runs train at once, each on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from common import CODE_AT_START, ROOT, results_dir, save

sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
from cache.store import CacheStore  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.manifest import Manifest, load_manifest, sha256_file, write_atomic  # noqa: E402
from pipeline.provenance import code_label, code_version, config_hash  # noqa: E402
from students.checkpoint import run_config_hash, started_config_hash  # noqa: E402

EXIT_PREEMPTED = 75


class Stale(Exception):
    """Work on disk that this commit and plan would not make as it is."""


# --- the plan -------------------------------------------------------------------------------------------------


def load_plan(path: Path) -> dict:
    plan = yaml.safe_load(Path(path).read_text())
    known = set(plan["variants"])
    for t in plan["tables"]:
        bad = [v for v in t["variants"] + [x for pair in t.get("compare", []) for x in pair] if v not in known]
        if bad:
            raise SystemExit(f"plan {path}: table {t['name']} names unknown variants {bad}; declare them")
    for name, v in plan["variants"].items():
        if v["teacher"] not in ("none", "online", *plan.get("stores", {})):
            raise SystemExit(f"plan {path}: variant {name} has teacher {v['teacher']!r}; use none, online or a store")
    return plan


def slice_dataset(src: Path, dest: Path, train_shards: int, val_shards: int, val_split: str) -> Path:
    """The first shards of each split, hard-linked, under a manifest of their own."""
    m = load_manifest(src)
    dest.mkdir(parents=True, exist_ok=True)
    sub = Manifest(name=f"{m.name} slice", classes=m.classes, class_ids=m.class_ids)
    for split, new, n in (("train", "train", train_shards), (val_split, "val", val_shards)):
        info = m.split(split)
        if n > len(info.shards):
            raise SystemExit(f"{src}: split '{split}' has {len(info.shards)} shards, fewer than the {n} asked for")
        keep = info.shards[:n]
        for s in keep:  # a link to other bytes (the source made again, another --data) is replaced, atomically
            link = dest / s.name
            if not (link.exists() and link.samefile(src / s.name)):
                tmp = dest / f".{s.name}.new"
                tmp.unlink(missing_ok=True)
                tmp.hardlink_to(src / s.name)
                os.replace(tmp, link)
        sub.splits[new] = type(info)(count=sum(s.count for s in keep), samples_per_shard=info.samples_per_shard,
                                     class_counts=info.class_counts, shards=keep, order_seed=info.order_seed)
    write_atomic(dest / "dataset.json", sub.to_json().encode())
    return dest


class Work:
    """The commands of a plan and where their outputs live."""

    def __init__(self, plan: dict, data: Path, work: Path):
        self.plan, self.data, self.work = plan, data, work
        self.manifest = load_manifest(data)
        self.teacher_dir = work / "teacher"

    def common(self) -> list:
        return ["--data", self.data, "--recipe", self.plan["recipe"], "--batch-size", self.plan["batch_size"],
                "--workers", 1, "--quiet"]

    def teacher_argv(self) -> list:
        t = self.plan["teacher"]
        return ["train-student", *self.common(), "--student", t["name"], *t.get("flags", []), "--method", "ce",
                "--epochs", t["epochs"], "--out", self.teacher_dir]

    def checkpoint(self) -> Path:
        return self.teacher_dir / "model.safetensors"

    def store(self, name: str) -> Path:
        return self.work / f"store-{name}.zarr"

    def store_argv(self, name: str) -> list:
        t = self.plan["teacher"]
        return ["cache-teacher", "--data", self.data, "--teacher", t["name"], *t.get("model_flags", []),
                "--checkpoint", self.checkpoint(), "--recipe", self.plan["recipe"], "--epochs", self.plan["epochs"],
                *self.plan["stores"][name], "--batch-size", 250, "--workers", 1, "--out", self.store(name), "--quiet"]

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.work / f"{variant}-seed{seed}"

    def run_argv(self, variant: str, seed: int) -> list:
        v, s, t = self.plan["variants"][variant], self.plan["student"], self.plan["teacher"]
        if v["teacher"] == "online":
            source = ["--teacher-online", t["name"], "--teacher-checkpoint", self.checkpoint(),
                      "--view-epochs", self.plan["epochs"],
                      *[f.replace("--model-kwargs", "--teacher-model-kwargs") for f in t.get("model_flags", [])]]
        elif v["teacher"] == "none":
            source = []
        else:
            source = ["--cache", self.store(v["teacher"])]
        return ["train-student", *self.common(), "--student", s["name"], *s.get("flags", []), *v["flags"], *source,
                "--epochs", self.plan["epochs"], "--seed", seed, "--out", self.run_dir(variant, seed)]

    def expected(self, argv: list) -> dict:
        """What a finished run of `argv` must have recorded to be reused."""
        cfg = cli.parse(argv[0], argv[1:])
        teacher = [] if cfg.run.loss.method == "ce" else [sha256_file(self.checkpoint())]
        caches = [config_hash(CacheStore(c).attrs) for c in cfg.stream.cache or []]
        return {"config_hash": run_config_hash(cfg), "val_samples": self.manifest.split("val").count,
                "data": {"train": self.manifest.split_hash("train"), "val": self.manifest.split_hash("val")},
                "teacher_sha256": teacher, "caches": caches}


# --- keyed reuse ----------------------------------------------------------------------------------------------


def run_state(run: Path, expected: dict | None, code: dict) -> str:
    """'done' (finished, and made as `expected` by `code`), 'resume', 'fresh'; raises Stale otherwise.
    expected None: only check that it was made by `code` (a report of finished runs)."""
    if (run / "metrics.json").exists():
        p = json.loads((run / "metrics.json").read_text()).get("provenance")
        if p is None:
            raise Stale(f"{run} records no provenance (made by an older version)")
        problems = []
        for made in (p["code"], p.get("code_at_start") or p["code"]):
            if made != code:
                problems.append(f"commit {made['commit']}{' (dirty)' if made['dirty'] else ''}, not {code['commit']}")
        for key, want in (expected or {}).items():
            got = [c["id"] for c in p["caches"]] if key == "caches" else p.get(key)
            if got != want:
                problems.append(f"{key} {got}, not {want}")
        if problems:
            raise Stale(f"{run} was made with {'; '.join(problems)}")
        return "done"
    if (run / "config.json").exists():
        config = json.loads((run / "config.json").read_text())
        made = config.get("made_by", {}).get("code")
        if made != code:
            raise Stale(f"{run} was started by commit {made and made['commit']}, not {code['commit']}")
        started = started_config_hash(run)
        if expected and started != expected["config_hash"]:
            raise Stale(f"{run} was started with config_hash {started}, not {expected['config_hash']}")
        return "resume" if (run / "progress.json").exists() else "fresh"
    if run.exists() and any(run.iterdir()):
        raise Stale(f"{run} holds files but no run")
    return "fresh"


def store_state(path: Path) -> str:
    """'make' (absent, or unfinished by this commit: cache-teacher resumes it and checks its request) or 'done'."""
    if not path.exists():
        return "make"
    try:
        store = CacheStore(path)
    except UserError as e:
        raise Stale(f"{path}: {e}") from None
    made = store.description.versions.get("code")
    if made != code_label():
        raise Stale(f"{path} was made by commit {made}, not {code_label()}")
    return "make"  # cache-teacher refuses a store of another request, finishes an incomplete one, skips done units


def settle(path: Path, check, replace: bool) -> str:
    """check() -> state; stale work is refused (one sentence) or, with --replace-stale, removed."""
    try:
        return check()
    except Stale as e:
        if not replace:
            raise SystemExit(f"{e}; remove it or pass --replace-stale to redo it with this commit") from None
        print(f"replacing stale work: {e}", flush=True)
        shutil.rmtree(path)
        return check()


PRINTING = threading.Lock()  # the --jobs threads print through one TextIOWrapper, which is not thread-safe


def cli_run(argv: list, resume: bool = False, code: dict | None = None) -> None:
    """`python cli.py argv`; with `code` (the plan's `code_version()` at its start), refused if the checkout is no
    longer that commit in that state: a run started after an edit would record another code, and the plan's
    tables could not hold it (checked before every run, not only once: plans run for hours)."""
    now = code_version.__wrapped__() if code is not None else None  # read now, not this process's cached answer
    if now is not None and (now["commit"], now["dirty"]) != (code["commit"], code["dirty"]):
        state = lambda c: f"{c['commit']}{' with uncommitted changes' if c['dirty'] else ''}"  # noqa: E731
        raise SystemExit(f"the checkout changed while the plan ran (it started at {state(code)}, it is now at "
                         f"{state(now)}): restore it, or run the plan again from the new commit")
    cmd = [sys.executable, str(ROOT / "cli.py"), *map(str, argv), *(["--resume"] if resume else [])]
    with PRINTING:  # unguarded, two threads printing at once lost a line now and then
        print("$ python cli.py", " ".join(map(str, cmd[2:])), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode == EXIT_PREEMPTED:
        raise SystemExit(f"stopped by a signal in {argv[-1] if argv[-1] != '--quiet' else argv}; run the same "
                         f"command again to resume")
    if proc.returncode:
        raise SystemExit(f"`{' '.join(map(str, argv[:1]))}` failed with status {proc.returncode}: {cmd}")


def make_all(w: Work, jobs: int, replace: bool, allow_dirty: bool = False) -> None:
    code = code_version()
    if code["commit"] is None or (code["dirty"] and not allow_dirty):
        raise SystemExit("the checkout is not a clean git checkout: commit first, so that every run records the "
                         "commit that made it (or pass --allow-dirty to try a plan, or use --report-only)")
    plan = w.plan
    state = settle(w.teacher_dir, lambda: run_state(w.teacher_dir, w.expected(w.teacher_argv()), code), replace)
    if state != "done":
        cli_run(w.teacher_argv(), resume=state == "resume", code=code)
    run_state(w.teacher_dir, w.expected(w.teacher_argv()), code)  # the teacher is what this plan asks for
    for store in dict.fromkeys(v["teacher"] for v in plan["variants"].values()):
        if store in plan.get("stores", {}):
            settle(w.store(store), lambda s=store: store_state(w.store(s)), replace)
            cli_run(w.store_argv(store), code=code)
    todo, queued = [], set()
    for t in plan["tables"]:  # tables in order; within one, seeds outermost: a finished seed is a whole comparison
        for seed in plan["seeds"]:
            for variant in t["variants"]:
                if (variant, seed) in queued:
                    continue
                queued.add((variant, seed))
                argv, run = w.run_argv(variant, seed), w.run_dir(variant, seed)
                state = settle(run, lambda r=run, a=argv: run_state(r, w.expected(a), code), replace)
                if state != "done":
                    todo.append((argv, state == "resume"))
    print(f"{len(todo)} runs to make, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        for f in [pool.submit(cli_run, argv, resume, code) for argv, resume in todo]:
            f.result()


# --- statistics and report ------------------------------------------------------------------------------------


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """a - b over the seeds both have: mean, sample sd and the 95% t-interval of the mean difference."""
    from scipy import stats
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds])
    out = {"seeds": seeds, "differences": d.tolist(), "mean": float(d.mean()) if len(d) else None}
    if len(d) > 1:
        half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
        out |= {"sd": float(d.std(ddof=1)), "ci95": [out["mean"] - half, out["mean"] + half],
                "resolved": bool(out["mean"] - half > 0 or out["mean"] + half < 0)}
    return out


def summarize(values: list[float]) -> dict:
    v = np.array(values, dtype=float)
    return {"mean": float(v.mean()) if len(v) else None, "sd": float(v.std(ddof=1)) if len(v) > 1 else None}


def collect(w: Work, allow_dirty: bool = False) -> dict:
    """Every finished cell's numbers; all runs (teacher included) must come from one clean commit."""
    t_metrics = json.loads((w.teacher_dir / "metrics.json").read_text())
    code = t_metrics["provenance"]["code"]
    if code["commit"] is None or (code["dirty"] and not allow_dirty):
        raise SystemExit(f"{w.teacher_dir} was made from a dirty checkout or outside git: not reportable (pass "
                         f"--allow-dirty to render it marked so)")
    if (CODE_AT_START["commit"], CODE_AT_START["dirty"]) != (code["commit"], code["dirty"]):
        raise SystemExit(f"the runs were made by commit {code['commit']} and this checkout is "
                         f"{CODE_AT_START['commit']}{' with changes' if CODE_AT_START['dirty'] else ''}: render them "
                         f"from a clean checkout of {code['commit']} (git worktree add DIR {code['commit']}), so that "
                         "the record names the one code that made and drew them")
    variants = {}
    for variant in dict.fromkeys(v for t in w.plan["tables"] for v in t["variants"]):
        cells = {}
        for seed in w.plan["seeds"]:
            run = w.run_dir(variant, seed)
            if not (run / "metrics.json").exists():
                continue
            try:  # made by the teacher's commit, as this plan asks (options, data, teacher, store)
                run_state(run, w.expected(w.run_argv(variant, seed)), code)
            except UserError as e:  # a store or the teacher's checkpoint gone
                raise SystemExit(f"{run} cannot be checked against the plan: {e}") from None
            except Stale as e:
                raise SystemExit(f"{e}: a table holds the runs of one commit ({code['commit']}, the teacher's)") \
                    from None
            m = json.loads((run / "metrics.json").read_text())
            cells[seed] = {k: m[k] for k in ("top1", "top5", "ece", "train_seconds", "val_samples")} | {
                "history": [h["top1"] for h in m["history"]], "config_hash": m["provenance"]["config_hash"]}
        variants[variant] = {"about": w.plan["variants"][variant].get("about", ""),
                             "flags": " ".join(map(str, w.plan["variants"][variant]["flags"])),
                             "teacher": w.plan["variants"][variant]["teacher"], "seeds": cells,
                             **{k: summarize([c[k] for c in cells.values()]) for k in ("top1", "top5", "ece")}}
    tables = []
    for t in w.plan["tables"]:
        comps = [{"a": a, "b": b, **paired({s: c["top1"] for s, c in variants[a]["seeds"].items()},
                                           {s: c["top1"] for s, c in variants[b]["seeds"].items()})}
                 for a, b in t.get("compare", [])]
        tables.append({"name": t["name"], "title": t["title"], "variants": t["variants"], "comparisons": comps})
    return {"label": w.plan["label"], "commit": code["commit"], "dirty": code["dirty"], "plan": w.plan,
            "setup": {"classes": len(w.manifest.classes), "train_images": w.manifest.split("train").count,
                      "val_images": w.manifest.split("val").count, "epochs": w.plan["epochs"],
                      "seeds": w.plan["seeds"]},
            "teacher": {"name": w.plan["teacher"]["name"], "top1": t_metrics["top1"], "ece": t_metrics.get("ece"),
                        "epochs": w.plan["teacher"]["epochs"]},
            "variants": variants, "tables": tables}


def _cell(s: dict, digits: int = 2) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['sd']:.{digits}f}" if s["sd"] is not None else "")


def table(record: dict) -> str:
    """The markdown of a saved results record (bench/results/<name>.json): one section per table."""
    r = record["results"]
    m = record.get("machine", {})
    lines = []
    for t in r["tables"]:
        lines += [f"#### {t['title']}", "",
                  f"{r['label']}: {r['setup']['train_images']:,} training and {r['setup']['val_images']:,} validation "
                  f"images, {r['setup']['classes']} classes, {r['setup']['epochs']} epochs, seeds "
                  f"{', '.join(map(str, r['setup']['seeds']))}; teacher {r['teacher']['name']} "
                  f"{r['teacher']['top1']:.2f}% top-1. Mean ± sample sd over seeds (n).", "",
                  "| variant | top-1 | top-5 | ECE (%) | n | what |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        for name in t["variants"]:
            v = r["variants"][name]
            lines.append(f"| {name} | {_cell(v['top1'])} | {_cell(v['top5'])} | {_cell(v['ece'])} | "
                         f"{len(v['seeds'])} | {v['about']} |")
        if t["comparisons"]:
            lines += ["", "| paired difference (top-1) | mean | 95% interval | n | resolved |",
                      "| --- | ---: | :---: | ---: | --- |"]
            for c in t["comparisons"]:
                ci = f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]" if "ci95" in c else "-"
                verdict = ("yes" if c["resolved"] else "no: the interval holds 0") if "resolved" in c else "-"
                mean = f"{c['mean']:+.2f}" if c["mean"] is not None else "-"
                lines.append(f"| {c['a']} - {c['b']} | {mean} | {ci} | {len(c['seeds'])} | {verdict} |")
        lines += [""]
    dirty = " with uncommitted changes" if r.get("dirty") else ""
    lines.append(f"Made by commit {r['commit'][:12]}{dirty} on {m.get('cpu', '?')} ({m.get('cores', '?')} cores); "
                 f"`{record.get('command', '')}`.")
    return "\n".join(lines) + "\n"


README_START = "<!-- accuracy tables: generated from bench/results/{name}.json -->"
README_END = "<!-- end accuracy tables -->"


def readme_block(text: str, record: dict) -> str:
    """`text` (a markdown file) with the block between the record's markers replaced by `table(record)`."""
    start = README_START.format(name=record["name"])
    if text.count(start) != 1 or text.count(README_END) != 1:
        raise SystemExit(f"the file holds no single pair of markers {start!r} ... {README_END!r}: add them where "
                         "the tables go")
    head, rest = text.split(start)
    return f"{head}{start}\n{table(record)}{README_END}{rest.split(README_END, 1)[1]}"


def plot(r: dict, path: Path) -> None:
    """One panel per table, one colour per variant: mean validation top-1 per epoch over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(r["tables"]), figsize=(6 * len(r["tables"]), 4.2), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, t in zip(axes[0], r["tables"], strict=True):
        for i, name in enumerate(t["variants"]):
            hist = [c["history"] for c in r["variants"][name]["seeds"].values()]
            if hist:
                mean = np.mean(np.array(hist), 0)
                ax.plot(range(1, len(mean) + 1), mean, marker="o", color=colours(i % 10), label=name)
        ax.set_title(textwrap.fill(f"{t['title']} (mean over seeds)", 70), fontsize=9)  # panels 6 inches wide
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", type=Path, required=True, help="YAML plan (bench/plans/)")
    ap.add_argument("--data", type=Path, help="dataset made by `cli.py shards` to slice [default: the plan's]")
    ap.add_argument("--work", type=Path, help="where runs and stores go [default: the plan's, under the repo]")
    ap.add_argument("--results", type=Path, help="directory of the results files [default: bench/results, or "
                    "$OFAKD_BENCH_RESULTS]")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once (one thread each)")
    ap.add_argument("--replace-stale", action="store_true", help="delete and redo work another commit made")
    ap.add_argument("--report-only", action="store_true", help="render the tables from finished runs")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="run or report from a checkout with uncommitted changes (to try a plan: its runs and tables "
                         "are marked dirty, and reuse cannot tell one uncommitted change from another)")
    args = ap.parse_args(argv)
    args.results = args.results or results_dir()
    plan = load_plan(args.plan)
    work = (args.work or ROOT / plan["work"]).resolve()  # runs record their paths: one spelling of the folder
    d = plan["data"]
    data = slice_dataset(args.data or ROOT / d["source"], work / "data", d["train_shards"], d["val_shards"],
                         d["val_split"])
    w = Work(plan, data, work)
    if not args.report_only:
        make_all(w, args.jobs, args.replace_stale, args.allow_dirty)
    results = collect(w, args.allow_dirty)
    record = json.loads(save(plan["name"], results, args.results).read_text())
    (args.results / f"{plan['name']}.md").write_text(table(record))
    plot(results, args.results / f"{plan['name']}.png")
    print(table(record))
    return record


if __name__ == "__main__":
    main()
