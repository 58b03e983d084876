"""Cosmos (diffusers CosmosTransformer3DModel).

Stack: transformer_blocks, called as block(hidden_states,
encoder_hidden_states, embedded_timestep, temb, image_rotary_emb,
extra_pos_emb, attention_mask, controlnet_residual) and returning
hidden_states. Indicator: block 0's norm1 on h BEFORE the extra position
embedding each block adds inside. Forced per branch: first and last step.

Cosmos-Predict2 (and 2.5) run the same class without the learnable extra
position embedding of Cosmos-1.0; no trustworthy set is published for them,
so that config picks the structure-only "predict2" variant (never the
Cosmos-1.0 set).
"""
from __future__ import annotations

from .base import BlockCall, Modulated
from .record import Family, Variant, structure_only
from .common import reference


def indicator(call: BlockCall):
    norm1 = call.model.transformer_blocks[0].norm1
    x, emb, temb = call["hidden_states"], call["embedded_timestep"], call.get("temb")
    if emb.dim() != 2:  # per-token timesteps: the modulated input, computed eagerly
        return norm1(x, emb, temb)[0]
    e = norm1.linear_2(norm1.linear_1(norm1.activation(emb)))
    if temb is not None:
        e = e + temb
    shift, scale = e.chunk(3, dim=-1)[:2]
    return Modulated(x, scale, shift, norm="layer", eps=float(norm1.norm.eps))


def _default_variant(model) -> str:
    """Cosmos-1.0 has the learnable extra position embedding; Predict2 / 2.5 not."""
    learnable = getattr(getattr(model, "config", None), "extra_pos_embed_type", None) == "learnable"
    return "default" if learnable else "predict2"


FAMILY = Family(
    name="cosmos", title="Cosmos", classes=("CosmosTransformer3DModel",),
    variants={
        "default": Variant((2.71156237e+02, -9.19775607e+01, 2.24437250e+00, 2.08355751e+00, 1.41776330e-01),
                           (0.3, 0.4), "Cosmos t2v / i2v: 1.4x / 2.0x",
                           reference("TeaCache4Cosmos/teacache_sample_video_t2v.py",
                                     "TeaCache4Cosmos/teacache_sample_video_i2v.py", "TeaCache4Cosmos/README.md")),
        "predict2": structure_only("Cosmos-Predict2: no trustworthy published set"),
    },
    default_variant=_default_variant,
    blocks=("transformer_blocks",),
    indicator=indicator,
    unbatched=("image_rotary_emb",),
)
