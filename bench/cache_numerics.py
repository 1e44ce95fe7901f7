"""How exactly a store gives the teacher back: DKD for confident teachers, and the cost of fp16 storage.

    python bench/cache_numerics.py [--draws 2000] [--name cache_numerics]

Everything goes through what a store holds (`summarize`, read back by `TeacherTargets`), against the same
quantity computed in float64 from the teacher's float32 logits:

- dkd_confident: a teacher with 1 - p_c from 1e-3 down to 1e-8 on the label class c (50 classes, top-5 + 8 tail
  samples drawn at T_d = 4, logits near 16), DKD (alpha 1, beta 8) at T = 1 and T = 4 from the store, against the
  same estimate (the same draw: the store's per-class weights) with the teacher's log-probabilities, and its 1 - p_c,
  computed in float64 from the full logits: the relative error of the batch mean (what a step takes), and the
  largest error of one view's estimate over the batch mean (one view's estimate can be near 0 by its draw). The
  non-target logits are multiples of 1/32, so that fp16 holds them exactly in either storage form (logits, or
  log-probabilities): what is measured is the arithmetic, not the rounding.
- fp16 (with --value-dtype float32, the same for float32 values): the views of
  tests/fixtures/tail_logits_tiny50.npz (a trained resnet18 teacher on the Tiny-ImageNet 50-class
  slice; its fp16 logits plus uniform noise within half an fp16 step, as float32 logits are not fp16 values), the
  same logits times 4 (range about -13 to 23) and scaled to a largest |z| of 100 (CLIP-like). For each: a k = C store
  (no tail: the only error is the storage's rounding) gives the L1 distance between the teacher's probabilities from
  the store and exact ones at T = 1 and T = 4 (the probability-weighted mean relative error) and each loss's relative
  error; a top-5 + 8-sample store gives each loss's bias over --draws draws, relative and in standard errors of that
  mean (a fixed error of the stored values is a bias: it does not average out over draws).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from common import ROOT, save

from cache.targets import TeacherTargets
from cache.teacher_pass import TailSpec, summarize
from students.losses import dkd_loss, kd_loss, ofa_loss

FIXTURE = ROOT / "tests" / "fixtures" / "tail_logits_tiny50.npz"
K, M, TEMPS, DRAW_T = 5, 8, [4.0], 4.0
LOSSES = {  # name -> (T, loss(student, teacher, target))
    "kd_T4": (4.0, lambda s, t, c: kd_loss(s, t, 4.0)),
    "ofa_paper_g1.5": (1.0, lambda s, t, c: ofa_loss(s, t, c, 1.5, 1.0, "paper")),
    "ofa_released_g1.5": (1.0, lambda s, t, c: ofa_loss(s, t, c, 1.5, 1.0, "released")),
    "dkd_T1": (1.0, lambda s, t, c: dkd_loss(s, t, c, 1.0, 8.0, 1.0)),
    "dkd_T4": (4.0, lambda s, t, c: dkd_loss(s, t, c, 1.0, 8.0, 4.0)),
}


def dkd64(s: torch.Tensor, log_p: torch.Tensor, scale: torch.Tensor, c: torch.Tensor, T: float,
          alpha: float = 1.0, beta: float = 8.0) -> torch.Tensor:
    """Per row, in float64: DKD with the teacher's exact log-probabilities log_p at T, 1 - p_c from the other classes
    (no cancellation), and the non-target sum weighted by `scale` (the store's draw)."""
    s, log_p, scale = s.double(), log_p.double(), scale.double()
    gt = F.one_hot(c, s.shape[1]).bool()
    log_q = F.log_softmax(s / T, 1)
    q_c, p_c = log_q.gather(1, c[:, None]), log_p.gather(1, c[:, None])
    q_rest = torch.logsumexp(log_q.masked_fill(gt, -math.inf), 1, keepdim=True)
    p_rest = torch.logsumexp(log_p.masked_fill(gt, -math.inf), 1, keepdim=True)
    b_t, b_s = torch.cat([p_c, p_rest], 1), torch.cat([q_c, q_rest], 1)
    tckd = (b_t.exp() * (b_t - b_s)).sum(1)
    log_nt, log_ns = log_p - p_rest, log_q - q_rest
    nckd = (scale * log_nt.exp() * (log_nt - log_ns)).masked_fill(gt, 0.0).sum(1)
    return (alpha * tckd + beta * nckd) * T * T


def confident_teacher(eps: float, rows: int, C: int, gen: torch.Generator):
    """Logits [rows, C] (float32) whose label class 0 has 1 - p_0 = eps (to the rounding of z_0), the others
    multiples of 1/32 about 16 below it; labels [rows]."""
    g = torch.randn(rows, C - 1, generator=gen, dtype=torch.float64) * 1.5
    v = g - torch.logsumexp(g, 1, keepdim=True) + math.log(eps)  # non-target log-probabilities, summing to eps
    v = torch.round(v * 32) / 32
    z_c = 16 + torch.log1p(-torch.logsumexp(v, 1).exp())
    z = torch.cat([z_c[:, None], v + 16], 1).float()
    return z, torch.zeros(rows, dtype=torch.int64)


def measure_dkd(rows: int = 8, C: int = 50) -> dict:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for eps in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8):
        z, c = confident_teacher(eps, rows, C, gen)
        s = torch.randn(rows, C, generator=gen) * 2
        arrays = summarize(z, c, c, K, np.arange(rows), TailSpec(M, TEMPS, DRAW_T))
        tt = TeacherTargets.from_arrays(arrays, len(TEMPS))
        for T in (1.0, 4.0):
            d = tt.distribution(c, c, C, T, TEMPS, DRAW_T)
            got = float(dkd_loss(s, d, c, 1.0, 8.0, T))  # the batch mean, as a training step takes it
            rows_got = torch.stack([dkd_loss(s[i:i + 1], type(d)(*(f[i:i + 1] for f in d)), c[i:i + 1], 1.0, 8.0, T)
                                    for i in range(rows)]).double()
            want = dkd64(s, F.log_softmax(z.double() / T, 1), d.scale, c, T)
            out[f"eps={eps:g} T={T:g}"] = {
                "batch_rel_error": got / float(want.mean()) - 1,
                # per view, over the batch's mean: a draw's estimate can be near 0 (its weights make it so)
                "max_view_error_over_batch_mean": float((rows_got - want).abs().max() / want.mean().abs())}
    return out


