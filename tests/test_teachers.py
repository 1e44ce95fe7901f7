"""Real teachers: timm's pretrained loader (--pretrained, --pretrained-file), the teacher's own
label space (--teacher-classes) and fine-tuning (train-student --pretrained).

Nothing is downloaded: a timm model's weights are saved to a file and loaded through --pretrained-file,
the same timm loader as the hub. Models are timm's tiny `test_*` family; data are real shards.
"""

import json
import shutil
import tarfile

import numpy as np
import pytest
import timm
import torch
import zarr
from safetensors.torch import load_file, save_file

from cache.format import NAMES
from cache.teacher import ClassMap
from conftest import SHARED_DATA, need_shared, run_cli, run_cli_process
from pipeline.manifest import Manifest, sha256_file
from pipeline.shards import make_shards

TINY = SHARED_DATA / "tiny-imagenet-200.tar.gz"
ROWS = [917, 3, 455, 0, 999, 128, 640, 77, 301, 512]  # teacher output of digit class 0..9 in the test label space


@pytest.fixture(scope="session")
def teacher_files(tmp_path_factory):
    """A 1000-output test_resnet saved as a pretrained file, the same with its classifier cut to ROWS,
    a label-space file (1000 ids, digits '0'..'9' at ROWS) and another 1000-output file (other weights)."""
    d = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(1234)  # not create_model's init seed (0): loaded weights differ from an unloaded model's
    full = timm.create_model("test_resnet", num_classes=1000).state_dict()
    save_file(full, str(d / "full.safetensors"))
    sliced = {**full, "fc.weight": full["fc.weight"][ROWS].clone(), "fc.bias": full["fc.bias"][ROWS].clone()}
    save_file(sliced, str(d / "sliced.safetensors"))
    torch.manual_seed(4321)
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), d / "other.pth")
    ids = [f"t{i:04d}" for i in range(1000)]
    for digit, row in enumerate(ROWS):
        ids[row] = str(digit)
    (d / "classes.txt").write_text("\n".join(ids) + "\n")
    return d


def _cache(data, out, *args, check=True):
    return run_cli("cache-teacher", "--data", data, "--teacher", "test_resnet", "--out", out, "--recipe", "digits",
                   "--epochs", 2, "--topk", 5, "--batch-size", 64, "--workers", 0, "--quiet", *args, check=check)


