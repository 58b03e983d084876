"""Mochi (diffusers MochiTransformer3DModel).

Stack: transformer_blocks, returning (hidden_states, encoder_hidden_states).
As in the reference, the cached span also covers norm_out and ends at the
input of proj_out. Indicator: block 0's norm1, ``RMSNorm(h) * (1 + scale_msa)``
with no shift. Forced: first and last step.
"""
from __future__ import annotations

from .base import Adapter, BlockCall, Variant, first_and_last, pick_variant, rms_scaled

CLASSES = ("MochiTransformer3DModel",)
VARIANTS = {
    "preview": Variant((-3.51241319e+03, 8.11675948e+02, -6.09400215e+01, 2.42429681e+00, 3.05291719e-03),
                       (0.06, 0.09), "Mochi 1 preview: published thresholds 0.06 / 0.09"),
}
DEFAULT_VARIANT = "preview"


def indicator(call: BlockCall):
    norm1 = call.model.transformer_blocks[0].norm1
    scale = norm1.linear(norm1.silu(call["temb"])).chunk(4, dim=1)[0]
    return rms_scaled(norm1.norm, call["hidden_states"], scale)


def passthrough(call: BlockCall):
    return call["hidden_states"], call["encoder_hidden_states"]


def adapter(model, variant=None) -> Adapter:
    name, v = pick_variant("Mochi", VARIANTS, variant, DEFAULT_VARIANT)
    return Adapter(
        name="mochi", variant=name, blocks=lambda m: list(m.transformer_blocks),
        indicator=indicator, output_index=0, passthrough=passthrough,
        tail=lambda m: [m.norm_out], end=lambda m: m.proj_out,
        unbatched=("image_rotary_emb",), subset=False, forced=first_and_last,
        coefficients=list(v.coefficients), threshold=v.thresholds[0])
