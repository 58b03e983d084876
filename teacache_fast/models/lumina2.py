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
Rotary embeddings are per sample here (batched), so per-sample runs slice them.

``variant="comfyui"``: the alternative Lumina-Image-2.0 set of ComfyUI-TeaCache,
fitted on the timestep embedding (``temb`` from time_caption_embed, the
argument every layer receives), per CFG branch; threshold 0.38, steps before
20% of the schedule compute (-> ~1.7x). The polynomial is negative for
rel < 0.0068 and rel > 0.325.
"""
from __future__ import annotations

from .record import Family, Variant
from .common import COMFYUI_TEACACHE, block_argument, reference, rms_scale_msa

_SOURCE = reference("TeaCache4Lumina2/teacache_lumina2.py", "TeaCache4Lumina2/README.md")

FAMILY = Family(
    name="lumina2", title="Lumina2", classes=("Lumina2Transformer2DModel",),
    variants={
        # v1 in the source: the Lumina-Next set, which the reference script uses
        "default": Variant((393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344),
                           (0.2, 0.3, 0.4, 0.5), "v1 (the Lumina-Next set): 1.25x / 1.56x / 2.08x / 2.5x",
                           _SOURCE),
        "v2": Variant((225.7042019806413, -608.8453716535591, 304.1869942338369, 124.21267720116742,
                       -1.4089066892956552), (0.2, 0.3, 0.5, 1.1),
                      "v2: better at low thresholds; 1.5x / 1.6x / 1.8x / 2.1x", _SOURCE),
        "comfyui": Variant((-8.74643948e+02, 4.66059906e+02, -7.51559762e+01, 5.32836175e+00, -3.27258296e-02),
                           (0.38,), "Lumina-Image-2.0: threshold 0.38, start 0.2 -> ~1.7x; indicator: "
                           "the timestep embedding", f"{COMFYUI_TEACACHE} nodes.py",
                           indicator=block_argument("temb"), start=0.2),
    },
    default_variant="default",
    blocks=("layers",),
    indicator=rms_scale_msa("layers"),
)
