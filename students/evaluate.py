"""Evaluation of the bare students (no heads): top-1, top-5 and calibration over the validation shards."""

from __future__ import annotations

import torch

from pipeline import collectives

ECE_BINS = 15  # expected calibration error over 15 equal-width confidence bins (Guo et al. 2017)


@torch.no_grad()
def evaluate(runs: list, eval_loader, ema: bool = False) -> list[dict]:
    """Top-1/top-5 and expected calibration error (in %, 15 bins) of each run's evaluated model (the bare student,
    or with `ema` its EMA) over this rank's val shards, summed over ranks. The val views are made once for all the
    runs."""
    accelerator = runs[0].accelerator
    models = [run.ema.module if ema else run.task.eval_model for run in runs]
    for model in models:
        model.eval()
        same_buffers(model, accelerator)
    sums = torch.zeros(len(runs), 3, device=accelerator.device, dtype=torch.float64)  # top-1, top-5 hits, count
    bins = torch.zeros(len(runs), 3, ECE_BINS, device=accelerator.device, dtype=torch.float64)
    for batch in eval_loader:
        x, y = batch["view"].to(accelerator.device), batch["label"].to(accelerator.device)
        for r, (run, model) in enumerate(zip(runs, models, strict=True)):
            logits = run.task.predict(x, model)
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top5[:, 0] == y
            sums[r, 0] += hit.sum()  # accumulated on the device: no sync per batch
            sums[r, 1] += (top5 == y[:, None]).any(1).sum()
            sums[r, 2] += len(y)
            bins[r] += calibration_bins(logits, top5[:, 0], hit)
    sums = collectives.reduce(sums, "sum").tolist()
    eces = calibration_error(collectives.reduce(bins, "sum")).tolist()
    return [{"top1": 100.0 * t1 / max(1.0, n), "top5": 100.0 * t5 / max(1.0, n), "ece": 100.0 * ece,
             "val_samples": int(n)} for (t1, t5, n), ece in zip(sums, eces, strict=True)]


def same_buffers(model: torch.nn.Module, accelerator) -> None:
    """Every rank evaluates the model rank 0 exports: its buffers (BatchNorm statistics) from rank 0. DDP sends
    them only at the start of each forward, so after a step each rank holds statistics of its own batch, and an
    EMA of them drifts apart per rank; only rank 0's are saved, so without this a resumed run's evaluation on
    the other ranks would differ from the uninterrupted run's."""
    if accelerator.num_processes > 1:
        for buffer in model.buffers():
            collectives.broadcast(buffer, src=0)


def calibration_bins(logits: torch.Tensor, predicted: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """logits [B, C], the predicted class [B] and whether it is right [B] -> [3, ECE_BINS] (float64): per
    confidence bin (i/15, (i+1)/15], the sum of the predicted class's probability, the hits and the count."""
    conf = logits.float().softmax(1).gather(1, predicted[:, None])[:, 0].double()
    b = (conf * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1
    out = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=logits.device)
    for row, values in enumerate((conf, hit.double(), torch.ones_like(conf))):
        out[row].index_add_(0, b, values)
    return out


def calibration_error(bins: torch.Tensor) -> torch.Tensor:
    """[..., 3, ECE_BINS] (`calibration_bins`, summed over batches and ranks) -> the expected calibration error
    [...] as a fraction: sum over bins of (n_b / N) |accuracy_b - confidence_b| = sum_b |hits_b - confidence
    sum_b| / N."""
    return (bins[..., 1, :] - bins[..., 0, :]).abs().sum(-1) / bins[..., 2, :].sum(-1).clamp(min=1)
