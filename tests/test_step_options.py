"""The GPU step options timm users expect (--channels-last, --compile) and the loader-wait figure: each changes how
the step runs, never what it computes."""

import pytest
import torch

from commands.options import build
from pipeline.errors import UserError
from students.config import TrainConfig
from students.train import train_epoch
from tests.support.runner import set_up_one

COMMON = dict(student="test_convnext", method="ofa", teacher_online="test_resnet", recipe="digits", view_epochs=1,
              epochs=1, batch_size=16, workers=0, max_steps_per_epoch=2, progress=False)


def _run(data, out, **extra):
    stream, run = set_up_one(build(TrainConfig, data=data, out=out, **{**COMMON, **extra}))
    metrics = train_epoch(stream, [run], 0)[0]
    return run, metrics, {k: v.detach().clone() for k, v in run.task.student.state_dict().items()}


def _close(a: dict, b: dict, tol: float) -> float:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst < tol, worst
    return worst


def test_channels_last_converts_weights_and_inputs_and_trains_to_the_same_weights(small_digits, tmp_path):
    plain, m_plain, w_plain = _run(small_digits, tmp_path / "plain")
    cl, m_cl, w_cl = _run(small_digits, tmp_path / "cl", channels_last=True)
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
    assert m_cl["train/loss"] == pytest.approx(m_plain["train/loss"], rel=1e-4)
    _close(w_plain, w_cl, 1e-4)


@pytest.mark.slow
def test_compile_compiles_the_student_in_place_and_trains_to_the_same_weights(small_digits, tmp_path):
    plain, m_plain, w_plain = _run(small_digits, tmp_path / "plain")
    comp, m_comp, w_comp = _run(small_digits, tmp_path / "comp", compile=True)
    assert comp.task.student._compiled_call_impl is not None and plain.task.student._compiled_call_impl is None
    assert w_comp.keys() == w_plain.keys()  # in place: checkpoints keep their keys (no "_orig_mod.")
    assert m_comp["train/loss"] == pytest.approx(m_plain["train/loss"], rel=1e-4)
    _close(w_plain, w_comp, 1e-4)


def test_the_epoch_reports_how_long_it_waited_for_views(small_digits, tmp_path):
    _, m, _ = _run(small_digits, tmp_path / "wait")
    assert 0 < m["loader_wait_seconds"] < m["train_seconds"]


def test_compile_backend_without_compile_is_refused(small_digits, tmp_path):
    with pytest.raises(UserError, match="--compile-backend aot_eager applies to --compile"):
        build(TrainConfig, data=small_digits, out=tmp_path / "x", compile_backend="aot_eager", **COMMON)
    assert not (tmp_path / "x").exists()
