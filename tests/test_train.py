import json
import math
import os
import shutil
import signal
import subprocess
import time

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from conftest import ROOT, launch_cmd, launch_env, run_cli
from pipeline.augment import get_recipe
from pipeline.models import model_input
from pipeline.reader import ShardReader
from pipeline.views import EvalViews

VIT = ["--model-kwargs", "img_size=32", "--model-kwargs", "patch_size=4"]


@pytest.fixture(scope="session")
def teacher_run(digits, tmp_path_factory):
    """A CE-trained CNN teacher and its cache, through the real CLI."""
    root = tmp_path_factory.mktemp("e2e")
    run_cli("train-student", "--data", digits, "--student", "test_resnet", "--method", "ce", "--recipe", "digits",
            "--epochs", 2, "--batch-size", 64, "--lr", 0.1, "--out", root / "teacher", "--quiet", check=True)
    run_cli("cache-teacher", "--data", digits, "--teacher", "test_resnet", "--checkpoint",
            root / "teacher" / "model.safetensors", "--recipe", "digits", "--epochs", 1, "--topk", 5,
            "--out", root / "teacher.zarr", "--quiet", check=True)
    return root


@pytest.mark.slow
def test_end_to_end_ofa_student_exports_a_timm_loadable_model(digits, teacher_run):
    t_metrics = json.loads((teacher_run / "teacher" / "metrics.json").read_text())
    assert t_metrics["top1"] > 60  # the CE teacher learned the digits
    out = teacher_run / "ofa"
    proc = run_cli("train-student", "--data", digits, "--student", "test_vit", *VIT, "--method", "ofa",
                   "--cache", teacher_run / "teacher.zarr", "--teacher", "test_resnet", "--epochs", 1,
                   "--batch-size", 64, "--optimizer", "adamw", "--lr", 1e-3, "--out", out, "--quiet", check=True)
    assert "top1" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    hist = metrics["history"][0]
    assert {"train/ofa/final", "train/ofa/stage1", "train/ofa/stage4", "train/loss"} <= set(hist)
    assert (out / "metrics.csv").read_text().startswith("epoch,")
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["heads"] == ["stage1", "stage2", "stage3", "stage4"]
    assert config["resolved"]["cache_teacher"]["name"] == "test_resnet"
    # the exported bare student loads in timm and reproduces the run's own evaluation
    model = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=4,
                              checkpoint_path=str(out / "model.safetensors")).eval()
    assert not any(k.startswith("heads") for k in load_file(out / "model.safetensors"))
    recipe = get_recipe("digits")
    minput = model_input(model, recipe.input_size)
    correct = n = 0
    predicted = set()
    with torch.no_grad():
        for b in DataLoader(EvalViews(ShardReader(digits, "val"), recipe), batch_size=128):
            pred = model(minput(b["view"])).argmax(1)
            correct += (pred == b["label"]).sum().item()
            n += len(b["label"])
            predicted.update(pred.tolist())
    assert n == 360 and 100.0 * correct / n == pytest.approx(metrics["top1"], abs=1e-6)
    assert len(predicted) >= 2, predicted  # a model answering one class matches any export answering it (3 seen)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_kd_and_dkd_from_the_cache(digits, teacher_run, method):
    """With the label term off (--w-ce 0) the student can only learn the digits from the cached teacher."""
    out = teacher_run / method
    run_cli("train-student", "--data", digits, "--student", "test_resnet", "--method", method, "--cache",
            teacher_run / "teacher.zarr", "--w-ce", 0, "--epochs", 1, "--batch-size", 32, "--lr", 0.1,
            "--workers", 0, "--out", out, "--quiet", check=True)
    m = json.loads((out / "metrics.json").read_text())
    hist = m["history"][0]
    assert "train/ce" not in hist and hist[f"train/{method}/final"] == pytest.approx(hist["train/loss"])
    assert m["top1"] > 40  # chance is 10; the CE teacher itself is above 60


