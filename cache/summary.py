"""What the teacher cache keeps of a view's logits: `summarize` turns a batch of teacher logits into the arrays of
cache.format (top-k, log-sum-exp, the label classes' logits, and the sampled tail with `TailSpec`).

The read side (cache.targets) rebuilds the teacher's distribution from these arrays; its docstring gives the
estimator the sampled tail feeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cache.format import (
    LABEL_LOGITS,
    LOG_Z,
    LSE,
    TAIL_IDS,
    TAIL_LOGITS,
    TAIL_LSE,
    TAIL_SEED_SALT,
    TOPK_INDICES,
    TOPK_VALUES,
)


@dataclass(frozen=True)
class TailSpec:
    """What `summarize` draws and records of the tail: M samples, log Z_T at `temperatures`, draw temperature."""

    samples: int = 0
    temperatures: list[float] = field(default_factory=list)
    draw_temperature: float = 1.0


def draw_tail(logits16: np.ndarray, known: np.ndarray, view_seeds: np.ndarray, m: int, draw_T: float):
    """Draw m tail classes per view, with replacement, from r_j = exp(z_j / T_d - tail_lse) over the classes not
    `known` (the fp16-rounded logits, so that training recomputes r_j from the stored values exactly).

    logits16 [B, C] float64 of fp16 values, known [B, C] bool, view_seeds [B] -> (ids [B, m] int64, -1 where the
    tail is empty; tail_lse [B] float64, -inf there). Each view draws from its own generator seeded
    [view_seed, TAIL_SEED_SALT], so the draw replays from the replay record whatever the batch."""
    a = np.where(known, -np.inf, logits16 / draw_T)
    top = a.max(1, keepdims=True)
    empty = ~np.isfinite(top[:, 0])
    top[empty] = 0.0
    e = np.exp(a - top)  # [B, C], 0 on known classes
    cdf = np.cumsum(e, 1)
    tail_lse = np.where(empty, -np.inf, top[:, 0] + np.log(np.where(empty, 1.0, cdf[:, -1])))
    ids = np.full((len(a), m), -1, dtype=np.int64)
    for b in np.flatnonzero(~empty):
        u = np.random.default_rng([int(view_seeds[b]), TAIL_SEED_SALT]).random(m) * cdf[b, -1]
        # first class whose cumulative mass exceeds u: never a known class (its mass adds nothing), never past C - 1
        ids[b] = np.searchsorted(cdf[b], u, side="right")
    return ids, tail_lse


def summarize(logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor, k: int,
              view_seeds: np.ndarray | None = None, tail: TailSpec = TailSpec()) -> dict:
    """logits [B, C] -> what the cache keeps of them: array name -> numpy in the array's dtype (cast in torch,
    so that a float16 rounds as the pass has always rounded it). With `tail.samples`, also the sampled tail
    (`draw_tail`; view_seeds [B] from the replay record) and log Z_T at `tail.temperatures`."""
    C = logits.shape[1]
    values, indices = logits.topk(k, dim=1)  # sorted, descending
    label_logits = torch.stack([logits.gather(1, labels[:, None])[:, 0],
                                logits.gather(1, partner_labels[:, None])[:, 0]], dim=1)
    out = {TOPK_VALUES: values, TOPK_INDICES: indices, LSE: torch.logsumexp(logits, dim=1), LABEL_LOGITS: label_logits}
    if tail.samples:
        known = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, indices, True)
        known.scatter_(1, labels[:, None], True).scatter_(1, partner_labels[:, None], True)
        z16 = logits.to(torch.float16).double().cpu().numpy()
        ids, tail_lse = draw_tail(z16, known.cpu().numpy(), view_seeds, tail.samples, tail.draw_temperature)
        tail_logits = np.take_along_axis(z16, np.maximum(ids, 0), 1) * (ids >= 0)
        out |= {TAIL_IDS: torch.from_numpy(ids), TAIL_LOGITS: torch.from_numpy(tail_logits),
                TAIL_LSE: torch.from_numpy(tail_lse)}
        if tail.temperatures:
            out[LOG_Z] = torch.stack([torch.logsumexp(logits.float() / t, dim=1) for t in tail.temperatures], 1)
    return {a.name: t.to(getattr(torch, a.dtype_for(C))).cpu().numpy() for a, t in out.items()}
