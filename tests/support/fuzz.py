"""What the property-based (hypothesis) tests of bad input share: the settings profiles, the one verdict
every case must reach, and the per-test counts printed at the end of the session.

Profiles (HYPOTHESIS_PROFILE=NAME, default `ci`):
  ci       derandomized (the examples are a fixed function of the test, no example database), so CI runs
           the same cases every time; each test's own example count; a per-example deadline well above a
           normal case (a hang is also cut by run_cli's timeout).
  explore  random, 20x the examples, with the database (.hypothesis/): for hunting locally.

The verdict (`outcome`): status 0 (the caller then checks the result is correct), or status 2 with
exactly one `error: <sentence>` line on stderr (or click's usage box, which names the option), and never a
traceback. `accepting(name, share)`: a property whose cases ran correctly fewer than `share` of the time
fails, so a build that refuses everything cannot pass it.

The oracle of a resolved configuration (`expected`): the value an option must hold when the case ran, from
what was given, by the rules the README and --help state (a number is a number of the option's kind, given
as one or as its text: 3.0 is 3, 3.7 is no integer; a switch is true or false; a list is a list or its
comma-separated text; null clears an optional option to its default), written here independently of the
code that converts them. REFUSE marks a value no run may take (whatever it made of it, it changed it): 3.7
for an integer, 'nope' for a choice; a case may always be refused for other reasons.
"""

from __future__ import annotations

import functools
import math
import os
import typing
from collections import Counter, defaultdict
from pathlib import Path

from hypothesis import HealthCheck, settings

from pipeline.spec import strip_optional

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


def accepting(name: str, share: float):
    """Fail the property if fewer than `share` of its cases (counted under `name` by `outcome`) ran."""
    def wrap(test):
        @functools.wraps(test)
        def run(*args, **kwargs):
            before = Counter(COUNTS[name])
            test(*args, **kwargs)
            ran = {k: COUNTS[name][k] - before[k] for k in ("ok", "refused")}
            total = sum(ran.values())
            assert total and ran["ok"] >= share * total, \
                f"{name}: {ran['ok']} of {total} cases ran, below the share {share} a working build reaches"
        return run
    return wrap


# ------------------------------------------------------------------------------------ the value oracle

REFUSE = type("Refuse", (), {"__repr__": lambda self: "REFUSE"})()  # the case must be refused
ANY = type("Any", (), {"__repr__": lambda self: "ANY"})()  # any value (a form this oracle does not model)


def _number(kind: str, value):
    if isinstance(value, str):  # its text: "3" and "3.0" are 3, "3.7" is no integer
        try:
            value = float(value) if kind == "float" or not value.strip().lstrip("+-").isdigit() else int(value)
        except ValueError:
            return REFUSE
    if isinstance(value, bool) or not isinstance(value, int | float):
        return REFUSE
    if kind == "float":
        return float(value)
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return REFUSE
    return int(value)


def expected(flag, value, from_flag: bool = False):
    """What option `flag` must resolve to when given `value` (from a file, or as a flag's text), or REFUSE."""
    tp = strip_optional(flag.tp)
    optional = tp is not flag.tp
    if value is None or (from_flag and optional and value == "null"):
        return ANY if optional else REFUSE  # cleared: the default, which a configuration may fill in itself
    kind = flag.kind
    if kind == "choice":
        return value if isinstance(value, str) and value in typing.get_args(tp) else REFUSE
    if kind in ("int", "float"):
        return _number(kind, value)
    if kind == "bool":  # a switch, or a file's true/false (a word for them may be refused, never misread)
        words = {True: (True, 1, "true", "yes", "on", "1"), False: (False, 0, "false", "no", "off", "0")}
        norm = value.strip().lower() if isinstance(value, str) else value
        return next((b for b, w in words.items() if any(norm == x and type(norm) is type(x) for x in w)), REFUSE)
    if kind == "path":
        return Path(value) if isinstance(value, str) else REFUSE
    if kind == "list":
        item = typing.get_args(tp)[0]
        if isinstance(value, list) and not all(isinstance(t, str) for t in value):
            items = value
        else:  # a text (or a repeated flag's texts): comma- or space-separated
            texts = value if isinstance(value, list) else [value]
            items = [t for p in texts for t in str(p).replace(",", " ").split()]
        if item is str:
            return items if all(isinstance(t, str) for t in items) else REFUSE
        out = [_number("int" if item is int else "float", t) for t in items]
        return REFUSE if any(v is REFUSE for v in out) else out
    if kind == "kwargs":
        if isinstance(value, dict):
            return dict(value) if all(isinstance(k, str) for k in value) else REFUSE
        return ANY if isinstance(value, list) and all(isinstance(v, str) for v in value) else REFUSE
    if isinstance(value, dict) and "Recipe" in str(flag.tp):
        return ANY  # a recipe's fields over its preset: the resolved recipe holds them all
    return value if isinstance(value, str) else REFUSE


def same(a, b) -> bool:
    """Equal as resolved values: NaN equals NaN, a Path its text, a text its characters (a surrogate pair as
    YAML reads a JSON escape, or the one character it stands for)."""
    if isinstance(a, str) and isinstance(b, str):
        return _chars(a) == _chars(b)
    if isinstance(a, Path) or isinstance(b, Path):
        return Path(a) == Path(b)
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and (a == b or (a != a and b != b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def _chars(s: str) -> str:
    return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def check_resolved(flags, given: dict, resolved: dict, context: str) -> None:
    """A case that ran: every option given once holds the value given (`expected`); none needed refusing."""
    for f in flags:
        if len(given.get(f.dest, ())) != 1:
            continue  # not given, or given twice (which one wins is not what this checks)
        (value, from_flag), = given[f.dest]
        want = expected(f, value, from_flag)
        assert want is not REFUSE, f"{f.option} = {value!r} was taken, where it must be refused: {context}"
        have = resolved
        for p in f.key:  # the resolved configuration is printed in the file layout
            have = have[p]
        if want == [] and have is None and strip_optional(f.tp) is not f.tp:
            continue  # an empty list of an optional option is no list: unset
        assert want is ANY or same(have, want), f"{f.option} = {value!r} resolved to {have!r}: {context}"
