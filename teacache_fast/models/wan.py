"""Wan2.1 (diffusers WanTransformer3DModel).

Stack: blocks, called as block(hidden_states, encoder_hidden_states,
timestep_proj, rotary_emb) and returning hidden_states. The indicator is the
timestep embedding, never the latent: ``e`` (condition_embedder output 0,
the plain time embedding) by default, ``e0`` (output 1, the projected one) in
the "-ret" variants. Cond and uncond calls are separate branches (they decide
alike, but their residuals differ). Forced per branch: first and last step;
"-ret" variants: the first 5 steps, the last not forced.
"""
from __future__ import annotations

from .base import Adapter, BlockCall, Variant, first_and_last, first_n, pick_variant

CLASSES = ("WanTransformer3DModel",)
RET_STEPS = 5
_E = {
    "t2v-1.3b": (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01),
    "t2v-14b": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    "i2v-480p": (-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01),
    "i2v-720p": (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
}
_E0 = {
    "t2v-1.3b": (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
    "t2v-14b": (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
    "i2v-480p": (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01),
    "i2v-720p": (8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02),
}
_THRESHOLDS = {"t2v-1.3b": (0.05, 0.08), "t2v-14b": (0.14, 0.20), "i2v-480p": (0.13, 0.26),
               "i2v-720p": (0.20, 0.30)}
_RET_THRESHOLDS = {"t2v-1.3b": (0.05, 0.10), "t2v-14b": (0.10, 0.20), "i2v-480p": (0.20, 0.30)}

VARIANTS = {}
for _name, _c in _E.items():
    VARIANTS[_name] = Variant(_c, _THRESHOLDS[_name], "indicator e (time embedding); first and last forced")
for _name, _t in _RET_THRESHOLDS.items():  # i2v-720p has no published ret_steps thresholds
    VARIANTS[_name + "-ret"] = Variant(_E0[_name], _t, f"indicator e0; first {RET_STEPS} steps forced")
DEFAULT_VARIANT = None  # the checkpoint is not visible from the model: ask


def _default_variant(model):
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "image_dim", None) is not None:
        return None
    dims = (getattr(cfg, "num_attention_heads", 0) * getattr(cfg, "attention_head_dim", 0),
            getattr(cfg, "num_layers", 0))
    return {(1536, 30): "t2v-1.3b", (5120, 40): "t2v-14b"}.get(dims)


def adapter(model, variant=None) -> Adapter:
    name, v = pick_variant("Wan", VARIANTS, variant, _default_variant(model))
    ret = name.endswith("-ret")
    output = 1 if ret else 0

    def indicator(call: BlockCall):
        return call.captured["condition"][output]

    return Adapter(
        name="wan", variant=name, blocks=lambda m: list(m.blocks), indicator=indicator,
        capture={"condition": lambda m: m.condition_embedder}, unbatched=("rotary_emb",),
        forced=first_n(RET_STEPS) if ret else first_and_last,
        coefficients=list(v.coefficients), threshold=v.thresholds[0])
