"""CogVideoX (diffusers CogVideoXTransformer3DModel).

Stack: transformer_blocks, returning (hidden_states, encoder_hidden_states).
Indicator: the time embedding ``emb`` that block 0 receives as temb (plus the
ofs embedding in 1.5-I2V). The residual covers the video tokens (the
reference also caches the text stream, which does not reach the output).
Forced: first and last step.
"""
from __future__ import annotations

from .record import Family, Variant
from .common import block_argument, reference

_T = (0.1, 0.2, 0.3)
_NOTE = "published thresholds 0.1 / 0.2 / 0.3: 1.3x / 1.8x / 2.1x"
_SOURCE = reference("TeaCache4CogVideoX1.5/teacache_sample_video.py", "TeaCache4CogVideoX1.5/README.md")


def _default_variant(model) -> str:
    """From the config: 1.5 models patch time (patch_size_t), 1.5-I2V adds an
    ofs embedding, 2b has 30 heads, the rest is 5b."""
    cfg = model.config
    if getattr(cfg, "patch_size_t", None) is not None:
        return "1.5-5b-i2v" if getattr(cfg, "ofs_embed_dim", None) else "1.5-5b"
    return "2b" if getattr(cfg, "num_attention_heads", None) == 30 else "5b"


FAMILY = Family(
    name="cogvideox", title="CogVideoX", classes=("CogVideoXTransformer3DModel",),
    variants={
        "2b": Variant((-3.10658903e+01, 2.54732368e+01, -5.92380459e+00, 1.75769064e+00, -3.61568434e-03),
                      _T, _NOTE, _SOURCE),
        "5b": Variant((-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02),
                      _T, _NOTE + " (also CogVideoX-5b-I2V)", _SOURCE),
        "1.5-5b": Variant((2.50210439e+02, -1.65061612e+02, 3.57804877e+01, -7.81551492e-01, 3.58559703e-02),
                          _T, _NOTE, _SOURCE),
        "1.5-5b-i2v": Variant((1.22842302e+02, -1.04088754e+02, 2.62981677e+01, -3.06009921e-01,
                               3.71213220e-02), _T, _NOTE, _SOURCE),
    },
    default_variant=_default_variant,
    blocks=("transformer_blocks",),
    skip_loops=True,
    indicator=block_argument("temb"),
    returns=("hidden_states", "encoder_hidden_states"),
    unbatched=("image_rotary_emb",),
)
