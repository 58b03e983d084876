"""Z-Image (diffusers ZImageTransformer2DModel).

Stack: layers, on the unified image + caption sequence the model builds
after its noise and context refiners (which always run), called as
layer(x, attn_mask, freqs_cis, adaln_input, ...) and returning x; the
residual covers the unified sequence (the final layer cuts the image out
after the span). Indicator (no source defines one): layers[0]'s
``RMSNorm_w(x) * (1 + scale_msa)`` (no shift) from adaLN_modulation of the
timestep embedding. The omni mode (SigLIP image tokens with per-token
noisy / clean modulation) is not supported: such a call is a clear error.
Forced: first and last step. The model's timestep argument is ``t``. No
trustworthy published set (the HunyuanVideo set and a placeholder reused
for it are on the never-ship list): structure only.
"""
from __future__ import annotations

from .base import BlockCall
from .record import Family, structure_only
from .common import rms_scaled


def indicator(call: BlockCall):
    layer = call.model.layers[0]
    if call.get("noise_mask") is not None:
        raise ValueError("TeaCache's Z-Image adapter does not support the omni mode (per-token "
                         "noisy / clean modulation with siglip_feats); run it without TeaCache")
    scale = layer.adaLN_modulation(call["adaln_input"]).chunk(4, dim=1)[0]
    return rms_scaled(layer.attention_norm1, call["x"], scale)


FAMILY = Family(
    name="z_image", title="Z-Image", classes=("ZImageTransformer2DModel",),
    variants={"default": structure_only("Z-Image: no public set of its own")},
    default_variant="default",
    blocks=("layers",),
    indicator=indicator,
    stream="x",
    timestep_arg="t",
)
