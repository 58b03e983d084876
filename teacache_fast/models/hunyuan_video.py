"""HunyuanVideo (diffusers HunyuanVideoTransformer3DModel).

Stack: transformer_blocks then single_transformer_blocks, called with
positional arguments (hidden_states, encoder_hidden_states, temb,
attention_mask, freqs_cis, ...) and returning (hidden_states,
encoder_hidden_states). Indicator: block 0's norm1 modulation of the video
tokens (the token-replace I2V blocks have the same norm1.linear / norm1.norm;
the published coefficients are for T2V). Forced: first and last step.
"""
from __future__ import annotations

from .base import Adapter, BlockCall, Variant, ada_norm_zero, first_and_last, pick_variant

CLASSES = ("HunyuanVideoTransformer3DModel",)
VARIANTS = {
    "t2v": Variant((7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02),
                   (0.1, 0.15), "HunyuanVideo T2V: 1.6x / 2.1x"),
}
DEFAULT_VARIANT = "t2v"


def indicator(call: BlockCall):
    return ada_norm_zero(call.model.transformer_blocks[0].norm1, call["hidden_states"], call["temb"])


def passthrough(call: BlockCall):
    return call["hidden_states"], call["encoder_hidden_states"]


def adapter(model, variant=None) -> Adapter:
    name, v = pick_variant("HunyuanVideo", VARIANTS, variant, DEFAULT_VARIANT)
    return Adapter(
        name="hunyuan_video", variant=name,
        blocks=lambda m: list(m.transformer_blocks) + list(m.single_transformer_blocks),
        indicator=indicator, output_index=0, passthrough=passthrough,
        unbatched=("freqs_cis",), forced=first_and_last,
        coefficients=list(v.coefficients), threshold=v.thresholds[0])
