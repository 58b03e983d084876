"""Latte (diffusers LatteTransformer3DModel).

Stack: spatial and temporal blocks, run interleaved (transformer_blocks[i],
then temporal_transformer_blocks[i]); each takes hidden_states first and
returns it. They are listed spatial first: with the span ending at a module's
input, only block 0 (the first spatial block) has to come first. Between them the model re-lays the tokens out (frames as the batch for
spatial blocks, tokens as the batch for temporal ones), so a block's output
is not in the span's input layout: the cached span ends at the INPUT of
norm_out, where the tokens are back in the spatial layout
(batch * frames, tokens, C). The stream's batch is batch * frames, so a
per-sample run would decide per frame: per_sample=True is refused.
Indicator: block 0's ``norm1(h) * (1 + scale_msa) + shift_msa`` with the
block's adaLN-single table. Forced: first and last step.
"""
from __future__ import annotations

from .base import BlockCall, Modulated
from .record import Family, Variant


def indicator(call: BlockCall) -> Modulated:
    block = call.model.transformer_blocks[0]
    x, t = call["hidden_states"], call["timestep"]
    shift, scale = (block.scale_shift_table[None] + t.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)[:2]
    norm = block.norm1
    if norm.weight is not None:  # fold the LayerNorm's affine into the modulation
        one = 1 + scale.float()
        scale = norm.weight.float() * one - 1
        shift = shift.float() + (0 if norm.bias is None else norm.bias.float() * one)
    return Modulated(x, scale, shift, norm="layer", eps=float(norm.eps))


FAMILY = Family(
    name="latte", title="Latte", classes=("LatteTransformer3DModel",),
    variants={
        "default": Variant((-2.46434137e+03, 3.08044764e+02, 8.07447667e+01, -4.11385132e+00, 1.11001402e-01),
                           (0.1, 0.2), "Latte: published thresholds 0.1 / 0.2 (from the official eval "
                           "code, a different code base than the per-model scripts); negative for "
                           "rel > 0.2369",
                           "ali-vilab/TeaCache@7c10efc4702c6b619f47805f7abe4a7a08085aa0 eval code "
                           "(Latte), as read by the project's survey shared/MODELS.md"),
    },
    default_variant="default",
    blocks=("transformer_blocks", "temporal_transformer_blocks"),
    indicator=indicator,
    end="norm_out",
    subset=False,
    per_sample=False,
)
