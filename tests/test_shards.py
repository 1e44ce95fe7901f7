import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import ROOT, SHARED_DATA, make_image_folder, need_shared, refused, run_cli
from pipeline.augment import get_recipe
from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from pipeline.reader import ShardReader, assign_shards, shard_order
from pipeline.shards import make_shards
from pipeline.views import TrainViews


def _samples(reader: ShardReader) -> list:
    """Every sample of the reader's split, shard by shard in stored order."""
    return [s for shard in range(reader.num_shards) for s in reader.read_shard(shard)]


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def test_image_folder_round_trip(image_folder, tmp_path):
    out = tmp_path / "ds"
    run_cli("shards", image_folder, out, "--shard-size", "4", "--quiet", check=True)
    m = load_manifest(out)
    assert m.classes == ["cat", "dog", "eel"]
    split = m.split("train")
    assert split.count == 21 and split.class_counts == [7, 7, 7] and len(split.shards) == 6
    # every original file's bytes are stored untouched, with its label, under its global index
    stored = {}
    for s in split.shards:
        members = _tar_members(out / s.name)
        assert hashlib.sha256((out / s.name).read_bytes()).hexdigest() == s.sha256
        for name, data in members.items():
            if name.endswith(".json"):
                key = name.split(".")[0]
                src = json.loads(data)["src"]
                img = members.get(f"{key}.jpg", members.get(f"{key}.png"))
                stored[src] = (int(key), int(members[f"{key}.cls"]), img)
                assert s.first <= int(key) < s.first + s.count
    assert len(stored) == 21
    for src, (_, label, data) in stored.items():
        assert data == (image_folder / src).read_bytes()
        assert label == ["cat", "dog", "eel"].index(src.split("/")[0])
    # the reader gives back decoded images, labels and indices for every sample
    seen = {}
    for sample in _samples(ShardReader(out)):
        seen[sample.index] = sample
    assert sorted(seen) == list(range(21))
    for src, (index, label, _) in stored.items():
        ref = np.array(Image.open(image_folder / src).convert("RGB"))
        assert seen[index].label == label
        assert torch.equal(seen[index].image, torch.from_numpy(ref).permute(2, 0, 1))


def test_digits_via_cli(tmp_path):
    from sklearn.datasets import load_digits
    out = tmp_path / "digits"
    proc = run_cli("shards", "digits", out, "--quiet", check=True)
    assert "1437 samples" in proc.stdout and "360 samples" in proc.stdout
    m = load_manifest(out)
    assert m.split("train").count == 1437 and m.split("val").count == 360 and m.num_classes == 10
    d = load_digits()
    for split in ("train", "val"):
        reader = ShardReader(out, split)
        for s in _samples(reader):
            # decoded 8x8 images are the sklearn digits exactly (lossless PNG of value * 255 / 16)
            gray = s.image[0].numpy()
            assert gray.shape == (8, 8)
            matches = np.flatnonzero((np.rint(d.images * 255 / 16).astype(np.uint8) == gray).all(axis=(1, 2)))
            assert any(d.target[i] == s.label for i in matches)