@pytest.fixture(scope="session")
def mapped_store(small_digits, teacher_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("mapped") / "mapped.zarr"
    _cache(small_digits, out, "--pretrained-file", teacher_files / "full.safetensors",
           "--teacher-classes", teacher_files / "classes.txt")
    return out


def test_tiny_imagenet_wnids_all_map_into_imagenet_1k():
    need_shared(TINY)
    with tarfile.open(TINY) as tar:
        member = next(m for m in tar if m.name.endswith("/wnids.txt"))
        wnids = tar.extractfile(member).read().decode().split()
    assert len(wnids) == 200
    cmap = ClassMap.resolve("imagenet-1k", Manifest(name="tiny", classes=sorted(wnids)))
    synsets = timm.data.ImageNetInfo("imagenet-1k").label_names()
    assert cmap.num_outputs == 1000 and len(set(cmap.indices)) == 200
    assert [synsets[i] for i in cmap.indices] == sorted(wnids)  # each class lands on its own ImageNet output


def test_mapped_teacher_cache_is_bit_identical_to_sliced_classifier(small_digits, teacher_files, mapped_store,
                                                                     tmp_path):
    sliced = tmp_path / "sliced.zarr"
    _cache(small_digits, sliced, "--pretrained-file", teacher_files / "sliced.safetensors")
    a, b = zarr.open_group(str(mapped_store), mode="r"), zarr.open_group(str(sliced), mode="r")
    for name in NAMES:
        x, y = a[name][...], b[name][...]
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert int(a["topk_indices"][...].max()) < 10  # dataset class indices, not teacher outputs
    desc = dict(a.attrs)["teacher"]
    assert desc["classes"] == {"source": str(teacher_files / "classes.txt"), "num_outputs": 1000, "indices": ROWS}
    assert desc["weights"]["source"] == "file" and desc["weights"]["tag"] == "test_resnet.r160_in1k"
    assert desc["weights"]["sha256"] == desc["checkpoint_sha256"] == sha256_file(teacher_files / "full.safetensors")
    assert dict(b.attrs)["teacher"]["classes"] is None


def test_teacher_label_space_refusals(small_digits, teacher_files, tmp_path):
    full = teacher_files / "full.safetensors"
    p = _cache(small_digits, tmp_path / "a.zarr", "--pretrained-file", full, check=False)
    assert p.returncode == 2 and "1000 outputs" in p.stderr and "--teacher-classes" in p.stderr, p.stderr
    assert not (tmp_path / "a.zarr").exists()
    p = _cache(small_digits, tmp_path / "b.zarr", "--pretrained-file", full, "--teacher-classes", "imagenet-1k",
               check=False)
    assert p.returncode == 2 and "10 of the 10 classes" in p.stderr and "e.g. 0, 1, 2, 3, 4" in p.stderr, p.stderr
    assert "fine-tune" in p.stderr
    short = tmp_path / "short.txt"
    short.write_text("\n".join(c for c in (teacher_files / "classes.txt").read_text().split() if c != "t0001"))
    p = _cache(small_digits, tmp_path / "c.zarr", "--pretrained-file", full, "--teacher-classes", short, check=False)
    assert p.returncode == 2 and "1000 outputs" in p.stderr and "lists 999" in p.stderr, p.stderr
    p = _cache(small_digits, tmp_path / "d.zarr", "--pretrained-file", full, "--checkpoint", full, check=False)
    assert p.returncode == 2 and "not both" in p.stderr, p.stderr
    for out in "abcd":  # a refused request writes nothing
        assert not (tmp_path / f"{out}.zarr").exists(), out


@pytest.mark.slow
def test_pretrained_without_the_hub_names_pretrained_file(small_digits, teacher_files, tmp_path):
    offline = {"HF_HUB_OFFLINE": "1"}  # read when huggingface_hub is imported: a real process
    p = run_cli_process("cache-teacher", "--data", small_digits, "--teacher", "test_resnet", "--out",
                        tmp_path / "h.zarr", "--recipe", "digits", "--pretrained", "--teacher-classes",
                        teacher_files / "classes.txt", "--quiet", env=offline)
    assert p.returncode == 2, p.stderr
    msg = p.stderr.strip().splitlines()
    assert len(msg) == 1 and "--pretrained-file" in msg[0] and "hub" in msg[0], p.stderr
    assert not (tmp_path / "h.zarr").exists()
    p = run_cli_process("train-student", "--data", small_digits, "--student", "test_resnet", "--pretrained",
                        "--method", "ce", "--recipe", "digits", "--epochs", 1, "--out", tmp_path / "run", "--quiet",
                        env=offline)
    assert p.returncode == 2 and "student 'test_resnet'" in p.stderr and "--pretrained-file" in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_hub_weights_are_recorded_and_equal_the_same_file(small_digits, teacher_files, mapped_store, tmp_path):
    """--pretrained through the Hugging Face cache (offline, so nothing is downloaded): the file timm read is
    recorded with its sha256, and the cache is the one --pretrained-file makes from the same bytes."""
    snapshot = tmp_path / "hf" / "models--timm--test_resnet.r160_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    shutil.copy(teacher_files / "full.safetensors", snapshot / "model.safetensors")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}  # read at import: a real process
    store = tmp_path / "hub.zarr"
    p = run_cli_process("cache-teacher", "--data", small_digits, "--teacher", "test_resnet", "--out", store,
                        "--recipe", "digits", "--epochs", 2, "--topk", 5, "--batch-size", 64, "--workers", 0, "--quiet",
                        "--pretrained", "--teacher-classes", teacher_files / "classes.txt", env=env)
    assert p.returncode == 0, p.stderr
    w = json.loads((store / "zarr.json").read_text())["attributes"]["teacher"]["weights"]
    hub_file = snapshot / "model.safetensors"
    assert (w["source"], w["tag"], w["hf_hub_id"]) == ("hub", "test_resnet.r160_in1k", "timm/test_resnet.r160_in1k")
    assert w["file"] == str(hub_file) and w["sha256"] == sha256_file(hub_file)
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(mapped_store), mode="r")
    for name in NAMES:
        assert np.array_equal(a[name][...], b[name][...]), name
    verified = run_cli_process("verify-cache", store, "--samples", 4, env=env, check=True)
    assert "OK" in verified.stdout  # the weights recorded: the hub file


