"""Property-based tests of what users hand us (hypothesis; profiles and the verdict in tests/support/fuzz.py):
config files of random shape and types, command-line values, damaged dataset.json, shards, store
attributes and unit markers, malformed class lists. Every case ends in a correct run, or in exit status 2
with one sentence and nothing a later run would trust; never a traceback or a hang. The CLI runs in this
process (run_cli), so a case costs milliseconds to a fraction of a second."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import cli
from cache.format import NAMES
from cache.store import CacheStore
from commands.options import flags_of
from conftest import make_image_folder, tree_digest
from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from pipeline.spec import strip_optional
from tests.support.fuzz import CASE_TIMEOUT, examples, outcome
from tests.support.runner import run_cli

# ------------------------------------------------------------------------------------------------ values

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 300)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["", "null", "true", "no", "1,2", "a=1", "3.5", "-1", "0", "train", "raise", "ofa"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)

REQUIRED = {"shards": ["src", "out"], "cache-teacher": ["--data", "d", "--out", "o", "--teacher", "test_resnet"],
            "train-student": ["--data", "d", "--out", "o", "--student", "test_resnet"],
            "inspect-cache": ["store"], "verify-cache": ["store"], "demo": [],
            "cka": ["--data", "d", "--model-a", "test_resnet", "--model-b", "test_vit"]}
FLAGS = {name: flags_of(cls) for name, (cls, _) in cli.COMMANDS.items()}


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


@st.composite
def config_file(draw, command: str):
    """A YAML or JSON config of random shape: real option paths (nested or flat), unknown keys, sections."""
    flags = FLAGS[command]
    data: dict = {}
    for _ in range(draw(st.integers(0, 5))):
        how = draw(st.sampled_from(["nested", "flat", "unknown"]))
        flag = draw(st.sampled_from(flags))
        value = draw(plausible(flag))
        if how == "nested":
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
        return isinstance(value, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) and (item is float or isinstance(v, int))
            for v in value)
    if kind == "kwargs":
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if kind == "str" and "Recipe" in str(flag.tp):
        return isinstance(value, str | dict)
    return isinstance(value, str)


def _print_config(command: str, tmp_path_factory, body: bytes, extra=()):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_bytes(body)
    proc = run_cli(command, *REQUIRED[command], *extra, "--config", path, "--print-config", timeout=CASE_TIMEOUT)
    return path, proc


commands_and_files = st.sampled_from(sorted(REQUIRED)).flatmap(lambda c: st.tuples(st.just(c), config_file(c)))


@examples(100)
@given(case=commands_and_files)
def test_config_files_of_any_shape_end_in_a_sentence_or_a_typed_configuration(tmp_path_factory, case):
    command, body = case
    path, proc = _print_config(command, tmp_path_factory, body)
    if outcome(proc, "config files", name=None) == "ok":
        resolved = yaml.safe_load(proc.stdout)
        for flag in FLAGS[command]:
            value = resolved
            for p in flag.key:  # the file layout (transparent groups add no level)
                value = value[p]
            assert typed(flag, value), f"{command}: {flag.option} resolved to {value!r} from\n{body!r}"


flag_texts = st.text(max_size=10) | st.sampled_from(["-1", "0", "1e9", "null", "1,x", "nan", "a=", "--x", "2.5"])


@examples(60)
@given(command=st.sampled_from(sorted(REQUIRED)), picks=st.lists(st.tuples(st.integers(0, 99), flag_texts), max_size=4))
def test_command_line_values_end_in_a_sentence_or_a_typed_configuration(command, picks):
    flags = [f for f in FLAGS[command] if not f.argument]
    args = list(REQUIRED[command])
    for i, text in picks:
        if not flags:
            break
        f = flags[i % len(flags)]
        args += [f"--{f.dest.replace('_', '-')}"] if f.kind == "bool" else [f"--{f.dest.replace('_', '-')}", text]
    proc = run_cli(command, *args, "--print-config", timeout=CASE_TIMEOUT)
    if outcome(proc, "command-line values") == "ok":
        resolved = yaml.safe_load(proc.stdout)
        for flag in FLAGS[command]:
            value = resolved
            for p in flag.key:  # the file layout (transparent groups add no level)
                value = value[p]
            assert typed(flag, value), f"{command}: {flag.option} resolved to {value!r} from {args}"


# ------------------------------------------------------------------------------------------ damaged files

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
    """The JSON text of `original` with 1-3 damages: a value deleted, replaced by anything, nudged (a number
    off by one or negated, a string cut, a list shortened or grown), or the text cut short."""
    obj = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
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
    text = json.dumps(obj).encode()
    if draw(st.integers(0, 5)) == 0:
        text = text[:draw(st.integers(0, max(len(text) - 1, 0)))]
    return text


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A 3-class ImageFolder of 6 tiny images, its train split as 2 shards of 3, and a 1-epoch top-2 store of it
    (test_resnet, digits recipe): each fuzz case copies what it damages. Shared: read-only."""
    root = tmp_path_factory.mktemp("fuzz")
    src = make_image_folder(root / "src", per_class=2, size=(8, 8))
    run_cli("shards", src, root / "data", "--shard-size", "3", "--quiet", check=True)
    run_cli("cache-teacher", *STORE_ARGS, "--data", root / "data", "--out", root / "store.zarr", check=True)
    before = tree_digest(root)
    yield root
    assert tree_digest(root) == before, "a fuzz case changed the shared tiny dataset or store"


