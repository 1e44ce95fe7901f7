"""students/runs.py and the group loop of students/train.py: several students from one view stream end with exactly
the weights and loss terms each has alone, through a SIGTERM + --resume and on two ranks; a run that changes the
stream is refused."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch_cmd, launch_env, run_cli

PROBE = ROOT / "tests" / "support" / "probe_cli.py"
# one run with drop-path (its own RNG stream matters), one with another seed and optimizer, one OFA with heads + EMA
RUNS = [{"out": "vit-ce", "student": "test_vit", "method": "ce",
         "model_kwargs": {"img_size": 32, "patch_size": 4, "drop_path_rate": 0.3}},
        {"out": "convnext-kd", "student": "test_convnext", "method": "kd", "optimizer": "adamw", "lr": 1e-3,
         "seed": 3},
        {"out": "resnet-ofa", "student": "test_resnet", "method": "ofa", "ema_decay": 0.9}]
NAMES = [r["out"] for r in RUNS]


def base(data, store, runs_file, out):
    return ["train-student", "--data", data, "--cache", store, "--student", "test_resnet", "--method", "ce",
            "--epochs", 2, "--batch-size", 16, "--max-steps-per-epoch", 3, "--workers", 1, "--lr", 0.05,
            "--runs", runs_file, "--out", out, "--quiet"]


@pytest.fixture(scope="session")
def group(small_digits, small_store, tmp_path_factory):
    """The three RUNS trained from one stream of small_store's views, uninterrupted."""
    root = tmp_path_factory.mktemp("runs")
    (root / "runs.yaml").write_text(json.dumps(RUNS))
    run_cli(*base(small_digits, small_store, root / "runs.yaml", root / "group"), check=True)
    return root


def same_weights(a, b, name="model.safetensors"):
    wa, wb = load_file(a / name), load_file(b / name)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def untimed(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    return [{k: v for k, v in h.items() if k not in ("train_seconds", "images_per_second", "loader_wait_seconds")}
            for h in m["history"]]


@pytest.mark.slow
def test_runs_from_one_stream_end_with_the_weights_each_has_alone(group, tmp_path):
    """Each run of the group, trained alone from its own config.json (a complete configuration: the order seed
    included), gives the same tensors and loss terms. (With `own_rng` swapping nothing, the drop-path ViT
    differs: checked.)"""
    for name in NAMES:
        run_dir = group / "group" / name
        cfg = json.loads((run_dir / "config.json").read_text())
        assert cfg["runs"] is None and cfg["order_seed"] == 0 and cfg["resolved"]["stream_runs"][0].endswith("vit-ce")
        run_cli("train-student", "--config", run_dir / "config.json", "--out", tmp_path / name, "--quiet", check=True)
        assert same_weights(run_dir, tmp_path / name), name
        assert untimed(run_dir) == untimed(tmp_path / name), name
    assert same_weights(group / "group" / "resnet-ofa", tmp_path / "resnet-ofa", "model_ema.safetensors")
    assert "train/ofa/stage1" in untimed(tmp_path / "resnet-ofa")[0]


@pytest.mark.slow
def test_a_group_stopped_mid_epoch_by_sigterm_resumes_to_the_same_weights(small_digits, small_store, group, tmp_path):
    """SIGTERM while the second run steps on batch 2 of epoch 2: every run saves at that step, exit 75; --resume
    ends with the uninterrupted group's weights, EMA and metrics. (With each run's RNG reseeded on resume instead
    of restored from its checkpoint, the drop-path ViT differs: checked.)"""
    args = base(small_digits, small_store, group / "runs.yaml", tmp_path / "cut")
    # probe_cli counts loss calls: 3 runs per batch, so call 4 of epoch 1 is run 1 on batch 1. The reference and
    # the resume run in this process: the stopped part runs with as many threads (a float sum depends on them)
    env = launch_env({"PROBE_DIR": str(tmp_path / "probe"), "PROBE_STALL": "1,4",
                      "OMP_NUM_THREADS": str(torch.get_num_threads())})
    proc = subprocess.Popen(launch_cmd(1, PROBE, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                            env=env, text=True)
    t0 = time.time()
    while not (tmp_path / "probe" / "stalled-0").exists():
        assert proc.poll() is None and time.time() - t0 < 300, "the group never reached the stop point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-2000:]
    for name in NAMES:
        progress = json.loads((tmp_path / "cut" / name / "progress.json").read_text())
        assert (progress["step"]["epoch"], progress["step"]["micro"]) == (1, 2), name
        assert not (tmp_path / "cut" / name / "model.safetensors").exists()
    p = run_cli(*args, "--resume", check=True)
    assert p.stdout.count("in epoch 2 of 2, after optimizer step 2") == 3
    for name in NAMES:
        assert same_weights(group / "group" / name, tmp_path / "cut" / name), name
        assert untimed(group / "group" / name) == untimed(tmp_path / "cut" / name), name
    assert same_weights(group / "group" / "resnet-ofa", tmp_path / "cut" / "resnet-ofa", "model_ema.safetensors")


@pytest.mark.slow
def test_a_group_on_two_ranks_ends_as_its_runs_alone_on_two_ranks(small_digits, small_store, tmp_path):
    """Two real ranks (DDP per run, one stream per rank): the drop-path run of a group equals itself alone."""
    (tmp_path / "runs.yaml").write_text(json.dumps(RUNS[:2]))
    args = base(small_digits, small_store, tmp_path / "runs.yaml", tmp_path / "group")
    env = launch_env({"PROBE_DIR": str(tmp_path / "probe")})
    p = subprocess.run(launch_cmd(2, PROBE, *args), capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "probe" / "rank-1.json").read_text())["world"] == 2
    alone = ["train-student", "--config", tmp_path / "group" / "vit-ce" / "config.json", "--out", tmp_path / "alone",
             "--quiet"]
    p = subprocess.run(launch_cmd(2, ROOT / "cli.py", *alone), capture_output=True, text=True, cwd=ROOT,
                       env=launch_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert same_weights(tmp_path / "group" / "vit-ce", tmp_path / "alone")
    assert untimed(tmp_path / "group" / "vit-ce") == untimed(tmp_path / "alone")


def test_a_run_that_changes_the_stream_is_refused_and_nothing_is_written(small_digits, small_store, tmp_path):
    refused = [({"out": "b", "batch_size": 32}, "sets --batch-size"), ({"out": "b", "recipe": "digits"}, "--recipe"),
               ({"out": "b", "order_seed": 5}, "--order-seed"), ({"out": "a"}, "as run 0 does")]
    for entry, needle in refused:
        (tmp_path / "runs.yaml").write_text(json.dumps([{"out": "a", "method": "kd"}, entry]))
        p = run_cli(*base(small_digits, small_store, tmp_path / "runs.yaml", tmp_path / "out"))
        assert p.returncode == 2 and needle in p.stderr, p.stderr
        assert "\n" not in p.stderr.strip() and not (tmp_path / "out").exists()