PROBE = ROOT / "tests" / "support" / "probe_cli.py"


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_from_its_step_checkpoint_to_the_same_weights(digits, teacher_run, tmp_path):
    """SIGKILL (no notice) while step 4 of epoch 2 runs, after the --save-every-steps 2 checkpoint of step 2:
    --resume restarts inside the epoch and ends with the uninterrupted run's weights and metrics."""
    args = ["train-student", "--data", digits, "--student", "test_convnext", "--method", "ofa", "--cache",
            teacher_run / "teacher.zarr", "--epochs", 2, "--batch-size", 64, "--lr", 0.05, "--workers", 1,
            "--max-steps-per-epoch", 6, "--quiet"]

    def start(out, probe, *extra, env=None):
        return launch_cmd(1, PROBE, *args, "--out", out, *extra), launch_env({"PROBE_DIR": str(probe), **(env or {})})

    def run(out, probe, *extra):
        cmd, env = start(out, probe, *extra)
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    full = run(tmp_path / "full", tmp_path / "pf")
    assert full.returncode == 0, full.stderr[-2000:]
    cut, probe = tmp_path / "cut", tmp_path / "pc"
    cmd, env = start(cut, probe, "--save-every-steps", 2, env={"PROBE_STALL": "1,3"})
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env,
                            start_new_session=True)
    t0 = time.time()
    while not (probe / "stalled-0").exists():
        assert proc.poll() is None and time.time() - t0 < 300, "the run never reached the kill point"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the process and its loader worker, no notice
    assert proc.wait(timeout=60) == -signal.SIGKILL
    progress = json.loads((cut / "progress.json").read_text())
    assert (progress["step"]["epoch"], progress["step"]["micro"]) == (1, 2)
    assert not (cut / "model.safetensors").exists()
    old = tmp_path / "old"  # the same run directory as another version of the tool would have left it
    shutil.copytree(cut, old)
    (old / "progress.json").write_text(json.dumps({**progress, "version": 1}))
    refused = run(old, tmp_path / "po", "--resume")
    assert refused.returncode == 2 and "was saved by another version of this tool (run state version 1" in \
        refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-2000:]
    assert json.loads((old / "progress.json").read_text())["version"] == 1 and not (old / "metrics.json").exists()
    resumed = run(cut, tmp_path / "pr", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "in epoch 2 of 2, after optimizer step 2" in resumed.stdout
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((tmp_path / "full" / "metrics.json").read_text())
    mb = json.loads((cut / "metrics.json").read_text())
    timings = ("train_seconds", "images_per_second", "loader_wait_seconds")
    untimed = [[{k: v for k, v in h.items() if k not in timings} for h in m["history"]]
               for m in (ma, mb)]
    assert untimed[0] == untimed[1] and ma["top1"] == mb["top1"]


@pytest.mark.slow
def test_mismatched_cache_and_checkpoint_are_refused(digits, small_digits, teacher_run, tmp_path):
    # a cache made from another dataset
    p = run_cli("train-student", "--data", small_digits, "--student", "test_resnet", "--method", "kd", "--cache",
                teacher_run / "teacher.zarr", "--teacher", "test_vit", "--recipe", "cifar", "--out", tmp_path / "a")
    assert p.returncode == 2
    for needle in ("dataset is", "teacher is test_resnet, requested test_vit", "augmentation recipe differs"):
        assert needle in p.stderr, p.stderr
    assert not (tmp_path / "a").exists()  # a refused request leaves nothing behind, not even the run directory
    # a checkpoint of another architecture
    p = run_cli("cache-teacher", "--data", digits, "--teacher", "test_convnext", "--checkpoint",
                teacher_run / "teacher" / "model.safetensors", "--recipe", "digits", "--out", tmp_path / "c.zarr")
    assert p.returncode == 2 and "does not match test_convnext" in p.stderr
    assert not (tmp_path / "c.zarr").exists()


def test_training_refuses_bad_requests(digits, tmp_path):
    p = run_cli("train-student", "--data", digits, "--student", "resnet_9000", "--method", "ce",
                "--out", tmp_path / "a")
    assert p.returncode == 2 and "resnet_9000" in p.stderr
    p = run_cli("train-student", "--data", digits, "--student", "test_resnet", "--method", "ofa",
                "--out", tmp_path / "b")
    assert p.returncode == 2 and "--cache" in p.stderr
    p = run_cli("train-student", "--data", digits, "--student", "test_resnet", "--method", "ofa",
                "--teacher-online", "test_resnet", "--stages", "1,7", "--recipe", "digits", "--out", tmp_path / "d")
    assert p.returncode == 2 and "stages [7]" in p.stderr
    p = run_cli("train-student", "--data", digits, "--student", "test_resnet", "--method", "ofa",
                "--teacher-online", "test_resnet", "--teacher-checkpoint", tmp_path / "nope.safetensors",
                "--recipe", "digits", "--out", tmp_path / "e")
    assert p.returncode == 2 and "nope.safetensors" in p.stderr
    for run in "abde":  # a refused request leaves nothing behind, not even the run directory
        assert not (tmp_path / run).exists(), run


@pytest.fixture(scope="session")
def full_cache(small_digits, tmp_path_factory):
    """A seeded random teacher in a file, and its cache with k = C = 10 (nothing left to reconstruct)."""
    from cache.teacher_pass import CacheConfig, cache_teacher
    from commands.options import build
    root = tmp_path_factory.mktemp("full")
    for seed in (1, 2):
        torch.manual_seed(seed)
        save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(root / f"t{seed}.safetensors"))
    for name, dtype in (("k10.zarr", "float16"), ("k10-float32.zarr", "float32")):
        cache_teacher(build(CacheConfig, data=small_digits, teacher="test_resnet", checkpoint=root / "t1.safetensors",
                            out=root / name, recipe="digits-mix", epochs=1, topk=10, batch_size=48, workers=0,
                            progress=False, value_dtype=dtype))
    return root


