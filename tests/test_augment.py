import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.augment import (
    DRAW_AUTO,
    DRAW_ERASE,
    PRESETS,
    Recipe,
    auto_augment_op,
    draw_rng,
    erase,
    erases,
    get_recipe,
    pillow_compatible,
    seed_of_view,
    seeded_globals,
)
from pipeline.errors import UserError
from pipeline.reader import ShardReader
from pipeline.transforms import MIX_CUTMIX, MIX_MIXUP, base_view, eval_view, mix, mix_record, to_view
from pipeline.views import TrainViews, UnitViews, view_digest


def _small(recipe: Recipe) -> Recipe:
    # the ImageNet presets at a test-friendly size; every other field (ops, mixing, erasing) unchanged
    return dataclasses.replace(recipe, input_size=min(recipe.input_size, 40))


def _collect(loader) -> dict[tuple[int, int], dict]:
    out = {}
    for b in loader:
        for j in range(len(b["index"])):
            epoch = int(b["epoch"][j]) if "epoch" in b else -1
            out[(epoch, int(b["index"][j]))] = {k: v[j] for k, v in b.items()}
    return out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_teacher_and_student_views_are_bit_identical(small_digits, preset):
    """The view stage one shows the teacher equals the view stage two rebuilds: every preset, 0 and 2
    workers, different batch sizes, different shard order and processes layout."""
    recipe = _small(PRESETS[preset])
    reader = ShardReader(small_digits)
    units = list(range(reader.num_shards))
    teacher_side = _collect(DataLoader(UnitViews(reader, recipe, 11, 2, units), batch_size=32, num_workers=0))
    for workers, batch, world in ((0, 7, 1), (2, 16, 2)):
        for epoch in (0, 1):
            got = {}
            for rank in range(world):
                stream = TrainViews(reader, recipe, 11, rank, world)
                stream.set_epoch(epoch)
                got |= {(epoch, i): v for (_, i), v in _collect(DataLoader(stream, batch_size=batch,
                                                                           num_workers=workers)).items()}
            assert len(got) == 270
            for key, v in got.items():
                t = teacher_side[key]
                assert torch.equal(v["view"], t["view"]), (preset, key)
                for f in ("label", "partner_label", "lam", "view_seed", "partner", "mix_mode"):
                    assert torch.equal(v[f], t[f]), (preset, key, f)
    modes = {int(v["mix_mode"]) for v in teacher_side.values()}
    if recipe.mixes:
        assert {MIX_MIXUP, MIX_CUTMIX} <= modes
    else:
        assert modes == {0}


def test_views_differ_across_epochs_and_seeds(small_digits):
    recipe = _small(PRESETS["imagenet-vit"])
    reader = ShardReader(small_digits)
    a = _collect(DataLoader(UnitViews(reader, recipe, 0, 2, [0]), batch_size=64))
    b = _collect(DataLoader(UnitViews(reader, recipe, 1, 1, [0]), batch_size=64))
    differ_epoch = sum(not torch.equal(a[(0, i)]["view"], a[(1, i)]["view"]) for i in range(48))
    differ_seed = sum(not torch.equal(a[(0, i)]["view"], b[(0, i)]["view"]) for i in range(48))
    assert differ_epoch > 40 and differ_seed > 40


def test_mixing_partner_is_in_the_same_shard():
    recipe = get_recipe("imagenet-vit")
    for i in range(200, 300):
        rec = mix_record(recipe, seed_of_view(3, 0, i), i, 200, 100)
        assert rec.partner == -1 or (200 <= rec.partner < 300 and rec.partner != i)
        assert 0.0 <= rec.lam <= 1.0


def test_recipe_validation_collects_every_problem():
    with pytest.raises(UserError) as e:
        Recipe(hflip=1.5, scale=(0.9, 0.1), mixup_alpha=-1)
    msg = str(e.value)
    assert "hflip" in msg and "scale" in msg and "alpha" in msg
    with pytest.raises(UserError, match="unknown recipe"):
        get_recipe("fancy")


