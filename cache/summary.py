"""What the teacher cache keeps of a view's logits: `summarize` turns a batch of teacher logits into the arrays of
cache.format, computed from the float32 logits with formulas that stay exact for confident teachers.

- values: log-probabilities at T = 1, v = z - lse, of the top-k classes (and of the sampled tail), in the store's
  value dtype: in float16 a value's rounding error is |log p| x 2^-11 relative on its probability, small where the
  probability is (a logit's would be |z| x 2^-11, whatever its probability);
- the label classes as log-odds a_c = logsumexp_{j != c}(z_j - z_c), from which both log p_c and log(1 - p_c) are
  exact (`cache.distribution.label_log_odds`), at T = 1 and at every tail temperature slot;
- with --standardize, the logits' standard deviation (logit standardization's temperature scale);
- with a sampled tail (`TailSpec`), M classes drawn from the rest and, per temperature slot, log Z over all classes.

The read side (cache.targets) rebuilds the teacher's distribution from these arrays; its docstring gives the
estimator the sampled tail feeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cache.distribution import effective_temperature, label_log_odds
from cache.format import (
    LABEL_LOG_ODDS,
    LOG_Z,
    LOGIT_STD,
    LSE,
    TAIL_IDS,
    TAIL_LABEL_LOG_ODDS,
    TAIL_LSE,
    TAIL_SEED_SALT,
    TAIL_VALUES,
    TOPK_INDICES,
    TOPK_VALUES,
    CacheDescription,
)


@dataclass(frozen=True)
class TailSpec:
    """What `summarize` draws and records of the tail: M samples, draw temperature, and the temperature slots whose
    log Z and label log-odds it stores: `temperatures` (T != 1, raw logits), then `standard_temperatures` (T of the
    standardized logits)."""

    samples: int = 0
    temperatures: list[float] = field(default_factory=list)
    draw_temperature: float = 1.0
    standard_temperatures: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, d: CacheDescription) -> TailSpec:
        return cls(d.tail_samples, d.tail_temperatures, d.tail_draw_temperature, d.standard_temperatures)

    @property
    def slots(self) -> list[tuple[float, bool]]:
        """(T, standardized) per slot, in the store's order (`CacheDescription.slots`)."""
        return [(float(t), False) for t in self.temperatures] + [(float(t), True) for t in self.standard_temperatures]


def draw_tail(stored: np.ndarray, known: np.ndarray, view_seeds: np.ndarray, m: int, draw_T: float):
    """Draw m tail classes per view, with replacement, from r_j = exp(v_j / T_d - tail_lse) over the classes not
    `known`, v the values as the store keeps them (so that training recomputes r_j from the stored values exactly).

    stored [B, C] float64 of stored values, known [B, C] bool, view_seeds [B] -> (ids [B, m] int64, -1 where the
    tail is empty; tail_lse [B] float64, -inf there). Each view draws from its own generator seeded
    [view_seed, TAIL_SEED_SALT], so the draw replays from the replay record whatever the batch."""
    a = np.where(known, -np.inf, stored / draw_T)
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


def log_probabilities(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z [B, C] float32 -> (log-probabilities [B, C], log-sum-exp [B]), each exact to float32 relative to its own
    size: v = (z - max) - log1p(sum over the other classes of exp(z - max)), never z - lse, whose subtraction of
    two numbers near max |z| would cost the top classes' small |v| an absolute max |z| x 2^-24."""
    top = z.max(dim=1, keepdim=True)
    d = z - top.values  # [B, C], 0 at the top class
    others = torch.exp(d).scatter(1, top.indices, 0.0).sum(1, keepdim=True)
    log_norm = torch.log1p(others)  # [B, 1]: log of sum exp(d), the top class's 1 taken out of the sum
    return d - log_norm, (top.values + log_norm)[:, 0]


def summarize(logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor, k: int,
              view_seeds: np.ndarray | None = None, tail: TailSpec = TailSpec(), value_dtype: str = "float16",
              standardize: bool = False) -> dict:
    """logits [B, C] -> what the cache keeps of them (module docstring): array name -> numpy in the array's dtype
    (cast in torch, so that a float16 rounds as the pass has always rounded it). With `tail.samples`, also the
    sampled tail (`draw_tail`; view_seeds [B] from the replay record) and its temperature slots."""
    z = logits.float()
    C = z.shape[1]
    indices = z.topk(k, dim=1).indices  # sorted, descending
    v, lse = log_probabilities(z)
    labels2 = torch.stack([labels, partner_labels], 1)
    out = {TOPK_VALUES: v.gather(1, indices), TOPK_INDICES: indices, LSE: lse,
           LABEL_LOG_ODDS: label_log_odds(z, labels2)}
    std = z.std(dim=1)
    if standardize:
        out[LOGIT_STD] = std
    if tail.samples:
        out |= _tail(z, v, indices, labels2, view_seeds, tail, value_dtype, std)
    return {a.name: t.to(getattr(torch, a.dtype_for(C, value_dtype))).cpu().numpy() for a, t in out.items()}


def _tail(z: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, labels2: torch.Tensor, view_seeds: np.ndarray,
          tail: TailSpec, value_dtype: str, std: torch.Tensor) -> dict:
    """The sampled tail of `summarize`: draws from the stored values, then log Z and the label log-odds per slot."""
    known = torch.zeros_like(z, dtype=torch.bool).scatter_(1, indices, True).scatter_(1, labels2, True)
    stored = v.to(getattr(torch, value_dtype)).double().cpu().numpy()  # the draw uses the values as stored
    ids, tail_lse = draw_tail(stored, known.cpu().numpy(), view_seeds, tail.samples, tail.draw_temperature)
    tail_values = np.take_along_axis(stored, np.maximum(ids, 0), 1) * (ids >= 0)
    out = {TAIL_IDS: torch.from_numpy(ids), TAIL_VALUES: torch.from_numpy(tail_values),
           TAIL_LSE: torch.from_numpy(tail_lse)}
    if tail.slots:
        temps = [effective_temperature(t, std) if standard else torch.full_like(std, t) for t, standard in tail.slots]
        out[LOG_Z] = torch.stack([torch.logsumexp(v / t[:, None], dim=1) for t in temps], 1)  # [B, t]
        out[TAIL_LABEL_LOG_ODDS] = torch.stack([label_log_odds(z, labels2, t) for t in temps], 1)  # [B, t, 2]
    return out