@pytest.mark.slow
def test_online_teacher_trains_to_the_weights_of_a_full_cache(small_digits, full_cache, tmp_path):
    """--teacher-online over the same views ends where training from a k = C cache ends: to float32 from a
    store of float32 values, and to the float16 rounding of the stored log-probabilities from the default one."""
    common = ["--data", small_digits, "--student", "test_convnext", "--method", "kd", "--epochs", 1,
              "--batch-size", 16, "--max-steps-per-epoch", 5, "--workers", 0, "--lr", 0.05, "--quiet"]
    online = ["--recipe", "digits-mix", "--view-epochs", 1, "--teacher-online", "test_resnet"]
    run_cli("train-student", *common, "--cache", full_cache / "k10.zarr", "--out", tmp_path / "cached", check=True)
    run_cli("train-student", *common, "--cache", full_cache / "k10-float32.zarr", "--out", tmp_path / "cached32",
            check=True)
    run_cli("train-student", *common, *online, "--teacher-checkpoint", full_cache / "t1.safetensors",
            "--out", tmp_path / "online", check=True)
    run_cli("train-student", *common, *online, "--teacher-checkpoint", full_cache / "t2.safetensors",
            "--out", tmp_path / "other", check=True)
    cfg = json.loads((tmp_path / "online" / "config.json").read_text())
    assert cfg["teacher"]["name"] == "test_resnet" and cfg["cache"] is None
    w = {name: load_file(tmp_path / name / "model.safetensors") for name in ("cached", "cached32", "online", "other")}

    def dist(a, b):
        return max((w[a][k].float() - w[b][k].float()).abs().max().item() for k in w[a] if w[a][k].is_floating_point())
    hist = [json.loads((tmp_path / n / "metrics.json").read_text())["history"] for n in ("cached", "online")]
    losses = [[h["train/kd/final"] for h in run] for run in hist]
    assert dist("cached32", "online") < 1e-6  # float32 values: float32 arithmetic only (measured 2.2e-8)
    # float16 log-probabilities of this random, near-uniform teacher (|log p| about 2.3): measured 1.5e-5
    assert dist("cached", "online") < 1e-4
    assert dist("online", "other") > 100 * dist("cached", "online")  # another teacher moves the weights far more
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def _lrs(updates: int, **cfg) -> list[float]:
    """The learning rate of each optimizer update under the schedule training builds (build_scheduler)."""
    from students.config import ScheduleConfig
    from students.run import build_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.pop("lr", 0.1))
    sched = build_scheduler(ScheduleConfig(**{k: v for k, v in cfg.items() if k != "epochs"}), cfg["epochs"], opt,
                            updates)
    lrs = []
    for n in range(updates * cfg["epochs"]):
        lrs.append(opt.param_groups[0]["lr"])  # the rate update n + 1 is taken with
        sched.step_update(num_updates=n + 1)
    return lrs + [opt.param_groups[0]["lr"]]


