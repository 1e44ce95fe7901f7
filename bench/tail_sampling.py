"""Sampled tail vs top-k only: bias and spread of each loss, and of its gradient, against bytes per view.

    python bench/tail_sampling.py --data DIR --teacher NAME --checkpoint PATH --student NAME --student-checkpoint PATH
        [--student-kwargs k=v ...] [--recipe cifar] [--shards 2] [--draws 100] [--batch 64] [--save-fixture NPZ]

On real teacher and student logits (the views of `--shards` data shards, as bench/tail_model.py gets them),
each configuration rebuilds the teacher from exactly what a store would hold (`cache.summary.summarize`,
read back through `cache.targets.TeacherTargets`): top-k only (the uniform tail, deterministic) or top-k + M
tail samples (`--draws` independent draws: the view seeds are shifted per draw, as each cached epoch draws
anew). For every loss, per batch of `--batch` views, against the same loss from the full logits:
- loss_rel_bias: mean over draws and batches of (estimate - full), over the mean full loss;
- loss_rel_spread: standard deviation over draws of a batch's estimate, over its full loss (batch mean);
- loss_rel_error: mean |estimate - full| / full over draws and batches (what one training step sees);
- grad_rel_bias: || mean over draws of the gradient w.r.t. the student logits - the full one || / || full ||
  (with samples this is the noise floor spread / sqrt(draws) if the estimator is unbiased);
- grad_rel_spread: the same for one draw, root mean square over draws.
`--save-fixture` writes the first 32 views' teacher logits (fp16), student logits and labels for
tests/test_tail_samples.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from common import inputs, save
from fidelity import add_pair_args, pair_logits

from cache.format import raw_bytes_per_view
from cache.summary import TailSpec, summarize
from cache.targets import TeacherTargets
from students.losses import dkd_loss, kd_loss, ofa_loss

TEMPS = [4.0]  # log Z_T recorded besides T = 1 (the default of --tail-temperatures)
LOSSES = {  # name -> (T, loss(student logits, teacher, target))
    "kd_T4": (4.0, lambda s, t, c: kd_loss(s, t, 4.0)),
    "ofa_paper_g1": (1.0, lambda s, t, c: ofa_loss(s, t, c, 1.0, 1.0, "paper")),
    "ofa_paper_g1.5": (1.0, lambda s, t, c: ofa_loss(s, t, c, 1.5, 1.0, "paper")),
    "ofa_released_g1.5": (1.0, lambda s, t, c: ofa_loss(s, t, c, 1.5, 1.0, "released")),
    "dkd_T4": (4.0, lambda s, t, c: dkd_loss(s, t, c, 1.0, 8.0, 4.0)),
}


def batch_losses(q: torch.Tensor, teachers: dict, c: torch.Tensor, batch: int) -> dict:
    """teachers: T -> teacher over all views -> {loss: (per-batch values [nb], gradient [nb * batch, C])}."""
    nb = len(q) // batch
    out = {}
    for name, (T, fn) in LOSSES.items():
        s = q[:nb * batch].clone().requires_grad_(True)
        t = teachers[T]
        vals = []
        for b in range(nb):
            sl = slice(b * batch, (b + 1) * batch)
            tb = t[sl] if isinstance(t, torch.Tensor) else type(t)(*(x[sl] for x in t))
            vals.append(fn(s[sl], tb, c[sl]))
        vals = torch.stack(vals)
        (g,) = torch.autograd.grad(vals.sum(), s)  # rows are independent: each row's gradient is its batch's
        out[name] = (vals.detach().double(), g.double())
    return out


def evaluate(z, q, labels, seeds, k, m, draw_T, draws, batch) -> dict:
    C = z.shape[1]
    c = labels[:, 0]
    exact = batch_losses(q, {T: z for T, _ in LOSSES.values()}, c, batch)
    runs = []
    for r in range(draws if m else 1):
        arrays = summarize(z, labels[:, 0], labels[:, 1], k, seeds + r * len(z), TailSpec(m, TEMPS, draw_T))
        tt = TeacherTargets.from_arrays(arrays, len(TEMPS))
        if m:
            teachers = {T: tt.distribution(labels[:, 0], labels[:, 1], C, T, TEMPS, draw_T) for T in (1.0, 4.0)}
        else:
            teachers = dict.fromkeys((1.0, 4.0), tt.logits(labels[:, 0], labels[:, 1], C))
        runs.append(batch_losses(q, teachers, c, batch))
    row = {"topk": k, "tail_samples": m, "draw_temperature": draw_T if m else None, "draws": len(runs),
           "raw_bytes_per_view": raw_bytes_per_view(k, C, m, len(TEMPS) if m else 0)}
    for name in LOSSES:
        full_v, full_g = exact[name]
        v = torch.stack([run[name][0] for run in runs])  # [draws, nb]
        g = torch.stack([run[name][1] for run in runs])  # [draws, nb * batch, C]
        gnorm = full_g.norm()
        row[name] = {
            "full": float(full_v.mean()),
            "loss_rel_bias": float((v - full_v).mean() / full_v.mean()),
            "loss_rel_spread": float((v.std(0) / full_v.abs()).mean()) if len(runs) > 1 else 0.0,
            "loss_rel_error": float(((v - full_v).abs() / full_v.abs()).mean()),
            "grad_rel_bias": float((g.mean(0) - full_g).norm() / gnorm),
            "grad_rel_spread": float(((g - full_g).flatten(1).norm(dim=1) ** 2).mean().sqrt() / gnorm),
        }
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_args(ap, recipe="cifar", shards=2)
    ap.add_argument("--topk", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--sampled", nargs="+", default=["5:4:1", "5:8:1", "5:16:1", "5:8:4", "10:8:1", "10:8:4"],
                    help="top-k + tail samples as k:M:T_d")
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--save-fixture", type=Path)
    ap.add_argument("--name", default="tail_sampling")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    z, q, labels, seeds, C = pair_logits(args)
    rows = [evaluate(z, q, labels, seeds, k, 0, 1.0, 1, args.batch) for k in args.topk]
    for spec in args.sampled:
        k, m, td = spec.split(":")
        rows.append(evaluate(z, q, labels, seeds, int(k), int(m), float(td), args.draws, args.batch))
        print(f"done {spec}", flush=True)
    mass = torch.softmax(z, 1).topk(max(args.topk), 1).values.cumsum(1)
    res = {"teacher": args.teacher, "checkpoint": str(args.checkpoint), "student": args.student,
           "student_kwargs": args.student_kwargs, "recipe": args.recipe, "num_classes": C, "views": len(z),
           "batch": args.batch, "topk_mass": {k: float(mass[:, k - 1].mean()) for k in args.topk},
           "rows": rows,
           "inputs": inputs(teacher=args.checkpoint, student=args.student_checkpoint, data=args.data)}
    path = save(args.name, res)
    path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
    if args.save_fixture:  # after the record: the fixture is tracked, and writing it first would refuse the record
        np.savez_compressed(args.save_fixture, teacher_logits=z[:32].half().numpy(), student_logits=q[:32].numpy(),
                            labels=labels[:32].numpy(), teacher=args.teacher, data=str(args.data))
    return res


def table(record: dict) -> str:
    """The record's table with its explanation (bench/results/README.md)."""
    res = record["results"]
    names = {"kd_T4": "KD T=4", "ofa_paper_g1": "OFA γ=1", "ofa_paper_g1.5": "OFA γ=1.5",
             "ofa_released_g1.5": "OFA released γ=1.5", "dkd_T4": "DKD T=4"}
    lines = ["Generated by bench/tail_sampling.py (command in tail_sampling.json). Per loss: the mean relative error "
             "|batch loss from the cache - full-logit batch loss| / full over batches and draws, then (bias, spread "
             "over draws), both relative. Gradient w.r.t. the student logits: || mean over draws - full || / || full "
             "|| (bias; with samples, the noise floor is the spread / sqrt(draws)) and its single-draw RMS (spread).",
             "",
             "| store | raw B/view | " + " | ".join(names.values()) + " | grad bias KD T=4 / OFA γ=1.5 | grad spread "
             "KD T=4 / OFA γ=1.5 |",
             "| --- | ---: | " + " | ".join("---:" for _ in names) + " | ---: | ---: |"]
    for r in res["rows"]:
        what = f"top-{r['topk']}" + (f" + M={r['tail_samples']}, T_d={r['draw_temperature']:g} ({r['draws']} draws)"
                                     if r["tail_samples"] else " only")
        cells = [f"{r[n]['loss_rel_error']:.2%} ({r[n]['loss_rel_bias']:+.2%}, {r[n]['loss_rel_spread']:.2%})"
                 for n in names]
        kd, ofa = r["kd_T4"], r["ofa_paper_g1.5"]
        lines.append(f"| {what} | {r['raw_bytes_per_view']} | " + " | ".join(cells)
                     + f" | {kd['grad_rel_bias']:.3f} / {ofa['grad_rel_bias']:.3f}"
                     f" | {kd['grad_rel_spread']:.3f} / {ofa['grad_rel_spread']:.3f} |")
    return "\n".join(lines) + "\n"


def markdown(record: dict) -> str:
    """<name>.md beside the record: a title over `table`."""
    res = record["results"]
    return (f"# Sampled tail vs top-k only ({res['teacher']} teacher, {res['num_classes']} classes, {res['views']} "
            f"views, batches of {res['batch']})\n\n" + table(record))


if __name__ == "__main__":
    main()
