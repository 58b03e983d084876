"""Wan2.1 (diffusers WanTransformer3DModel).

Stack: blocks, called as block(hidden_states, encoder_hidden_states,
timestep_proj, rotary_emb) and returning hidden_states. The indicator is the
timestep embedding, never the latent: ``e`` (condition_embedder output 0,
the plain time embedding) by default, ``e0`` (output 1, the projected one) in
the "-ret" variants. Cond and uncond calls are separate branches (they decide
alike, but their residuals differ). Forced per branch: first and last step;
"-ret" variants: the first 5 steps, the last not forced.

Wan2.2 (the same class): A14B runs two experts (``transformer`` for the
high-noise steps, ``transformer_2`` for the low-noise ones), TI2V-5B one
model with per-token timesteps. No public Wan2.2 set passes review (the
per-expert ones failed their own project's quality gate; Wan2.1 sets do not
transfer), so their variants carry the structure only: give
``coefficients=`` (one set per expert: ``coefficients={"transformer": [...],
"transformer_2": [...]}``) or ``coefficients="auto"``. A pipeline with
``transformer_2`` picks "2.2-a14b" for both experts; a lone A14B T2V expert's
config is Wan2.1 14B's, so name the variant there.
"""
from __future__ import annotations

from .base import first_n
from .record import Family, Variant, structure_only
from .common import captured_output, reference

RET_STEPS = 5
_SOURCE = reference("TeaCache4Wan2.1/teacache_generate.py", "TeaCache4Wan2.1/README.md")
_E, _E0 = captured_output("condition", 0), captured_output("condition", 1)


def _plain(coefficients, thresholds) -> Variant:
    return Variant(coefficients, thresholds, "indicator e (time embedding); first and last forced", _SOURCE,
                   indicator=_E)


def _ret(coefficients, thresholds) -> Variant:
    return Variant(coefficients, thresholds, f"indicator e0; first {RET_STEPS} steps forced", _SOURCE,
                   indicator=_E0, forced=first_n(RET_STEPS))


_WAN22 = ("Wan2.2 {}: no trustworthy published set (the per-expert sets in circulation failed "
          "their project's quality gate; Wan2.1 sets do not transfer): give coefficients= or "
          "coefficients='auto'")


def _default_variant(model):
    """T2V by size (1.3B: 12 heads x 128 over 30 layers; 14B: 40 x 128 over
    40); I2V (image_dim set) cannot tell 480p from 720p: ask. Wan2.2: TI2V-5B
    by its 48 latent channels, A14B I2V by 36 input channels with no image
    embedding; an A14B expert in a two-expert pipeline by the pipeline."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if getattr(cfg, "in_channels", None) == 48:
        return "2.2-ti2v-5b"
    if getattr(cfg, "image_dim", None) is not None:
        return None
    if getattr(cfg, "in_channels", None) == 36:
        return "2.2-a14b"
    dims = (getattr(cfg, "num_attention_heads", 0) * getattr(cfg, "attention_head_dim", 0),
            getattr(cfg, "num_layers", 0))
    return {(1536, 30): "t2v-1.3b", (5120, 40): "t2v-14b"}.get(dims)


FAMILY = Family(
    name="wan", title="Wan", classes=("WanTransformer3DModel",),
    variants={
        "t2v-1.3b": _plain((2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01),
                           (0.05, 0.08)),
        "t2v-14b": _plain((-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
                          (0.14, 0.20)),
        "i2v-480p": _plain((-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01),
                           (0.13, 0.26)),
        "i2v-720p": _plain((-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683), (0.20, 0.30)),
        "t2v-1.3b-ret": _ret((-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
                             (0.05, 0.10)),
        "t2v-14b-ret": _ret((-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
                            (0.10, 0.20)),
        "i2v-480p-ret": _ret((2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01),
                             (0.20, 0.30)),
        "i2v-720p-ret": _ret((8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02),
                             (0.20, 0.30)),
        "2.2-a14b": structure_only(_WAN22.format("A14B (two experts)")),
        "2.2-ti2v-5b": structure_only(_WAN22.format("TI2V-5B")),
    },
    default_variant=_default_variant,
    expert_variant="2.2-a14b",
    blocks=("blocks",),
    skip_loops=True,
    indicator=_E,
    capture={"condition": "condition_embedder"},
    unbatched=("rotary_emb",),
)