def test_learning_rate_schedule_warms_up_then_follows_the_cosine_to_min_lr():
    lrs = _lrs(5, epochs=2, lr=0.1, warmup_epochs=0.4, warmup_lr=0.0, min_lr=0.01)
    assert lrs[:2] == pytest.approx([0.0, 0.05])  # linear warm-up over 2 updates from warmup_lr
    # then timm's cosine over all 10 updates (warm-up included, as timm's train.py does) down to min_lr
    assert lrs[2:] == pytest.approx([0.01 + 0.5 * 0.09 * (1 + math.cos(math.pi * t / 10)) for t in range(2, 11)])
    assert lrs[-1] == pytest.approx(0.01)


def test_step_schedule_decays_by_the_rate_every_decay_epochs():
    lrs = _lrs(4, epochs=3, lr=0.1, sched="step", decay_epochs=1, decay_rate=0.5)
    assert lrs[:4] == pytest.approx([0.1] * 4) and lrs[4:8] == pytest.approx([0.05] * 4)
    assert lrs[8:12] == pytest.approx([0.025] * 4)


def _ce_run(data, out, *extra):
    run_cli("train-student", "--data", data, "--student", "test_vit", *VIT, "--method", "ce", "--recipe", "digits",
            "--epochs", 1, "--max-steps-per-epoch", 3, "--workers", 0, "--lr", 0.05, "--min-lr", 0.005,
            "--weight-decay", 0, "--out", out, "--quiet", *extra, check=True)
    return load_file(out / "model.safetensors"), json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_gradient_accumulation_equals_the_larger_batch_and_the_schedule_ends_at_min_lr(small_digits, tmp_path):
    """3 steps of 2 x 16 accumulated = 3 steps of 32 (a LayerNorm student: no batch statistics)."""
    big, m_big = _ce_run(small_digits, tmp_path / "b32", "--batch-size", 32)
    acc, m_acc = _ce_run(small_digits, tmp_path / "b16x2", "--batch-size", 16, "--grad-accum", 2)
    assert all(torch.allclose(big[k], acc[k], atol=1e-6, rtol=1e-5) for k in big)
    assert max((big[k] - acc[k]).abs().max().item() for k in big) < 1e-5
    for m in (m_big, m_acc):  # the cosine reached its floor after the 3 optimizer steps, not 6
        assert m["history"][0]["lr"] == pytest.approx(0.005)


