"""HiDream-I1 (diffusers HiDreamImageTransformer2DModel).

Stack: double_stream_blocks then single_stream_blocks. The model's own code
between and after them concatenates and slices text tokens, so the cached
span ends at the input of final_layer (the image tokens after the stack).
Indicator: the t_embedder output only, not the temb the blocks receive (that
one adds the pooled text). Forced: the first ceil(0.1 n) steps; the last is
not forced.

HiDream-I1 Dev and Fast (ComfyUI-TeaCache sets): their indicator is the
embedded image tokens (the x_embedder output after patchify, not
timestep-modulated), a single branch, plain sum; the first call computes.
Fast also computes from 90% of the schedule on. A Dev / Fast checkpoint's
config is Full's, so the variant is named.
"""
from __future__ import annotations

from .base import BlockCall, first_fraction, first_only
from .record import Family, Variant
from .common import COMFYUI_TEACACHE, captured_output, reference

_COMFY = f"{COMFYUI_TEACACHE} nodes.py"
_TOKENS = captured_output("x_embedder")  # the embedded image tokens


def passthrough(call: BlockCall):
    h, enc = call["hidden_states"], call.get("encoder_hidden_states")
    return h if enc is None else (h, enc)  # single-stream blocks get no text


FAMILY = Family(
    name="hidream", title="HiDream", classes=("HiDreamImageTransformer2DModel",),
    variants={
        "full": Variant((-3.13605009e+04, -7.12425503e+02, 4.91363285e+01, 8.26515490e+00, 1.08053901e-01),
                        (0.17, 0.25, 0.3, 0.45), "HiDream-I1-Full: 1.5x / 1.7x / 2.0x / 2.6x",
                        reference("TeaCache4HiDream-I1/teacache_hidream_i1.py", "TeaCache4HiDream-I1/README.md")),
        "dev": Variant((1.39997273, -4.30130469, 5.01534416, -2.20504164, 0.93942874), (1.0,),
                       "HiDream-I1-Dev: threshold 1.0 -> ~2x; indicator: embedded image tokens", _COMFY,
                       indicator=_TOKENS, forced=first_only),
        "fast": Variant((2.26509623, -6.88864563, 7.61123826, -3.10849353, 0.99927602), (1.5,),
                        "HiDream-I1-Fast: threshold 1.5, end 0.9 -> ~1.7x; indicator: embedded image tokens",
                        _COMFY, indicator=_TOKENS, forced=first_only, end=0.9),
    },
    default_variant="full",
    blocks=("double_stream_blocks", "single_stream_blocks"),
    indicator=captured_output("t_embedder"),
    passthrough=passthrough,
    capture={"t_embedder": "t_embedder", "x_embedder": "x_embedder"},
    end="final_layer",
    timestep_arg="timesteps",
    unbatched=("image_rotary_emb",),
    subset=False,
    forced=first_fraction(0.1),
)