def test_student_seed_changes_order_not_views(small_digits):
    recipe = get_recipe("digits")
    reader = ShardReader(small_digits)
    runs = {}
    for order_seed in (0, 1):
        stream = TrainViews(reader, recipe, 7, order_seed=order_seed)
        stream.set_epoch(0)
        runs[order_seed] = [(int(b["index"][j]), b["view"][j]) for b in DataLoader(stream, batch_size=50)
                            for j in range(len(b["index"]))]
    assert [i for i, _ in runs[0]] != [i for i, _ in runs[1]]  # another order...
    views0 = dict(runs[0])
    assert all(torch.equal(views0[i], v) for i, v in runs[1])  # ...of the same views


def _indices(loader) -> list[list[int]]:
    return [b["index"].tolist() for b in loader]


@pytest.mark.parametrize("workers,world", [(0, 1), (1, 1), (2, 2), (3, 1), (4, 1)])
def test_a_loader_resumed_at_batch_i_replays_the_rest_of_the_epoch(small_digits, workers, world):
    """loader(start=i) yields exactly batches i, i + 1, ... of the uninterrupted loader, in order: uneven
    shards (5 x 48 + 30), workers that run out at different batches (4 workers: 6, 4, 3 and 1 batches)."""
    reader, recipe = ShardReader(small_digits), get_recipe("digits")
    for rank in range(world):
        views = TrainViews(reader, recipe, 3, rank, world, order_seed=5)
        full = _indices(views.loader(1, 16, workers))
        assert len(full) >= 4 and len({i for b in full for i in b}) == 16 * len(full)
        for start in sorted({1, 2, 3, len(full) // 2, len(full) - 1, len(full)}):
            assert _indices(views.loader(1, 16, workers, start=start)) == full[start:], (rank, start)


def test_a_resumed_loader_does_not_read_the_shards_it_skips(small_digits, monkeypatch):
    reader, read = ShardReader(small_digits), []
    real = reader.read_shard
    monkeypatch.setattr(reader, "read_shard", lambda shard: read.append(shard) or real(shard))
    views = TrainViews(reader, get_recipe("digits"), 3, order_seed=5)
    order = views.shards(0, 1)
    list(views.loader(0, 16, 0, start=7))  # batch 7 starts at view 112, in the third shard
    assert read == order[2:]


def test_student_seed_changes_initialisation():
    from pipeline.models import create_model
    a = create_model("test_resnet", 10, init_seed=0).state_dict()
    b = create_model("test_resnet", 10, init_seed=1).state_dict()
    c = create_model("test_resnet", 10, init_seed=0).state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a) and not all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ timm's ops, replayed bit for bit

def _image(seed: int, h: int = 45, w: int = 61) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8))


def _view(image: torch.Tensor, recipe: Recipe, vseed: int) -> torch.Tensor:
    """One unmixed training view, as shard_views makes it."""
    return erase(to_view(base_view(image, recipe, vseed)), recipe, vseed)


def test_randaugment_and_erasing_pixels_are_timms():
    """For a given image and drawn op sequence, the view is what timm's own transforms make: the RandAugment
    and RandomErasing that timm's transform factory builds for the authors' settings (rand-m9-mstd0.5-inc1,
    random interpolation, re_prob 0.25 in pixel mode), run under the view's seeding."""
    from timm.data import create_transform
    recipe = dataclasses.replace(PRESETS["imagenet-vit"], input_size=48, mixup_alpha=0.0, cutmix_alpha=0.0)
    _, secondary, final = create_transform(48, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                           interpolation="random", re_prob=0.25, re_mode="pixel", separate=True)
    (randaugment,) = secondary.transforms
    randaugment = pillow_compatible(randaugment)  # as ours: 0-bit Posterize is black, not Pillow 13's error
    to_tensor, normalize, erasing = final.transforms
    plain = dataclasses.replace(recipe, auto_augment="none", erase_prob=0.0, erase_mode=None)  # same crop + flip
    image, augmented, erased = _image(0), 0, 0
    for i in range(24):
        vs = seed_of_view(0, 0, i)
        before = base_view(image, plain, vs)
        pil = Image.fromarray(before.permute(1, 2, 0).numpy())
        with seeded_globals(draw_rng(vs, DRAW_AUTO)):
            pil = randaugment(pil)
        ours = base_view(image, recipe, vs)
        assert torch.equal(ours, torch.from_numpy(np.array(pil)).permute(2, 0, 1)), i  # RandAugment: same pixels
        augmented += not torch.equal(ours, before)
        x = normalize(to_tensor(pil))
        with seeded_globals(draw_rng(vs, DRAW_ERASE)):
            want = erasing(x.clone())  # timm erases in place, in the normalised space
        got = normalize(_view(image, recipe, vs))
        box = want != x
        assert torch.equal(got != x, box), i  # the same box...
        assert torch.equal(got[~box], want[~box]), i  # ...the pixels around it bit for bit
        torch.testing.assert_close(got[box], want[box], rtol=0, atol=1e-5)  # ...and its noise to float rounding
        erased += bool(box.any())
    assert augmented >= 16 and 2 <= erased <= 12  # ops (each with p 0.5) and erasing (p 0.25) really happen