def _teachers() -> dict:
    f = np.load(FIXTURE)
    z16 = torch.from_numpy(f["teacher_logits"]).float()
    ulp = torch.from_numpy(np.spacing(np.abs(f["teacher_logits"])).astype(np.float32))
    z = z16 + (torch.rand(z16.shape, generator=torch.Generator().manual_seed(1)) - 0.5) * ulp
    q = torch.from_numpy(f["student_logits"]).float()
    labels = torch.from_numpy(f["labels"]).long()
    return {"real": (z, q, labels), "real_x4": (z * 4, q, labels),
            "scaled_to_100": (z * (100 / z.abs().max()), q, labels)}


def _exact_losses(z, q, c) -> dict:
    return {name: float(fn(q.double(), z.double(), c)) for name, (_, fn) in LOSSES.items()}


def per_draw(fn, q: torch.Tensor, d, c: torch.Tensor, draws: int) -> torch.Tensor:
    """d: `draws` blocks of len(q) rows -> each block's batch-mean loss [draws] (float64)."""
    with torch.no_grad():
        v = torch.vmap(lambda *f: fn(q, type(d)(*f), c))(*(x.view(draws, len(q), -1) for x in d))
    return v.double()


def measure_fp16(draws: int, value_dtype: str | None) -> dict:
    kw = {"value_dtype": value_dtype} if value_dtype else {}  # a store's value dtype (float16 unless asked)
    out = {}
    for name, (z, q, labels) in _teachers().items():
        B, C = z.shape
        c = labels[:, 0]
        exact = _exact_losses(z, q, c)
        full = TeacherTargets.from_arrays(summarize(z, labels[:, 0], labels[:, 1], C, **kw)).logits(labels[:, 0],
                                                                                                 labels[:, 1], C)
        row = {"logit_range": [float(z.min()), float(z.max())]}
        for T in (1.0, 4.0):
            p, p_store = F.softmax(z.double() / T, 1), F.softmax(full.double() / T, 1)
            row[f"k=C L1(p_store - p) T={T:g}"] = float((p_store - p).abs().sum(1).mean())
        row["k=C loss rel error"] = {n: float(fn(q.double(), full.double(), c)) / exact[n] - 1
                                     for n, (_, fn) in LOSSES.items()}
        zz, ll = z.repeat(draws, 1), labels.repeat(draws, 1)
        tt = TeacherTargets.from_arrays(summarize(zz, ll[:, 0], ll[:, 1], K, np.arange(draws * B),
                                                  TailSpec(M, TEMPS, DRAW_T), **kw), len(TEMPS))
        dists = {T: tt.distribution(ll[:, 0], ll[:, 1], C, T, TEMPS, DRAW_T) for T in (1.0, 4.0)}
        bias = {}
        for n, (T, fn) in LOSSES.items():
            v = per_draw(fn, q, dists[T], c, draws)
            se = float(v.std() / draws ** 0.5)
            bias[n] = {"rel_bias": float(v.mean()) / exact[n] - 1, "bias_in_se": (float(v.mean()) - exact[n]) / se}
        row[f"top-{K} + M={M} bias over {draws} draws"] = bias
        out[name] = row
    return out


