"""The bad-input catalogue and crash behaviour: every refusal is one sentence, and a crash leaves nothing trusted."""

import io
import json
import tarfile

import numpy as np
import pytest

from cache.format import NAMES
from cache.store import CacheStore
from cache.teacher_pass import CacheConfig, cache_teacher
from commands.options import build
from conftest import (
    SMALL_STORE,
    make_image_folder,
    probe_batches,
    refused,
    run_cli,
    run_cli_process,
    small_tmpfs,
    stored_targets,
    units_written,
)
from pipeline.errors import UserError
from pipeline.manifest import sha256_file
from pipeline.shards import make_shards


def _cfg(data, out, **kw):
    base = dict(data=data, teacher="test_resnet", out=out, recipe="digits-mix",
                epochs=1, topk=3, batch_size=64, workers=0, progress=False)
    return build(CacheConfig, **{**base, **kw})


def _fail_on_write(monkeypatch, n: int, exc: BaseException):
    """Make the n-th unit write raise `exc` (earlier ones succeed); returns the real write_unit."""
    real, calls = CacheStore.write_unit, {"n": 0}

    def write_unit(self, unit):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        real(self, unit)

    monkeypatch.setattr(CacheStore, "write_unit", write_unit)
    return real


def test_a_disk_that_fills_up_mid_unit_is_a_clear_error_and_the_rerun_completes_the_store(small_digits, small_store,
                                                                                          tmp_path):
    """The store on a real tmpfs with room for its metadata, two units and half of a third (each file of this store
    takes one 4 KiB page): the write that finds no space (ENOSPC) stops the pass in one sentence, the store holds
    exactly the two complete units, and once space is freed the same command completes it bit for bit."""
    meta = sum(1 for _ in small_store.rglob("zarr.json"))  # the group's and each array's
    unit = units_written(small_store)[0] + 1  # a unit's files: one zarr shard per array, and its marker
    disk = tmp_path / "disk"
    out = disk / "s.zarr"
    args = ["cache-teacher", "--data", small_digits, "--out", out, "--quiet",
            *(a for k, v in SMALL_STORE.items() for a in (f"--{k.replace('_', '-')}", v))]
    with small_tmpfs(disk, 4096 * (meta + 2 * unit + unit // 2)) as resize:
        msg = refused(run_cli(*args), "No space left on device", "rerun the same command")
        store = CacheStore(out)
        assert store.done_units() == {0, 1} and units_written(out)[2] == unit // 2, (msg, units_written(out))
        with pytest.raises(UserError, match="incomplete"):  # the unit that failed is not marked complete
            store.check_complete()
        ref = CacheStore(small_store)
        for u in (0, 1):  # what is marked complete is complete
            for e in range(ref.epochs):
                a, b = store.read_epoch(e, u), ref.read_epoch(e, u)
                assert all(np.array_equal(a[n], b[n]) for n in NAMES)
        assert not list(out.rglob("*.partial"))  # the cut write left no temporary file
        resize(4 << 20)  # space freed
        run_cli(*args, check=True)
        store = CacheStore(out)
        for name in NAMES:
            assert np.array_equal(store.read_all(name), ref.read_all(name)), name
        assert all(store.unit_info(u) == ref.unit_info(u) for u in range(ref.num_units))


def test_output_that_cannot_be_written(small_digits, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="choose a writable --out"):
        cache_teacher(_cfg(small_digits, blocker / "store.zarr"))
    p = run_cli("train-student", "--data", small_digits, "--student", "test_resnet", "--method", "ce", "--recipe",
                "digits", "--epochs", 1, "--out", blocker / "run")
    assert p.returncode == 2 and "a-file" in p.stderr
    assert blocker.read_text() == "x" and sorted(tmp_path.iterdir()) == [blocker]  # nothing written beside it


def test_incomplete_cache_is_refused_for_training_and_reads(small_digits, tmp_path, monkeypatch):
    out = tmp_path / "half.zarr"
    _fail_on_write(monkeypatch, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(_cfg(small_digits, out))
    store = CacheStore(out)  # a reader of a store still being written sees only complete units
    assert store.done_units() == {0, 1}  # one process, workers 0: units in order, the third died
    missing = (set(range(store.num_units)) - store.done_units()).pop()
    with pytest.raises(UserError, match=f"data shard {missing}"):
        store.read_epoch(0, missing)
    p = run_cli("train-student", "--data", small_digits, "--student", "test_resnet", "--method", "kd", "--cache", out,
                "--epochs", 1, "--out", tmp_path / "run")
    assert p.returncode == 2 and "incomplete" in p.stderr and "resume" in p.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fewer_cached_epochs_are_reused_in_order_and_said_once(small_digits, tmp_path):
    """E = 2 cached epochs, 3 training epochs: the note once, and 3 epochs trained. Which views each epoch
    replays (0, 1, 0) is checked view by view in test_every_shuffled_view_is_paired_with_its_own_teacher_target."""
    store = tmp_path / "two.zarr"
    cache_teacher(_cfg(small_digits, store, recipe="digits", epochs=2))
    p = run_cli("train-student", "--data", small_digits, "--student", "test_resnet", "--method", "kd", "--cache",
                store, "--epochs", 3, "--batch-size", 32, "--max-steps-per-epoch", 2, "--workers", 0,
                "--out", tmp_path / "run", "--quiet", check=True)
    assert p.stdout.count("replays cached epoch e mod 2") == 1 and "note:" in p.stdout
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]) == 3


def test_checkpoint_with_another_class_count(tmp_path, small_digits):
    import timm
    from safetensors.torch import save_file
    ckpt = tmp_path / "hundred.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=100).state_dict(), str(ckpt))
    # the guarantees (docs/design.md) promise the mismatching tensor by name
    with pytest.raises(UserError, match=r"shape of fc\.weight is \(100, \d+\) in the file, \(10, \d+\) in test_resnet"
                                        r" with 10 classes"):
        cache_teacher(_cfg(small_digits, tmp_path / "c.zarr", checkpoint=ckpt))
    assert not (tmp_path / "c.zarr").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hundred.safetensors"]  # nor a temporary store beside it


@pytest.mark.slow
def test_skip_policy_records_skipped_samples_and_training_excludes_them(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=12, size=(32, 32))
    data = tmp_path / "data"
    make_shards(str(src), data, shard_size=12, progress=False)
    make_shards(str(src), data, split="val", shard_size=12, progress=False)
    shard = data / "train-000001.tar"
    with tarfile.open(shard) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    victim = sorted(n for n in members if n.endswith((".jpg", ".png")))[4]
    with tarfile.open(shard, "w") as t:
        for name, blob in members.items():
            blob = b"garbage" if name == victim else blob
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    key = int(victim.split(".")[0])
    with pytest.raises(UserError, match="train-000001.tar does not match its checksum"):
        cache_teacher(_cfg(data, tmp_path / "sum.zarr", recipe="cifar"))
    # a shard whose bad sample predates its checksum (made by another tool): the error policy decides
    manifest = json.loads((data / "dataset.json").read_text())
    manifest["splits"]["train"]["shards"][1]["sha256"] = sha256_file(shard)
    (data / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"{key:09d}"):  # default policy: stop, naming the sample
        cache_teacher(_cfg(data, tmp_path / "stop.zarr", recipe="cifar"))
    out = tmp_path / "skip.zarr"
    cache_teacher(_cfg(data, out, recipe="cifar", on_error="skip"))
    store = CacheStore(out)
    store.check_complete()
    assert store.skipped() == {key}
    _trains_without(data, out, key, tmp_path)


def _trains_without(data, store_path, key: int, tmp_path) -> None:
    """train-student from a store that skipped sample `key` (tests/support/probe_cli.py records every batch it
    steps on): every other sample is a view of every epoch (35 of them: 5 whole batches of 7, none dropped),
    `key` of none (nor a mix partner), and each view's joined targets are its own row of the store."""
    import torch
    batches = probe_batches(tmp_path / "probe", "train-student", "--data", data, "--student", "test_resnet",
                            "--method", "kd", "--cache", store_path, "--epochs", 2, "--batch-size", 7, "--workers", 0,
                            "--out", tmp_path / "run", "--quiet")
    n = CacheStore(store_path).description.dataset.num_samples
    for epoch in (0, 1):
        seen = [b for b in batches if b["epoch"] == epoch]
        index = torch.cat([b["index"] for b in seen]).tolist()
        assert sorted(index) == sorted(set(range(n)) - {key}), (epoch, sorted(index))  # each once, `key` never
        if "partner" in seen[0]:
            assert key not in torch.cat([b["partner"] for b in seen]).tolist()
        for b in seen:  # the join: row (cached epoch, index) of the store, exactly
            t = stored_targets(store_path, epoch, b["index"].numpy())
            assert torch.equal(b["t_values"], t.values) and torch.equal(b["t_indices"], t.indices)
            assert torch.equal(b["t_lse"], t.lse) and torch.equal(b["t_label_log_odds"], t.label_log_odds)


@pytest.mark.slow
def test_a_temporary_folder_too_long_for_the_workers_sockets_is_refused_before_anything_runs(small_digits, tmp_path):
    """Loader workers pass batches through Unix sockets under TMPDIR; past 107 bytes a worker drops its batch
    and the loop waits forever (met in this suite under a longer pytest path): refused in one sentence instead,
    and --workers 0 (no sockets) still runs."""
    long_tmp = tmp_path / ("t" * max(1, 90 - len(str(tmp_path))))
    long_tmp.mkdir()
    env = {"TMPDIR": str(long_tmp)}
    for command, args in [("train-student", ["--data", small_digits, "--student", "test_resnet", "--method", "ce"]),
                          ("cache-teacher", ["--data", small_digits, "--teacher", "test_resnet"])]:
        out = tmp_path / command
        p = run_cli_process(command, *args, "--out", out, "--workers", 1, env=env)
        assert p.returncode == 2 and "too long a path for the loader workers' sockets" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and not out.exists(), p.stderr
        p = run_cli_process(command, *args, "--out", out, "--workers", 0, "--print-config", env=env)
        assert p.returncode == 0, p.stderr