STORE_ARGS = ("--teacher", "test_resnet", "--recipe", "digits", "--topk", "2", "--workers", "0", "--batch-size", "8",
              "--quiet")


def _untrusted_store(path: Path, units=()) -> None:
    """A refused cache-teacher run left no store a later run would trust: none at all, or one whose listed
    units are not marked complete."""
    if not (path / "zarr.json").exists():
        return
    try:
        store = CacheStore(path)
    except UserError:
        return
    assert not set(units) & store.done_units(), f"a refused run marked units {units} of {path} complete"


@examples(30)
@given(data_=st.data())
def test_damaged_dataset_json_is_refused_or_read_right(tiny, tmp_path_factory, data_):
    body = data_.draw(damaged_json(json.loads((tiny / "data" / "dataset.json").read_text())))
    work = tmp_path_factory.mktemp("manifest")
    data = work / "data"
    shutil.copytree(tiny / "data", data)
    (data / "dataset.json").write_bytes(body)
    # a command that extends the dataset (it reads the manifest and writes it back with a new split)
    extend = run_cli("shards", tiny / "src", data, "--split", "val", "--quiet", timeout=CASE_TIMEOUT)
    if outcome(extend, "damaged dataset.json", name="dataset.json") == "refused":
        assert (data / "dataset.json").read_bytes() == body and not list(data.glob("val-*")), \
            "a refused shards run changed the dataset"
    else:
        assert load_manifest(data).split("val").count == 6
    # the command that reads it: the teacher pass over the train split
    run = run_cli("cache-teacher", *STORE_ARGS, "--data", data, "--out", work / "s.zarr", timeout=CASE_TIMEOUT)
    if outcome(run, "damaged dataset.json") == "refused":
        _untrusted_store(work / "s.zarr", units=(0, 1))
    else:  # the damage did not touch what the pass reads: the store is the undamaged one's
        _same_store(work / "s.zarr", tiny / "store.zarr")


def _same_store(path: Path, reference: Path, skipped_may_differ=False) -> None:
    store, ref = CacheStore(path), CacheStore(reference)
    store.check_complete()
    assert store.description.request() == ref.description.request()
    for name in NAMES:
        assert np.array_equal(store.read_all(name), ref.read_all(name)), name
    for s in range(ref.num_units):
        have, want = store.unit_info(s), ref.unit_info(s)
        if skipped_may_differ:
            have = dataclasses.replace(have, skipped=want.skipped)
        assert have == want


