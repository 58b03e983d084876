"""LongCat-Image (diffusers LongCatImageTransformer2DModel), a FLUX.1 layout.

Stack: the dual-stream transformer_blocks, then the
single_transformer_blocks; both take (hidden_states, encoder_hidden_states,
temb, image_rotary_emb) and return (encoder_hidden_states, hidden_states),
in loops that only run the blocks. The residual covers the image stream.
Indicator (no source defines one): block 0's AdaLayerNormZero norm1
modulation of the image tokens, as for FLUX. Forced: first and last step.
Fits exist in public projects, unverified: structure only.
"""
from __future__ import annotations

from .record import Family, structure_only
from .common import ada_norm_zero_msa

FAMILY = Family(
    name="longcat_image", title="LongCat-Image", classes=("LongCatImageTransformer2DModel",),
    variants={"default": structure_only("LongCat-Image: fits exist in public projects, unverified")},
    default_variant="default",
    blocks=("transformer_blocks", "single_transformer_blocks"),
    skip_loops=True,
    indicator=ada_norm_zero_msa("transformer_blocks"),
    returns=("encoder_hidden_states", "hidden_states"),
    unbatched=("image_rotary_emb",),
)