def table(record: dict) -> str:
    """The record's two tables (bench/results/README.md): DKD for confident teachers, then each teacher's storage
    error with a k = C store and the loss bias of a top-5 + 8-sample store over its draws."""
    res = record["results"]
    lines = [f"DKD (alpha 1, beta 8) from a top-{K} + M={M} store, relative error of the batch mean against float64 "
             "from the teacher's logits, by 1 - p of the label class (values' dtype: "
             f"{res.get('value_dtype', 'default')}).", "",
             "| 1 - p_c | T = 1 | T = 4 | worst view / batch mean (T = 1, T = 4) |", "| --- | ---: | ---: | ---: |"]
    eps = dict.fromkeys(k.split()[0].split("=")[1] for k in res["dkd_confident"])
    for e in eps:
        t1, t4 = res["dkd_confident"][f"eps={e} T=1"], res["dkd_confident"][f"eps={e} T=4"]
        lines.append(f"| {e} | {t1['batch_rel_error']:+.2e} | {t4['batch_rel_error']:+.2e} | "
                     f"{t1['max_view_error_over_batch_mean']:.2e}, {t4['max_view_error_over_batch_mean']:.2e} |")
    names = list(LOSSES)
    lines += ["", "Storage error: L1 distance of the teacher's probabilities from a k = C store at T = 1 / T = 4, and "
              f"each loss's bias from a top-{K} + M={M} store over its draws, relative (in standard errors).", "",
              "| teacher | logit range | L1 T=1 / T=4 | " + " | ".join(names) + " |",
              "| --- | --- | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for teacher, row in res["fp16"].items():
        bias = next(v for k, v in row.items() if k.endswith("draws"))
        lo, hi = row["logit_range"]
        cells = [f"{bias[n]['rel_bias']:+.1e} ({bias[n]['bias_in_se']:+.1f})" for n in names]
        lines.append(f"| {teacher} | {lo:.1f} to {hi:.1f} | {row['k=C L1(p_store - p) T=1']:.1e} / "
                     f"{row['k=C L1(p_store - p) T=4']:.1e} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--value-dtype", choices=["float16", "float32"],
                    help="the stores' value dtype [default: the store's default]")
    ap.add_argument("--name", default="cache_numerics")
    args = ap.parse_args(argv)
    res = {"dkd_confident": measure_dkd(), "fp16": measure_fp16(args.draws, args.value_dtype),
           "value_dtype": args.value_dtype or "default",
           "machine_note": "2-core CPU shared with other jobs; numbers are not timings"}
    save(args.name, res)
    return res


if __name__ == "__main__":
    main()
