import pytest
import timm
import torch

from pipeline.errors import UserError
from students.heads import StudentWithHeads, select_indices

# every family the brief names, at real size (construction and one forward; no training)
FAMILIES = [("resnet18", {}), ("mobilenetv2_100", {}), ("efficientnet_b0", {}), ("convnext_tiny", {}),
            ("swin_tiny_patch4_window7_224", {}), ("deit_tiny_patch16_224", {}), ("vit_tiny_patch16_224", {}),
            ("mixer_s16_224", {}), ("resmlp_12_224", {})]


@pytest.mark.parametrize("name,kw", FAMILIES)
def test_heads_for_every_family_at_real_size(name, kw):
    bare = timm.create_model(name, num_classes=100, **kw)
    n_bare = sum(p.numel() for p in bare.parameters())
    model = StudentWithHeads(bare, 100, 224, teacher_width=768).train()
    assert model.names == ["stage1", "stage2", "stage3", "stage4"]
    out = model(torch.randn(2, 3, 224, 224))
    assert out["logits"].shape == (2, 100)
    assert {k: tuple(v.shape) for k, v in out["heads"].items()} == {f"stage{i}": (2, 100) for i in range(1, 5)}
    # the exported student is exactly a fresh timm model of that name: every tensor, no head tensor
    fresh = timm.create_model(name, num_classes=100, **kw)
    fresh.load_state_dict(model.model.state_dict(), strict=True)
    assert sum(p.numel() for p in model.parameters()) - n_bare == sum(p.numel() for p in model.heads.parameters()) > 0
    model.eval()
    assert model(torch.randn(1, 3, 224, 224))["heads"] == {}


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


def test_isotropic_depth_fractions_and_selection_errors():
    deit = timm.create_model("deit_tiny_patch16_224", num_classes=10)
    assert select_indices(deit)[0] == [2, 5, 8, 11]
    assert select_indices(deit, stages=[2, 4])[0] == [5, 11]
    assert select_indices(deit, block_indices=[1, 3, 9, 11])[0] == [1, 3, 9, 11]
    with pytest.raises(UserError, match="stages"):
        select_indices(deit, stages=[5])
    with pytest.raises(UserError, match="block indices"):
        select_indices(deit, block_indices=[12])


@pytest.mark.parametrize("name,kind", [("swin_tiny_patch4_window7_224", "TokenHead"), ("resnet18", "ConvHead"),
                                       ("deit_tiny_patch16_224", "TokenHead"), ("convnext_tiny", "ConvHead")])
def test_transformer_students_get_token_heads_by_default(name, kind):
    """The authors give transformer students token heads, hierarchical ones (Swin) included."""
    model = StudentWithHeads(timm.create_model(name, num_classes=100), 100, 224).train()
    assert {type(h).__name__ for h in model.heads.values()} == {kind}
    if name.startswith("swin"):  # at real size: stage features [B, C, H, W] become token grids of the head
        out = model(torch.randn(1, 3, 224, 224))
        assert {tuple(v.shape) for v in out["heads"].values()} == {(1, 100)}
