"""The README's "Your own training loop" example, run as written against a real cache."""

import re
import subprocess
import sys

import pytest

from cache.teacher_pass import CacheConfig, cache_teacher
from commands.options import build
from conftest import ROOT


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its api-example block"
    return m.group(1)


@pytest.mark.slow
def test_readme_training_loop_runs_on_a_real_cache(small_digits, small_store):
    store = small_store  # 2 epochs of digits-mix views, top-4 (conftest), read-only here
    code = readme_example()
    assert 'CachedTeacher("runs/demo/teacher.zarr")' in code and '"runs/demo/data"' in code
    # the same code; only the demo's paths become this test's store and data, and a smaller timm model
    code = (code.replace("runs/demo/teacher.zarr", str(store)).replace("runs/demo/data", str(small_digits))
            .replace('"resnet18"', '"test_resnet"'))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"epoch \d+: loss (\S+)", proc.stdout)]
    assert len(losses) == 2 and all(0 < v < 100 for v in losses), proc.stdout


def test_cached_teacher_refuses_another_dataset(small_digits, digits, tmp_path):
    from cache.targets import CachedTeacher
    from pipeline.errors import UserError
    store = tmp_path / "t.zarr"
    cache_teacher(build(CacheConfig, data=small_digits, teacher="test_resnet", out=store, recipe="digits", epochs=1,
                        topk=3, batch_size=64, workers=0, progress=False))
    with pytest.raises(UserError, match="dataset is"):
        CachedTeacher(store).views(digits, 0)


@pytest.fixture(scope="session")
def one_epoch_store(small_digits, tmp_path_factory):
    store = tmp_path_factory.mktemp("fp") / "t.zarr"
    cache_teacher(build(CacheConfig, data=small_digits, teacher="test_resnet", out=store, recipe="digits-mix",
                        epochs=1, topk=3, batch_size=64, workers=0, progress=False))
    return store


def _read_all(views):
    from torch.utils.data import DataLoader
    return [b["index"] for b in DataLoader(views, batch_size=50, num_workers=0)]


def test_views_whose_pixels_changed_are_refused_naming_shard_and_versions(small_digits, one_epoch_store, monkeypatch):
    """Same seeds and replay records, pixels one grey level off (what another torchvision or Pillow could
    do): the replay record alone cannot see it, the fingerprint must."""
    import pipeline.views
    from cache.store import CacheStore
    from cache.targets import CachedTeacher
    from pipeline.errors import UserError
    assert all(CacheStore(one_epoch_store).unit_info(u).view_digests[0] for u in range(6))
    assert sum(len(b) for b in _read_all(CachedTeacher(one_epoch_store).views(small_digits, 0))) == 270
    real = pipeline.views.to_view

    def drifted(base):
        v = real(base).clone()
        v[0, 0, 0] = (v[0, 0, 0] + 1 / 255).clamp(0, 1) if v[0, 0, 0] < 0.5 else v[0, 0, 0] - 1 / 255
        return v

    monkeypatch.setattr(pipeline.views, "to_view", drifted)
    with pytest.raises(UserError) as e:
        _read_all(CachedTeacher(one_epoch_store).views(small_digits, 0))
    msg = str(e.value)
    assert "differ pixel for pixel" in msg and "data shard" in msg and "torchvision" in msg and "installed" in msg


def test_a_tampered_fingerprint_is_refused(small_digits, one_epoch_store, tmp_path):
    import json
    import shutil

    from cache.store import CacheStore
    from cache.targets import CachedTeacher
    from pipeline.errors import UserError
    copy = tmp_path / "t.zarr"
    shutil.copytree(one_epoch_store, copy)
    store = CacheStore(copy)
    for u in range(6):
        info = {**store.unit_info(u).to_attrs(), "view_digests": ["0" * 32]}
        store.marker(u).write_text(json.dumps(info))
    with pytest.raises(UserError, match="epoch 0"):
        _read_all(CachedTeacher(copy).views(small_digits, 0))