@examples(20)
@given(shard=st.integers(0, 1), how=st.sampled_from(["truncate", "garble", "zero"]), at=st.floats(0, 1),
       length=st.integers(1, 600), seed=st.integers(0, 2**32 - 1), rehash=st.booleans(),
       on_error=st.sampled_from(["raise", "skip"]))
def test_damaged_tar_shards_are_refused_naming_the_shard(tiny, tmp_path_factory, shard, how, at, length, seed, rehash,
                                                         on_error):
    """`rehash`: the manifest's checksum is updated to the damaged file (damage before the checksum was taken),
    so the reader itself must cope with the garbled members."""
    work = tmp_path_factory.mktemp("tar")
    data = work / "data"
    shutil.copytree(tiny / "data", data)
    name = f"train-{shard:06d}.tar"
    original = (data / name).read_bytes()
    raw = bytearray(original)
    start = int(at * (len(raw) - 1))
    if how == "truncate":
        raw = raw[:start]
    else:
        end = min(start + length, len(raw))
        raw[start:end] = np.random.default_rng(seed).bytes(end - start) if how == "garble" else bytes(end - start)
    (data / name).write_bytes(bytes(raw))
    if rehash:
        m = json.loads((data / "dataset.json").read_text())
        m["splits"]["train"]["shards"][shard] |= {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
        (data / "dataset.json").write_text(json.dumps(m))
    proc = run_cli("cache-teacher", *STORE_ARGS, "--data", data, "--out", work / "s.zarr", "--on-error", on_error,
                   timeout=CASE_TIMEOUT)
    if outcome(proc, "damaged tar shards", name=None if rehash else name) == "refused":
        _untrusted_store(work / "s.zarr", units=(shard,))
    else:  # the manifest's checksum is the damaged file's: its pixels are the data now (JPEG decodes around
        # many damages). The other shard's rows are the undamaged store's: views mix only within a shard.
        assert rehash or bytes(raw) == original, f"{name} does not match its checksum, yet the pass ran"
        store, ref = CacheStore(work / "s.zarr"), CacheStore(tiny / "store.zarr")
        store.check_complete()
        assert on_error == "skip" or not store.skipped()
        other = slice(3 * (1 - shard), 3 * (1 - shard) + 3)
        for n in NAMES:
            assert np.array_equal(store.read_all(n)[:, other], ref.read_all(n)[:, other]), n
        assert store.unit_info(1 - shard) == ref.unit_info(1 - shard)


@examples(30)
@given(target=st.sampled_from(["attrs", "marker"]), shard=st.integers(0, 1), data=st.data())
def test_damaged_store_attributes_and_unit_markers_are_refused_or_read_right(tiny, tmp_path_factory, target, shard,
                                                                           data):
    work = tmp_path_factory.mktemp("store")
    store = work / "store.zarr"
    shutil.copytree(tiny / "store.zarr", store)
    if target == "attrs":
        # the group's zarr.json: zarr's own keys, and the store's description under "attributes"
        (store / "zarr.json").write_bytes(data.draw(damaged_json(json.loads((store / "zarr.json").read_text()))))
    else:
        marker = store / "_units" / f"shard-{shard:06d}.json"
        marker.write_bytes(data.draw(damaged_json(json.loads(marker.read_text()))))
    outcome(run_cli("inspect-cache", store, timeout=CASE_TIMEOUT), "damaged store (inspect)")
    # the same request again: it resumes the store, trusting only what it can check
    proc = run_cli("cache-teacher", *STORE_ARGS, "--data", tiny / "data", "--out", store, timeout=CASE_TIMEOUT)
    if outcome(proc, "damaged store (resume)") == "ok":
        # a marker is not checksummed: one whose skipped list names other samples of its own unit reads as
        # a valid marker (training then leaves those samples out); every other damage is refused above
        _same_store(store, tiny / "store.zarr", skipped_may_differ=True)


# ------------------------------------------------------------------------------------------- class lists

class_lines = st.lists(st.sampled_from(["cat", "dog", "eel", "Cat", " dog ", "", "\t", "cat\tfeline", "dog\tcanine",
                                        "eel\tfish\tx", "x\ty", "cat", "n0144\tgoldfish"]) | st.text(max_size=6),
                       max_size=6)
# every class once, in any order, among other lines: the lists that can be right
class_lists = class_lines | st.tuples(st.permutations(["cat", "dog", "eel"]), class_lines, st.integers(0, 3)).map(
    lambda t: [*t[1][:t[2]], *t[0], *t[1][t[2]:]])


def _lines_file(draw_lines, draw_bytes) -> bytes:
    return draw_bytes if draw_bytes is not None else "\n".join(draw_lines).encode()


@examples(30)
@given(lines=class_lists, raw=st.none() | st.none() | st.binary(max_size=20) | st.just(b"cat\n\xff\xfe\ndog\neel\n"))
def test_malformed_class_names_files_are_refused_or_name_every_class(tiny, tmp_path_factory, lines, raw):
    work = tmp_path_factory.mktemp("names")
    names = work / "names.txt"
    names.write_bytes(_lines_file(lines, raw))
    proc = run_cli("shards", tiny / "src", work / "data", "--class-names", names, "--quiet", timeout=CASE_TIMEOUT)
    if outcome(proc, "class-names files", name="names.txt") == "refused":
        assert not (work / "data" / "dataset.json").exists()
    else:
        m = load_manifest(work / "data")
        assert len(m.classes) == 3 and all(isinstance(c, str) and c.strip() == c and c for c in m.classes), m.classes
        assert m.class_ids == ["cat", "dog", "eel"]


@examples(15)
@given(lines=class_lists, raw=st.none() | st.none() | st.binary(max_size=20) | st.just(b"cat\n\xff\xfe\ndog\neel\n"))
def test_malformed_teacher_class_lists_are_refused_or_map_every_class(tiny, tmp_path_factory, lines, raw):
    work = tmp_path_factory.mktemp("teacher-classes")
    ids = work / "ids.txt"
    ids.write_bytes(_lines_file(lines, raw))
    proc = run_cli("cache-teacher", *STORE_ARGS, "--data", tiny / "data", "--out", work / "s.zarr",
                   "--teacher-classes", ids, timeout=CASE_TIMEOUT)
    if outcome(proc, "teacher class lists", name="ids.txt") == "refused":
        _untrusted_store(work / "s.zarr", units=(0, 1))
    else:
        store = CacheStore(work / "s.zarr")
        store.check_complete()
        table = ids.read_text().rstrip("\n").split("\n")
        indices = store.description.teacher.classes["indices"]
        assert [table[i].strip() for i in indices] == ["cat", "dog", "eel"]


# --------------------------------------------------------------------- the bugs these tests found, pinned

def test_a_flag_value_with_a_line_separator_is_quoted_in_the_sentence():
    proc = run_cli("cache-teacher", *REQUIRED["cache-teacher"], "--model-kwargs", "\x1e", "--print-config")
    assert outcome(proc, "pinned cases", name="'\\x1e'") == "refused"  # not a message split in two lines


@pytest.mark.parametrize("command,body,needle", [
    ("cache-teacher", b"teacher:\n  weights:\n    checkpoint: []\n", "'teacher.weights.checkpoint'"),  # traceback
    ("cache-teacher", b"teacher:\n  weights:\n    pretrained: 'false'\n", "must be true or false"),  # taken as true
    ("cache-teacher", b"\x80", "not UTF-8"),  # UnicodeDecodeError
    ("cache-teacher", b"\x00", "not valid YAML"),  # a message over two lines
    ("cache-teacher", b'"\\r": digits\n', "'\\r'"),  # an unknown key that broke the line
    ("demo", b"epochs: null\n", "cannot be null"),  # None reached a comparison: TypeError
    ("cache-teacher", b"epochs: 3.7\n", "must be an integer"),  # silently 3
    ("train-student", b"gamma: [1, {}]\n", "'loss.gamma'"),  # int({}) TypeError
    ("cka", b"views:\n  recipe:\n    scale: '0'\n", "scale '0'"),  # TypeError
    ("cka", b"views:\n  recipe:\n    mixup_alpha: null\n", "mixup_alpha None"),  # TypeError
])
def test_config_values_the_fuzzer_broke_are_refused_in_one_sentence(tmp_path_factory, command, body, needle):
    _, proc = _print_config(command, tmp_path_factory, body)
    assert outcome(proc, "pinned cases", name=needle) == "refused"


def test_damaged_files_the_fuzzer_broke_are_refused_in_one_sentence(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    m = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**m, "classes": []}))  # not to be trusted and extended
    assert outcome(run_cli("shards", tiny / "src", data, "--split", "val", "--quiet"), "pinned cases",
                   name="dataset.json") == "refused"
    assert not list(data.glob("val-*"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"cat\n\xff\xfe\ndog\neel\n")  # UnicodeDecodeError, both lists
    assert outcome(run_cli("shards", tiny / "src", tmp_path / "d2", "--class-names", bad, "--quiet"),
                   "pinned cases", name="bad.txt") == "refused"
    assert outcome(run_cli("cache-teacher", *STORE_ARGS, "--data", tiny / "data", "--out", tmp_path / "s.zarr",
                           "--teacher-classes", bad), "pinned cases", name="bad.txt") == "refused"
    assert not (tmp_path / "d2").exists() and not (tmp_path / "s.zarr").exists()
    marker = json.loads((tiny / "store.zarr" / "_units" / "shard-000000.json").read_text())
    for damage in (b"{", json.dumps({**marker, "shard": -1}).encode(),  # JSONDecodeError; trusted by a resume
                   json.dumps({**marker, "view_digests": [marker["view_digests"][0][:-1]]}).encode()):
        store = tmp_path / "store.zarr"
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(tiny / "store.zarr", store)
        (store / "_units" / "shard-000000.json").write_bytes(damage)
        for args in (("inspect-cache", store), ("cache-teacher", *STORE_ARGS, "--data", tiny / "data", "--out", store)):
            assert outcome(run_cli(*args), "pinned cases", name="shard-000000.json") == "refused", args
    meta = json.loads((tiny / "store.zarr" / "zarr.json").read_text())
    (store / "zarr.json").write_text(json.dumps({**meta, "attributes": None, "node_type": []}))  # a zarr traceback
    assert outcome(run_cli("inspect-cache", store), "pinned cases", name="zarr.json") == "refused"


def test_more_damage_the_explore_profile_found_is_refused_in_one_sentence(tiny, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    m = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**m, "classes": ["ca", "dog", "eel"]}))  # "(3 vs 3)", unnamed
    assert outcome(run_cli("shards", tiny / "src", data, "--split", "val", "--quiet"), "pinned cases",
                   name="dataset.json lists 'ca' where the source has 'cat'") == "refused"
    ids = tmp_path / "ids.txt"
    ids.write_text("0\x1e0\n0\x1e0\n")  # the quoted id held a line separator: two lines
    assert outcome(run_cli("cache-teacher", *STORE_ARGS, "--data", tiny / "data", "--out", tmp_path / "s.zarr",
                           "--teacher-classes", ids), "pinned cases", name="'0\\x1e0'") == "refused"
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny / "store.zarr", store)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["dataset"]["num_samples"] = 7  # the arrays hold 6: a resume trusted it
    (store / "zarr.json").write_text(json.dumps(meta))
    assert outcome(run_cli("cache-teacher", *STORE_ARGS, "--data", tiny / "data", "--out", store), "pinned cases",
                   name="where its attributes give") == "refused"
