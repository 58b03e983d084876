"""Lumina-Image 2.0 (diffusers Lumina2Transformer2DModel).

Stack: layers (the context and noise refiners before them always run), on
the joint text + image sequence: layer(hidden_states, attention_mask,
rotary_emb, temb). Indicator: layers[0].norm1 on the joint sequence, as in
Lumina-Next. Cond and uncond are separate branches (the reference keys them
by sequence length and never advances its counter when both are equal). With
apply_teacache(pipe) the scheduler's step() marks the steps, so the pipeline's
cfg_trunc_ratio (uncond calls stop part-way) keeps both branches right; on a
bare transformer, calls are told apart by order and a change in calls per
step is seen as a new generation. Forced per branch: first and last step.
"""
from __future__ import annotations

from .base import Adapter, Variant, first_and_last, pick_variant
from .lumina_next import lumina_indicator

CLASSES = ("Lumina2Transformer2DModel",)
VARIANTS = {
    "default": Variant((393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344),
                       (0.2, 0.3, 0.4, 0.5), "the Lumina-Next set, as the reference uses"),
    "v2": Variant((225.7042019806413, -608.8453716535591, 304.1869942338369, 124.21267720116742,
                   -1.4089066892956552), (0.2, 0.3, 0.4, 0.5), "alternative set; Lumina-Next thresholds"),
}
DEFAULT_VARIANT = "default"


def adapter(model, variant=None) -> Adapter:
    name, v = pick_variant("Lumina2", VARIANTS, variant, DEFAULT_VARIANT)
    # rotary embeddings are per sample here (batched), so per-sample slicing takes them too
    return Adapter(
        name="lumina2", variant=name, blocks=lambda m: list(m.layers),
        indicator=lumina_indicator, forced=first_and_last,
        coefficients=list(v.coefficients), threshold=v.thresholds[0])
