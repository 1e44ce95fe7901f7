"""Linear CKA between the stage features of two models (Kornblith et al. 2019), as the OFA paper measures.

For features X [n, d1] and Y [n, d2] of the same n inputs, K = X X^T, L = Y Y^T, H = I - 11^T / n:

    HSIC(K, L) = tr(K H L H) / (n - 1)^2,     CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

`full` computes that on all n samples (memory O(n^2) through the Grams; use for small n).
`minibatch` (Nguyen, Raghu & Kornblith 2021) averages the *unbiased* HSIC estimator over minibatches
of size m and forms CKA from the averages: memory O(m^2) whatever n, and it converges to the
full-batch value as the number of batches grows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline.augment import ViewSpec
from pipeline.errors import UserError
from pipeline.models import ModelSpec
from pipeline.spec import group


@dataclass
class CkaConfig:
    """The options of `cka`: two models (each a `ModelSpec`), the images, and the estimator."""

    data: Path
    """Dataset directory made by `shards`."""
    model_a: ModelSpec = field(default_factory=ModelSpec, metadata=group(
        suffix="-a", names={"name": "model-a"}, required=("name",), about="model A"))
    model_b: ModelSpec = field(default_factory=ModelSpec, metadata=group(
        suffix="-b", names={"name": "model-b"}, required=("name",), about="model B"))
    out: Path = Path("runs/cka")
    """Output directory for cka.png, cka.csv, cka.json."""
    split: str = "val"
    """Split to read."""
    samples: int = 512
    """Number of images."""
    batch_size: int = 64
    """Minibatch size (minibatch CKA averages over these)."""
    mode: Literal["minibatch", "full"] = "minibatch"
    """minibatch (memory O(batch^2)) or full (exact, memory O(n^2))."""
    every_block: bool = False
    """Isotropic models: every block, not 4 depth fractions."""
    views: ViewSpec = field(default_factory=lambda: ViewSpec("imagenet-cnn"), metadata=group(
        exclude=("seed",), defaults={"recipe": "imagenet-cnn"},
        help={"recipe": "Evaluation view size and crop from this preset."}))

    def __post_init__(self):
        if self.samples < 4:
            raise UserError(f"--samples must be at least 4, got {self.samples}")

# ------------------------------------------------------------------------------------------ math


def _center(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Full-batch linear CKA of x [n, d1] and y [n, d2] (float64, feature-space form of the Gram formula)."""
    x, y = _center(x.double()), _center(y.double())
    xy = (y.T @ x).pow(2).sum()
    return float(xy / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()))


def unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    """Unbiased HSIC estimator (Song et al. 2012) of two n x n Gram matrices, n >= 4."""
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0)
    l = l.clone().fill_diagonal_(0)  # noqa: E741
    ones = torch.ones(n, 1, dtype=k.dtype, device=k.device)
    term1 = (k * l).sum()
    term2 = (ones.T @ k @ ones) * (ones.T @ l @ ones) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones.T @ k @ l @ ones)
    return ((term1 + term2 - term3) / (n * (n - 3))).squeeze()


