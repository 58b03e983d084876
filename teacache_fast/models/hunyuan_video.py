"""HunyuanVideo (diffusers HunyuanVideoTransformer3DModel).

Stack: transformer_blocks then single_transformer_blocks, called with
positional arguments (hidden_states, encoder_hidden_states, temb,
attention_mask, freqs_cis, ...) and returning (hidden_states,
encoder_hidden_states). Indicator: block 0's norm1 modulation of the video
tokens (the token-replace I2V blocks have the same norm1.linear / norm1.norm;
the published coefficients are for T2V). Forced: first and last step.
"""
from __future__ import annotations

from .record import Family, Variant
from .common import ada_norm_zero_msa, reference

FAMILY = Family(
    name="hunyuan_video", title="HunyuanVideo", classes=("HunyuanVideoTransformer3DModel",),
    variants={
        "t2v": Variant((7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02),
                       (0.1, 0.15), "HunyuanVideo T2V: 1.6x / 2.1x",
                       reference("TeaCache4HunyuanVideo/teacache_sample_video.py",
                                 "TeaCache4HunyuanVideo/README.md")),
    },
    default_variant="t2v",
    blocks=("transformer_blocks", "single_transformer_blocks"),
    skip_loops=True,
    indicator=ada_norm_zero_msa("transformer_blocks"),
    returns=("hidden_states", "encoder_hidden_states"),
    unbatched=("freqs_cis",),
)
