"""Options come from the config dataclasses: flags, --config files, --print-config, the shipped configs/."""

import dataclasses
import json

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import cli
from commands.options import field_docs, flags_of
from conftest import ROOT, need_module, run_cli
from students.config import OptimConfig, RunConfig, ScheduleConfig, StreamConfig
from students.run import trackers

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# the stable flags: users' scripts pass them, so each must keep its name
STABLE_FLAGS = {
    "shards": "--class-names --name --order-seed --overwrite --quiet --shard-size --split",
    "cache-teacher": "--batch-size --checkpoint --config --data --epochs --input-size --model-kwargs --no-overwrite "
                     "--no-pretrained --on-error --out --overwrite --pretrained --pretrained-file --print-config "
                     "--progress --quiet --recipe --seed --split --teacher --teacher-classes --topk --view-size "
                     "--workers",
    "inspect-cache": "--json",
    "verify-cache": "--checkpoint --data --pretrained --pretrained-file --samples --seed",
    "train-student": "--batch-size --block-indices --cache --clip-grad --config --data --decay-epochs --decay-rate "
                     "--dkd-alpha --dkd-beta --dkd-warmup-epochs --ema-decay --epochs --gamma --grad-accum --head-kind "
                     "--input-size --label-smoothing --log-with --lr --max-steps-per-epoch --method --min-lr "
                     "--mixed-precision --model-kwargs --momentum --no-pretrained --no-resume --no-teacher-pretrained "
                     "--ofa-form --on-error --optimizer --out --pretrained --pretrained-file --print-config --progress "
                     "--quiet --recipe --resume --sched --seed --stage-weights --stages --student --teacher "
                     "--teacher-checkpoint --teacher-classes --teacher-input-size --teacher-model-kwargs "
                     "--teacher-online --teacher-pretrained --teacher-pretrained-file --temperature --train-split "
                     "--val-split --view-epochs --view-seed --view-size --w-ce --w-kd --w-ofa --warmup-epochs "
                     "--warmup-lr --weight-decay --workers",
    "demo": "--epochs --max-steps-per-epoch --out --processes --quiet --seeds --teacher-epochs",
    "cka": "--batch-size --checkpoint-a --checkpoint-b --data --every-block --mode --model-a --model-b "
           "--model-kwargs-a --model-kwargs-b --out --pretrained-a --pretrained-b --pretrained-file-a "
           "--pretrained-file-b --recipe --samples --split --view-size",
}


def test_every_command_is_built_from_one_configuration():
    assert set(cli.COMMANDS) == set(STABLE_FLAGS)
    for command, (config, _) in cli.COMMANDS.items():
        assert dataclasses.is_dataclass(config), command


@pytest.mark.parametrize("command", sorted(STABLE_FLAGS))
def test_every_option_is_documented_once_and_offered_as_a_flag(command):
    help_text = run_cli(command, "--help", check=True, env={"COLUMNS": "400"}).stdout
    words = set(help_text.replace("/", " ").split())  # whole flags, not substrings of longer ones
    for flag in flags_of(cli.COMMANDS[command][0]):
        if flag.argument:
            assert flag.dest.upper() in words, flag.dest
            continue
        spelling = (flag.decls[0] if flag.decls else f"--{flag.dest.replace('_', '-')}").split("/")[0]
        assert spelling in words, spelling
        assert field_docs(flag.owner).get(flag.path[-1]), f"{flag.path} has no docstring in {flag.owner.__name__}"
    missing = [f for f in STABLE_FLAGS[command].split() if f not in words]
    assert not missing, f"{command} lost flags {missing}"


