"""The authors' recipe details as options: the schedule stepped per epoch (timm 0.6.5's t_in_epochs) and a model's
own input normalisation (the authors' CIFAR teachers were trained with the CIFAR mean/std)."""

import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from cache.store import CacheStore
from commands.options import build
from conftest import ROOT, launch_cmd, launch_env, run_cli
from pipeline.augment import get_recipe
from pipeline.models import model_input
from pipeline.reader import ShardReader
from pipeline.views import UnitViews
from students.config import TrainConfig
from students.train import train_student
from tests.support.runner import set_up_one

COMMON = dict(student="test_resnet", method="ce", recipe="digits", batch_size=16, workers=0, max_steps_per_epoch=3,
              progress=False)
CIFAR_MEAN, CIFAR_STD = [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]


def test_a_per_epoch_schedule_runs_each_epoch_at_one_rate(small_digits, tmp_path):
    """--sched-step epoch: epoch 1 at the warm-up rate, then cosine at t = 1, 2 of 3 epochs (timm's t_in_epochs,
    no warm-up prefix); the default per-update schedule ends epoch 1 past its warm-up, at cosine(3 of 9 updates)."""
    lr, warm, epochs = 0.1, 0.01, 3
    kw = dict(epochs=epochs, lr=lr, warmup_lr=warm, warmup_epochs=1, **COMMON)
    per_epoch = train_student(build(TrainConfig, data=small_digits, out=tmp_path / "e", sched_step="epoch", **kw))
    cosine = [0.5 * lr * (1 + math.cos(math.pi * t / epochs)) for t in (1, 2)]
    assert [h["lr"] for h in per_epoch["history"]] == pytest.approx([warm, *cosine], rel=1e-9)
    per_update = train_student(build(TrainConfig, data=small_digits, out=tmp_path / "u", **kw))
    assert per_update["history"][0]["lr"] == pytest.approx(0.5 * lr * (1 + math.cos(math.pi * 3 / 9)), rel=1e-9)


@pytest.mark.slow
def test_a_per_epoch_schedule_resumes_to_the_same_weights(small_digits, tmp_path):
    """SIGTERM during epoch 2 of a per-epoch schedule: the state saved mid-epoch holds epoch 2's rate, and the
    resumed run ends with the uninterrupted run's weights and rates."""
    args = ["train-student", "--data", small_digits, "--student", "test_resnet", "--method", "ce", "--recipe",
            "digits", "--epochs", 3, "--batch-size", 16, "--max-steps-per-epoch", 4, "--workers", 0, "--lr", 0.1,
            "--warmup-epochs", 1, "--sched-step", "epoch", "--quiet"]
    probe = ROOT / "tests" / "support" / "probe_cli.py"
    full = subprocess.run(launch_cmd(1, probe, *args, "--out", tmp_path / "full"), capture_output=True, text=True,
                          cwd=ROOT, env=launch_env({"PROBE_DIR": str(tmp_path / "pf")}), timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    env = launch_env({"PROBE_DIR": str(tmp_path / "pc"), "PROBE_STALL": "1,2"})
    proc = subprocess.Popen(launch_cmd(1, probe, *args, "--out", tmp_path / "cut"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while not (tmp_path / "pc" / "stalled-0").exists():
        assert proc.poll() is None and time.time() - t0 < 300, "the run never reached step 2 of epoch 2"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
    resumed = subprocess.run(launch_cmd(1, probe, *args, "--out", tmp_path / "cut", "--resume"), capture_output=True,
                             text=True, cwd=ROOT, env=launch_env({"PROBE_DIR": str(tmp_path / "pr")}), timeout=600)
    assert resumed.returncode == 0 and "in epoch 2 of 3" in resumed.stdout, resumed.stderr[-2000:]
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lrs = [[h["lr"] for h in json.loads((tmp_path / d / "metrics.json").read_text())["history"]]
           for d in ("full", "cut")]
    assert lrs[0] == lrs[1] and len(set(lrs[0])) == 3


def test_a_students_own_normalisation_is_used_and_recorded(small_digits, tmp_path):
    cfg = build(TrainConfig, data=small_digits, out=tmp_path / "s", epochs=1, mean=CIFAR_MEAN, std=CIFAR_STD, **COMMON)
    _, run = set_up_one(cfg)
    views = torch.rand(2, 3, 32, 32)
    want = (views - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]
    assert torch.allclose(run.task.student_input(views), want, atol=1e-6)
    default = set_up_one(build(TrainConfig, data=small_digits, out=tmp_path / "d", epochs=1, **COMMON))[1]
    assert not torch.allclose(default.task.student_input(views), want, atol=1e-3)
    train_student(cfg)
    student = json.loads((tmp_path / "s" / "config.json").read_text())["student"]
    assert (student["mean"], student["std"]) == (CIFAR_MEAN, CIFAR_STD)


def test_bad_normalisation_is_refused_in_one_sentence(small_digits, tmp_path):
    p = run_cli("train-student", "--data", small_digits, "--student", "test_resnet", "--method", "ce", "--std",
                "0.2,0,0.2", "--out", tmp_path / "x")
    assert p.returncode == 2 and "--std needs 3 values (R, G, B), each > 0" in p.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_teacher_cached_with_its_own_normalisation(small_digits, tmp_path):
    """cache-teacher --mean/--std: the store records them, its log-sum-exps are the teacher's on views normalised
    that way (not timm's default), and verify-cache, which rebuilds the teacher from the record, agrees."""
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(tmp_path / "t.safetensors"))
    store = tmp_path / "t.zarr"
    run_cli("cache-teacher", "--data", small_digits, "--teacher", "test_resnet", "--checkpoint",
            tmp_path / "t.safetensors", "--recipe", "digits", "--epochs", 1, "--topk", 3, "--mean",
            ",".join(map(str, CIFAR_MEAN)), "--std", ",".join(map(str, CIFAR_STD)), "--workers", 0, "--out", store,
            "--quiet", check=True)
    s = CacheStore(store)
    assert (s.description.teacher.mean, s.description.teacher.std) == (CIFAR_MEAN, CIFAR_STD)
    model = timm.create_model("test_resnet", num_classes=10, checkpoint_path=str(tmp_path / "t.safetensors")).eval()
    items = list(UnitViews(ShardReader(small_digits, "train"), get_recipe("digits"), 0, 1, [0]))[:8]
    views = torch.stack([v["view"] for v in items])
    mean, std = torch.tensor(CIFAR_MEAN)[:, None, None], torch.tensor(CIFAR_STD)[:, None, None]
    with torch.no_grad():
        lse = torch.logsumexp(model((views - mean) / std), 1)
        lse_default = torch.logsumexp(model(model_input(model, 32)(views)), 1)
    cached = torch.from_numpy(s.read_epoch(0, 0, names=("lse",))["lse"][:8])
    assert torch.allclose(cached, lse, atol=1e-4) and not torch.allclose(cached, lse_default, atol=1e-2)
    run_cli("verify-cache", store, "--samples", 6, check=True)
