"""What made a run or a store is recorded with it: the code's commit, the configuration's hash, the data, the
teacher's weights, the caches, the machine; and the calibration error beside top-1."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import DataLoader

from cache.store import CacheStore
from commands.options import build
from conftest import ROOT
from pipeline.augment import get_recipe
from pipeline.models import model_input
from pipeline.provenance import code_label, code_version, config_hash
from pipeline.reader import ShardReader
from pipeline.views import EvalViews
from students.checkpoint import run_config_hash
from students.config import TrainConfig
from students.train import train_student

COMMON = dict(student="test_resnet", method="ce", epochs=1, batch_size=32, workers=0, lr=0.05, progress=False)


def git(*args) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_a_checkout_is_dirty_for_a_changed_source_file_but_not_for_a_rewritten_benchmark_record(tmp_path):
    """make bench writes each record into bench/results (tracked) while later benchmarks start: those writes must
    not mark the code as changed, or every record after the first would say dirty and the run's own record would
    be refused; a changed source file does mark it."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--shared", str(ROOT), str(clone)], check=True)
    shutil.copy(ROOT / "pipeline" / "provenance.py", clone / "pipeline" / "provenance.py")  # this code, committed
    subprocess.run(["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "sync",
                    "--allow-empty"], check=True)

    def dirty() -> bool:
        out = subprocess.run([sys.executable, "-c", "from pipeline.provenance import code_version as v; "
                              "print(v()['dirty'])"], capture_output=True, text=True, cwd=clone, check=True,
                             env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(clone)})
        return out.stdout.strip() == "True"
    assert not dirty()
    (clone / "bench" / "results" / "stop_check.json").write_text("{}\n")
    assert not dirty()
    with open(clone / "pipeline" / "provenance.py", "a") as f:
        f.write("# changed\n")
    assert dirty()


def test_code_version_is_this_checkouts_commit():
    v = code_version()
    assert v["commit"] == git("rev-parse", "HEAD")
    assert v["dirty"] == bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)bench/results"))
    assert code_label() == v["commit"] + ("-dirty" if v["dirty"] else "")


def test_code_outside_its_checkout_has_no_commit(tmp_path):
    """A copy of the package that is not this repository's checkout (pip-installed, say) claims no commit, even
    inside another git repository."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copytree(ROOT / "pipeline", tmp_path / "lib" / "pipeline")
    out = subprocess.run([sys.executable, "-c", "from pipeline.provenance import code_version as v; print(v())"],
                         cwd=tmp_path / "lib", capture_output=True, text=True, check=True).stdout
    assert out.strip() == "{'commit': None, 'dirty': None}"


def test_config_hash_covers_what_a_run_computes_not_where_it_writes(tmp_path):
    def cfg(out="a", **kw):
        return build(TrainConfig, data=tmp_path, out=tmp_path / out, recipe="digits", **{**COMMON, **kw})
    a = run_config_hash(cfg())
    assert a == run_config_hash(cfg("b")) == run_config_hash(cfg(progress=True))
    assert a != run_config_hash(cfg(lr=0.06)) and a != run_config_hash(cfg(seed=1))


def test_store_records_the_commit_that_made_it(small_store):
    assert CacheStore(small_store).description.versions["code"] == code_label()


def _ece_by_hand(model, data, recipe, num_bins=15) -> float:
    minput = model_input(model, recipe.input_size)
    probs, labels = [], []
    with torch.no_grad():
        for b in DataLoader(EvalViews(ShardReader(data, "val"), recipe), batch_size=64):
            probs.append(model(minput(b["view"])).softmax(1).double().numpy())
            labels.append(b["label"].numpy())
    p, y = np.concatenate(probs), np.concatenate(labels)
    conf, hit = p.max(1), p.argmax(1) == y
    ece = 0.0
    for i in range(num_bins):  # bins (i/15, (i+1)/15], the first one closed at 0
        sel = (conf > i / num_bins) & (conf <= (i + 1) / num_bins) | ((i == 0) & (conf == 0))
        if sel.any():
            ece += sel.sum() / len(y) * abs(hit[sel].mean() - conf[sel].mean())
    return 100 * ece


def test_calibration_error_by_bin():
    """Two bins off in opposite directions: 4 predictions at confidence 0.9 with 2 right (over-confident by 0.4)
    and 4 at 0.25 with 3 right (under-confident by 0.5): ECE = 0.5 * 0.4 + 0.5 * 0.5."""
    from students.evaluate import calibration_bins, calibration_error
    def logits_at(p: float) -> list[float]:  # 5 classes, class 0 at probability p
        rest = (1 - p) / 4
        return [float(np.log(p)), *[float(np.log(rest))] * 4]
    logits = torch.tensor([logits_at(0.9)] * 4 + [logits_at(0.25)] * 4)
    hit = torch.tensor([1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    bins = calibration_bins(logits, torch.zeros(8, dtype=torch.long), hit)
    assert bins[2].sum() == 8 and bins[2, 13] == 4 and bins[2, 3] == 4  # 0.9 in (13/15, 14/15], 0.25 in (3/15, 4/15]
    assert float(calibration_error(bins)) == pytest.approx(0.5 * 0.4 + 0.5 * 0.5, abs=1e-6)


@pytest.mark.slow
def test_run_records_its_provenance_and_calibration(small_digits, small_store, tmp_path):
    """A cached KD run: commit, configuration hash, data, validation samples, the store's identity and teacher;
    its ECE equals the one computed by hand from the exported model."""
    cfg = build(TrainConfig, data=small_digits, out=tmp_path / "kd", cache=str(small_store),
                **{**COMMON, "method": "kd"})
    summary = train_student(cfg)
    m = json.loads((tmp_path / "kd" / "metrics.json").read_text())
    p = m["provenance"]
    assert p["code"] == code_version() and p["code_at_start"] == code_version()
    assert p["config_hash"] == run_config_hash(cfg)
    config = json.loads((tmp_path / "kd" / "config.json").read_text())
    assert config["made_by"]["code"] == code_version()
    manifest = ShardReader(small_digits, "train").manifest
    assert p["data"] == {"train": manifest.split_hash("train"), "val": manifest.split_hash("val")}
    assert m["val_samples"] == p["val_samples"] == manifest.split("val").count == 96
    store = CacheStore(small_store)
    assert p["caches"] == [{"path": str(store.path), "id": config_hash(store.attrs), "code": code_label(),
                            "teacher_sha256": store.description.teacher.checkpoint_sha256}]
    assert {"cpu", "cores", "load_1min"} <= set(p["machine"])
    model = timm.create_model("test_resnet", num_classes=10, checkpoint_path=str(tmp_path / "kd" / "model.safetensors"))
    by_hand = _ece_by_hand(model.eval(), small_digits, get_recipe("digits-mix"))
    assert m["ece"] == summary["ece"] == pytest.approx(by_hand, abs=1e-6)
    assert 0 < m["ece"] < 100


def test_online_teacher_weights_are_recorded(small_digits, tmp_path):
    ckpt = tmp_path / "teacher.pth"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), ckpt)
    cfg = build(TrainConfig, data=small_digits, out=tmp_path / "kd", teacher_online="test_resnet",
                teacher_checkpoint=str(ckpt), max_steps_per_epoch=2, recipe="digits", **{**COMMON, "method": "kd"})
    train_student(cfg)
    p = json.loads((tmp_path / "kd" / "metrics.json").read_text())["provenance"]
    assert p["teacher_sha256"] == [hashlib.sha256(ckpt.read_bytes()).hexdigest()] and p["caches"] == []