def test_other_weights_or_class_map_are_refused(small_digits, teacher_files, mapped_store, tmp_path):
    classes = teacher_files / "classes.txt"
    # resuming the same store with other weights
    p = _cache(small_digits, mapped_store, "--pretrained-file", teacher_files / "other.pth",
               "--teacher-classes", classes, check=False)
    assert p.returncode == 2 and "teacher weights" in p.stderr, p.stderr
    # verify-cache: by default the recorded file and class map; other weights are refused
    p = run_cli("verify-cache", mapped_store, "--samples", 8, check=True)
    assert "OK" in p.stdout
    p = run_cli("verify-cache", mapped_store, "--samples", 8, "--pretrained-file", teacher_files / "other.pth")
    assert p.returncode == 2 and "not the ones" in p.stderr, p.stderr
    # training from the cache with a class map other than the cache's
    moved = tmp_path / "moved.txt"
    ids = classes.read_text().split()
    ids[ROWS[0]], ids[5] = ids[5], ids[ROWS[0]]
    moved.write_text("\n".join(ids))
    p = run_cli("train-student", "--data", small_digits, "--student", "test_convnext", "--method", "kd",
                "--cache", mapped_store, "--teacher-classes", moved, "--epochs", 1, "--max-steps-per-epoch", 1,
                "--batch-size", 16, "--workers", 0, "--out", tmp_path / "run", "--quiet")
    assert p.returncode == 2 and "teacher class map" in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()


def test_online_teacher_uses_the_same_class_map(small_digits, teacher_files, mapped_store, tmp_path):
    base = ["train-student", "--data", small_digits, "--student", "test_convnext", "--method", "kd",
            "--teacher-online", "test_resnet", "--teacher-pretrained-file", teacher_files / "full.safetensors",
            "--recipe", "digits", "--epochs", 1, "--max-steps-per-epoch", 2, "--batch-size", 16, "--workers", 0,
            "--quiet"]
    p = run_cli(*base, "--out", tmp_path / "unmapped")
    assert p.returncode == 2 and "--teacher-classes" in p.stderr, p.stderr
    run_cli(*base, "--teacher-classes", teacher_files / "classes.txt", "--out", tmp_path / "run", check=True)
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    cached = json.loads((mapped_store / "zarr.json").read_text())["attributes"]["teacher"]
    assert resolved["online_teacher"]["classes"] == cached["classes"]
    assert resolved["online_teacher"]["weights"]["sha256"] == cached["weights"]["sha256"]


def test_online_teacher_logits_match_the_cache(small_digits, teacher_files, mapped_store, tmp_path):
    """The teacher `--teacher-online` builds gives the cached top-k for the same views (one Teacher path)."""
    from torch.utils.data import DataLoader

    from cache.targets import CachedTeacher
    from commands.options import build
    from students.config import TrainConfig
    from students.run import build_task
    from students.stream import open_stream
    cfg = build(TrainConfig, data=small_digits, student="test_convnext", out=tmp_path / "x", method="kd",
                teacher_online="test_resnet", teacher_pretrained_file=teacher_files / "full.safetensors",
                teacher_classes=str(teacher_files / "classes.txt"), recipe="digits", view_epochs=2, workers=0)
    stream_cfg, run_cfg = cfg.split()
    task = build_task(run_cfg, open_stream(stream_cfg, 0, 1), "cpu")
    views = CachedTeacher(mapped_store).views(small_digits, 0)
    batch = next(iter(DataLoader(views, batch_size=32)))
    online = task.teacher_logits(batch)  # [32, 10]
    values, indices = torch.log_softmax(online, 1).topk(5, dim=1)  # the cache keeps log-probabilities
    assert online.shape == (32, 10)
    assert torch.equal(indices, batch["teacher"].indices)
    assert torch.allclose(values, batch["teacher"].values, atol=2e-3, rtol=1e-3)  # fp16 in the cache


def test_student_fine_tunes_from_pretrained_file(small_digits, teacher_files, tmp_path):
    """train-student --pretrained(-file): timm's loader, a new classifier for the dataset's classes."""
    full = teacher_files / "full.safetensors"
    run_cli("train-student", "--data", small_digits, "--student", "test_resnet", "--method", "ce",
            "--pretrained-file", full, "--recipe", "digits", "--epochs", 1, "--max-steps-per-epoch", 1,
            "--batch-size", 16, "--workers", 0, "--lr", 1e-9, "--out", tmp_path / "ft", "--quiet", check=True)
    resolved = json.loads((tmp_path / "ft" / "config.json").read_text())["resolved"]
    assert resolved["student_weights"]["source"] == "file"
    assert resolved["student_weights"]["sha256"] == sha256_file(full)
    assert resolved["student_weights"]["weights_num_classes"] == 1000
    got, want = load_file(str(tmp_path / "ft" / "model.safetensors")), load_file(str(full))
    assert got["fc.weight"].shape == (10, want["fc.weight"].shape[1])  # timm replaced the 1000-class head
    assert torch.allclose(got["conv1.0.weight"], want["conv1.0.weight"], atol=1e-6)  # the body is the file's


