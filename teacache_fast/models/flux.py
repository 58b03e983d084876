"""FLUX.1 (diffusers FluxTransformer2DModel).

Stack: the dual-stream transformer_blocks, then the single_transformer_blocks;
in diffusers 0.42 both take (hidden_states, encoder_hidden_states, temb, ...)
and return (encoder_hidden_states, hidden_states). The residual covers the
image stream; the text stream is not used after the stack. Indicator: block
0's norm1 modulation of the image hidden states. Forced: first and last step.
"""
from __future__ import annotations

from .base import Adapter, BlockCall, Variant, ada_norm_zero, first_and_last, pick_variant

CLASSES = ("FluxTransformer2DModel",)
VARIANTS = {
    "dev": Variant((4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01),
                   (0.25, 0.4, 0.6, 0.8), "FLUX.1-dev: 1.5x / 1.8x / 2.0x / 2.25x"),
}
DEFAULT_VARIANT = "dev"


def indicator(call: BlockCall):
    block0 = call.model.transformer_blocks[0]
    return ada_norm_zero(block0.norm1, call["hidden_states"], call["temb"])


def passthrough(call: BlockCall):
    return call["encoder_hidden_states"], call["hidden_states"]


def adapter(model, variant=None) -> Adapter:
    name, v = pick_variant("FLUX", VARIANTS, variant, DEFAULT_VARIANT)
    return Adapter(
        name="flux", variant=name,
        blocks=lambda m: list(m.transformer_blocks) + list(m.single_transformer_blocks),
        indicator=indicator, stream="hidden_states", output_index=1, passthrough=passthrough,
        unbatched=("image_rotary_emb",), forced=first_and_last,
        coefficients=list(v.coefficients), threshold=v.thresholds[0])
