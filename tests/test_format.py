"""cache/format.py: the records read back exactly what a real store holds, docs/cache-format.md is generated from them,
and a store of another format version is refused without a byte written."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cache.format import (
    ARRAYS,
    FORMAT_VERSION,
    NAMES,
    CacheDescription,
    CacheRequest,
    UnitRecord,
    format_reference,
    raw_bytes_per_view,
)
from cache.store import CacheStore
from cache.targets import CachedTeacher
from cache.teacher_pass import CacheConfig, cache_teacher
from commands.options import build
from conftest import ROOT
from pipeline.augment import get_recipe
from pipeline.errors import UserError


def _cfg(data, out, **kw) -> CacheConfig:
    base = dict(data=data, teacher="test_resnet", out=out, recipe="digits-mix",
                epochs=2, topk=3, batch_size=64, workers=0, progress=False, on_error="skip")
    return build(CacheConfig, **{**base, **kw})


@pytest.fixture(scope="module")
def store_path(small_digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fmt") / "t.zarr"
    cache_teacher(_cfg(small_digits, out))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_records_round_trip_a_real_store_key_for_key(store_path):
    attrs = json.loads((store_path / "zarr.json").read_text())["attributes"]
    desc = CacheDescription.from_attrs(attrs)
    again = desc.to_attrs()
    assert again == attrs and json.dumps(again) == json.dumps(attrs)  # same keys, values and order
    assert CacheDescription.from_attrs(again) == desc
    assert desc.topk == 3 and desc.epochs == 2 and desc.teacher.name == "test_resnet" and desc.on_error == "skip"
    for marker in sorted((store_path / "_units").iterdir()):
        raw = marker.read_text()
        unit = UnitRecord.from_attrs(json.loads(raw))
        assert json.dumps(unit.to_attrs()) == raw and len(unit.view_digests) == 2  # the bytes the store wrote


def test_arrays_are_what_the_specs_say(store_path):
    store = CacheStore(store_path)
    d = store.description
    assert {p.parent.name for p in store_path.glob("*/zarr.json")} == {a.name for a in d.arrays}
    assert {a.name for a in d.arrays} == set(NAMES)  # no tail arrays without --tail-samples
    for a in d.arrays:
        arr = store.array(a.name)
        assert arr.dtype == np.dtype(d.dtype(a)), a.name
        assert arr.shape == (d.epochs, d.dataset.num_samples, *d.trailing_shape(a)), a.name
        assert arr.metadata.fill_value == a.fill, a.name
    assert d.raw_bytes_per_view == raw_bytes_per_view(3, 10) == 4 * 3 + 23


def test_a_request_is_compared_on_the_fields_it_gives_or_on_every_field(store_path):
    d = CacheStore(store_path).description
    assert d.mismatches(CacheRequest()) == [] and d.mismatches(d.request(), every=True) == []
    assert d.mismatches(CacheRequest(seed=5, topk=3)) == ["view seed is 0, requested 5"]
    every = d.mismatches(CacheRequest(seed=5), every=True)  # every field: the ones not given differ too
    assert "view seed is 0, requested 5" in every and "teacher is test_resnet, requested None" in every
    assert "teacher class map is None, requested None" not in every  # equal, None included
    other = get_recipe("digits-mix").to_dict() | {"mixup_alpha": 0.7}
    assert d.mismatches(CacheRequest(recipe=other)) == [f"augmentation recipe differs (mixup_alpha: "
                                                         f"{d.recipe['mixup_alpha']} != 0.7)"]


def test_the_format_page_is_the_generated_reference():
    page = (ROOT / "docs" / "cache-format.md").read_text()
    ref = format_reference()
    assert page == ref, "docs/cache-format.md is stale: `python -m cache.format > docs/cache-format.md` regenerates it"
    for a in ARRAYS:
        assert f"| `{a.name}` |" in ref
    assert "](cache-format.md)" in (ROOT / "docs" / "design.md").read_text()  # the design links the page
    assert "docs/cache-format.md" in (ROOT / "README.md").read_text()  # and so does the README


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, FORMAT_VERSION - 1])
def test_another_format_version_is_refused_naming_both_and_writes_nothing(small_digits, store_path, tmp_path,
                                                                          version):
    copy = tmp_path / "t.zarr"
    shutil.copytree(store_path, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["format_version"] = version
    (copy / "zarr.json").write_text(json.dumps(meta))
    before = _files(copy)
    for attempt in (lambda: CacheStore(copy), lambda: CachedTeacher(copy), lambda: CacheStore(copy, mode="r+"),
                    lambda: cache_teacher(_cfg(small_digits, copy))):
        with pytest.raises(UserError) as e:
            attempt()
        msg = str(e.value)
        assert f"format version {version} " in msg and f"format version {FORMAT_VERSION};" in msg, msg
        assert "rebuild the cache with this version" in msg and str(copy) in msg, msg
    assert _files(copy) == before  # the refusal wrote nothing


def test_a_description_or_marker_of_another_layout_is_refused(store_path, tmp_path):
    attrs = CacheStore(store_path).attrs
    with pytest.raises(UserError, match="missing weights"):
        CacheDescription.from_attrs({**attrs, "teacher": {k: v for k, v in attrs["teacher"].items() if k != "weights"}})
    with pytest.raises(UserError, match="unknown extra"):
        CacheDescription.from_attrs({**attrs, "extra": 1})
    with pytest.raises(UserError, match="raw_bytes_per_view"):
        CacheDescription.from_attrs({**attrs, "raw_bytes_per_view": 1})
    # a marker without fingerprints is refused, not read without the check
    copy = tmp_path / "t.zarr"
    shutil.copytree(store_path, copy)
    marker = copy / "_units" / "shard-000000.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "view_digests"}))
    with pytest.raises(UserError, match="data shard 0.*missing view_digests.*rebuild the cache"):
        CacheStore(copy).unit_info(0)