@pytest.mark.parametrize("prob", [0.25, 0.5, 1.0])
def test_the_erase_shortcut_agrees_with_timms_erasing_on_every_view(prob):
    """`erases` (one draw read ahead) says exactly which views timm's RandomErasing, run on a canvas under the
    view's seeding, writes a box into: a timm that drew in another order would fail here."""
    from timm.data.random_erasing import RandomErasing
    recipe = dataclasses.replace(PRESETS["imagenet-vit"], erase_prob=prob)
    timm_erasing = RandomErasing(probability=prob, mode="pixel", device="cpu")
    said = []
    for i in range(300):
        vs = seed_of_view(0, 1, i)
        canvas = torch.full((3, 16, 16), float("nan"))
        with seeded_globals(draw_rng(vs, DRAW_ERASE)):
            timm_erasing(canvas)
        said.append(erases(recipe, vs))
        assert said[-1] == bool((~canvas.isnan()).any()), i
    assert 0.6 * prob * 300 <= sum(said) <= min(300, 1.4 * prob * 300)  # both answers really occur


def test_mixup_is_timms_blend_in_float32_whichever_way_the_partner_comes():
    """mix(): own * lam + partner * (1 - lam) as timm's Mixup computes it on [0, 1] views, bit for bit, from a
    float partner or its uint8 base view, in place or not (in place leaves the partner alone)."""
    own, partner = to_view(_image(3, 40, 40)), _image(4, 40, 40).permute(1, 2, 0).contiguous().permute(2, 0, 1)
    for lam in (0.0, 0.37, 0.999):
        rec = dataclasses.replace(mix_record(PRESETS["imagenet-vit"], 1, 0, 0, 2), lam=lam, mode=MIX_MIXUP)
        want = own * lam + (partner.float() / 255) * (1 - lam)
        for p in (partner, to_view(partner)):
            before = p.clone()
            assert torch.equal(mix(own, p, rec), want)
            assert torch.equal(mix(own.clone(), p, rec, inplace=True), want)
            assert torch.equal(p, before)


def test_random_interpolation_picks_either_kernel_per_view():
    recipe = dataclasses.replace(PRESETS["imagenet-cnn"], input_size=40, interpolation="random")
    image, kernels = _image(1), []
    for i in range(16):
        vs = seed_of_view(0, 0, i)
        got = base_view(image, recipe, vs)
        fixed = {k: base_view(image, dataclasses.replace(recipe, interpolation=k), vs) for k in ("bilinear", "bicubic")}
        kernels += [k for k, v in fixed.items() if torch.equal(v, got)]
    assert len(kernels) == 16 and {"bilinear", "bicubic"} <= set(kernels)


class _Views(torch.utils.data.Dataset):
    def __init__(self, recipe):
        self.recipe = recipe

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return _view(_image(i), self.recipe, seed_of_view(3, 0, i))


def test_a_view_is_a_function_of_recipe_and_seed_and_leaves_the_global_generators_alone():
    recipe = _small(PRESETS["imagenet-vit"])
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    here = [_Views(recipe)[i] for i in range(6)]
    assert random.getstate() == states[0]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:], states[1][1:], strict=True))
    assert torch.equal(torch.get_rng_state(), states[2])
    again = [_Views(recipe)[i] for i in range(6)]
    in_worker = [v for b in DataLoader(_Views(recipe), batch_size=2, num_workers=1) for v in b]
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(here, again, in_worker, strict=True))


