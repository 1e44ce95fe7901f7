"""bench/accuracy.py end to end on the digits: a declared plan, keyed reuse, refusal of stale work, intervals."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

PLAN = {
    "name": "accuracy_smoke", "label": "digits smoke", "work": "unused",
    "data": {"source": "unused", "val_split": "val", "train_shards": 3, "val_shards": 1},
    "recipe": "digits", "epochs": 1, "batch_size": 32, "seeds": [0, 1],
    "teacher": {"name": "test_resnet", "epochs": 1, "flags": ["--lr", 0.1, "--max-steps-per-epoch", 4]},
    "student": {"name": "test_vit", "flags": ["--model-kwargs", "img_size=32", "--model-kwargs", "patch_size=4",
                                             "--lr", 1e-3, "--optimizer", "adamw", "--max-steps-per-epoch", 3]},
    "stores": {"top4": ["--topk", 4]},
    "variants": {"ce": {"teacher": "none", "flags": ["--method", "ce"]},
                 "kd": {"teacher": "top4", "flags": ["--method", "kd"]},
                 "ofa-top4": {"teacher": "top4", "flags": ["--method", "ofa"]}},
    "tables": [{"name": "main", "title": "smoke", "variants": ["ce", "kd", "ofa-top4"], "compare": [["kd", "ce"]]}],
    "declared": "a smoke plan",
}


def argv(plan, data, work, results, *extra) -> list[str]:
    return [str(a) for a in ("--plan", plan, "--data", data, "--work", work, "--results", results, "--allow-dirty",
                             *extra)]


def bench(plan, data, work, results, *extra):
    """bench/accuracy.py as a user runs it, in its own process."""
    cmd = [sys.executable, str(ROOT / "bench" / "accuracy.py"), *argv(plan, data, work, results, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)


def bench_here(capsys, plan, data, work, results, *extra) -> str:
    """bench/accuracy.py's main() in this process (no second start of torch and timm, 4-5 s): for the calls
    after the first, which ran as a process. Returns what it printed; a refusal raises its SystemExit."""
    sys.path.insert(0, str(ROOT / "bench"))
    import accuracy
    capsys.readouterr()
    accuracy.main(argv(plan, data, work, results, *extra))
    return capsys.readouterr().out


@pytest.mark.slow
def test_plan_runs_reuses_refuses_stale_and_reports_intervals(digits, tmp_path, capsys, monkeypatch):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(PLAN))
    work, results = tmp_path / "work", tmp_path / "results"
    first = bench(plan, digits, work, results, "--jobs", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("$ python cli.py train-student") == 7  # the teacher, 3 variants x 2 seeds
    record = json.loads((results / "accuracy_smoke.json").read_text())
    r = record["results"]
    assert record["code"]["commit"] == r["commit"] and len(r["commit"]) == 40
    assert {v: sorted(r["variants"][v]["seeds"]) for v in r["variants"]} == {v: ["0", "1"] for v in r["variants"]}
    assert all(c["val_samples"] == 200 for v in r["variants"].values() for c in v["seeds"].values())
    (kd_ce,), kd = r["tables"][0]["comparisons"], r["variants"]["kd"]["seeds"]
    ce = r["variants"]["ce"]["seeds"]
    assert kd_ce["differences"] == pytest.approx([kd[s]["top1"] - ce[s]["top1"] for s in ("0", "1")])
    assert len(kd_ce["ci95"]) == 2 and kd_ce["ci95"][0] <= kd_ce["mean"] <= kd_ce["ci95"][1]
    assert (results / "accuracy_smoke.md").read_text().count("| kd - ce |") == 1

    again = bench_here(capsys, plan, digits, work, results)  # everything reused: no command runs
    assert "0 runs to make" in again and "cli.py train-student" not in again

    metrics = work / "kd-seed1" / "metrics.json"  # a run made under another configuration is never reused
    m = json.loads(metrics.read_text())
    m["provenance"]["config_hash"] = "0" * 64
    metrics.write_text(json.dumps(m))
    with pytest.raises(SystemExit) as stale:  # a sentence, as the process prints it (no traceback)
        bench_here(capsys, plan, digits, work, results)
    assert isinstance(stale.value.code, str), stale.value.code
    assert "kd-seed1 was made with config_hash" in stale.value.code and "--replace-stale" in stale.value.code
    redo = bench(plan, digits, work, results, "--replace-stale")
    assert redo.returncode == 0 and "1 runs to make" in redo.stdout
    assert redo.stdout.count("$ python cli.py train-student") == 1
    assert json.loads(metrics.read_text())["provenance"]["config_hash"] != "0" * 64

    sys.path.insert(0, str(ROOT / "bench"))
    import accuracy
    w, code = accuracy.Work(PLAN, work / "data", work), accuracy.code_version.__wrapped__()
    started = accuracy.CODE_AT_START  # the runs are rendered only by the checkout that made them
    try:
        accuracy.CODE_AT_START = {"commit": "0" * 40, "dirty": False}
        with pytest.raises(SystemExit, match="render them from a clean checkout of"):
            accuracy.collect(w, allow_dirty=True)
    finally:
        accuracy.CODE_AT_START = started
    run = work / "kd-seed1"  # an unfinished run is resumed only under the options it started with
    (run / "metrics.json").rename(tmp_path / "metrics.json")
    assert accuracy.run_state(run, w.expected(w.run_argv("kd", 1)), code) in ("resume", "fresh")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"epochs": config["epochs"] + 1}))
    with pytest.raises(accuracy.Stale, match="kd-seed1 was started with config_hash"):
        accuracy.run_state(run, w.expected(w.run_argv("kd", 1)), code)
    (run / "config.json").write_text(json.dumps(config))
    (tmp_path / "metrics.json").rename(run / "metrics.json")

    cka_evidence_reads_the_plans_models(plan, work, results, r, monkeypatch)
    head_gradients_reads_a_plans_ofa_run(work, results, monkeypatch)


def cka_evidence_reads_the_plans_models(plan, work, results, r: dict, monkeypatch) -> None:
    """bench/cka_evidence.py on the models the plan made: a pair whose run the plan lacks (its OFA variant is not
    named `ofa`), or whose checkpoint is missing, is refused in one sentence (its main() here: the refusals come
    before any work); the others give their record, in its own process."""
    import cka_evidence
    args = ["--plan", str(plan), "--work", str(work), "--samples", "48"]
    monkeypatch.setenv("OFAKD_BENCH_RESULTS", str(results))
    with pytest.raises(SystemExit, match="plan accuracy_smoke makes no run ofa-seed0: choose --pairs"):
        cka_evidence.main(args)
    assert not (results / "cka_evidence.json").exists()
    (work / "ce-seed1" / "model.safetensors").rename(work / "ce-seed1" / "away.safetensors")
    with pytest.raises(SystemExit, match="ce-seed1/model.safetensors is missing"):
        cka_evidence.main([*args, "--pairs", "ce0-vs-ce1"])
    (work / "ce-seed1" / "away.safetensors").rename(work / "ce-seed1" / "model.safetensors")
    cka = [sys.executable, str(ROOT / "bench" / "cka_evidence.py"), *args]
    env = {**os.environ, "OFAKD_BENCH_RESULTS": str(results)}
    made = subprocess.run([*cka, "--pairs", "teacher-vs-ce0", "ce0-vs-ce1"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=env)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    from tests.test_bench import record
    cka_r = record(results, "cka_evidence", "cka_evidence")
    assert list(cka_r["pairs"]) == ["teacher-vs-ce0", "ce0-vs-ce1"] and cka_r["samples"] == 48
    assert cka_r["models_commit"] == r["commit"] + (" (dirty)" if r["dirty"] else "")
    assert cka_r["plan"] == "accuracy_smoke"
    pair = cka_r["pairs"]["teacher-vs-ce0"]
    assert (pair["model_a"], pair["model_b"]) == ("test_resnet", "test_vit") and len(pair["diagonal"]) >= 2
    assert (results / "cka" / "ce0-vs-ce1" / "cka.json").exists()


def head_gradients_reads_a_plans_ofa_run(work, results, monkeypatch) -> None:
    """bench/head_gradients.py on an OFA run the plan made: per part of the student, the gradients of the final
    term and of the heads, at the run's initialisation and trained; a run of another method is refused in one
    sentence (its main() here), the OFA run gives its record in its own process."""
    import head_gradients
    monkeypatch.setenv("OFAKD_BENCH_RESULTS", str(results))
    with pytest.raises(SystemExit, match="kd-seed0 is not an OFA run from a cache"):
        head_gradients.main(["--run", str(work / "kd-seed0")])
    assert not (results / "head_gradients.json").exists()
    cmd = [sys.executable, str(ROOT / "bench" / "head_gradients.py"), "--run", str(work / "ofa-top4-seed0"),
           "--batches", "2"]
    made = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OFAKD_BENCH_RESULTS": str(results)})
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    from tests.test_bench import record
    (run,) = record(results, "head_gradients", "head_gradients")["runs"]
    assert run["heads"] == ["stage1", "stage2", "stage3", "stage4"] and run["batches"] == 2
    assert run["epochs_trained"] == 1 and run["config_hash"] and run["inputs"]["state"]["sha256"]
    parts = [f"blocks.{i}" for i in range(len(run["init"]) - 2)]
    assert list(run["init"]) == list(run["trained"]) == ["embed", *parts, "final"]
    for when in ("init", "trained"):
        g = run[when]
        assert g["final"]["heads"] == 0 and g["final"]["final"] > 0  # no head reads the classifier
        assert all(g[p]["final"] > 0 and g[p]["heads"] > 0 and -1 <= g[p]["cosine"] <= 1 for p in parts)
    assert run["init"]["blocks.0"] != run["trained"]["blocks.0"]  # the trained weights were loaded


@pytest.mark.slow
def test_a_run_is_refused_once_the_checkout_has_changed_since_the_plan_started():
    """The plan's code is checked before every run, not once: a checkout edited (or moved to another commit) while
    a plan runs for hours would otherwise start runs recording another code than the table's."""
    sys.path.insert(0, str(ROOT / "bench"))
    import accuracy
    started = {"commit": "0" * 40, "dirty": False}  # the plan started at another commit than the checkout's now
    with pytest.raises(SystemExit, match="the checkout changed while the plan ran"):
        accuracy.cli_run(["--help"], code=started)  # `cli.py --help` would succeed: only the check stops it
    accuracy.cli_run(["--help"], code=accuracy.code_version.__wrapped__())  # unchanged: it runs


