"""The GPU step options timm users expect (--channels-last, --compile) and the loader-wait figure: each changes how
the step runs, never what it computes."""

import json
import time

import pytest
import torch

from commands.options import build
from conftest import run_cli
from pipeline.errors import UserError
from pipeline.reader import ShardReader
from students.config import TrainConfig
from students.train import train_epoch
from tests.support.runner import set_up_one

COMMON = dict(student="test_convnext", method="ofa", teacher_online="test_resnet", recipe="digits", view_epochs=1,
              epochs=1, batch_size=16, workers=0, max_steps_per_epoch=2, progress=False)


def _state(run) -> dict:
    return {k: v.detach().clone() for k, v in run.task.student.state_dict().items()}


def _run(data, out, **extra):
    """The student with its heads before and after 2 steps, and the epoch's metrics."""
    stream, run = set_up_one(build(TrainConfig, data=data, out=out, **{**COMMON, **extra}))
    before = _state(run)
    metrics = train_epoch(stream, [run], 0)[0]
    return run, metrics, before, _state(run)


def _same_training(before: dict, plain: dict, other: dict, ratio: float = 1e-3) -> None:
    """`other` trained as `plain` did from the same `before`: every tensor within `ratio` of its own update
    (max |plain - before|), exactly where that update is 0 and for integer buffers. Measured on CPU: the
    worst tensor is 1.4e-4 of its update for channels-last and compile, 49 of 183 tensors are equal; a tensor
    left unchanged by a broken step is 1.0 of its update."""
    assert before.keys() == plain.keys() == other.keys()
    for k in plain:
        if not plain[k].is_floating_point():
            assert torch.equal(plain[k], other[k]), k
            continue
        update = (plain[k] - before[k]).abs().max().item()
        diff = (other[k] - plain[k]).abs().max().item()
        assert diff <= ratio * update, f"{k}: {diff:.3g} off, {diff / update if update else float('inf'):.3g} of " \
                                       f"its update {update:.3g}"


def test_channels_last_converts_weights_and_inputs_and_trains_to_the_same_weights(small_digits, tmp_path):
    plain, m_plain, w0, w_plain = _run(small_digits, tmp_path / "plain")
    cl, m_cl, w0_cl, w_cl = _run(small_digits, tmp_path / "cl", channels_last=True)
    convs = [p for p in cl.task.student.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous(memory_format=torch.channels_last)
                   for p in plain.task.student.parameters() if p.dim() == 4)
    views = torch.rand(2, 3, 32, 32)
    assert cl.task.student_input(views).is_contiguous(memory_format=torch.channels_last)
    teacher = cl.task.teacher_source.__closure__[0].cell_contents  # online(teacher): the Teacher it calls
    assert teacher.input.channels_last and teacher.model.conv1[0].weight.is_contiguous(
        memory_format=torch.channels_last)
    # another memory layout, the same arithmetic up to summation order
    assert m_cl["train/loss"] == pytest.approx(m_plain["train/loss"], rel=1e-5)
    assert all(torch.equal(w0[k], w0_cl[k]) for k in w0)
    _same_training(w0, w_plain, w_cl)


@pytest.mark.slow
def test_compile_compiles_the_student_in_place_and_trains_to_the_same_weights(small_digits, tmp_path):
    plain, m_plain, w0, w_plain = _run(small_digits, tmp_path / "plain")
    comp, m_comp, _, w_comp = _run(small_digits, tmp_path / "comp", compile=True)
    assert comp.task.student._compiled_call_impl is not None and plain.task.student._compiled_call_impl is None
    assert w_comp.keys() == w_plain.keys()  # in place: checkpoints keep their keys (no "_orig_mod.")
    assert m_comp["train/loss"] == pytest.approx(m_plain["train/loss"], rel=1e-5)
    _same_training(w0, w_plain, w_comp)


def test_the_epoch_reports_how_long_it_waited_for_views(small_digits, tmp_path, monkeypatch):
    """A loader made slower by a known time (each training shard's read sleeps 1 s: 4 steps of 16 read 2 shards
    of 48) reports that time as waited for views, on top of what it waited without it, and not in the steps.
    The slack (1 s, twice the steps) is for a loaded machine: the sleeps are what the bounds pin."""
    args = ["--data", small_digits, "--student", "test_resnet", "--method", "ce", "--recipe", "digits", "--epochs",
            1, "--batch-size", 16, "--max-steps-per-epoch", 4, "--workers", 0, "--quiet"]

    def epoch(out):
        run_cli("train-student", *args, "--out", out, check=True)
        m = json.loads((out / "metrics.json").read_text())["history"][0]
        return m["loader_wait_seconds"], m["train_seconds"]
    wait, train = epoch(tmp_path / "plain")
    assert 0 < wait and train - wait > 0.05, (wait, train)  # 4 steps of test_resnet take longer than 50 ms
    real, pause = ShardReader.read_shard, 1.0

    def slow_read(self, shard_id):
        if self.split_name == "train":
            time.sleep(pause)
        yield from real(self, shard_id)
    monkeypatch.setattr(ShardReader, "read_shard", slow_read)
    slow_wait, slow_train = epoch(tmp_path / "slow")
    assert 2 * pause <= slow_wait <= wait + 2 * pause + 1.0, (wait, slow_wait)  # both shards' pauses, no more
    assert slow_train - slow_wait <= 2 * (train - wait) + 1.0, (train, wait, slow_train, slow_wait)  # the steps


def test_compile_backend_without_compile_is_refused(small_digits, tmp_path):
    with pytest.raises(UserError, match="--compile-backend aot_eager applies to --compile"):
        build(TrainConfig, data=small_digits, out=tmp_path / "x", compile_backend="aot_eager", **COMMON)
    assert not (tmp_path / "x").exists()