@pytest.mark.slow
def test_ema_is_updated_exported_and_evaluated(small_digits, tmp_path):
    """The EMA is the update rule applied by hand after every optimizer step: e_0 = w_0, e_t = d e_(t-1) +
    (1 - d) w_t. A constant rate (step schedule, no decay within the run) makes a 1-step run's weights the
    2-step run's after its first step, so the two runs give w_1, w_2 and the EMA after each."""
    from pipeline.models import create_model
    d, const = 0.75, ["--sched", "step", "--decay-epochs", 30, "--ema-decay", 0.75, "--batch-size", 16]
    w1, _ = _ce_run(small_digits, tmp_path / "one", *const, "--max-steps-per-epoch", 1)
    w2, m = _ce_run(small_digits, tmp_path / "ema", *const, "--max-steps-per-epoch", 2)
    e1, ema = (load_file(tmp_path / run / "model_ema.safetensors") for run in ("one", "ema"))
    w0 = create_model("test_vit", 10, model_kwargs={"img_size": 32, "patch_size": 4}, role="student",
                      init_seed=0).state_dict()
    assert w0.keys() == w1.keys() == e1.keys() == ema.keys()
    for k in w0:
        torch.testing.assert_close(e1[k], d * w0[k] + (1 - d) * w1[k], rtol=1e-6, atol=1e-7, msg=k)
        torch.testing.assert_close(ema[k], d * e1[k] + (1 - d) * w2[k], rtol=1e-6, atol=1e-7, msg=k)
    moved = [k for k in w0 if not torch.equal(w0[k], w1[k]) and not torch.equal(w1[k], w2[k])]
    assert len(moved) > len(w0) // 2, moved  # most tensors moved at both steps: the rule is tested on them
    model = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=4).eval()
    model.load_state_dict(ema)
    recipe = get_recipe("digits")
    correct = n = 0
    with torch.no_grad():
        for b in DataLoader(EvalViews(ShardReader(small_digits, "val"), recipe), batch_size=48):
            correct += (model(model_input(model, recipe.input_size)(b["view"])).argmax(1) == b["label"]).sum().item()
            n += len(b["label"])
    assert n == 96 and 100.0 * correct / n == pytest.approx(m["ema_top1"], abs=1e-6)


@pytest.mark.slow
def test_a_resume_that_changes_what_the_run_computes_is_refused_and_one_that_changes_how_it_is_fed_runs(
        small_digits, digits, tmp_path):
    """--resume continues the run config.json describes: an option that changes what it computes (the learning
    rate, the loss, ...) is refused naming it, before anything is written; where the data sits, the loader's
    workers and how often it checks and saves may change."""
    import hashlib
    out = tmp_path / "run"
    args = ["train-student", "--data", small_digits, "--student", "test_resnet", "--method", "ce", "--recipe",
            "digits", "--epochs", 1, "--batch-size", 16, "--max-steps-per-epoch", 2, "--workers", 0, "--lr", 0.1,
            "--order-seed", 0, "--quiet", "--out", out]
    assert run_cli(*args).returncode == 0
    files = lambda: {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))  # noqa: E731
                     if p.is_file()}
    before = files()
    changed = run_cli(*args, "--resume", "--lr", 0.2, "--label-smoothing", 0.1)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert f"{out} was started with loss.label_smoothing 0.0 (now 0.1), optim.lr 0.1 (now 0.2); resume with the " \
           "same settings" in changed.stderr, changed.stderr
    assert files() == before
    fed = run_cli(*args, "--resume", "--workers", 1, "--check-signal-every", 3)
    assert fed.returncode == 0, fed.stderr[-2000:]
    # the same options resolving to something else (here: another number of classes) is refused as well
    import cli
    from pipeline.errors import UserError
    from students.checkpoint import check_same_options
    config = cli.parse("train-student", [str(a) for a in args[1:]])
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    check_same_options(out, config, resolved | {"processes": 8})  # the process count may change between epochs
    with pytest.raises(UserError, match=r"was started with resolved.num_classes 10 \(now 11\); resume with"):
        check_same_options(out, config, resolved | {"num_classes": 11})
    other = run_cli(*args, "--resume", "--data", digits)  # the data may move, but not change
    assert other.returncode == 2 and "was started with resolved.data.train " in other.stderr, other.stderr
    group = tmp_path / "group"  # where a --runs group's runs write may change; a key not recorded is not compared
    group.mkdir()
    saved = json.loads((out / "config.json").read_text())
    saved["resolved"] |= {"stream_runs": ["/a/run-0", "/a/run-1"]}
    saved.pop("seed")
    (group / "config.json").write_text(json.dumps(saved))
    check_same_options(group, config, resolved | {"stream_runs": ["/b/run-0", "/b/run-1"]})
