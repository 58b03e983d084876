"""FLUX.1 (diffusers FluxTransformer2DModel).

Stack: the dual-stream transformer_blocks, then the single_transformer_blocks;
in diffusers 0.42 both take (hidden_states, encoder_hidden_states, temb, ...)
and return (encoder_hidden_states, hidden_states). The residual covers the
image stream; the text stream is not used after the stack. Indicator: block
0's norm1 modulation of the image hidden states. Forced: first and last step.
"""
from __future__ import annotations

from .record import Family, Variant
from .common import ada_norm_zero_msa, reference

FAMILY = Family(
    name="flux", title="FLUX", classes=("FluxTransformer2DModel",),
    variants={
        "dev": Variant((4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01),
                       (0.25, 0.4, 0.6, 0.8), "FLUX.1-dev: 1.5x / 1.8x / 2.0x / 2.25x",
                       reference("TeaCache4FLUX/teacache_flux.py", "TeaCache4FLUX/README.md")),
    },
    default_variant="dev",
    blocks=("transformer_blocks", "single_transformer_blocks"),
    skip_loops=True,
    indicator=ada_norm_zero_msa("transformer_blocks"),
    returns=("encoder_hidden_states", "hidden_states"),
    unbatched=("image_rotary_emb",),
)

# Older names, read by tests/test_wrapper*.py: prefer FAMILY.variants and
# teacache_fast.models.adapter_for(model).
VARIANTS, adapter = FAMILY.variants, FAMILY.adapter