def test_conversion_is_byte_identical(image_folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_shards(str(image_folder), a, shard_size=5, progress=False)
    make_shards(str(image_folder), b, shard_size=5, progress=False)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_shard_order_is_a_function_of_seed_and_epoch():
    code = "from pipeline.reader import shard_order; print(shard_order(50, 3, 7))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={"PYTHONPATH": str(ROOT)}).stdout for _ in range(2)}
    assert len(outs) == 1 and outs.pop().strip() == str(shard_order(50, 3, 7))
    assert shard_order(50, 3, 7) != shard_order(50, 3, 8)
    assert sorted(shard_order(50, 3, 8)) == list(range(50))


def test_two_ranks_two_workers_see_every_sample_once(digits):
    """The training stream's shard order and rank/worker assignment: 2 ranks of 2 loader workers each make every
    sample's view exactly once per epoch (items unbatched, so none is dropped with a partial batch)."""
    reader = ShardReader(digits)
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            views = TrainViews(reader, get_recipe("digits"), 0, rank, 2, order_seed=5)
            views.set_epoch(epoch)
            seen += [int(v["index"]) for v in DataLoader(views, batch_size=None, num_workers=2)]
        assert sorted(seen) == list(range(1437))
    order = shard_order(8, 5, 0)
    parts = [assign_shards(order, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(sum(parts, [])) == list(range(8)) and all(parts)


# ------------------------------------------------------------------------------------------ errors

def _fails(proc, *needles):
    """Status 2 and one sentence naming every needle (click's usage errors: its box naming the option)."""
    msg = proc.stderr + proc.stdout
    assert proc.returncode == 2 and "Traceback" not in msg, msg
    if "Usage:" not in proc.stderr:
        refused(proc)
    for n in needles:
        assert n in msg, msg
    return msg


def test_error_missing_source(tmp_path):
    _fails(run_cli("shards", tmp_path / "nope", tmp_path / "out"), "nope", "does not exist")
    assert not (tmp_path / "out").exists()


def test_error_empty_source(tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(run_cli("shards", tmp_path / "empty", tmp_path / "out"), "empty", "no class folders")
    assert not (tmp_path / "out").exists()


def test_error_class_without_images(image_folder, tmp_path):
    (image_folder / "zebra").mkdir()
    (image_folder / "zebra" / "notes.txt").write_text("no images here")
    _fails(run_cli("shards", image_folder, tmp_path / "out"), "zebra", "no JPEG or PNG")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_error_corrupt_image_names_the_file(image_folder, tmp_path, damage):
    bad = image_folder / "dog" / "img001.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a jpeg at all" * 10)
    out = tmp_path / "out"
    _fails(run_cli("shards", image_folder, out, "--quiet"), "img001.jpg", "corrupt or truncated")
    assert not (out / "dataset.json").exists()  # nothing that looks complete


def test_error_out_holds_other_data(image_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    _fails(run_cli("shards", image_folder, out), "thesis.tex", "--overwrite")
    assert (out / "thesis.tex").read_text() == "precious"
    (out / "thesis.tex").unlink()
    run_cli("shards", image_folder, out, "--quiet", check=True)  # a second split is fine...
    _fails(run_cli("shards", image_folder, out), "already holds split 'train'", "--overwrite")  # ...same one is not
    run_cli("shards", image_folder, out, "--split", "val", "--quiet", check=True)
    assert set(load_manifest(out).splits) == {"train", "val"}
    run_cli("shards", image_folder, out, "--overwrite", "--quiet", check=True)
    assert set(load_manifest(out).splits) == {"train", "val"}


def test_error_unknown_option_value(image_folder, tmp_path):
    _fails(run_cli("shards", image_folder, tmp_path / "o", "--shard-size", "many"), "shard-size")
    make_shards(str(image_folder), tmp_path / "ds", progress=False)
    _fails(run_cli("cache-teacher", "--data", tmp_path / "ds", "--teacher", "test_resnet", "--out", tmp_path / "c",
                   "--recipe", "fancy"), "fancy")
    _fails(run_cli("shards", image_folder, tmp_path / "o2", "--split", "my-split"), "my-split")
    assert not any((tmp_path / n).exists() for n in ("o", "c", "o2"))  # a refused request writes nothing


def test_class_names_file(image_folder, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("cat\tfelis catus\ndog\tcanis familiaris\neel\tanguilla\nyak\tbos grunniens\n")
    out = tmp_path / "ds"
    make_shards(str(image_folder), out, class_names=words, progress=False)
    m = load_manifest(out)
    assert m.classes == ["felis catus", "canis familiaris", "anguilla"] and m.class_ids == ["cat", "dog", "eel"]
    words.write_text("cat\tfelis catus\n")
    with pytest.raises(UserError, match="no entry"):
        make_shards(str(image_folder), tmp_path / "ds2", class_names=words, progress=False)
    assert not (tmp_path / "ds2").exists()


# ---------------------------------------------------------------------------------- reader errors

def test_reader_detects_truncated_missing_and_tampered_shards(image_folder, tmp_path):
    out = tmp_path / "ds"
    make_shards(str(image_folder), out, shard_size=8, progress=False)
    reader = ShardReader(out)
    shard = out / reader.split.shards[1].name
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="train-000001.tar"):
        list(reader.read_shard(1))
    with pytest.raises(UserError, match=r"train-000001\.tar does not match its checksum"):
        ShardReader(out, verify=True).check_files()
    shard.unlink()
    with pytest.raises(UserError, match=r"train-000001\.tar listed in .* is missing"):
        list(reader.read_shard(1))
    with pytest.raises(UserError, match=r"train-000001\.tar listed in .* is missing"):
        ShardReader(out).check_files()


def test_reader_error_policy_on_corrupt_sample(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=4)
    out = tmp_path / "ds"
    make_shards(str(src), out, shard_size=20, progress=False)
    shard = out / "train-000000.tar"
    members = _tar_members(shard)
    victim = sorted(n for n in members if n.endswith((".jpg", ".png")))[2]
    with tarfile.open(shard, "w") as t:  # rewrite with one image broken
        for name, data in members.items():
            data = b"garbage" if name == victim else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    key = victim.split(".")[0]
    with pytest.raises(UserError, match=key):
        list(ShardReader(out).read_shard(0))
    skipped = []
    got = list(ShardReader(out, on_error="skip", on_skip=lambda k, why: skipped.append(k)).read_shard(0))
    assert skipped == [key] and len(got) == 11


# ------------------------------------------------------------------------------------ real CIFAR-10

def test_cifar10_slice(tmp_path):
    src = tmp_path / "cifar"
    wanted = {}
    with tarfile.open(need_shared(SHARED_DATA / "cifar10.tar.gz"), "r:gz") as t:
        for m in t:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[1] == "test":
                if wanted.get(parts[2], 0) < 20:
                    wanted[parts[2]] = wanted.get(parts[2], 0) + 1
                    (src / parts[2]).mkdir(parents=True, exist_ok=True)
                    (src / parts[2] / parts[3]).write_bytes(t.extractfile(m).read())
    out = tmp_path / "ds"
    run_cli("shards", src, out, "--split", "test", "--shard-size", "64", "--quiet", check=True)
    m = load_manifest(out)
    assert m.classes[:3] == ["airplane", "automobile", "bird"] and m.num_classes == 10
    assert m.split("test").count == 200 and m.split("test").class_counts == [20] * 10
    imgs = _samples(ShardReader(out, "test"))
    assert len(imgs) == 200 and all(tuple(s.image.shape) == (3, 32, 32) for s in imgs)


# ------------------------------------------------------------------------------------------ --max-size

def test_max_size_bounds_the_shorter_side_records_it_and_changes_the_split_identity(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=3, size=(60, 40))
    Image.new("RGB", (20, 50), (9, 9, 9)).save(src / "cat" / "small.jpg", quality=95)  # already small: kept as is
    plain, small = tmp_path / "plain", tmp_path / "small"
    run_cli("shards", src, plain, "--quiet", check=True)
    run_cli("shards", src, small, "--max-size", "24", "--quality", "80", "--quiet", check=True)
    run_cli("shards", src, tmp_path / "again", "--max-size", "24", "--quality", "80", "--quiet", check=True)
    info = load_manifest(small).split("train")
    assert (info.max_size, info.quality) == (24, 80) and load_manifest(plain).split("train").max_size is None
    assert json.loads((small / "dataset.json").read_text())["splits"]["train"]["max_size"] == 24
    assert load_manifest(small).split_hash("train") != load_manifest(plain).split_hash("train")
    assert (small / "train-000000.tar").read_bytes() == (tmp_path / "again" / "train-000000.tar").read_bytes()
    before = {s.index: s for s in ShardReader(plain).read_shard(0)}
    for s in ShardReader(small).read_shard(0):
        (w, h), (w0, h0) = s.size, before[s.index].size
        assert tuple(s.image.shape[1:]) == (h, w)
        if min(w0, h0) <= 24:
            assert s.data == before[s.index].data
        else:  # shorter side exactly 24, aspect kept to a pixel, same format
            assert min(w, h) == 24 and abs(w / h - w0 / h0) < 0.05 and s.data[:2] == before[s.index].data[:2]


@pytest.mark.parametrize("args, needle", [(["--max-size", "4"], "--max-size must be at least 8"),
                                          (["--quality", "80"], "--quality applies only to images resized"),
                                          (["--max-size", "64", "--quality", "100"], "--quality must be in 1..95")])
def test_bad_max_size_or_quality_is_refused_and_writes_nothing(image_folder, tmp_path, args, needle):
    _fails(run_cli("shards", image_folder, tmp_path / "out", *args, "--quiet"), needle)
    assert not (tmp_path / "out").exists()
