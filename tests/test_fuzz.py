"""Property-based tests of what users hand us (hypothesis; profiles and the verdict in tests/support/fuzz.py):
config files of random shape and types, command-line values, damaged dataset.json, shards, store
attributes and unit markers, malformed class lists. Every case ends in a correct run, or in exit status 2
with one sentence and nothing a later run would trust; never a traceback or a hang. The CLI runs in this
process (run_cli), so a case costs milliseconds to a fraction of a second."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cache.format import NAMES
from cache.store import CacheStore
from conftest import make_image_folder, tree_digest
from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from tests.support.fuzz import CASE_TIMEOUT, accepting, check_resolved, examples, outcome
from tests.support.fuzz_inputs import (
    FLAGS,
    SPELLING,
    config_file,
    damaged_json,
    from_file,
    near,
    repacked,
    typed,
)
from tests.support.runner import run_cli

# ------------------------------------------------------------------------------------------------ values

REQUIRED = {"shards": ["src", "out"], "cache-teacher": ["--data", "d", "--out", "o", "--teacher", "test_resnet"],
            "train-student": ["--data", "d", "--out", "o", "--student", "test_resnet", "--method", "ce"],
            "inspect-cache": ["store"], "verify-cache": ["store"], "demo": [],
            "cka": ["--data", "d", "--model-a", "test_resnet", "--model-b", "test_vit"]}


def _resolved(proc) -> dict:
    return yaml.safe_load(proc.stdout)


def _print_config(command: str, scratch, body: bytes, extra=()):
    path = scratch("cfg") / "config.yaml"
    path.write_bytes(body)
    proc = run_cli(command, *REQUIRED[command], *extra, "--config", path, "--print-config", timeout=CASE_TIMEOUT)
    return path, proc


commands_and_files = st.sampled_from(sorted(REQUIRED)).flatmap(lambda c: st.tuples(st.just(c), config_file(c)))


@accepting("config files", 0.15)
@examples(100)
@given(case=commands_and_files)
def test_config_files_of_any_shape_end_in_a_sentence_or_the_values_they_give(scratch, case):
    command, body = case
    path, proc = _print_config(command, scratch, body)
    if outcome(proc, "config files", name=None) == "ok":
        resolved = _resolved(proc)
        for flag in FLAGS[command]:
            value = resolved
            for p in flag.key:  # the file layout (transparent groups add no level)
                value = value[p]
            assert typed(flag, value), f"{command}: {flag.option} resolved to {value!r} from\n{body!r}"
        given = from_file(body, command)
        assert given is not None, f"{command} took a file that is no mapping of options:\n{body!r}"
        for f in FLAGS[command]:  # given on the command line too (REQUIRED): the flag wins, as documented
            if f.argument or f"--{f.dest.replace('_', '-')}" in REQUIRED[command]:
                given.pop(f.dest, None)
        check_resolved(FLAGS[command], given, resolved, f"{command} --config\n{body!r}")


@st.composite
def one_option(draw):
    """(command, option, value): an option of each kind as often (a command that has one, one of its options
    not given by the required arguments) and a value one step from its type."""
    kind = draw(st.sampled_from(["int", "float", "bool", "choice", "list", "path", "str", "kwargs"]))
    options = {c: [f for f in FLAGS[c] if f.kind == kind and not f.argument
                   and f"--{f.dest.replace('_', '-')}" not in REQUIRED[c]] for c in sorted(REQUIRED)}
    command = draw(st.sampled_from([c for c, flags in options.items() if flags]))
    flag = draw(st.sampled_from(options[command]))
    return command, flag, draw(near(flag))


@accepting("one option in a file", 0.25)
@examples(80)
@given(case=one_option())
def test_one_option_in_a_file_is_the_value_given_or_refused(scratch, case):
    """`epochs: 3.7` is refused, never 3; `epochs: 3.0` is 3; `lr: '0.5'` is 0.5 or refused; and so on for
    every option (tests/support/fuzz.py, `expected`)."""
    command, flag, value = case
    body = yaml.safe_dump(_nested(flag.key, value))
    _, proc = _print_config(command, scratch, body.encode())
    if outcome(proc, "one option in a file") == "ok":
        check_resolved(FLAGS[command], {flag.dest: [(value, False)]}, _resolved(proc), f"{command}: {body!r}")


def _nested(path: tuple, value) -> dict:
    out = value
    for p in reversed(path):
        out = {p: out}
    return out


flag_texts = st.text(max_size=10) | st.sampled_from(["-1", "0", "1e9", "null", "1,x", "nan", "a=", "--x", "2.5", "3",
                                                    "2,3", "1.0", "0.5", "train", "raise", "digits", "imagenet-1k"])


@accepting("command-line values", 0.3)
@examples(60)
@given(command=st.sampled_from(sorted(REQUIRED)), picks=st.lists(st.tuples(st.integers(0, 99), flag_texts,
                                                                            st.booleans()), max_size=4))
def test_command_line_values_end_in_a_sentence_or_the_values_they_give(command, picks):
    flags = [f for f in FLAGS[command] if not f.argument]
    args, given = list(REQUIRED[command]), defaultdict(list)
    for i, text, yes in picks:
        f = flags[i % len(flags)]
        on, off = SPELLING[command][f.dest]
        if f.kind == "bool":  # a switch: either spelling, no value
            args.append(on[0] if yes or not off else off[0])
            given[f.dest].append((yes or not off, True))
        else:
            args += [on[0], text]
            given[f.dest].append((text, True))
    for f in flags:  # a list or mapping option collects its texts (repeats); any other keeps the last one given
        if f.kind in ("list", "kwargs") and f.dest in given:
            given[f.dest] = [([t for t, _ in given[f.dest]], True)]
    proc = run_cli(command, *args, "--print-config", timeout=CASE_TIMEOUT)
    if outcome(proc, "command-line values") == "ok":
        resolved = _resolved(proc)
        for flag in FLAGS[command]:
            value = resolved
            for p in flag.key:  # the file layout (transparent groups add no level)
                value = value[p]
            assert typed(flag, value), f"{command}: {flag.option} resolved to {value!r} from {args}"
        check_resolved(FLAGS[command], given, resolved, f"{command} {args}")


# ------------------------------------------------------------------------------------------ damaged files

@pytest.fixture(scope="session")
def scratch(tmp_path_factory):
    """scratch(name): a new folder for a case. On a tmpfs (/dev/shm) where there is one: each case writes a
    store, whose fsyncs cost nothing there and most of a case's time on a disk. Removed at the end."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path_factory.mktemp
        return
    base = Path(tempfile.mkdtemp(prefix="ofakd-fuzz-", dir=shm))
    yield lambda name: Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
    shutil.rmtree(base, ignore_errors=True)


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


