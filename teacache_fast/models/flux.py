"""FLUX.1 (diffusers FluxTransformer2DModel).

Stack: the dual-stream transformer_blocks, then the single_transformer_blocks;
in diffusers 0.42 both take (hidden_states, encoder_hidden_states, temb, ...)
and return (encoder_hidden_states, hidden_states). The residual covers the
image stream; the text stream is not used after the stack. Indicator: block
0's norm1 modulation of the image hidden states. Forced: first and last step.

FLUX.1-Kontext (the same class, run by FluxKontextPipeline; the packed
sequence also holds the reference-image tokens) is ``variant="kontext"``: the
ComfyUI-TeaCache set, tuned with absolute-value accumulation
(``est += |poly(rel)|``; the raw polynomial is negative for rel > 0.2407),
inside the schedule window [0.2, 0.9) (steps outside it compute); step 0
computes, the last step is not forced. A Kontext checkpoint's config is the
FLUX.1 one, so the variant is named, never guessed.
"""
from __future__ import annotations

from .base import first_only
from .record import Family, Variant
from .common import COMFYUI_TEACACHE, ada_norm_zero_msa, reference

FAMILY = Family(
    name="flux", title="FLUX", classes=("FluxTransformer2DModel",),
    variants={
        "dev": Variant((4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01),
                       (0.25, 0.4, 0.6, 0.8), "FLUX.1-dev: 1.5x / 1.8x / 2.0x / 2.25x",
                       reference("TeaCache4FLUX/teacache_flux.py", "TeaCache4FLUX/README.md")),
        "kontext": Variant((-1.04655119e+03, 3.12563399e+02, -1.69500694e+01, 4.10995971e-01, 3.74537863e-02),
                           (0.22,), "FLUX.1-Kontext-dev: threshold 0.22, window [0.2, 0.9): ~2x; abs "
                           "accumulation", f"{COMFYUI_TEACACHE} nodes.py",
                           forced=first_only, accumulate="abs", start=0.2, end=0.9),
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