def test_the_readme_accuracy_tables_are_the_record_they_name():
    """The README's accuracy tables are generated from bench/results/accuracy_tiny50.json (accuracy.table), never
    written by hand: a table edited, or a record replaced without regenerating the README, fails here."""
    sys.path.insert(0, str(ROOT / "bench"))
    import accuracy
    record = json.loads((ROOT / "bench" / "results" / "accuracy_tiny50.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert accuracy.readme_block(readme, record) == readme, \
        "README.md's accuracy tables are stale: run python bench/report.py"


def test_the_readme_block_is_replaced_by_the_records_tables_and_needs_its_markers(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import accuracy
    import report
    record = json.loads((ROOT / "bench" / "results" / "accuracy_tiny50.json").read_text())
    start = accuracy.README_START.format(name="accuracy_tiny50")
    text = f"# intro\n\n{start}\nan old table\n{accuracy.README_END}\n\nafter\n"
    out = accuracy.readme_block(text, record)
    assert out == f"# intro\n\n{start}\n{accuracy.table(record)}{accuracy.README_END}\n\nafter\n"
    assert "an old table" not in out and accuracy.readme_block(out, record) == out
    (tmp_path / "accuracy_tiny50.json").write_text(json.dumps(record))  # what `python bench/report.py` runs
    (tmp_path / "README.md").write_text(text)
    report.readme_tables(tmp_path, tmp_path / "README.md")
    assert (tmp_path / "README.md").read_text() == out
    with pytest.raises(SystemExit, match="no single pair of markers"):
        accuracy.readme_block("# intro\n", record)


def test_the_slice_links_the_sources_bytes_even_where_an_older_slice_left_links_of_the_same_names(
        digits, small_digits, tmp_path):
    """Shard names repeat across datasets (train-000000.tar, ...): a slice made again from another source must
    link that source's shards, not keep the old bytes under the new manifest (train-student checks only that the
    shards exist, so runs would train on the old data while recording the new split hashes)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import accuracy

    from pipeline.manifest import load_manifest
    dest = tmp_path / "slice"
    accuracy.slice_dataset(digits, dest, 2, 1, "val")
    accuracy.slice_dataset(small_digits, dest, 2, 1, "val")
    m = load_manifest(dest)
    for split in ("train", "val"):
        for shard in m.split(split).shards:
            assert (dest / shard.name).samefile(small_digits / shard.name), shard.name
    assert m.split("train").count == 96
