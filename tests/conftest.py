import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.launch import free_port, launch_cmd, launch_env
from tests.support.runner import ROOT, run_cli, run_cli_process

SHARED_DATA = ROOT.parent / "shared" / "data"

__all__ = ["ROOT", "free_port", "launch_cmd", "launch_env", "run_cli", "run_cli_process"]


def launch_cli(n: int, *args, timeout=600, env=None) -> subprocess.CompletedProcess:
    """The real CLI on n real CPU ranks (tests/support/launch.py: torchrun with ACCELERATE_USE_CPU)."""
    return subprocess.run(launch_cmd(n, ROOT / "cli.py", *args), capture_output=True, text=True, timeout=timeout,
                          env=launch_env(env), cwd=ROOT)


def make_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class=7, size=(20, 16), seed=0) -> Path:
    """A small ImageFolder tree with real JPEG and PNG files of random content."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            fmt = "PNG" if i % 3 == 0 else "JPEG"
            Image.fromarray(arr).save(root / c / f"img{i:03d}.{'png' if fmt == 'PNG' else 'jpg'}", format=fmt)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "src")


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The embedded digits as shards (train 1437, val 360; 200 per shard)."""
    from pipeline.shards import make_shards
    out = tmp_path_factory.mktemp("digits") / "data"
    make_shards("digits", out, progress=False)
    return out


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory) -> Path:
    """A 6-shard slice of digits (48 per shard) for fast cache tests."""
    from pipeline.shards import digits_source, write_split
    classes, splits = digits_source()
    out = tmp_path_factory.mktemp("small") / "data"
    write_split(out, "train", classes, splits["train"][:270], name="digits-small", shard_size=48, progress=False)
    write_split(out, "val", classes, splits["val"][:96], name="digits-small", shard_size=48, progress=False)
    return out


def jpeg_bytes(seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()
