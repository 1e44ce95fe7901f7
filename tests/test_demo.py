import json
import statistics

import pytest

from conftest import run_cli

STUDENTS = ("test_vit", "resmlp_demo")
METHODS = ("ce", "kd", "ofa")  # ofa: the authors' CIFAR-100 recipe (commands.demo.ARMS)


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_its_table_verdict_and_plot(tmp_path):
    """The real `demo` command with few steps: every (student, method) over 2 seeds, mean and spread that
    agree with the per-seed runs, a verdict line per distillation method with its paired interval, OFA trained with
    the rule's settings, and a resume that retrains nothing."""
    out = tmp_path / "demo"
    args = ("demo", "--out", out, "--epochs", 2, "--teacher-epochs", 1, "--max-steps-per-epoch", 3, "--quiet")
    proc = run_cli(*args, check=True, timeout=900)
    results = json.loads((out / "results.json").read_text())

    assert results["cached_epochs"] == results["epochs"] == 2
    assert results["seeds"] == [0, 1]
    runs = sorted((r["student"], r["method"], r["seed"]) for r in results["runs"])
    assert runs == sorted((s, m, seed) for s in STUDENTS for m in METHODS for seed in (0, 1))
    assert all(len(r["history"]) == 2 for r in results["runs"])
    assert all(r["teacher_seconds_saved"] > 0 for r in results["runs"] if r["method"] != "ce")

    assert len(results["groups"]) == len(STUDENTS) * len(METHODS)
    for g in results["groups"]:
        per_seed = [r["top1"] for r in results["runs"] if (r["student"], r["method"]) == (g["student"], g["method"])]
        assert g["top1"] == per_seed and g["seeds"] == [0, 1]
        assert g["top1_mean"] == pytest.approx(statistics.fmean(per_seed))
        assert g["top1_std"] == pytest.approx(statistics.stdev(per_seed))

    table = (out / "results.md").read_text()
    assert "| student | method | top-1 (mean ± sd) |" in proc.stdout
    assert f"| test_resnet (CNN teacher) | ce | {results['teacher_top1']:.2f} |" in table
    assert len(results["verdict"]) == len(STUDENTS) * (len(METHODS) - 1)
    by = {(r["student"], r["method"], r["seed"]): r["top1"] for r in results["runs"]}
    for line, (student, method) in zip(results["verdict"], [(s, m) for s in STUDENTS for m in METHODS[1:]],
                                       strict=True):
        assert line in proc.stdout and line in table
        gain = statistics.fmean(by[(student, method, seed)] - by[(student, "ce", seed)] for seed in (0, 1))
        assert line.startswith(f"{student} (") and f"{method.upper()} vs CE {gain:+.2f} pt, 95% interval [" in line
    ofa = json.loads((out / "students" / "test_vit-ofa-s0" / "config.json").read_text())["loss"]
    assert (ofa["ofa_form"], ofa["w_ofa"], ofa["label_smoothing"]) == ("released", 0.1, 0.1)
    assert (out / "accuracy.png").stat().st_size > 5000
    assert (out / "teacher.zarr" / "zarr.json").exists()

    # resumable: a second invocation reuses the teacher and all student runs and reports the same numbers
    again = run_cli(*args, check=True, timeout=300)
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["runs_reused"] == 1 + len(results["runs"])
    assert [r["top1"] for r in resumed["runs"]] == [r["top1"] for r in results["runs"]]
    assert "finished runs reused" in again.stdout

    # a run that another configuration made is redone, not reused
    stale = out / "students" / "test_vit-kd-s1" / "metrics.json"
    m = json.loads(stale.read_text())
    m["provenance"]["config_hash"] = "0" * 64
    stale.write_text(json.dumps(m))
    third = run_cli(*args, check=True, timeout=300)
    assert f"redoing {stale.parent}" in third.stdout
    assert json.loads((out / "results.json").read_text())["runs_reused"] == len(results["runs"])  # teacher + all - 1
    assert json.loads(stale.read_text())["provenance"]["config_hash"] != "0" * 64


def test_the_readme_demo_block_is_the_committed_demo_record():
    """The README shows what `make demo` gave: its results.md verbatim, committed with the results.json it was
    drawn from (bench/results/demo/), made by a clean checkout of the commit the block names."""
    from commands.demo import _table
    from conftest import ROOT
    folder = ROOT / "bench" / "results" / "demo"
    results = json.loads((folder / "results.json").read_text())
    md = (folder / "results.md").read_text()
    assert md == _table(results), "bench/results/demo/results.md is not what its results.json draws"
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- demo results: filled by the lead from make demo -->")[1].split(
        "<!-- end demo results -->")[0]
    assert md.strip() in block, "README.md's demo block is not bench/results/demo/results.md verbatim"
    assert results["code"]["dirty"] is False and f"commit {results['code']['commit'][:7]}" in block
