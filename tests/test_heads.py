from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch import nn

from pipeline.errors import UserError
from students.heads import PatchMerging, SepConv, StudentWithHeads, isotropic_blocks, select_indices

ROOT = Path(__file__).resolve().parents[1]

# The heads the authors' code builds for the student/teacher pair of each shipped config, derived by reading
# github.com/Hao840/OFAKD (HEAD f7bb896; none of it imported or run):
# - which features: `stage_info` in custom_forward/resnet.py (resnet18: layer1..layer4, widths 64/128/256/512,
#   grids 56/28/14/7, final width 512), custom_forward/vision_transformer.py (deit_tiny_patch16_224: blocks
#   1, 3, 9, 11 of (197, 192), final 192) and custom_forward/mlp_mixer.py (resmlp_12_224: blocks 1, 3, 9, 11 of
#   (196, 384), final 384); teacher widths = the teacher's `stage_info(-1)`: 768 for swin_tiny (swin_transformer.py)
#   and convnext_tiny (convnext.py), 192 for deit_tiny.
# - the heads: `OFA.__init__` in distillers/ofa.py with SepConv, PatchMerging and init_weights from
#   distillers/utils.py, Block from timm 0.6.5 (their requirements.txt):
#   CNN student, stage s < 4: 4 - s SepConvs, in -> 2 in (the last -> D = max(student 512, teacher)); stage 4:
#   Conv2d(in, D, 1) with bias; then AdaptiveAvgPool2d(1), Flatten, Linear(D, classes).
#   SepConv(i, o) = dw3x3/2 (9i) + pw (i*i) + BN (2i) + ReLU + dw3x3 (9i) + pw (i*o) + BN (2o) + ReLU
#                 = i^2 + i*o + 20i + 2o parameters.
#   Token student: floor(log2(14 / 7)) = 1 PatchMerging(dim, W, GELU) = LN(4 dim) + Linear(4 dim, W, no bias)
#   = 8 dim + 4 dim W; max(4 - s, 1) Block(W, num_heads=4) (qkv_bias False in timm 0.6.5) = 12 W^2 + 10 W;
#   readout: class token (DeiT) or token mean (ResMLP, GAP1d); Linear(W, classes).
# Worked numbers, CIFAR Swin-T -> ResNet-18 (D = 768, 100 classes): SepConv(64,128) 13,824, SepConv(128,256)
# 52,224, SepConv(256,768) 268,800, Conv2d(512,768,1) 393,984, Linear(768,100) 76,900.
PAIRS = {
    "cifar100_swin-t_resnet18.yaml": {
        "indices": [1, 2, 3, 4],
        "stage1": (411_748, [("SepConv", 64, 128), ("SepConv", 128, 256), ("SepConv", 256, 768), ("pool",),
                             ("Linear", 768, 100)]),
        "stage2": (397_924, [("SepConv", 128, 256), ("SepConv", 256, 768), ("pool",), ("Linear", 768, 100)]),
        "stage3": (345_700, [("SepConv", 256, 768), ("pool",), ("Linear", 768, 100)]),
        "stage4": (470_884, [("Conv2d", 512, 768, 1, True), ("pool",), ("Linear", 768, 100)]),
    },
    "imagenet_deit-t_resnet18.yaml": {  # D = max(512, 192) = 512
        "indices": [1, 2, 3, 4],
        "stage1": (781_800, [("SepConv", 64, 128), ("SepConv", 128, 256), ("SepConv", 256, 512), ("pool",),
                             ("Linear", 512, 1000)]),
        "stage2": (767_976, [("SepConv", 128, 256), ("SepConv", 256, 512), ("pool",), ("Linear", 512, 1000)]),
        "stage3": (715_752, [("SepConv", 256, 512), ("pool",), ("Linear", 512, 1000)]),
        "stage4": (775_656, [("Conv2d", 512, 512, 1, True), ("pool",), ("Linear", 512, 1000)]),
    },
    "cifar100_convnext-t_resmlp-s12.yaml": {  # W = 384: merge 592,896; block 1,773,312; linear 38,500
        "indices": [1, 3, 9, 11],
        "stage1": (5_951_332, [("PatchMerging", 384, 384, "GELU")] + [("Block", 384, 4, False)] * 3
                   + [("mean",), ("Linear", 384, 100)]),
        "stage2": (4_178_020, [("PatchMerging", 384, 384, "GELU")] + [("Block", 384, 4, False)] * 2
                   + [("mean",), ("Linear", 384, 100)]),
        "stage3": (2_404_708, [("PatchMerging", 384, 384, "GELU"), ("Block", 384, 4, False), ("mean",),
                               ("Linear", 384, 100)]),
        "stage4": (2_404_708, [("PatchMerging", 384, 384, "GELU"), ("Block", 384, 4, False), ("mean",),
                               ("Linear", 384, 100)]),
    },
    "imagenet_convnext-t_deit-t.yaml": {  # W = 192: merge 148,992; block 444,288; linear 193,000
        "indices": [1, 3, 9, 11],
        "stage1": (1_674_856, [("PatchMerging", 192, 192, "GELU")] + [("Block", 192, 4, False)] * 3
                   + [("class token",), ("Linear", 192, 1000)]),
        "stage2": (1_230_568, [("PatchMerging", 192, 192, "GELU")] + [("Block", 192, 4, False)] * 2
                   + [("class token",), ("Linear", 192, 1000)]),
        "stage3": (786_280, [("PatchMerging", 192, 192, "GELU"), ("Block", 192, 4, False), ("class token",),
                             ("Linear", 192, 1000)]),
        "stage4": (786_280, [("PatchMerging", 192, 192, "GELU"), ("Block", 192, 4, False), ("class token",),
                             ("Linear", 192, 1000)]),
    },
}


