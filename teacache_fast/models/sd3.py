"""Stable Diffusion 3 / 3.5 (diffusers SD3Transformer2DModel).

Stack: transformer_blocks (JointTransformerBlock), called as
block(hidden_states, encoder_hidden_states, temb, ...) and returning
(encoder_hidden_states, hidden_states) (the last block's text output is
None: context_pre_only). The residual covers the image stream; a
ControlNet's residuals, added between blocks, lie inside the span.
Indicator (no published source defines one): block 0's norm1 modulation of
the image tokens, as TeaCache does for MMDiT models (SD3.5's 9-chunk norm1
starts with the same shift/scale). Forced: first and last step; cond and
uncond are separate branches. Skip-layer guidance (``skip_layers``) must
not skip block 0 or the last block (the wrapper then says the span never ran).
No trustworthy published set: structure only.
"""
from __future__ import annotations

from .record import Family, structure_only
from .common import ada_norm_zero_msa

FAMILY = Family(
    name="sd3", title="SD3", classes=("SD3Transformer2DModel",),
    variants={"default": structure_only("SD3 / SD3.5: fits exist in public projects, unverified")},
    default_variant="default",
    blocks=("transformer_blocks",),
    indicator=ada_norm_zero_msa("transformer_blocks"),
    returns=("encoder_hidden_states", "hidden_states"),
)