class MinibatchCKA:
    """Accumulates unbiased HSIC over minibatches for every pair of (A stage, B stage)."""

    def __init__(self, n_a: int, n_b: int):
        self.kl = torch.zeros(n_a, n_b, dtype=torch.float64)
        self.kk = torch.zeros(n_a, dtype=torch.float64)
        self.ll = torch.zeros(n_b, dtype=torch.float64)
        self.batches = 0

    def update(self, feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> None:
        """feats_*: per stage [m, d] features of the same m inputs (m >= 4)."""
        grams_a = [f.double() @ f.double().T for f in feats_a]
        grams_b = [f.double() @ f.double().T for f in feats_b]
        for i, ka in enumerate(grams_a):
            self.kk[i] += unbiased_hsic(ka, ka)
            for j, lb in enumerate(grams_b):
                self.kl[i, j] += unbiased_hsic(ka, lb)
        for j, lb in enumerate(grams_b):
            self.ll[j] += unbiased_hsic(lb, lb)
        self.batches += 1

    def value(self) -> np.ndarray:
        return (self.kl / (self.kk[:, None].clamp(min=1e-30) * self.ll[None, :].clamp(min=1e-30)).sqrt()).numpy()


# ------------------------------------------------------------------------------------- features

@dataclass
class StageModel:
    name: str
    model: torch.nn.Module
    minput: object
    indices: list[int]
    labels: list[str]

    @torch.no_grad()
    def features(self, views: torch.Tensor) -> list[torch.Tensor]:
        """views [B, 3, S, S] -> per stage [B, C*H*W] (each image's stage output flattened)."""
        feats = self.model.forward_intermediates(self.minput(views), indices=self.indices, intermediates_only=True)
        return [f.flatten(1).float() for f in feats]


def stage_model(name: str, num_classes: int, view_size: int, weights=None, model_kwargs=None,
                every_block: bool = False, input_size: int | None = None, mean=None, std=None) -> StageModel:
    """`weights` (pipeline.models.Weights): pretrained ones keep their own classifier (the stages are what count)."""
    from pipeline.models import create_model, model_input
    from students.heads import feature_levels
    pretrained = weights is not None and weights.from_timm
    model = create_model(name, None if pretrained else num_classes, weights=weights, model_kwargs=model_kwargs).eval()
    levels, isotropic = feature_levels(model)
    if every_block and isotropic:
        idx = list(range(len(model.feature_info)))
        labels = [f"block{i}" for i in idx]
    else:
        idx = levels
        labels = [f"stage{i + 1}" + (f" (b{b})" if isotropic else "") for i, b in enumerate(levels)]
    return StageModel(name, model, model_input(model, view_size, input_size, mean, std), idx, labels)


def compute_cka(a: StageModel, b: StageModel, batches, mode: str = "minibatch") -> np.ndarray:
    """CKA matrix [stages of A, stages of B] over an iterable of view batches [B, 3, S, S]."""
    if mode == "minibatch":
        acc = MinibatchCKA(len(a.indices), len(b.indices))
        for views in batches:
            if len(views) >= 4:
                acc.update(a.features(views), b.features(views))
        return acc.value()
    if mode != "full":
        raise ValueError(f"mode must be minibatch or full, got {mode}")
    fa, fb = [[] for _ in a.indices], [[] for _ in b.indices]
    for views in batches:
        for lst, f in zip(fa, a.features(views), strict=True):
            lst.append(f)
        for lst, f in zip(fb, b.features(views), strict=True):
            lst.append(f)
    xa, xb = [torch.cat(f) for f in fa], [torch.cat(f) for f in fb]
    return np.array([[linear_cka(x, y) for y in xb] for x in xa])


def save_outputs(matrix: np.ndarray, a: StageModel, b: StageModel, out: Path, meta: dict) -> dict:
    import csv
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cka.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"{a.name} \\ {b.name}", *b.labels])
        for label, row in zip(a.labels, matrix, strict=True):
            w.writerow([label, *[f"{v:.4f}" for v in row]])
    (out / "cka.json").write_text(json.dumps({**meta, "rows": a.labels, "cols": b.labels,
                                              "matrix": matrix.tolist()}, indent=1))
    fig, ax = plt.subplots(figsize=(1.3 * len(b.labels) + 2.5, 1.0 * len(a.labels) + 2))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center",
                    color="black" if matrix[i, j] > 0.6 else "white", fontsize=9)
    ax.set_xticks(range(len(b.labels)), b.labels, rotation=30, ha="right")
    ax.set_yticks(range(len(a.labels)), a.labels)
    ax.set_xlabel(b.name)
    ax.set_ylabel(a.name)
    ax.set_title(f"linear CKA ({meta['mode']}, n={meta['samples']}): {a.name} vs {b.name}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / "cka.png", dpi=110)
    plt.close(fig)
    return {"png": str(out / "cka.png"), "csv": str(out / "cka.csv"), "json": str(out / "cka.json")}


def run_cka(cfg: CkaConfig) -> dict:
    """CKA of the two models on the same evaluation views; writes the outputs, prints the table."""
    from itertools import islice

    from torch.utils.data import DataLoader

    from pipeline.reader import ShardReader
    from pipeline.views import EvalViews
    r = cfg.views.get()
    reader = ShardReader(cfg.data, cfg.split)
    C = reader.manifest.num_classes
    a, b = (stage_model(m.name, C, r.input_size, m.weights, m.model_kwargs, cfg.every_block, m.input_size, m.mean,
                        m.std) for m in (cfg.model_a, cfg.model_b))
    n_batches = -(-cfg.samples // cfg.batch_size)
    loader = DataLoader(EvalViews(reader, r), batch_size=cfg.batch_size)
    views = (batch["view"][: cfg.samples - i * cfg.batch_size] for i, batch in enumerate(islice(loader, n_batches)))
    matrix = compute_cka(a, b, views, cfg.mode)
    n = min(cfg.samples, reader.split.count)
    files = save_outputs(matrix, a, b, cfg.out, {"model_a": cfg.model_a.name, "model_b": cfg.model_b.name,
                                                 "mode": cfg.mode, "samples": n, "batch_size": cfg.batch_size,
                                                 "split": cfg.split})
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"linear CKA ({cfg.mode}, n={n}): rows {cfg.model_a.name}, columns {cfg.model_b.name}")
    t.add_column("")
    for c in b.labels:
        t.add_column(c, justify="right")
    for label, row in zip(a.labels, matrix, strict=True):
        t.add_row(label, *[f"{v:.3f}" for v in row])
    Console().print(t)
    print(f"wrote {files['png']}, {files['csv']}, {files['json']}")
    return files
