"""Lumina-Next (diffusers LuminaNextDiT2DModel).

Stack: layers, called as layer(hidden_states, mask, image_rotary_emb,
encoder_hidden_states, encoder_mask, temb=...) and returning hidden_states.
Indicator: layers[0].norm1, ``RMSNorm_w(h) * (1 + scale_msa)`` (the RMSNorm
weight is folded into the scale). Forced: first and last step.
"""
from __future__ import annotations

from .base import Adapter, BlockCall, Variant, first_and_last, pick_variant, rms_scaled

CLASSES = ("LuminaNextDiT2DModel",)
VARIANTS = {
    "default": Variant((393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344),
                       (0.2, 0.3, 0.4, 0.5), "Lumina-Next: 1.5x / 1.9x / 2.4x / 2.8x"),
}
DEFAULT_VARIANT = "default"


def lumina_indicator(call: BlockCall):
    norm1 = call.model.layers[0].norm1
    scale = norm1.linear(norm1.silu(call["temb"])).chunk(4, dim=1)[0]
    return rms_scaled(norm1.norm, call["hidden_states"], scale)


def adapter(model, variant=None) -> Adapter:
    name, v = pick_variant("Lumina-Next", VARIANTS, variant, DEFAULT_VARIANT)
    return Adapter(
        name="lumina_next", variant=name, blocks=lambda m: list(m.layers),
        indicator=lumina_indicator, unbatched=("image_rotary_emb",), forced=first_and_last,
        coefficients=list(v.coefficients), threshold=v.thresholds[0])