@pytest.mark.slow
@accepting("damaged dataset.json", 0.05)
@examples(100)
@given(data_=st.data())
def test_damaged_dataset_json_is_refused_or_read_right(tiny, scratch, data_):
    body, damaged = data_.draw(damaged_json(json.loads((tiny / "data" / "dataset.json").read_text())))
    work = scratch("manifest")
    data = work / "data"
    shutil.copytree(tiny / "data", data)
    (data / "dataset.json").write_bytes(body)
    # the command that reads it: the teacher pass over the train split
    run = run_cli("cache-teacher", *STORE_ARGS, "--data", data, "--out", work / "s.zarr", timeout=CASE_TIMEOUT)
    if outcome(run, "damaged dataset.json") == "refused":
        assert damaged, f"a dataset.json written another way was refused: {run.stderr[-500:]}\n{body!r}"
        _untrusted_store(work / "s.zarr", units=(0, 1))
    else:  # the damage did not touch what the pass reads: the undamaged store's arrays and markers, made for
        # the dataset as read (a renamed class is another dataset; an undamaged manifest is the same one)
        _same_store(work / "s.zarr", tiny / "store.zarr", manifest_hash=load_manifest(data).split_hash("train"))
        assert damaged or CacheStore(work / "s.zarr").description.request() == \
            CacheStore(tiny / "store.zarr").description.request()
    # a command that extends the dataset (it reads the manifest and writes it back with a new split)
    extend = run_cli("shards", tiny / "src", data, "--split", "val", "--quiet", timeout=CASE_TIMEOUT)
    if outcome(extend, "damaged dataset.json", name="dataset.json") == "refused":
        assert damaged, f"a dataset.json written another way was refused: {extend.stderr[-500:]}\n{body!r}"
        assert (data / "dataset.json").read_bytes() == body and not list(data.glob("val-*")), \
            "a refused shards run changed the dataset"
    else:
        assert load_manifest(data).split("val").count == 6


def _same_store(path: Path, reference: Path, skipped_may_differ=False, manifest_hash: str | None = None) -> None:
    store, ref = CacheStore(path), CacheStore(reference)
    store.check_complete()
    want = ref.description.request()
    assert store.description.request() == dataclasses.replace(want, manifest_hash=manifest_hash or want.manifest_hash)
    for name in NAMES:
        assert np.array_equal(store.read_all(name), ref.read_all(name)), name
    for s in range(ref.num_units):
        have, want = store.unit_info(s), ref.unit_info(s)
        if skipped_may_differ:
            have = dataclasses.replace(have, skipped=want.skipped)
        assert have == want


