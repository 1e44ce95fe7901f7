"""What the property-based (hypothesis) tests of bad input share: the settings profiles, the one verdict
every case must reach, and the per-test counts printed at the end of the session.

Profiles (HYPOTHESIS_PROFILE=NAME, default `ci`):
  ci       derandomized (the examples are a fixed function of the test, no example database), so CI runs
           the same cases every time; each test's own example count; a per-example deadline well above a
           normal case (a hang is also cut by run_cli's timeout).
  explore  random, 20x the examples, with the database (.hypothesis/): for hunting locally.

The verdict (`outcome`): status 0 (the caller then checks the result is correct), or status 2 with
exactly one `error: <sentence>` line on stderr (or click's usage box, which names the option), and never a
traceback.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

from hypothesis import HealthCheck, settings

SCALE = {"ci": 1, "explore": 20}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.register_profile("ci", derandomize=True, database=None, deadline=20_000, print_blob=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.register_profile("explore", deadline=20_000, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(PROFILE)

CASE_TIMEOUT = 60  # seconds: run_cli raises TimeoutError past it, so a hang fails the case
COUNTS: dict[str, Counter] = defaultdict(Counter)  # test name -> {"ok": n, "refused": n}


def examples(n: int) -> settings:
    """This test's example count under the current profile."""
    return settings(max_examples=n * SCALE.get(PROFILE, 1))


def outcome(proc, test: str, *, name: str | None = None) -> str:
    """'ok' (status 0) or 'refused' (status 2, one sentence); anything else fails the case. `name`: a word
    the refusal must contain (the input it is about). Counted under `test` for the session summary."""
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, f"a traceback:\n{text[-3000:]}"
    if proc.returncode == 0:
        COUNTS[test]["ok"] += 1
        return "ok"
    assert proc.returncode == 2, f"exit status {proc.returncode}, not 0 or 2:\n{text[-3000:]}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if errors:
        assert len(errors) == 1 and lines[-1] == errors[0], f"not one error sentence at the end:\n{proc.stderr}"
        message = errors[0]
    else:  # click's own usage error: a box naming the option
        assert "Usage:" in proc.stderr and "Error" in proc.stderr, f"status 2 without a message:\n{text[-3000:]}"
        message = proc.stderr
    if name is not None:
        assert name in message, f"the refusal does not name {name!r}: {message}"
    COUNTS[test]["refused"] += 1
    return "refused"