def config_pair(config: str) -> tuple[nn.Module, int, int]:
    """The config's student (random init), its number of classes and its teacher's feature width."""
    cfg = yaml.safe_load((ROOT / "configs" / config).read_text())["train-student"]
    classes = 100 if config.startswith("cifar100") else 1000
    with torch.device("meta"):  # only the width is needed: no memory, no init
        teacher_width = timm.create_model(cfg["cache_teacher"], num_classes=classes).num_features
    return timm.create_model(cfg["student"]["name"], num_classes=classes), classes, teacher_width


def layers(head: nn.Module) -> list[tuple]:
    """A head as the list of its layers, in the vocabulary of the derivation above."""
    if hasattr(head, "blocks"):  # token head
        out = [("PatchMerging", m.norm.normalized_shape[0] // 4, m.reduction.out_features, type(m.act).__name__)
               for m in head.merges]
        out += [("Block", b.attn.qkv.in_features, b.attn.num_heads, b.attn.qkv.bias is not None) for b in head.blocks]
        return out + [("class token",) if head.class_token else ("mean",), ("Linear", head.fc.in_features,
                                                                            head.fc.out_features)]
    out = []
    for m in head:
        if isinstance(m, SepConv):
            out.append(("SepConv", m[0].in_channels, m[5].out_channels))
        elif isinstance(m, nn.Conv2d):
            out.append(("Conv2d", m.in_channels, m.out_channels, m.kernel_size[0], m.bias is not None))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            out.append(("pool",))
        elif isinstance(m, nn.Linear):
            out.append(("Linear", m.in_features, m.out_features))
    return out


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("config", sorted(PAIRS))
def test_heads_of_the_shipped_pairs_are_the_authors(config):
    bare, classes, teacher_width = config_pair(config)
    model = StudentWithHeads(bare, classes, 224, teacher_width=teacher_width)
    want = PAIRS[config]
    assert model.indices == want["indices"]
    assert model.names == ["stage1", "stage2", "stage3", "stage4"]
    for name in model.names:
        assert (n_params(model.heads[name]), layers(model.heads[name])) == want[name], name


def test_sepconv_and_patch_merging_layer_by_layer():
    """The authors' SepConv (distillers/utils.py): dw 3x3 stride 2, pw 1x1, BN, ReLU, dw 3x3, pw 1x1 to the
    output width, BN, ReLU, convs without bias; their PatchMerging: LN(4C), Linear(4C, out) without bias, act."""
    got = [(type(m).__name__, getattr(m, "in_channels", None), getattr(m, "out_channels", None),
            getattr(m, "stride", None), getattr(m, "groups", None), getattr(m, "bias", None) is not None)
           for m in SepConv(64, 128)]
    assert got == [("Conv2d", 64, 64, (2, 2), 64, False), ("Conv2d", 64, 64, (1, 1), 1, False),
                   ("BatchNorm2d", None, None, None, None, True), ("ReLU", None, None, None, None, False),
                   ("Conv2d", 64, 64, (1, 1), 64, False), ("Conv2d", 64, 128, (1, 1), 1, False),
                   ("BatchNorm2d", None, None, None, None, True), ("ReLU", None, None, None, None, False)]
    assert SepConv(64, 128)[0].kernel_size == SepConv(64, 128)[4].kernel_size == (3, 3)
    assert n_params(SepConv(64, 128)) == 64 ** 2 + 64 * 128 + 20 * 64 + 2 * 128
    m = PatchMerging(96, 768, act=True)
    assert n_params(m) == 8 * 96 + 4 * 96 * 768 and m.reduction.bias is None
    assert m(torch.randn(2, 56, 56, 96)).shape == (2, 28, 28, 768)


@pytest.mark.parametrize("config", sorted(PAIRS))
def test_forward_gives_one_logit_tensor_per_head_and_export_has_no_heads(config):
    bare, classes, teacher_width = config_pair(config)
    model = StudentWithHeads(bare, classes, 224, teacher_width=teacher_width).train()
    out = model(torch.randn(2, 3, 224, 224))
    assert out["logits"].shape == (2, classes)
    assert {k: tuple(v.shape) for k, v in out["heads"].items()} == {f"stage{i}": (2, classes) for i in range(1, 5)}
    (out["logits"].sum() + sum(h.sum() for h in out["heads"].values())).backward()
    assert all(p.grad is not None for p in model.parameters())  # heads and every tensor of the student
    # the exported student is exactly the bare timm model: every tensor, no head tensor
    fresh = timm.create_model(bare.pretrained_cfg["architecture"], num_classes=classes)
    fresh.load_state_dict(model.model.state_dict(), strict=True)
    assert not any("heads" in k for k in model.model.state_dict())
    assert n_params(model) - n_params(model.model) == n_params(model.heads)
    model.eval()
    assert model(torch.randn(1, 3, 224, 224))["heads"] == {}


def test_class_token_reaches_the_token_heads_of_vit_students():
    """DeiT: the class token bypasses the merge and joins the blocks, and the head reads it out (the authors'
    TokenFnContext/TokenFilter); ResMLP has none and is read out by the token mean."""
    seen = {}
    deit = StudentWithHeads(timm.create_model("deit_tiny_patch16_224", num_classes=10), 10, 224).train()
    deit.heads["stage1"].register_forward_hook(lambda m, args, out: seen.update(shapes=[a.shape for a in args]))
    deit(torch.randn(2, 3, 224, 224))
    assert seen["shapes"] == [(2, 192, 14, 14), (2, 1, 192)]
    resmlp = StudentWithHeads(timm.create_model("resmlp_12_224", num_classes=10), 10, 224)
    assert deit.prefix and not resmlp.prefix and not resmlp.heads["stage1"].class_token


def test_the_authors_initialisation():
    torch.manual_seed(0)
    bare, classes, width = config_pair("cifar100_swin-t_resnet18.yaml")
    head = StudentWithHeads(bare, classes, 224, teacher_width=width).heads["stage1"]
    fc, pw, bn = head[-1], head[2][5], head[2][6]  # Linear(768, 100); SepConv(256, 768)'s last pw conv and BN
    # timm's trunc_normal_(std=.02) cuts at +-2 absolute, i.e. effectively a plain normal of std 0.02
    assert abs(fc.weight.std().item() - 0.02) < 0.002 and not fc.bias.any()
    assert abs(pw.weight.std().item() - (2 / 768) ** 0.5) < 0.003  # Kaiming normal, fan out = 768 x 1 x 1
    assert bool((bn.weight == 1).all()) and not bn.bias.any()


def test_isotropic_block_choice_and_selection_errors():
    """The authors' stage_info: blocks 1, 3, 9, 11 of every 12-block ViT/DeiT/Mixer/ResMLP/BEiT-B and 1, 3, 21,
    23 of the 24-block BEiT-L: the ends of a (2, 2, d - 6, 2) split, as Swin-T's (2, 2, 6, 2) stages end."""
    assert isotropic_blocks(12) == [1, 3, 9, 11]
    assert isotropic_blocks(24) == [1, 3, 21, 23]
    assert isotropic_blocks(8) == [1, 3, 5, 7]
    assert isotropic_blocks(4) == [0, 1, 2, 3]
    deit = timm.create_model("deit_tiny_patch16_224", num_classes=10)
    assert select_indices(deit) == ([1, 3, 9, 11], [0, 1, 2, 3])
    assert select_indices(deit, stages=[2, 4])[0] == [3, 11]
    assert select_indices(deit, block_indices=[2, 5, 8, 11])[0] == [2, 5, 8, 11]
    with pytest.raises(UserError, match="stages"):
        select_indices(deit, stages=[5])
    with pytest.raises(UserError, match="block indices"):
        select_indices(deit, block_indices=[12])


# every family the brief names, at real size (construction and one forward; no training)
FAMILIES = ["resnet18", "mobilenetv2_100", "efficientnet_b0", "convnext_tiny", "swin_tiny_patch4_window7_224",
            "vit_tiny_patch16_224", "mixer_s16_224"]


@pytest.mark.parametrize("name", FAMILIES)
def test_heads_for_every_family_at_real_size(name):
    model = StudentWithHeads(timm.create_model(name, num_classes=100), 100, 224, teacher_width=768).train()
    assert model.names == ["stage1", "stage2", "stage3", "stage4"]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert {k: tuple(v.shape) for k, v in out["heads"].items()} == {f"stage{i}": (1, 100) for i in range(1, 5)}


def test_swin_students_get_the_authors_token_heads():
    """Hierarchical transformer: stage 1 (56x56x96) merges three times, projecting to Swin-T's final 768 in
    the first merge, then 3 blocks of 768 with 4 heads (the authors' heads for swin students)."""
    model = StudentWithHeads(timm.create_model("swin_tiny_patch4_window7_224", num_classes=100), 100, 224)
    assert model.kind == "token" and not model.prefix
    assert layers(model.heads["stage1"]) == [("PatchMerging", 96, 768, "GELU"), ("PatchMerging", 768, 768, "GELU"),
                                             ("PatchMerging", 768, 768, "Identity")] + [("Block", 768, 4, False)] * 3 \
        + [("mean",), ("Linear", 768, 100)]
    assert layers(model.heads["stage4"]) == [("Block", 768, 4, False), ("mean",), ("Linear", 768, 100)]
    assert n_params(model.heads["stage1"]) == 26_360_164


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_convnext", "test_efficientnet", "test_mambaout"])
def test_tiny_models_train_with_heads(name):
    kw = {"img_size": 32, "patch_size": 4} if name == "test_vit" else {}
    model = StudentWithHeads(timm.create_model(name, num_classes=10, **kw), 10, 32, teacher_width=64).train()
    out = model(torch.randn(4, 3, 32, 32))
    loss = out["logits"].sum() + sum(h.sum() for h in out["heads"].values())
    loss.backward()
    assert all(p.grad is not None for p in model.heads.parameters())


def test_final_logits_are_the_plain_forward():
    bare = timm.create_model("test_vit", num_classes=10).eval()
    model = StudentWithHeads(bare, 10, 160)
    model.train()
    bare.eval()  # heads in train mode do not change the student's own logits
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(model(x)["logits"], bare(x), atol=1e-5)


@pytest.mark.parametrize("name,kw", [
    ("test_vit", {"img_size": 16, "patch_size": 4, "depth": 4, "class_token": False, "global_pool": "avg"}),
    ("resmlp_demo", {})])
def test_token_lite_heads_keep_their_pinned_sizes(name, kw):
    """--head-kind token-lite builds the lite token heads: their per-head parameter counts for the demo's students
    are pinned here, so a change to the lite heads' layout fails this test."""
    from pipeline.models import create_model
    torch.manual_seed(0)
    model = StudentWithHeads(create_model(name, 10, model_kwargs=kw), 10, 16, head_kind="token-lite").train()
    assert {n: n_params(h) for n, h in model.heads.items()} == {
        "stage1": 150_730, "stage2": 100_746, "stage3": 50_762, "stage4": 50_762}
    assert not model.prefix and type(model.heads["stage1"]).__name__ == "LiteTokenHead"
    out = model(torch.randn(2, 3, 16, 16))
    assert sorted(out["heads"]) == ["stage1", "stage2", "stage3", "stage4"]


def test_the_accuracy_plans_student_has_heads_of_one_size_in_both_kinds():
    """docs/design.md: on bench/plans/tiny50.yaml's student (test_vit at 32 px, patch 4: 64 wide, an 8x8 grid) the
    authors' token heads and the lite ones have nearly the same parameters, so the plan's ofa-lite against ofa
    compares their design, not their size. The figures the page gives are pinned here."""
    from pipeline.models import create_model
    kw = {"img_size": 32, "patch_size": 4}
    sizes = {}
    for kind in ("auto", "token-lite"):
        torch.manual_seed(0)
        student = create_model("test_vit", 50, model_kwargs=kw)
        model = StudentWithHeads(student, 50, 32, head_kind=kind)
        sizes[kind] = sum(n_params(h) for h in model.heads.values())
        assert n_params(model.model) == 261_106
    assert sizes == {"auto": 361_544, "token-lite": 363_400}
    text = (ROOT / "docs" / "design.md").read_text()
    assert "361,544" in text and "363,400" in text and "261,106" in text
