"""What the property-based tests (tests/test_fuzz.py) draw, and what the drawn files mean.

    json_values, plausible(flag), valid(flag)   values: anything, near an option's type, of its type
    near(flag)                                  values one step from the option's type (3.7 for an integer)
    config_file(command)                        a YAML/JSON/bytes config file of random shape
    from_file(body, command)                    what such a file sets, by the documented rules (the oracle's input)
    typed(flag, value)                          whether a resolved value has the option's declared type
    damaged_json(original)                      a JSON document written another way, with 0-3 damages
    repacked(raw, seed)                         the same tar members written as another tar file
"""

from __future__ import annotations

import copy
import io
import json
import tarfile
import typing
from collections import defaultdict

import typer
import yaml
from hypothesis import strategies as st

import cli
from commands.options import flags_of
from pipeline.spec import strip_optional

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 300)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["", "null", "true", "no", "1,2", "a=1", "3.5", "-1", "0", "train", "raise", "ofa"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)

FLAGS = {name: flags_of(cls) for name, (cls, _) in cli.COMMANDS.items()}
# how the command line spells each option: from the typer commands themselves (inspect-cache's json_out is
# --json), with a switch's two spellings (--progress/--quiet, --x/--no-x)
SPELLING = {name: {p.name: (p.opts, p.secondary_opts) for p in cmd.params}
            for name, cmd in typer.main.get_command(cli.app).commands.items()}


def plausible(flag):
    """Values near what the option takes, so that cases get past the first check, plus anything at all."""
    tp = strip_optional(flag.tp)
    near = {"int": st.integers(-2, 5) | st.floats(-2, 5) | st.sampled_from(["3", "x"]),
            "float": st.floats(-1, 3) | st.integers(-1, 3) | st.sampled_from(["0.5", "nan"]),
            "bool": st.booleans() | st.sampled_from(["false", "yes", 0, 1]),
            "path": st.sampled_from(["a.txt", "", "/nonexistent/x"]),
            "list": st.lists(st.integers(-1, 5) | st.floats(0, 2) | st.text(max_size=3), max_size=3)
            | st.sampled_from(["1,2", "0.5, 1", "a,b"]),
            "kwargs": st.dictionaries(st.sampled_from(["img_size", "drop_rate", "x"]), scalars, max_size=2)
            | st.lists(st.sampled_from(["img_size=32", "x", "=", "a=[1,"]), max_size=2),
            "choice": st.sampled_from([*typing.get_args(tp), "nope"]) if flag.kind == "choice" else st.none(),
            "str": st.sampled_from(["digits", "digits-mix", "cifar", "test_resnet", "imagenet-1k", "train"])
            | st.dictionaries(st.sampled_from(["input_size", "crop", "hflip", "scale", "mixup_alpha", "bogus"]),
                              scalars | st.lists(st.floats(0, 1), max_size=3), max_size=3)}
    return near.get(flag.kind, st.none()) | json_values


def valid(flag):
    """Values of the option's own type, in the range its checks allow for most options."""
    tp = strip_optional(flag.tp)
    item = typing.get_args(tp)[0] if flag.kind == "list" else None
    return {"int": st.integers(1, 4), "float": st.floats(0.01, 0.9), "bool": st.booleans(),
            "choice": st.sampled_from(typing.get_args(tp)) if flag.kind == "choice" else st.none(),
            "path": st.sampled_from(["a.txt", "runs/x", "/nonexistent/x"]),
            "list": st.lists(st.sampled_from(["digits", "test_vit"]) if item is str else
                             st.integers(1, 3) if item is int else st.floats(0.1, 2), min_size=1, max_size=3),
            "kwargs": st.dictionaries(st.sampled_from(["drop_rate", "img_size"]), st.integers(0, 32), max_size=2),
            "str": st.sampled_from(["digits", "digits-mix", "test_resnet", "train", "imagenet-1k"])}.get(
        flag.kind, st.none())


def near(flag):
    """Values one step from the option's type: a fraction or a numeral for an integer, a numeral for a number,
    a word for a switch, a choice in other case, a list's text, a number for a string."""
    tp = strip_optional(flag.tp)
    choices = typing.get_args(tp) if flag.kind == "choice" else ()
    return {"int": st.floats(-3, 10) | st.integers(-3, 10) | st.sampled_from(["3", "3.0", "3.7", " 4 ", "1e1", "x"]),
            "float": st.sampled_from([0.123456789, "0.000123", 1.0000001, 2.5e-05, "nan", " 2 ", "x", 3]),
            "bool": st.booleans() | st.sampled_from(["true", "false", "yes", "no", 0, 1, 2, None]),
            "choice": st.sampled_from([*choices, *(c.upper() for c in choices), *(f" {c}" for c in choices)] or
                                      [None]),
            "path": st.sampled_from(["a.txt", "a//b/", 5, None]),
            "list": st.lists(st.integers(-1, 5) | st.floats(0, 2), max_size=3) | st.sampled_from(
                ["1,2", "0.5, 1", "1 2", 3, "a,b", None]),
            "kwargs": st.dictionaries(st.sampled_from(["drop_rate", "img_size"]), st.integers(0, 32), max_size=2)
            | st.sampled_from([["drop_rate=0.1"], "drop_rate=0.1", None]),
            "str": st.sampled_from(["digits", "test_resnet", 3, 0.5, True, None])}.get(flag.kind, st.none())


