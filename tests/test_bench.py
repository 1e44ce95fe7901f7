"""bench/: every script runs as a user runs it (`python bench/X.py ...` in its own process, at tiny sizes, its
results in a temporary folder through $OFAKD_BENCH_RESULTS) and its record holds the numbers it promises, with
the command, commit, machine and date; bench/results/README.md is what the committed records generate.

The smoke runs start together, two at a time (one per core), when the first of them is needed, and only those
of the selected tests: each alone costs seconds of interpreter and library start-up, most of its time. chaos.py's
is a real round (5 SIGKILLs of the teacher pass, 2 of training, every resumed result bit-identical), not only
a smoke run."""

from __future__ import annotations

import ast
import importlib
import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ROOT

BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import run_all  # noqa: E402

PAIR = ["--teacher", "test_resnet", "--checkpoint", "{teacher}", "--student", "test_vit", "--student-kwargs",
        "img_size=32", "patch_size=4", "--student-checkpoint", "{student}", "--data", "{data}", "--shards", 2,
        "--recipe", "digits-mix"]
ENTRIES = {b.name: b for b in run_all.BENCHES}
# job -> (the script's arguments, or a run_all entry run as make bench runs it with --small)
JOBS = {
    "run_all": ["bench/run_all.py", "--small", "--work", "{work}", "--only", "stage_one_small"],
    **{name: name for name in ("stage_two", "scaling", "loader_vs_timm", "loader_memory", "multi_teacher",
                               "multi_student", "object_store", "stop_check")},
    "gpu_smoke": ["bench/gpu_smoke.py", "--small", "--data", "{data}", "--steps", 2, "--students", 2, "--work",
                  "{work}"],
    "chaos": ["bench/chaos.py", "--kills", 5, "--stage-two-kills", 2, "--rounds", 1, "--processes", 1, "--save"],
    "fidelity": ["bench/fidelity.py", *PAIR, "--topk", 2, 5],
    "tail_model": ["bench/tail_model.py", *PAIR, "--topk", 2, 5, "--T", 1, 4],
    "tail_sampling": ["bench/tail_sampling.py", *PAIR, "--topk", 2, 5, "--sampled", "2:2:1", "--draws", 3,
                      "--batch", 16],
    "cache_numerics": ["bench/cache_numerics.py", "--draws", 4],
}
SLOWEST_FIRST = ["multi_student", "gpu_smoke", "chaos", "object_store", "stop_check", "run_all"]


def checkpoints(work: Path) -> dict[str, Path]:
    """Randomly initialised weights where the fidelity scripts expect trained ones: a test_resnet teacher and a
    test_vit student."""
    from safetensors.torch import save_file

    from pipeline.models import create_model
    vit = {"img_size": 32, "patch_size": 4}
    out = {"teacher": work / "teacher.safetensors", "student": work / "student.safetensors"}
    for key, name, kwargs, seed in (("teacher", "test_resnet", {}, 0), ("student", "test_vit", vit, 0)):
        out[key].parent.mkdir(parents=True, exist_ok=True)
        model = create_model(name, 10, model_kwargs=kwargs, init_seed=seed)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out[key])
    return out


def command(job: str, data: Path, work: Path, ckpt: dict) -> list[str]:
    spec = JOBS[job]
    if isinstance(spec, str):  # the make bench entry with its --small sizes
        return run_all.command(ENTRIES[spec], dict.fromkeys(("digits", "tiny400", "tiny2k"), data), small=True)
    fill = {"data": data, "work": work, "teacher": ckpt["teacher"], "student": ckpt["student"]}
    return [sys.executable, *(str(a).format(**fill) for a in spec)]