# CRC-32s of views, hard-coded: the presets that use no auto-augment, erasing or random interpolation must keep
# their pixels (and so their caches). Valid for the pinned library versions
# of this environment (torch 2.14.1, torchvision 0.29.1, Pillow 13.0.0, numpy 2.4.6, timm 1.0.31): another
# torchvision or Pillow may round a resize differently, and then these numbers, not the code, are to update.
# Per preset: four views of one image mixed (when the preset mixes) with views of another, then the eval view.
_UNCHANGED = {
    "cifar": [3749142017, 530892631, 4267308387, 2268599540, 362305403],
    "digits": [501557428, 596695902, 1305726445, 214281078, 362305403],
    "digits-demo": [1230774476, 699560190, 2974845372, 3154279026, 1136588764],
    "digits-mix": [2188205212, 3815598063, 1323171594, 333961293, 362305403],
    "imagenet-cnn": [188591252, 2083891995, 3175385863, 241175135, 1337558586],
    "tiny-cnn": [3115428400, 982852293, 63262775, 435235030, 2081169157],
}


@pytest.mark.parametrize("preset", sorted(_UNCHANGED))
def test_presets_without_timm_ops_keep_their_pixels(preset):
    r = PRESETS[preset]
    own, other = _image(1), _image(2)
    crcs = []
    for i in range(4):
        vs = seed_of_view(5, 1, i)
        rec = mix_record(r, vs, i, 0, 4)
        partner = to_view(base_view(other, r, seed_of_view(5, 1, rec.partner))) if rec.partner >= 0 else None
        crcs.append(view_digest(erase(mix(to_view(base_view(own, r, vs)), partner, rec), r, vs)))
    crcs.append(view_digest(eval_view(own, r)))
    assert crcs == _UNCHANGED[preset]


def test_a_recipe_from_before_timms_ops_is_refused():
    """A cache made with the hand-written RandAugment or erasing records a recipe this version refuses, rather
    than replaying it with other pixels."""
    old = {**Recipe().to_dict(), "auto_augment": "randaugment", "ra_n": 2, "ra_m": 9}
    del old["erase_mode"]
    with pytest.raises(UserError, match="unknown recipe fields: ra_m, ra_n"):
        Recipe.from_dict(old)
    with pytest.raises(UserError, match="auto_augment"):
        Recipe(auto_augment="randaugment")
    with pytest.raises(UserError, match="erase_mode"):
        Recipe.from_dict({"erase_prob": 0.25})


def test_posterize_of_0_bits_is_black_not_pillows_error():
    """timm's PosterizeIncreasing keeps 0 bits at magnitude 10 (m9 plus noise reaches it): Pillow 13 raises
    there, older Pillow made the image black; ours makes it black."""
    ra = auto_augment_op(PRESETS["imagenet-vit"])
    (op,) = [o for o in ra.ops if o.name == "PosterizeIncreasing"]
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.array(op.aug_fn(img, 0)).max() == 0
    assert (np.array(op.aug_fn(img, 2)) == 192).all()  # other bit counts: timm's posterize as before


def test_shard_views_give_the_global_generators_back_before_each_view_they_yield(tmp_path):
    """Views are made in chunks with the generators' states saved once per chunk (timm's ops reseed them): code
    that draws from them between views (a training step's dropout) gets the draws it would get with no views."""
    from conftest import make_image_folder
    from pipeline.shards import make_shards
    from pipeline.views import VIEW_CHUNK, shard_views
    make_shards(str(make_image_folder(tmp_path / "src", per_class=8)), tmp_path / "ds", shard_size=24, progress=False)
    samples = list(ShardReader(tmp_path / "ds").read_shard(0))
    assert len(samples) > VIEW_CHUNK  # more than one chunk

    def draw():
        return random.random(), float(np.random.random()), float(torch.rand(1))

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    got = [draw() for _ in shard_views(samples, _small(PRESETS["imagenet-vit"]), 0, 0, 0, len(samples))]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert got == [draw() for _ in got]
