"""What a test needs and may not find: the real datasets of ../shared/data, the dev extra's modules (moto, s3fs,
tensorboard), a tmpfs to fill. Their tests skip where one is absent, but fail under OFAKD_REQUIRE_ALL=1 (.ci/run)
or, for the data, OFAKD_REQUIRE_SHARED_DATA=1, so a CI that lost one cannot pass by skipping."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, need_module, need_shared


def _verdict(need, *args) -> tuple[str, str]:
    """What `need(*args)` did to the test: ("failed" | "skipped" | "passed", its message). Caught here, so that
    a skip where a failure is due fails this test instead of skipping it."""
    try:
        need(*args)
    except pytest.fail.Exception as e:
        return "failed", str(e)
    except pytest.skip.Exception as e:
        return "skipped", str(e)
    return "passed", ""


def test_an_absent_dataset_fails_when_required_and_skips_otherwise(monkeypatch):
    missing = Path("/nonexistent/cifar10.tar.gz")
    monkeypatch.delenv("OFAKD_REQUIRE_ALL", raising=False)
    monkeypatch.setenv("OFAKD_REQUIRE_SHARED_DATA", "1")
    verdict, msg = _verdict(need_shared, missing)
    assert verdict == "failed" and "OFAKD_REQUIRE_SHARED_DATA" in msg, msg
    monkeypatch.delenv("OFAKD_REQUIRE_SHARED_DATA")
    assert _verdict(need_shared, missing)[0] == "skipped"
    monkeypatch.setenv("OFAKD_REQUIRE_ALL", "1")
    verdict, msg = _verdict(need_shared, missing)
    assert verdict == "failed" and "OFAKD_REQUIRE_ALL" in msg, msg


def test_a_missing_module_fails_when_required_and_skips_otherwise(monkeypatch):
    monkeypatch.setenv("OFAKD_REQUIRE_ALL", "1")
    verdict, msg = _verdict(need_module, "no_such_module_ofakd")
    assert verdict == "failed" and "no_such_module_ofakd" in msg and "OFAKD_REQUIRE_ALL=1" in msg, msg
    assert need_module("json").dumps([1]) == "[1]"  # present: the module itself
    monkeypatch.delenv("OFAKD_REQUIRE_ALL")
    assert _verdict(need_module, "no_such_module_ofakd")[0] == "skipped"


@pytest.mark.parametrize("required", [False, True])
def test_a_module_level_need_fails_the_pytest_run_only_when_required(tmp_path, required):
    """As test_object_store.py uses it: at import, before any test of the module is collected."""
    test = tmp_path / "test_needs.py"
    test.write_text("from conftest import need_module\nneed_module('no_such_module_ofakd')\n\n"
                    "def test_x():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFAKD_REQUIRE")}
    env |= {"PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}", **({"OFAKD_REQUIRE_ALL": "1"} if required else {})}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=env)
    if required:
        assert p.returncode != 0 and "no_such_module_ofakd" in p.stdout and "1 error" in p.stdout, p.stdout
    else:
        assert p.returncode == 5 and "1 skipped" in p.stdout and "error" not in p.stdout, p.stdout  # 5: none ran
