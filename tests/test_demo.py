import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_its_table_and_plot(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", out, "--epochs", 1, "--teacher-epochs", 1, "--quiet", check=True, timeout=900)
    assert "| method | student |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    runs = {(r["student"], r["method"]) for r in results["runs"]}
    assert runs == {(s, m) for s in ("test_vit", "resmlp_tiny_p4") for m in ("ce", "kd", "ofa")}
    assert all(r["teacher_seconds_saved"] > 0 for r in results["runs"] if r["method"] != "ce")
    assert (out / "accuracy.png").stat().st_size > 5000
    assert (out / "teacher.zarr" / "zarr.json").exists()
