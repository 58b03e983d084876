"""ConsisID (diffusers ConsisIDTransformer3DModel), a CogVideoX-5b derivative.

Stack: transformer_blocks, called as block(hidden_states,
encoder_hidden_states, temb, image_rotary_emb) and returning
(hidden_states, encoder_hidden_states). Between blocks the model adds its
face cross-attention to the video tokens; that lies inside the cached span
(a skipped call's residual carries it; what the loop computes on a skipped
call is dropped), so the loop is not left early (no skip_loops). Indicator:
the time embedding ``time_embedding(time_proj(t))`` that block 0 receives as
temb. Forced: first and last step (the reference wraps its counter one call
early, a bug not copied). Published set: CogVideoX-5b's.
"""
from __future__ import annotations

from .record import Family, Variant
from .common import block_argument, reference

FAMILY = Family(
    name="consisid", title="ConsisID", classes=("ConsisIDTransformer3DModel",),
    variants={
        "default": Variant((-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02),
                           (0.1, 0.15, 0.2), "ConsisID (the CogVideoX-5b set): 1.6x / 2.1x / 2.7x",
                           reference("TeaCache4ConsisID")),
    },
    default_variant="default",
    blocks=("transformer_blocks",),
    indicator=block_argument("temb"),
    returns=("hidden_states", "encoder_hidden_states"),
    unbatched=("image_rotary_emb",),
)