@accepting("damaged tar shards", 0.25)
@examples(100)
@given(shard=st.integers(0, 1), how=st.sampled_from(["truncate", "garble", "zero", "repack"]), at=st.floats(0, 1),
       length=st.integers(1, 600), seed=st.integers(0, 2**32 - 1), rehash=st.booleans(),
       on_error=st.sampled_from(["raise", "skip"]))
@pytest.mark.slow
def test_damaged_tar_shards_are_refused_naming_the_shard(tiny, scratch, shard, how, at, length, seed, rehash,
                                                         on_error):
    """`rehash`: the manifest's checksum is updated to the damaged file (damage before the checksum was taken),
    so the reader itself must cope with the garbled members. `repack`: the same samples in another tar file,
    which, checksummed, must give the undamaged store."""
    work = scratch("tar")
    data = work / "data"
    shutil.copytree(tiny / "data", data)
    name = f"train-{shard:06d}.tar"
    original = (data / name).read_bytes()
    raw = bytearray(original)
    start = int(at * (len(raw) - 1))
    if how == "truncate":
        raw = raw[:start]
    elif how == "repack":
        raw = bytearray(repacked(original, seed))
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
    verdict = outcome(proc, "damaged tar shards", name=None if rehash else name)
    if how == "repack" and rehash:  # the same samples: the same arrays and markers (the checksum is the dataset's)
        assert verdict == "ok", f"{name} repacked and checksummed was refused: {proc.stderr[-500:]}"
        _same_store(work / "s.zarr", tiny / "store.zarr", manifest_hash=load_manifest(data).split_hash("train"))
    elif verdict == "refused":
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


@pytest.mark.slow
@accepting("damaged store", 0.12)
@examples(100)
@given(target=st.sampled_from(["attrs", "marker"]), shard=st.integers(0, 1), data=st.data())
def test_damaged_store_attributes_and_unit_markers_are_refused_or_read_right(tiny, scratch, target, shard,
                                                                           data):
    work = scratch("store")
    store = work / "store.zarr"
    shutil.copytree(tiny / "store.zarr", store)
    # the group's zarr.json (zarr's own keys, and the store's description under "attributes"), or a unit's marker
    file = store / "zarr.json" if target == "attrs" else store / "_units" / f"shard-{shard:06d}.json"
    body, damaged = data.draw(damaged_json(json.loads(file.read_text())))
    file.write_bytes(body)
    verdicts = [outcome(run_cli("inspect-cache", store, timeout=CASE_TIMEOUT), "damaged store")]
    # the same request again: it resumes the store, trusting only what it can check
    proc = run_cli("cache-teacher", *STORE_ARGS, "--data", tiny / "data", "--out", store, timeout=CASE_TIMEOUT)
    verdicts.append(outcome(proc, "damaged store"))
    assert damaged or verdicts == ["ok", "ok"], f"{file.name} written another way was refused:\n{body!r}"
    if verdicts[1] == "ok":
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
def test_malformed_class_names_files_are_refused_or_name_every_class(tiny, scratch, lines, raw):
    work = scratch("names")
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
def test_malformed_teacher_class_lists_are_refused_or_map_every_class(tiny, scratch, lines, raw):
    work = scratch("teacher-classes")
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
    assert outcome(proc, "pinned cases", name="'\\x1e'") == "refused"  # was a message split in two lines
    proc = run_cli("cache-teacher", *REQUIRED["cache-teacher"], "--recipe", "\x85", "--print-config")
    assert outcome(proc, "pinned cases", name="'\\x85'") == "refused"  # the explore profile: the same, a recipe


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
def test_config_values_the_fuzzer_broke_are_refused_in_one_sentence(scratch, command, body, needle):
    _, proc = _print_config(command, scratch, body)
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
    m = json.loads((data / "dataset.json").read_text())
    m["classes"], m["splits"]["train"]["class_counts"] = ["dog", "eel"], [2, 2]  # a class lost: label 2 crashed
    (data / "dataset.json").write_text(json.dumps(m))
    assert outcome(run_cli("cache-teacher", *STORE_ARGS, "--data", data, "--out", tmp_path / "s2.zarr"),
                   "pinned cases", name="label 2 outside the 2 classes") == "refused"
    (store / "zarr.json").write_text(json.dumps({**meta, "zarr_format": 2}))  # KeyError: 'topk_values'
    assert outcome(run_cli("inspect-cache", store), "pinned cases", name="no readable array") == "refused"
    meta["attributes"]["dataset"] = "\x1e"  # shown as it was: a line separator split the sentence in two
    (store / "zarr.json").write_text(json.dumps(meta))
    assert outcome(run_cli("inspect-cache", store), "pinned cases", name="dataset as '\\x1e'") == "refused"
