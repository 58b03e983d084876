"""Chroma (diffusers ChromaTransformer2DModel), a pruned FLUX.1-schnell.

Stack: the dual-stream transformer_blocks (returning (encoder_hidden_states,
hidden_states)), then the single_transformer_blocks on the joint text +
image sequence the model concatenates between the two lists (returning
hidden_states). The span ends at the INPUT of norm_out, where the model has
cut the image tokens back out. Indicator (no source defines one): block 0's
norm1, ``LayerNorm(h) * (1 + scale_msa) + shift_msa`` with the per-block
modulation Chroma's approximator hands the block as temb (no linear).
Forced: first and last step. No trustworthy published set (the FLUX.1 set
reused for Chroma is on the never-ship list): structure only.
"""
from __future__ import annotations

from .base import BlockCall, Modulated
from .common import image_and_text_passthrough
from .record import Family, structure_only


def indicator(call: BlockCall) -> Modulated:
    norm1 = call.model.transformer_blocks[0].norm1
    # temb: (B, 12, C), the image stream's six modulations then the text's;
    # norm1 reads the image's as shift_msa, scale_msa, ...
    temb = call["temb"]
    shift, scale = temb[:, 0], temb[:, 1]
    return Modulated(call["hidden_states"], scale, shift, norm="layer", eps=float(norm1.norm.eps))


FAMILY = Family(
    name="chroma", title="Chroma", classes=("ChromaTransformer2DModel",),
    variants={"default": structure_only("Chroma: no public set of its own")},
    default_variant="default",
    blocks=("transformer_blocks", "single_transformer_blocks"),
    indicator=indicator,
    passthrough=image_and_text_passthrough,
    end="norm_out",
    unbatched=("image_rotary_emb",),
    subset=False,
)
