"""Would a better model of the teacher's tail (the classes outside the cached top-k and labels) cut the loss error?

    python bench/tail_model.py --data DIR --teacher NAME --checkpoint PATH --student NAME --student-checkpoint PATH
        [--student-kwargs k=v ...] [--recipe cifar] [--view-size 32] [--shards 2] [--topk 5 10 20] [--T 1 4]

The cache keeps the top-k logits, their classes and the log-sum-exp; which class holds which of the
remaining logits is lost. On real teacher and student logits this script compares the KD loss (at each
T) from full logits with three reconstructions of the tail:
- uniform: the tail's probability mass spread evenly: the cache's own reconstruction, from what a store holds
  (`summarize`, float16 values, read back by `TeacherTargets.logits`, with the exact label-class log-odds the
  cache also keeps);
- oracle shape, unknown classes: the exact tail logit values (an upper bound on any shape model fitted
  to what the cache stores), with the classes that hold them unknown, i.e. each tail class weighted by
  the mean;
- oracle shape, student's order: the exact tail values handed to the tail classes in the student's order.
For the OFA loss (T = 1) the tail enters only through sum_tail p_j log q_j, so with the classes unknown
the uniform spread is already the estimate a shape model would give; only KD has a shape term.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import inputs, md_table, save
from fidelity import add_pair_args, pair_line, pair_logits

from cache.summary import summarize
from cache.targets import TeacherTargets
from students.losses import kd_loss


def estimates(z: torch.Tensor, q: torch.Tensor, labels: torch.Tensor, k: int, T: float) -> dict:
    """Mean KD loss at temperature T (student logits q) from full teacher logits z and from each tail
    reconstruction; labels [B, 2] are the label classes of each view, whose logits the cache keeps exactly."""
    C = z.shape[1]
    idx = z.topk(k, 1).indices
    stored = TeacherTargets.from_arrays(summarize(z, labels[:, 0], labels[:, 1], k))  # a float16 store's arrays
    uniform = stored.logits(labels[:, 0], labels[:, 1], C)
    tail = torch.ones_like(z, dtype=torch.bool).scatter_(1, idx, False).scatter_(1, labels, False)
    # oracle shape, classes unknown: exact teacher terms; the cross term weights every tail class by the mean
    log_p, log_q = F.log_softmax(z / T, 1), F.log_softmax(q / T, 1)
    p = log_p.exp()
    mean_tail_log_q = log_q.masked_fill(~tail, 0).sum(1) / tail.sum(1).clamp(min=1)
    shape = ((p * (log_p - log_q)).masked_fill(tail, 0).sum(1) + (p * log_p).masked_fill(~tail, 0).sum(1)
             - p.masked_fill(~tail, 0).sum(1) * mean_tail_log_q).mean() * T * T
    # oracle shape, student's order: the tail values, sorted, handed to the tail classes in the student's order
    sorted_tail = z.masked_fill(~tail, float("-inf")).sort(1, descending=True).values
    student_order = q.masked_fill(~tail, float("-inf")).argsort(1, descending=True)
    ranked = torch.where(tail, z.clone().scatter_(1, student_order, sorted_tail), z)
    return {"full": float(kd_loss(q, z, T)), "uniform": float(kd_loss(q, uniform, T)),
            "oracle_shape_unknown_classes": float(shape), "oracle_shape_student_order": float(kd_loss(q, ranked, T))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_args(ap, recipe="cifar", shards=2)
    ap.add_argument("--topk", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--T", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--name", default="tail_model")
    args = ap.parse_args(argv)
    z, q, labels, _, C = pair_logits(args)
    rows = []
    for k in args.topk:
        for T in args.T:
            e = estimates(z, q, labels, k, T)
            row = {"topk": k, "T": T, "views": len(z), **e}
            for name in ("uniform", "oracle_shape_unknown_classes", "oracle_shape_student_order"):
                row[f"{name}_rel_error"] = abs(e[name] - e["full"]) / abs(e["full"])
            rows.append(row)
            print(f"k={k:3d} T={T:g}: KD full {e['full']:.4f}; relative error: uniform "
                  f"{row['uniform_rel_error']:.2%}, oracle shape with unknown classes "
                  f"{row['oracle_shape_unknown_classes_rel_error']:.2%}, oracle shape in the student's order "
                  f"{row['oracle_shape_student_order_rel_error']:.2%}")
    res = {"teacher": args.teacher, "checkpoint": str(args.checkpoint), "student": args.student,
           "student_kwargs": args.student_kwargs, "recipe": args.recipe, "num_classes": C, "rows": rows,
           "inputs": inputs(teacher=args.checkpoint, student=args.student_checkpoint, data=args.data)}
    save(args.name, res)
    return res


def table(record: dict) -> str:
    r = record["results"]
    rows = [[x["topk"], x["T"], x["views"], x["full"], x["uniform_rel_error"],
             x["oracle_shape_unknown_classes_rel_error"], x["oracle_shape_student_order_rel_error"]] for x in r["rows"]]
    return (pair_line(r) + ". Relative error of the KD loss from each reconstruction of the tail against full "
            "logits. No target: whether a model of the tail would beat the uniform one.\n\n"
            + md_table(["k", "T", "views", "KD from full logits", "uniform tail (the cache's)",
                        "oracle shape, classes unknown", "oracle shape, student's order"], rows))


if __name__ == "__main__":
    main()