def test_cka_takes_pretrained_files(small_digits, teacher_files, tmp_path):
    full = teacher_files / "full.safetensors"

    def cka(*args, out):
        run_cli("cka", "--model-a", "test_resnet", "--model-b", "test_resnet", "--data", small_digits, "--split",
                "train", "--samples", 16, "--batch-size", 16, "--mode", "full", "--recipe", "digits", "--out", out,
                *args, check=True)
        return np.diag(json.loads((out / "cka.json").read_text())["matrix"])

    assert np.allclose(cka("--pretrained-file-a", full, "--pretrained-file-b", full, out=tmp_path / "same"), 1.0)
    assert not np.allclose(cka("--pretrained-file-a", full, out=tmp_path / "init"), 1.0, atol=1e-3)  # vs random init
    p = run_cli("cka", "--model-a", "test_resnet", "--pretrained-file-a", full, "--checkpoint-a", full,
                "--model-b", "test_resnet", "--data", small_digits, "--split", "train", "--samples", 16,
                "--recipe", "digits", "--out", tmp_path / "cka2")
    assert p.returncode == 2 and "not both" in p.stderr, p.stderr


@pytest.mark.slow
def test_tiny_imagenet_slice_with_a_mapped_imagenet_teacher(teacher_files, tmp_path):
    """shards of a Tiny-ImageNet slice -> cache from a 1000-class teacher mapped by wnid -> OFA student."""
    need_shared(TINY)
    src, per_class = tmp_path / "src", {"train": 24, "val": 6}
    taken: dict[str, int] = {}
    with tarfile.open(TINY) as tar:  # the first 4 classes of the archive's train part (grouped by class: fast)
        for m in tar:
            parts = m.name.split("/")  # tiny-imagenet-200/train/<wnid>/<file>.JPEG
            if not (m.isfile() and len(parts) == 4 and parts[1] == "train"):
                continue
            wnid = parts[2]
            if wnid not in taken and len(taken) == 4:
                break
            n = taken[wnid] = taken.get(wnid, 0) + 1
            if n <= 30:  # 24 to train on, 6 held out as the val split
                split = "train" if n <= per_class["train"] else "val"
                (src / split / wnid).mkdir(parents=True, exist_ok=True)
                (src / split / wnid / parts[-1]).write_bytes(tar.extractfile(m).read())
    picked = sorted(taken)
    data = tmp_path / "data"
    for split in per_class:  # the class ids in dataset.json are the folder names: wnids
        make_shards(str(src / split), data, split=split, shard_size=24, progress=False)
    store = tmp_path / "tiny.zarr"
    run_cli("cache-teacher", "--data", data, "--teacher", "test_resnet", "--out", store, "--recipe", "tiny-cnn",
            "--view-size", 32, "--epochs", 1, "--topk", 3, "--workers", 0, "--quiet",
            "--pretrained-file", teacher_files / "full.safetensors", "--teacher-classes", "imagenet-1k", check=True)
    synsets = timm.data.ImageNetInfo("imagenet-1k").label_names()
    classes = json.loads((store / "zarr.json").read_text())["attributes"]["teacher"]["classes"]
    assert [synsets[i] for i in classes["indices"]] == picked
    _ofa_is_the_loss_on_the_mapped_teacher(data, store, tmp_path)


def _ofa_is_the_loss_on_the_mapped_teacher(data, store, tmp_path):
    """One OFA step from the mapped cache (tests/support/probe_cli.py records its batch): the final logits' term the
    run reports is ofa_loss on the student's initial logits against the store's rows over the 4 dataset classes."""
    from cache.targets import CachedTeacher
    from conftest import probe_batches, stored_targets
    from pipeline.models import create_model, model_input
    from students.losses import ofa_loss, soft_target, target_class
    out = tmp_path / "run"
    (b,) = probe_batches(tmp_path / "probe", "train-student", "--data", data, "--student", "test_convnext", "--method",
                         "ofa", "--cache", store, "--teacher-classes", "imagenet-1k", "--epochs", 1,
                         "--max-steps-per-epoch", 1, "--batch-size", 16, "--workers", 0, "--out", out, "--quiet")
    z = stored_targets(store, 0, b["index"].numpy()).logits(b["label"], b["partner_label"], 4)
    student = create_model("test_convnext", 4, role="student", init_seed=0).train()
    with torch.no_grad():
        s = student(model_input(student, CachedTeacher(store).recipe.input_size)(b["view"]))
    c = target_class(b["label"], b["partner_label"], b["lam"])
    want = ofa_loss(s, z, c, 1.0, 1.0, "paper", soft_target(b["label"], b["partner_label"], b["lam"], 4)).item()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 1
    assert metrics["history"][0]["train/ofa/final"] == pytest.approx(want, rel=1e-5), (metrics["history"], want)
