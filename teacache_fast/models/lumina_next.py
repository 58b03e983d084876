"""Lumina-Next (diffusers LuminaNextDiT2DModel).

Stack: layers, called as layer(hidden_states, mask, image_rotary_emb,
encoder_hidden_states, encoder_mask, temb=...) and returning hidden_states.
Indicator: layers[0].norm1, ``RMSNorm_w(h) * (1 + scale_msa)`` (the RMSNorm
weight is folded into the scale). Forced: first and last step.
"""
from __future__ import annotations

from .record import Family, Variant
from .common import reference, rms_scale_msa

FAMILY = Family(
    name="lumina_next", title="Lumina-Next", classes=("LuminaNextDiT2DModel",),
    variants={
        "default": Variant((393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344),
                           (0.2, 0.3, 0.4, 0.5), "Lumina-Next-SFT: 1.5x / 1.9x / 2.4x / 2.8x",
                           reference("TeaCache4Lumina-T2X/teacache_lumina_next.py",
                                     "TeaCache4Lumina-T2X/README.md")),
    },
    default_variant="default",
    blocks=("layers",),
    indicator=rms_scale_msa("layers"),
    unbatched=("image_rotary_emb",),
)
