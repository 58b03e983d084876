"""FLUX.2 dev and klein (diffusers Flux2Transformer2DModel).

Stack: the dual-stream transformer_blocks (returning (encoder_hidden_states,
hidden_states)), then the single_transformer_blocks on the joint text +
image sequence the model concatenates between the lists (called with
encoder_hidden_states=None, returning hidden_states). The span ends at the
INPUT of norm_out, where the model has cut the image tokens back out.
Indicator (no source defines one): block 0's ``norm1(h) * (1 + scale_msa) +
shift_msa`` from the shared image modulation ``temb_mod_img`` the block
receives. Forced: first and last step. Calls that extract a KV cache of
reference tokens (``kv_cache_mode="extract"``) change the image sequence
inside the span and are not supported (the residual's shapes disagree). No
trustworthy published set (the FLUX.1 set reused for klein and a
placeholder reused for FLUX.2 are on the never-ship list): structure only.
"""
from __future__ import annotations

from .base import BlockCall, Modulated
from .common import image_and_text_passthrough
from .record import Family, structure_only


def indicator(call: BlockCall):
    norm1 = call.model.transformer_blocks[0].norm1
    x, mod = call["hidden_states"], call["temb_mod_img"]
    shift, scale = mod.chunk(6, dim=-1)[:2]
    if mod.dim() == 3 and mod.shape[1] != 1:  # per-token modulation: as the block computes it
        return (1 + scale) * norm1(x) + shift
    return Modulated(x, scale, shift, norm="layer", eps=float(norm1.eps))


FAMILY = Family(
    name="flux2", title="FLUX.2", classes=("Flux2Transformer2DModel",),
    variants={"default": structure_only("FLUX.2 dev / klein: no public set of their own")},
    default_variant="default",
    blocks=("transformer_blocks", "single_transformer_blocks"),
    indicator=indicator,
    passthrough=image_and_text_passthrough,
    end="norm_out",
    unbatched=("image_rotary_emb",),
    subset=False,
)
