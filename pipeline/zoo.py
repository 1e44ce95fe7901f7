"""Small MLP students registered with timm, for 32x32 data on CPUs.

timm's Mixer and ResMLP are registered only at ImageNet scale (patch 16, 224 px): at 32 px they see a
2x2 token grid. These variants keep the architecture and use patch 4 (an 8x8 grid). Importing
`pipeline.models` (which every stage does) registers them; then
`timm.create_model("resmlp_tiny_p4", checkpoint_path=...)` works like any timm name.
"""

from timm.models import register_model
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock, _create_mixer


@register_model
def mixer_tiny_p4(pretrained: bool = False, **kwargs) -> MlpMixer:
    """MLP-Mixer, 8 blocks of width 128, 4x4 patches, 32x32 input."""
    args = dict(img_size=32, patch_size=4, num_blocks=8, embed_dim=128, **kwargs)
    return _create_mixer("mixer_s16_224", pretrained=False, **args)


@register_model
def resmlp_tiny_p4(pretrained: bool = False, **kwargs) -> MlpMixer:
    """ResMLP, 8 blocks of width 128, 4x4 patches, 32x32 input."""
    args = dict(img_size=32, patch_size=4, num_blocks=8, embed_dim=128, mlp_ratio=4, block_layer=ResBlock,
                norm_layer=Affine, **kwargs)
    return _create_mixer("resmlp_12_224", pretrained=False, **args)


@register_model
def resmlp_demo(pretrained: bool = False, **kwargs) -> MlpMixer:
    """ResMLP for the demo: 16x16 input, 4x4 patches (a 4x4 token grid), 4 blocks of width 64.

    Every argument can be overridden (the variants above fix theirs at 32 px)."""
    args = dict(img_size=16, patch_size=4, num_blocks=4, embed_dim=64, mlp_ratio=4, block_layer=ResBlock,
                norm_layer=Affine) | kwargs
    return _create_mixer("resmlp_12_224", pretrained=False, **args)
