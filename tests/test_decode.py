"""Decoding for the view: JPEG draft (reduced-size) decoding chosen from the crop, replayed bit for bit by both
stages, and shards of resized images (`shards --max-size`)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cache.format import CacheRequest
from cache.targets import CachedTeacher
from cache.teacher_pass import CacheConfig, cache_teacher
from commands.options import build
from pipeline.augment import DRAW_CROP, draw_rng, get_recipe, seed_of_view
from pipeline.errors import UserError
from pipeline.reader import Sample, ShardReader, decode_image, image_size
from pipeline.shards import make_shards
from pipeline.transforms import DRAFT_MARGIN, _decode_for, _rrc_params, base_view, eval_view


def photo_jpegs(root: Path, n: int = 12, size=(200, 150), classes=("a", "b", "c")) -> Path:
    """An ImageFolder tree of real-photo JPEGs (crops of scikit-learn's china.jpg, downscaled, quality 90)."""
    import sklearn
    photo = Image.open(Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg").convert("RGB")
    rng = np.random.default_rng(0)
    for i in range(n):
        x, y = int(rng.integers(0, photo.width - 400)), int(rng.integers(0, photo.height - 300))
        im = photo.crop((x, y, x + 400, y + 300)).resize(size, Image.BICUBIC)
        out = root / classes[i % len(classes)] / f"p{i:03d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        im.save(out, quality=90)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    make_shards(str(photo_jpegs(root / "src")), root / "data", shard_size=6, progress=False)
    make_shards(str(photo_jpegs(root / "src")), root / "data", split="val", shard_size=6, progress=False)
    return root / "data"


def _samples(data: Path, shard: int = 0) -> list[Sample]:
    return list(ShardReader(data).read_shard(shard))


def test_draft_decodes_each_crop_as_small_as_it_allows_and_never_below_the_view(photos):
    """Over many drawn crops: the decoded crop spans >= DRAFT_MARGIN x S (so >= S) on both sides, the next
    reduction would not, the reduced box covers the drawn box to half a reduced pixel, and some crops are reduced."""
    S = 32
    recipe = dataclasses.replace(get_recipe("imagenet-cnn", S), decode="draft")
    used = {1: 0, 2: 0, 4: 0}
    for s in _samples(photos):
        w, h = s.size
        for epoch in range(40):
            vs = seed_of_view(0, epoch, s.index)
            box = _rrc_params(draw_rng(vs, DRAW_CROP), h, w, recipe.scale, recipe.ratio)
            img, (top, left, ch, cw) = _decode_for(s, recipe, box, S, S)
            r = round(w / img.shape[-1])
            used[r] = used.get(r, 0) + 1
            assert ch >= S and cw >= S or r == 1, (box, r)
            if r > 1:
                assert ch >= DRAFT_MARGIN * S - 1 and cw >= DRAFT_MARGIN * S - 1  # the rounding's one pixel
                assert abs(top * r - box[0]) <= r / 2 and abs((top + ch) * r - (box[0] + box[2])) <= r
            assert not (box[2] >= 2 * r * DRAFT_MARGIN * S and box[3] >= 2 * r * DRAFT_MARGIN * S and r < 8)
    assert used[2] > 20 and used[1] > 20, used  # 200x150 photos at 32 px: both cases occur


def test_draft_decoding_is_deterministic_reduced_and_equal_to_full_where_it_does_not_reduce(photos):
    s = _samples(photos)[0]
    full, half = decode_image(s.data), decode_image(s.data, 2)
    assert torch.equal(half, decode_image(s.data, 2)) and tuple(half.shape) == (3, 75, 100)
    assert tuple(full.shape) == (3, 150, 200) and image_size(s.data) == (200, 150)
    big = get_recipe("imagenet-cnn", 96)  # 96 px from a 200x150 photo: never reducible, so draft == full
    for epoch in range(5):
        vs = seed_of_view(0, epoch, s.index)
        assert torch.equal(base_view(s, dataclasses.replace(big, decode="draft"), vs), base_view(full, big, vs))
    assert torch.equal(eval_view(s, dataclasses.replace(big, decode="draft")), eval_view(full, big))
    small = dataclasses.replace(get_recipe("imagenet-cnn", 16), decode="draft")
    assert not torch.equal(eval_view(s, small), eval_view(full, dataclasses.replace(small, decode="full")))


def test_draft_leaves_pngs_at_full_size(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(buf, "PNG")
    s = Sample(buf.getvalue(), 0, 0, 0, (200, 150))
    recipe = dataclasses.replace(get_recipe("imagenet-cnn", 16), decode="draft")
    assert torch.equal(base_view(s, recipe, 7), base_view(s.image, dataclasses.replace(recipe, decode="full"), 7))
    with pytest.raises(UserError, match="sample 0 is unreadable"):
        s.decoded(2)


def test_a_body_that_fails_behind_a_valid_header_stops_naming_the_sample(photos):
    s = _samples(photos)[0]
    bad = Sample(s.data[: len(s.data) // 2], s.label, s.index, 0, s.size, "sample 000000007 in shard x.tar")
    with pytest.raises(UserError, match="sample 000000007 in shard x.tar is unreadable"):
        base_view(bad, get_recipe("imagenet-cnn", 32), 1)


@pytest.fixture(scope="module")
def draft_store(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("draft") / "t.zarr"
    cache_teacher(build(CacheConfig, data=photos, teacher="test_resnet", out=out, recipe="imagenet-cnn", view_size=32,
                        decode="draft", epochs=2, topk=3, batch_size=12, workers=0, progress=False))
    return out


def test_a_draft_cache_replays_with_draft_and_is_refused_with_full_decode(photos, draft_store):
    """Stage one made the views (each shard decoded once for both epochs, a reduction per crop); stage two
    rebuilds them from fresh reads: the fingerprint check passes. The same cache replayed with full decoding
    is refused, by the recorded recipe and by the pixels."""
    from torch.utils.data import DataLoader
    cached = CachedTeacher(draft_store)
    assert cached.recipe.decode == "draft" and cached.store.description.recipe["decode"] == "draft"
    for epoch in range(2):
        assert sum(len(b["index"]) for b in DataLoader(cached.views(photos, epoch), batch_size=4)) == 12
    full = get_recipe("imagenet-cnn", 32)
    with pytest.raises(UserError, match="decode"):
        cached.store.check_request(CacheRequest(recipe=full.to_dict()))
    cached.recipe = full
    with pytest.raises(UserError, match="differ pixel for pixel"):
        list(DataLoader(cached.views(photos, 0), batch_size=4))


def test_a_recipe_record_without_decode_means_full():
    r = get_recipe("imagenet-vit")
    assert "decode" not in r.to_dict() and type(r).from_dict(r.to_dict()).decode == "full"
    d = dataclasses.replace(r, decode="draft").to_dict()
    assert d["decode"] == "draft" and type(r).from_dict(d).decode == "draft"
    with pytest.raises(UserError, match="decode .half. is not one of: full, draft"):
        type(r).from_dict({**d, "decode": "half"})


def test_decode_without_a_recipe_is_refused_not_ignored(tmp_path):
    from conftest import run_cli
    p = run_cli("train-student", "--data", tmp_path, "--student", "test_resnet", "--decode", "draft",
                "--out", tmp_path / "run", "--quiet")
    assert p.returncode == 2 and "--decode draft changes a recipe's views: name the recipe too" in p.stderr + p.stdout
