"""The teacher's distribution at a temperature, as a cache with a sampled tail gives it to the losses.

Stage one (cache.teacher_pass) stores what makes it; the read side (cache.targets) builds it; the losses
(students.losses) take it beside plain logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TeacherDist(NamedTuple):
    """The teacher at temperature T as a sampled-tail cache gives it.

    log_p [B, C]: log p_j = z_j / T - log Z_T, exact on known and sampled classes, finite filler elsewhere;
    scale [B, C]: 1 on known classes (top-k, labels), count_j / (M r_j) on sampled tail classes, 0 on the rest."""

    log_p: torch.Tensor
    scale: torch.Tensor