def run_job(cmd: list[str], results: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OFAKD_BENCH_RESULTS": str(results), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


@pytest.fixture(scope="session")
def smoke(request, small_digits, tmp_path_factory):
    """job -> Future of (its process, its results folder), for the jobs of the selected tests."""
    wanted = {item.callspec.params["job"] for item in request.session.items
              if getattr(item, "callspec", None) and "job" in item.callspec.params}
    root = tmp_path_factory.mktemp("bench-smoke")
    ckpt = checkpoints(root / "models")
    order = sorted(wanted, key=lambda j: SLOWEST_FIRST.index(j) if j in SLOWEST_FIRST else len(SLOWEST_FIRST))
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {}
    for job in order:
        work = root / job / "work"
        cmd = command(job, small_digits, work, ckpt)
        futures[job] = pool.submit(lambda c=cmd, r=root / job / "results": (run_job(c, r), r))
    yield futures
    pool.shutdown(wait=True)


def finite(x, where="results") -> None:
    """Every number in a record's results is finite."""
    if isinstance(x, dict):
        for k, v in x.items():
            finite(v, f"{where}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            finite(v, f"{where}[{i}]")
    elif isinstance(x, float):
        assert math.isfinite(x), f"{where} = {x}"


def record(results: Path, name: str, script: str) -> dict:
    """The record `name` as saved: provenance complete, numbers finite, drawn by its script's table."""
    rec = json.loads((results / f"{name}.json").read_text())
    assert rec["name"] == name and rec["command"].startswith(f"python bench/{script}.py"), rec["command"]
    assert re.fullmatch(r"[0-9a-f]{40}", rec["code"]["commit"]) and rec["code"]["dirty"] in (True, False)
    m = rec["machine"]
    assert m["cpu"] and m["cores"] >= 1 and m["load_1min"] >= 0 and re.fullmatch(r"\d{4}-\d\d-\d\d .*", rec["date"])
    finite(rec["results"])
    table = importlib.import_module(script).table(rec)
    assert table.count("\n|") >= 2, table
    return rec["results"]


def rows_of(r: dict, n: int, *keys) -> list[dict]:
    assert len(r["rows"]) == n, r["rows"]
    for row in r["rows"]:
        assert all(k in row for k in keys), (keys, row)
    return r["rows"]


def check_run_all(d: Path):
    r = record(d, "stage_one_small", "stage_one")
    inputs_hashed(r, ("data",))
    assert r["views"] == 192 and r["teacher"] == "test_resnet" and r["pass_over_bare"] > 0
    assert r["raw_bytes_per_view"] <= r["raw_budget_4k_plus_24"] and r["disk_bytes_per_view"] > 0
    ran = record(d, "run_all", "run_all")
    assert list(ran["ran"]) == ["stage_one_small"] and ran["ran"]["stage_one_small"]["seconds"] > 0 and ran["small"]
    text = (d / "README.md").read_text()
    assert text == report.render(d) and "### stage_one_small.json" in text and "### run_all.json" in text


def check_stage_two(d: Path):
    r = record(d, "stage_two", "stage_two")
    inputs_hashed(r, ("data",))
    assert r["samples"] == 270 and r["steps"] == 2 and r["rounds"] == 2 and r["heads"]
    assert all(len(v) == 2 for v in r["per_round"].values())
    for k in ("loader_with_over_without", "digest_share_of_loader_time", "cached_over_free", "saving_predicted",
              "free_ofa_step_s", "cached_ofa_step_s", "online_ofa_step_s", "teacher_forward_s", "ce_task_step_s"):
        assert r[k] > 0, k  # the measured saving may come out negative at 2 steps on a loaded machine
    assert r["saving_relative_error"] == pytest.approx(abs(r["saving_measured"] - r["saving_predicted"])
                                                       / r["saving_predicted"])


def check_scaling(d: Path):
    r = record(d, "scaling", "scaling")
    inputs_hashed(r, ("data",))
    rows = rows_of(r, 4, "stage_one_s", "disk_bytes_per_view", "stage_two_cache_side_ms_per_view")
    assert [(x["samples"], x["topk"]) for x in rows] == [(48, 5), (48, 10), (96, 5), (96, 10)]
    assert r["extrapolation_imagenet_300_epochs_k10"]["raw_GB"] == pytest.approx(1_281_167 * 300 * 63 / 1e9)


def check_loader_vs_timm(d: Path):
    r = record(d, "loader_vs_timm", "loader_vs_timm")
    assert r["images"] == 8 and list(r["recipes"]) == ["imagenet-cnn@64", "imagenet-vit@64"]
    for x in r["recipes"].values():
        for k in ("ours", "ours_draft", "ours_g4", "ours_draft_g4"):
            assert x[f"{k}_over_timm"] > 0, k
        assert sum(x["draft_reductions"].values()) == pytest.approx(1.0)


def check_loader_memory(d: Path):
    r = record(d, "loader_memory", "loader_memory")
    rows = rows_of(r, 1, "peak_growth_mb", "accounted_mb")
    assert [(x["shard_size"], x["per_decode"], x["views"]) for x in rows] == [(4, 2, 24)]


def check_multi_teacher(d: Path):
    r = record(d, "multi_teacher", "multi_teacher")
    inputs_hashed(r, ("data",))
    assert r["views"] == 96 and len(r["seconds"]) == 6 and all(v > 0 for v in r["seconds"].values())
    assert r["both_over_floor"] > 0 and r["both_over_two_singles"] > 0


def check_multi_student(d: Path):
    r = record(d, "multi_student", "multi_student")
    inputs_hashed(r, ("data",))
    assert r["setting"]["students"] == ["test_resnet", "test_convnext"] and len(r["rounds"]) == 1
    assert len(r["rounds"][0]["separate_walls"]) == 2 and 0 <= r["loader_share_of_step"] <= 1
    assert r["wall_ratio_median"] > 0 and r["bound_loop_ratio"] > 0
    assert 0.5 <= r["bound_loop_ratio_median"] <= 1 and r["step_ratio_median"] > 0 and r["loader_ratio_median"] > 0
    for x in r["rounds"]:  # the loop's ratio is its loader's part and its steps' part, as recorded
        n, sep_l, sep_t = 2, x["separate_loader_wait"], x["separate_train_seconds"]
        parts = (x["loader_ratio"] * sep_l / n + x["step_ratio"] * (sep_t - sep_l)) / sep_t
        assert math.isclose(x["train_ratio"], parts, rel_tol=1e-9), x


def check_object_store(d: Path):
    r = record(d, "object_store", "object_store")
    inputs_hashed(r, ("data",))
    assert r["samples"] == 270 and r["shards"] == 6 and "workers_2" not in r
    modes = r["workers_0"]["loader_cpu_s_per_epoch"]
    assert list(modes) == ["local", "s3_loopback", "s3_proxy_0ms", "s3_1ms", "s3_1ms_no_prefetch"]
    assert all(r["workers_0"][f"{m}_views_per_s"] > 0 for m in modes)


def check_stop_check(d: Path):
    r = record(d, "stop_check", "stop_check")
    inputs_hashed(r, ("data",))
    assert r["ranks"] == 2 and r["reps"] == 20 and 0 < r["seconds_per_check_best"] <= r["seconds_per_check_median"]
    assert 0 < r["seconds_per_step_best"] <= r["seconds_per_step_median"] and r["check_over_step_best"] > 0
    assert r["steps"] == 2 and r["images_per_run"] == [2 * 16 * 2]  # real runs: 2 steps of 16 images on each rank


def check_gpu_smoke(d: Path):
    r = record(d, "gpu_smoke_cpu_check", "gpu_smoke")
    for k in ("teacher_pass_views_per_s", "loader_views_per_s", "ce_images_per_s", "cached_ofa_images_per_s",
              "online_ofa_images_per_s", "students2_stream_views_per_s", "students2_over_separate_wall"):
        assert r[k] > 0, k


def check_chaos(d: Path):
    """SIGKILLs at random moments (stage one: inside unit writes), resumes, every result bit-identical."""
    r = record(d, "chaos", "chaos")
    assert r["ok"] and len(r["rounds"]) == 1 and set(r["rounds"][0]) == {"stage_one_1p", "stage_two"}
    one, two = r["rounds"][0]["stage_one_1p"], r["rounds"][0]["stage_two"]
    assert len(one["kill_points"]) >= 5 and one["kills_mid_write"] >= 1
    # stage two: train-student was killed (SIGKILL) at least once mid-run, and the resumed run's weights and
    # per-epoch metrics are the uninterrupted run's
    assert sum(p["killed"] for p in two["kill_points"]) >= 1 and len(two["kill_points"]) <= 2, two
    assert two["ok"] and two["weights_identical"] and two["metrics_identical"], two


def inputs_hashed(r: dict, keys=("teacher", "student", "data")) -> None:
    """The record names the checkpoints and data it was computed from, each with the sha256 of what was read."""
    from pipeline.manifest import sha256_file
    assert set(r["inputs"]) == set(keys)
    for key, entry in r["inputs"].items():
        path = Path(entry["path"])
        assert entry["sha256"] == sha256_file(path / "dataset.json" if key == "data" else path), key


def check_fidelity(d: Path):
    r = record(d, "fidelity", "fidelity")
    inputs_hashed(r)
    rows = rows_of(r, 2, "ofa_g1_rel_error", "kd_T4_rel_error", "tv_T1")
    assert [(x["topk"], x["views"]) for x in rows] == [(2, 96), (5, 96)]


def check_tail_model(d: Path):
    r = record(d, "tail_model", "tail_model")
    inputs_hashed(r)
    rows = rows_of(r, 4, "uniform_rel_error", "oracle_shape_student_order")
    assert [(x["topk"], x["T"], x["views"]) for x in rows] == [(2, 1.0, 96), (2, 4.0, 96), (5, 1.0, 96), (5, 4.0, 96)]


def check_cache_numerics(d: Path):
    r = record(d, "cache_numerics", "cache_numerics")
    assert len(r["dkd_confident"]) == 12 and set(r["fp16"]) == {"real", "real_x4", "scaled_to_100"}
    worst = max(abs(v["batch_rel_error"]) for v in r["dkd_confident"].values())
    assert worst < 1e-4, worst  # DKD is exact for confident teachers (before format 4: up to 79% off)


def check_tail_sampling(d: Path):
    r = record(d, "tail_sampling", "tail_sampling")
    inputs_hashed(r)
    rows = rows_of(r, 3, "kd_T4", "ofa_paper_g1.5", "dkd_T4")
    assert [(x["topk"], x["tail_samples"], x["draws"]) for x in rows] == [(2, 0, 1), (5, 0, 1), (2, 2, 3)]
    import tail_sampling
    assert (d / "tail_sampling.md").read_text() == tail_sampling.markdown(json.loads((d / "tail_sampling.json")
                                                                                     .read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("job", list(JOBS))
def test_bench_script_runs_and_its_record_holds_its_numbers(job, smoke):
    proc, results = smoke[job].result()
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    globals()[f"check_{job}"](results)


def test_results_readme_is_what_the_committed_records_generate():
    assert report.render(BENCH / "results") == (BENCH / "results" / "README.md").read_text(), \
        "bench/results/README.md is stale: regenerate it with `python bench/report.py`"
    import tail_sampling
    for md in (BENCH / "results").glob("tail_sampling*.md"):
        assert md.read_text() == tail_sampling.markdown(json.loads(md.with_suffix(".json").read_text())), md


def test_a_scripts_note_opens_its_section_and_a_stray_note_is_refused(tmp_path):
    """notes/<script>.md is the hand-written narrative of a benchmark: it appears under that script's heading, before
    its records; a note of a script with no records would be lost silently, so the report refuses it."""
    record = json.loads((BENCH / "results" / "stop_check.json").read_text())
    (tmp_path / "stop_check.json").write_text(json.dumps(record))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "stop_check.md").write_text("\nWhat bounds it: the all-reduce's latency.\n\n")
    text = report.render(tmp_path)
    section = text.split("## stop_check.py", 1)[1]
    assert section.index("What bounds it: the all-reduce's latency.") < section.index("### stop_check.json")
    assert "\n\nWhat bounds it: the all-reduce's latency.\n\n" in section  # a paragraph of its own
    (tmp_path / "notes" / "fidelity.md").write_text("no fidelity record here")
    with pytest.raises(SystemExit, match="fidelity"):
        report.render(tmp_path)


def test_every_committed_note_is_in_the_report():
    text = (BENCH / "results" / "README.md").read_text()
    for note in sorted((BENCH / "results" / "notes").glob("*.md")):
        assert note.read_text().strip() in text, note


def test_every_script_that_saves_records_draws_them_in_the_report():
    """A script that calls `save` defines `table`, has its place in report.ORDER and has its records checked by a
    smoke run (accuracy.py's and cka_evidence.py's: tests/test_bench_accuracy.py, on the models its plan trains)."""
    saving = sorted(p.stem for p in BENCH.glob("*.py")
                    if any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "save"
                           for n in ast.walk(ast.parse(p.read_text()))))
    assert set(saving) <= set(report.ORDER), set(saving) - set(report.ORDER)
    for name in saving:
        module = importlib.import_module(name)
        assert callable(getattr(module, "table", None)), name
    checked = set(re.findall(r'record\(d, "\w+", "(\w+)"\)', Path(__file__).read_text()))
    plan_test = (Path(__file__).parent / "test_bench_accuracy.py").read_text()
    checked |= set(re.findall(r'record\(results, "\w+", "(\w+)"\)', plan_test))
    assert set(saving) - {"accuracy"} <= checked, set(saving) - checked


def test_a_record_is_refused_once_the_checkout_changed_while_its_benchmark_ran(tmp_path):
    """save() records the code the benchmark started with, and refuses to write when the checkout is no longer
    that: figures timed on one commit (or on two, through subprocesses started after an edit) never carry
    another's name."""
    import common
    started = common.CODE_AT_START
    try:
        common.CODE_AT_START = {"commit": "0" * 40, "dirty": False}  # as if the script had started on another commit
        with pytest.raises(SystemExit, match="the checkout changed while this benchmark ran"):
            common.save("probe", {"x": 1.0}, tmp_path)
        assert not (tmp_path / "probe.json").exists()
    finally:
        common.CODE_AT_START = started
    rec = json.loads(common.save("probe", {"x": 1.0}, tmp_path).read_text())  # unchanged: saved, with that code
    assert rec["code"] == started and rec["results"] == {"x": 1.0}


def test_tail_models_uniform_row_is_rebuilt_from_the_values_a_float16_store_holds():
    """bench/tail_model.py's "uniform" row stands for the cache: its top-k log-probabilities as a float16 store
    rounds them (summarize, read back by TeacherTargets), not float32 values no store holds. Logits of spread 6 put
    the tail's log-probabilities where a float16 step is 2^-6: the two readings' KD losses differ by 0.09 at T 4."""
    import tail_model
    import torch

    from cache.distribution import label_log_odds, reconstruct_logits
    from students.losses import kd_loss
    g = torch.Generator().manual_seed(0)
    z, q = torch.randn(256, 50, generator=g) * 6, torch.randn(256, 50, generator=g) * 2
    labels = torch.randint(0, 50, (256, 2), generator=g)
    v, idx = z.topk(10, 1)
    lse = z.logsumexp(1)

    def kd_of(values):
        return float(kd_loss(q, reconstruct_logits(values, idx, lse, labels, label_log_odds(z, labels), 50), 4.0))
    as_float16, as_float32 = kd_of((v - lse[:, None]).half().float()), kd_of(v - lse[:, None])
    got = tail_model.estimates(z, q, labels, 10, 4.0)["uniform"]
    assert abs(got - as_float16) < abs(got - as_float32) / 4, (got, as_float16, as_float32)