@st.composite
def config_file(draw, command: str):
    """A YAML or JSON config of random shape: real option paths (nested or flat), unknown keys, sections."""
    flags = FLAGS[command]
    data: dict = {}
    for _ in range(draw(st.integers(0, 5))):
        how = draw(st.sampled_from(["nested", "flat", "unknown", "valid"]))
        flag = draw(st.sampled_from(flags))
        value = draw(valid(flag) if how == "valid" else plausible(flag))
        if how in ("nested", "valid"):
            d = data
            for p in flag.key[:-1]:
                d = d.setdefault(p, {}) if isinstance(d.get(p, {}), dict) else d
            d[flag.key[-1]] = value
        elif how == "flat":
            data[flag.dest] = value
        else:
            data[draw(st.text(max_size=8))] = value
    shape = draw(st.sampled_from(["plain", "plain", "plain", "section", "scalar"]))
    if shape == "section":
        data = {command: data, **({draw(st.sampled_from(list(cli.COMMANDS))): {}} if draw(st.booleans()) else {})}
    elif shape == "scalar":
        data = draw(json_values)
    kind = draw(st.sampled_from(["yaml", "json", "bytes"]))
    if kind == "yaml":
        return yaml.safe_dump(data, allow_unicode=True).encode()
    if kind == "json":
        return json.dumps(data).encode()
    return draw(st.binary(max_size=40) | st.sampled_from([b"a: [1,", b"\xff\xfe:\x00", b"- 1\n- 2", b"{a: {b: }"]))


def typed(flag, value) -> bool:
    """Whether a value of the resolved configuration has the option's declared type."""
    tp = strip_optional(flag.tp)
    if value is None:
        return tp is not flag.tp
    kind = flag.kind
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "choice":
        return value in typing.get_args(tp)
    if kind == "list":
        item = typing.get_args(tp)[0]
        if item is str:
            return isinstance(value, list) and all(isinstance(v, str) for v in value)
        return isinstance(value, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) and (item is float or isinstance(v, int))
            for v in value)
    if kind == "kwargs":
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if kind == "str" and "Recipe" in str(flag.tp):
        return isinstance(value, str | dict)
    return isinstance(value, str)


def from_file(body: bytes, command: str) -> dict[str, list] | None:
    """{option dest: [(value, False)] per place the file sets it}: what a file reading as this YAML sets for
    `command` by the documented rules (nested by group, or flat by flag name at the top; a file of command
    sections gives its own section), or None when it is no mapping of options."""
    try:
        data = yaml.safe_load(body.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return None
    if isinstance(data, dict) and any(k in cli.COMMANDS for k in data):
        data = data.get(command) or {} if all(k in cli.COMMANDS for k in data) else None
    if data is None:  # an empty file (or one holding only null) sets nothing
        return {}
    if not isinstance(data, dict):
        return None
    flags = FLAGS[command]
    by_path, by_dest = {f.key: f for f in flags}, {f.dest: f for f in flags}
    groups = {f.key[:i] for f in flags for i in range(1, len(f.key))}
    found = defaultdict(list)

    def walk(d: dict, prefix: tuple):
        for k, v in d.items():
            at = (*prefix, str(k))
            if at in groups and isinstance(v, dict):
                walk(v, at)
            elif at in by_path:
                found[by_path[at].dest].append((v, False))
            elif not prefix and str(k) in by_dest:
                found[str(k)].append((v, False))
    walk(data, ())
    return found


def _paths(obj, prefix=()):
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


def _at(obj, path):
    for p in path:
        obj = obj[p]
    return obj


@st.composite
def damaged_json(draw, original):
    """(text, damaged): the JSON of `original` written another way (indentation, key order, escapes), which must
    read as the original, with 0-3 damages: a value deleted, replaced by anything, nudged (a number off by one or
    negated, a string cut, a list shortened or grown), or the text cut short."""
    obj = copy.deepcopy(original)
    damages = draw(st.sampled_from([0, 1, 1, 2, 3]))  # one case in five undamaged
    for _ in range(damages):
        path = draw(st.sampled_from(list(_paths(obj))))
        action = draw(st.sampled_from(["replace", "delete", "nudge", "nudge"]))
        if path == ():
            obj = draw(json_values) if action == "replace" else obj
            continue
        parent, key = _at(obj, path[:-1]), path[-1]
        value = parent[key]
        if action == "delete":
            del parent[key]
        elif action == "replace":
            parent[key] = draw(json_values)
        elif isinstance(value, bool):
            parent[key] = not value
        elif isinstance(value, int):
            parent[key] = value + draw(st.sampled_from([-1, 1, -2 * value - 1, 10**6]))
        elif isinstance(value, str):
            parent[key] = value[:-1]
        elif isinstance(value, list):
            parent[key] = value[:-1] if value and draw(st.booleans()) else [*value, *value[:1]]
        else:
            parent[key] = draw(json_values)
    text = json.dumps(obj, indent=draw(st.sampled_from([None, 0, 2, 4])), sort_keys=draw(st.booleans()),
                      ensure_ascii=draw(st.booleans())).encode()
    if damages and draw(st.integers(0, 5)) == 0:
        text = text[:draw(st.integers(0, max(len(text) - 1, 0)))]
    return text, damages > 0


def repacked(raw: bytes, seed: int) -> bytes:
    """The same members, in the same order, with the same bytes, written as another tar (another mtime, and the
    GNU or PAX format): another file holding the same samples."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as src, \
            tarfile.open(fileobj=out, mode="w", format=[tarfile.GNU_FORMAT, tarfile.PAX_FORMAT][seed % 2]) as dst:
        for m in src.getmembers():
            m.mtime = 1_000_000 + seed % 1000
            dst.addfile(m, src.extractfile(m))
    return out.getvalue()