def test_a_group_is_declared_once_and_reused_under_other_flags():
    """The weight options live in one dataclass; each command mounts them under its own flag names."""
    from pipeline.models import Weights
    where = {c: [f for f in flags_of(cfg) if f.owner is Weights] for c, (cfg, _) in cli.COMMANDS.items()}
    spelled = {c: sorted(f.dest for f in fl) for c, fl in where.items() if fl}
    assert spelled == {
        "cache-teacher": ["checkpoint", "pretrained", "pretrained_file"],
        "verify-cache": ["checkpoint", "pretrained", "pretrained_file"],
        "train-student": ["checkpoint", "pretrained", "pretrained_file", "teacher_checkpoint", "teacher_pretrained",
                          "teacher_pretrained_file"],
        "cka": ["checkpoint_a", "checkpoint_b", "pretrained_a", "pretrained_b", "pretrained_file_a",
                "pretrained_file_b"]}
    # and a change to a field's docstring shows everywhere it is mounted
    doc = field_docs(Weights)["pretrained_file"]
    for fl in where.values():
        assert all(doc[1:] in f.help for f in fl if f.path[-1] == "pretrained_file")


def test_print_config_takes_flags_over_the_file_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"data": "d", "student": {"name": "test_resnet"}, "out": "o", "epochs": 3, "cache": "c",
                                 "optim": {"lr": 0.2}, "loss": {"method": "kd", "temperature": 2.0}}))
    p = run_cli("train-student", "--config", f, "--epochs", 5, "--gamma", "1,1.5", "--print-config", check=True)
    got = yaml.safe_load(p.stdout)
    assert got["epochs"] == 5 and got["optim"]["lr"] == 0.2 and got["batch_size"] == StreamConfig.batch_size
    assert got["student"]["name"] == "test_resnet"
    assert got["loss"]["method"] == "kd" and got["loss"]["temperature"] == 2.0 and got["loss"]["gamma"] == [1.0, 1.5]
    assert not (tmp_path / "o").exists()  # printing runs nothing


def test_a_flat_file_of_flag_names_reads_as_the_nested_one(tmp_path):
    """config.json files written before options were grouped keep working: flat keys are flag names."""
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text(yaml.safe_dump({"data": "d", "student": "test_resnet", "out": "o", "lr": 0.2, "sched": "step",
                                    "teacher_online": "test_convnext", "teacher_pretrained_file": "t.pth",
                                    "view_seed": 3, "teacher": None, "loss": {"method": "kd"}, "resolved": {}}))
    nested.write_text(yaml.safe_dump({"data": "d", "student": {"name": "test_resnet"}, "out": "o",
                                      "optim": {"lr": 0.2}, "schedule": {"sched": "step"},
                                      "teacher": {"name": "test_convnext", "weights": {"pretrained_file": "t.pth"}},
                                      "views": {"seed": 3}, "loss": {"method": "kd"}}))
    a = run_cli("train-student", "--config", flat, "--print-config", check=True).stdout
    b = run_cli("train-student", "--config", nested, "--print-config", check=True).stdout
    assert a == b and yaml.safe_load(a)["teacher"]["weights"]["pretrained_file"] == "t.pth"


def test_a_config_json_from_before_several_caches_reads_its_cache_as_a_list_of_one(tmp_path):
    """Runs made before --cache became repeatable recorded `cache` as one string; their config.json still
    reproduces them: the string is a list of that one cache, exactly as the flag given once."""
    old = tmp_path / "config.json"
    old.write_text(json.dumps({"data": "d", "student": {"name": "test_resnet"}, "out": "o",
                               "loss": {"method": "ofa"}, "cache": "runs/t.zarr", "resolved": {}}))
    a = yaml.safe_load(run_cli("train-student", "--config", old, "--print-config", check=True).stdout)
    b = yaml.safe_load(run_cli("train-student", "--data", "d", "--student", "test_resnet", "--out", "o",
                               "--method", "ofa", "--cache", "runs/t.zarr", "--print-config", check=True).stdout)
    assert a["cache"] == ["runs/t.zarr"] and a == b


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
    assert c1["made_by"]["code"] == c2["made_by"]["code"]  # the same commit made both (date and load differ)
    assert {**c1, "out": None, "made_by": None} == {**c2, "out": None, "made_by": None}


