"""Options come from the config dataclasses: flags, --config files, --print-config, the shipped configs/."""

import dataclasses
import json

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from cache.teacher_pass import CacheConfig
from conftest import ROOT, run_cli
from pipeline.config import field_docs, flags_of
from students.task import LossConfig
from students.train import TrainConfig, trackers

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("command,cls", [("train-student", TrainConfig), ("cache-teacher", CacheConfig)])
def test_every_option_is_documented_once_and_offered_as_a_flag(command, cls):
    help_text = run_cli(command, "--help", check=True, env={"COLUMNS": "400"}).stdout
    for flag in flags_of(cls):
        spelling = (flag.decls[0] if flag.decls else f"--{flag.name.replace('_', '-')}").split("/")[0]
        assert spelling in help_text, spelling
        owner = LossConfig if flag.path[0] == "loss" else cls
        assert field_docs(owner).get(flag.name), f"{flag.name} has no docstring in {owner.__name__}"


def test_print_config_takes_flags_over_the_file_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"data": "d", "student": "test_resnet", "out": "o", "epochs": 3, "lr": 0.2,
                                 "loss": {"method": "kd", "temperature": 2.0}}))
    p = run_cli("train-student", "--config", f, "--epochs", 5, "--gamma", "1,1.5", "--print-config", check=True)
    got = yaml.safe_load(p.stdout)
    assert got["epochs"] == 5 and got["lr"] == 0.2 and got["batch_size"] == TrainConfig.batch_size
    assert got["loss"]["method"] == "kd" and got["loss"]["temperature"] == 2.0 and got["loss"]["gamma"] == [1.0, 1.5]
    assert not (tmp_path / "o").exists()  # printing runs nothing


def test_unknown_keys_and_bad_values_are_refused_naming_them(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: d\nstudent: s\nout: o\nloss: {methd: kd}\nlearning_rate: 1\n")
    p = run_cli("train-student", "--config", f)
    assert p.returncode == 2 and "loss.methd" in p.stderr and "learning_rate" in p.stderr
    p = run_cli("train-student", "--data", "d", "--student", "s", "--out", tmp_path / "o", "--sched", "linear")
    assert p.returncode == 2 and "--sched must be one of cosine, step" in p.stderr
    p = run_cli("cache-teacher", "--teacher", "test_resnet")
    assert p.returncode == 2 and "--data" in p.stderr and "--out" in p.stderr


@pytest.mark.slow
def test_a_runs_config_json_reruns_it_to_the_same_weights(digits, tmp_path):
    first = tmp_path / "first"
    run_cli("train-student", "--data", digits, "--student", "test_resnet", "--method", "ce", "--recipe", "digits",
            "--epochs", 1, "--max-steps-per-epoch", 3, "--batch-size", 32, "--workers", 0, "--lr", 0.1,
            "--label-smoothing", 0.1, "--quiet", "--out", first, check=True)
    again = tmp_path / "again"
    run_cli("train-student", "--config", first / "config.json", "--out", again, check=True)
    a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    c1, c2 = json.loads((first / "config.json").read_text()), json.loads((again / "config.json").read_text())
    assert {**c1, "out": None} == {**c2, "out": None}


def test_log_with_a_missing_tracker_is_refused(monkeypatch):
    import accelerate.utils

    from pipeline.errors import UserError
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(UserError, match=r"pip install '\.\[wandb\]'"):
        trackers("wandb")
    assert trackers(None) is None


@pytest.mark.slow
def test_log_with_tensorboard_writes_event_files(digits, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    run_cli("train-student", "--data", digits, "--student", "test_resnet", "--method", "ce", "--recipe", "digits",
            "--epochs", 1, "--max-steps-per-epoch", 2, "--batch-size", 32, "--workers", 0, "--quiet",
            "--log-with", "tensorboard", "--out", out, check=True)
    assert list(out.rglob("events.out.tfevents.*"))
    assert (out / "metrics.csv").is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_parse_and_print(path):
    assert len(CONFIGS) >= 4
    text = path.read_text()
    assert "Paper's top-1" in text and "Run" in text  # the row it reproduces and how to run it
    for command in ("cache-teacher", "train-student"):
        p = run_cli(command, "--config", path, "--print-config", check=True)
        printed = yaml.safe_load(p.stdout)
        assert printed["data"] == yaml.safe_load(text)[command]["data"]
    assert yaml.safe_load(text)["train-student"]["loss"]["ofa_form"] == "released"


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_run_one_step_on_the_digits(path, digits, tmp_path):
    """The real files, with only the sizes overridden: a tiny teacher and student, 32-px views, one step."""
    weights = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(weights))
    store, run = tmp_path / "t.zarr", tmp_path / "run"
    run_cli("cache-teacher", "--config", path, "--data", digits, "--teacher", "test_resnet", "--no-pretrained",
            "--teacher-classes", "null", "--checkpoint", weights,
            "--out", store, "--view-size", 32, "--epochs", 1, "--topk", 5, "--batch-size", 128, "--workers", 0,
            "--quiet", check=True)
    vit = "deit" in path.stem or "resmlp" in path.stem
    student = ["--student", "test_vit", "--model-kwargs", "img_size=32", "--model-kwargs", "patch_size=4"] if vit \
        else ["--student", "test_resnet"]
    run_cli("train-student", "--config", path, "--data", digits, *student, "--cache", store, "--teacher", "test_resnet",
            "--out", run, "--epochs", 1, "--max-steps-per-epoch", 1, "--batch-size", 16, "--workers", 0, "--quiet",
            check=True)
    cfg = json.loads((run / "config.json").read_text())
    file_cfg = yaml.safe_load(path.read_text())["train-student"]
    for key in ("optimizer", "lr", "weight_decay", "sched", "warmup_epochs", "clip_grad", "ema_decay"):
        assert cfg[key] == file_cfg.get(key, dataclasses.asdict(TrainConfig("d", "s", "o"))[key]), key
    assert cfg["loss"]["w_ofa"] == file_cfg["loss"]["w_ofa"] and cfg["loss"]["label_smoothing"] == 0.1
    assert json.loads((run / "metrics.json").read_text())["history"][0]["train/ofa/stage1"] > 0
