"""Qwen-Image / Qwen-Image-Edit (diffusers QwenImageTransformer2DModel).

Stack: transformer_blocks, called as block(hidden_states,
encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb,
...) and returning (encoder_hidden_states, hidden_states). The residual
covers the image stream; a ControlNet's residuals, added between blocks,
lie inside the span. Indicator (no source defines one): block 0's image
modulation ``img_norm1(h) * (1 + scale) + shift`` from ``img_mod(temb)``;
with Edit-2511's per-token modulation (``modulate_index``) the block's own
modulation is computed. Forced: first and last step; CFG calls are separate
branches. No trustworthy published set (the one in circulation is a
round-number placeholder): structure only.
"""
from __future__ import annotations

from .base import BlockCall, Modulated
from .record import Family, structure_only


def indicator(call: BlockCall):
    block = call.model.transformer_blocks[0]
    x = call["hidden_states"]
    mod1 = block.img_mod(call["temb"]).chunk(2, dim=-1)[0]
    index = call.get("modulate_index")
    if index is not None:  # zero_cond_t: per-token choice between two modulations
        return block._modulate(block.img_norm1(x), mod1, index)[0]
    shift, scale = mod1.chunk(3, dim=-1)[:2]
    return Modulated(x, scale, shift, norm="layer", eps=float(block.img_norm1.eps))


FAMILY = Family(
    name="qwen_image", title="Qwen-Image", classes=("QwenImageTransformer2DModel",),
    variants={"default": structure_only("Qwen-Image / -Edit: the public set is a placeholder")},
    default_variant="default",
    blocks=("transformer_blocks",),
    indicator=indicator,
    returns=("encoder_hidden_states", "hidden_states"),
    unbatched=("image_rotary_emb",),
)
