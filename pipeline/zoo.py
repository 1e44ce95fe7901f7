"""A small MLP student registered with timm, for the demo's 16x16 digits on CPUs.

timm's ResMLP is registered only at ImageNet scale (patch 16, 224 px): at 16 px it would see one
token. This variant keeps the architecture and uses patch 4 (a 4x4 grid). Importing `pipeline.models`
(which every stage does) registers it; then `timm.create_model("resmlp_demo")` works like any timm name.
"""

from timm.models import register_model
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock, _create_mixer


@register_model
def resmlp_demo(pretrained: bool = False, **kwargs) -> MlpMixer:
    """ResMLP for the demo: 16x16 input, 4x4 patches (a 4x4 token grid), 4 blocks of width 64; every
    argument can be overridden."""
    args = dict(img_size=16, patch_size=4, num_blocks=4, embed_dim=64, mlp_ratio=4, block_layer=ResBlock,
                norm_layer=Affine) | kwargs
    return _create_mixer("resmlp_12_224", pretrained=False, **args)