def test_log_with_a_missing_tracker_is_refused(monkeypatch):
    import accelerate.utils

    from pipeline.errors import UserError
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(UserError, match=r"pip install '\.\[wandb\]'"):
        trackers("wandb")
    assert trackers(None) is None


@pytest.mark.slow
def test_log_with_tensorboard_logs_every_epoch_metric(digits, tmp_path):
    """The event file, read back by TensorBoard's own reader, holds each epoch's metrics at its epoch."""
    need_module("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    run_cli("train-student", "--data", digits, "--student", "test_resnet", "--method", "ce", "--recipe", "digits",
            "--epochs", 2, "--max-steps-per-epoch", 2, "--batch-size", 32, "--workers", 0, "--quiet",
            "--log-with", "tensorboard", "--out", out, check=True)
    assert list((out / "tb").glob("events.out.tfevents.*"))  # accelerate's folder: the run's name
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    history = json.loads((out / "metrics.json").read_text())["history"]
    logged = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    want = {k for m in history for k, v in m.items() if isinstance(v, int | float)}
    assert set(logged) == want and {"train/loss", "top1", "lr", "ece"} <= want, (sorted(logged), sorted(want))
    for tag, points in logged.items():  # float32 in the file
        assert points == [(m["epoch"], pytest.approx(m[tag], rel=1e-6, abs=1e-6)) for m in history], tag
    assert (out / "metrics.csv").is_file()


def test_the_configs_are_shipped():
    """Outside the parametrized tests, which an empty configs/ would silently turn into no tests at all."""
    assert len(CONFIGS) >= 7, CONFIGS  # four OFA rows, three KD/DKD baselines


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_parse_and_print(path):
    assert len(CONFIGS) >= 4
    text = path.read_text()
    assert "Paper's top-1" in text and "Run" in text  # the row it reproduces and how to run it
    for command in ("cache-teacher", "train-student"):
        p = run_cli(command, "--config", path, "--print-config", check=True)
        printed = yaml.safe_load(p.stdout)
        assert printed["data"] == yaml.safe_load(text)[command]["data"]
    loss = yaml.safe_load(text)["train-student"]["loss"]
    assert loss["method"] in ("kd", "dkd") or loss["ofa_form"] == "released"  # the authors' OFA, or a baseline


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
    defaults = {"optim": dataclasses.asdict(OptimConfig()), "schedule": dataclasses.asdict(ScheduleConfig()),
                "ema_decay": RunConfig.ema_decay}
    for group, key in (("optim", "optimizer"), ("optim", "lr"), ("optim", "weight_decay"), ("schedule", "sched"),
                       ("schedule", "warmup_epochs"), ("optim", "clip_grad"), (None, "ema_decay")):
        want, have, default = (file_cfg.get(group, {}), cfg[group], defaults[group]) if group else \
            (file_cfg, cfg, defaults)
        assert have[key] == want.get(key, default[key]), (group, key)
    for key in ("method", "temperature", "w_ofa", "dkd_alpha", "dkd_beta", "dkd_warmup_epochs"):
        if key in file_cfg["loss"]:
            assert cfg["loss"][key] == file_cfg["loss"][key], key
    assert cfg["loss"]["label_smoothing"] == 0.1
    # the authors' schedule stepping and precision, as each file states them
    assert cfg["schedule"]["sched_step"] == "epoch" and cfg["mixed_precision"] == file_cfg["mixed_precision"]
    assert cfg["mixed_precision"] == ("no" if "cifar" in path.stem else "fp16")
    term = {"kd": "kd/final", "dkd": "dkd/final"}.get(file_cfg["loss"]["method"], "ofa/stage1")
    assert json.loads((run / "metrics.json").read_text())["history"][0][f"train/{term}"] > 0
