"""Mochi (diffusers MochiTransformer3DModel).

Stack: transformer_blocks, returning (hidden_states, encoder_hidden_states).
As in the reference, the cached span also covers norm_out and ends at the
input of proj_out. Indicator: block 0's norm1, ``RMSNorm(h) * (1 + scale_msa)``
with no shift. Forced: first and last step.
"""
from __future__ import annotations

from .record import Family, Variant
from .common import reference, rms_scale_msa

FAMILY = Family(
    name="mochi", title="Mochi", classes=("MochiTransformer3DModel",),
    variants={
        "preview": Variant((-3.51241319e+03, 8.11675948e+02, -6.09400215e+01, 2.42429681e+00, 3.05291719e-03),
                           (0.06, 0.09), "Mochi 1 preview: published thresholds 0.06 / 0.09",
                           reference("TeaCache4Mochi/teacache_mochi.py", "TeaCache4Mochi/README.md")),
    },
    default_variant="preview",
    blocks=("transformer_blocks",),
    skip_loops=True,
    indicator=rms_scale_msa("transformer_blocks"),
    returns=("hidden_states", "encoder_hidden_states"),
    tail=("norm_out",), end="proj_out",
    unbatched=("image_rotary_emb",),
    subset=False,
)
