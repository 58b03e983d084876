"""HiDream-I1 (diffusers HiDreamImageTransformer2DModel).

Stack: double_stream_blocks then single_stream_blocks. The model's own code
between and after them concatenates and slices text tokens, so the cached
span ends at the input of final_layer (the image tokens after the stack).
Indicator: the t_embedder output only, not the temb the blocks receive (that
one adds the pooled text). Forced: the first ceil(0.1 n) steps; the last is
not forced.
"""
from __future__ import annotations

from .base import Adapter, BlockCall, Variant, first_fraction, pick_variant

CLASSES = ("HiDreamImageTransformer2DModel",)
VARIANTS = {
    "full": Variant((-3.13605009e+04, -7.12425503e+02, 4.91363285e+01, 8.26515490e+00, 1.08053901e-01),
                    (0.17, 0.25, 0.3, 0.45), "HiDream-I1-Full: 1.5x / 1.7x / 2.0x / 2.6x"),
}
DEFAULT_VARIANT = "full"


def indicator(call: BlockCall):
    return call.captured["t_embedder"]


def passthrough(call: BlockCall):
    h, enc = call["hidden_states"], call.get("encoder_hidden_states")
    return h if enc is None else (h, enc)  # single-stream blocks get no text


def adapter(model, variant=None) -> Adapter:
    name, v = pick_variant("HiDream", VARIANTS, variant, DEFAULT_VARIANT)
    return Adapter(
        name="hidream", variant=name,
        blocks=lambda m: list(m.double_stream_blocks) + list(m.single_stream_blocks),
        indicator=indicator, passthrough=passthrough, output_index=None,
        capture={"t_embedder": lambda m: m.t_embedder}, end=lambda m: m.final_layer,
        timestep_arg="timesteps", unbatched=("image_rotary_emb",), subset=False,
        forced=first_fraction(0.1), coefficients=list(v.coefficients), threshold=v.thresholds[0])
