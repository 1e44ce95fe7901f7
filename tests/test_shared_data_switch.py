"""The real datasets of ../shared/data: their tests skip where it is absent, but fail under
OFAKD_REQUIRE_SHARED_DATA=1 (CI, where shared/ lies beside the clone), so a CI that lost them cannot pass
by skipping."""

from pathlib import Path

import pytest

from conftest import need_shared


def test_an_absent_dataset_fails_when_required_and_skips_otherwise(monkeypatch):
    missing = Path("/nonexistent/cifar10.tar.gz")
    monkeypatch.setenv("OFAKD_REQUIRE_SHARED_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="OFAKD_REQUIRE_SHARED_DATA"):
        need_shared(missing)
    monkeypatch.delenv("OFAKD_REQUIRE_SHARED_DATA")
    with pytest.raises(pytest.skip.Exception):
        need_shared(missing)
