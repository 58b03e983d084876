"""HunyuanVideo-1.5 (diffusers HunyuanVideo15Transformer3DModel).

Stack: transformer_blocks, called as block(hidden_states,
encoder_hidden_states, temb, attention_mask, freqs_cis) and returning
(hidden_states, encoder_hidden_states), in a loop that only runs the blocks
(the text refiner and the token reordering run before it). The residual
covers the video tokens. Indicator (no source defines one): block 0's
AdaLayerNormZero norm1 modulation of the video tokens, as for
HunyuanVideo. Forced: first and last step. No trustworthy published set:
structure only.
"""
from __future__ import annotations

from .record import Family, structure_only
from .common import ada_norm_zero_msa

FAMILY = Family(
    name="hunyuan_video15", title="HunyuanVideo-1.5", classes=("HunyuanVideo15Transformer3DModel",),
    variants={"default": structure_only("HunyuanVideo-1.5: no public set of its own")},
    default_variant="default",
    blocks=("transformer_blocks",),
    skip_loops=True,
    indicator=ada_norm_zero_msa("transformer_blocks"),
    returns=("hidden_states", "encoder_hidden_states"),
    unbatched=("freqs_cis",),
)
