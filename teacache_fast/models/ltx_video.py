"""LTX-Video (diffusers LTXVideoTransformer3DModel).

Stack: transformer_blocks (each returns hidden_states). As in the reference,
the cached span also covers the tail: norm_out and the final shift/scale
modulation, so it ends at the input of proj_out. Indicator: block 0's
``RMSNorm(h) * (1 + scale_msa) + shift_msa`` rebuilt from its
scale_shift_table and the temb it receives (no submodule returns it).
Forced: first and last step.
"""
from __future__ import annotations

from .base import BlockCall, Modulated
from .record import Family, Variant
from .common import reference


def indicator(call: BlockCall):
    block0 = call.model.transformer_blocks[0]
    x, temb = call["hidden_states"], call["temb"]
    table = block0.scale_shift_table
    ada = table[None, None].to(temb.device) + temb.reshape(x.shape[0], temb.size(1), table.shape[0], -1)
    shift, scale = ada[:, :, 0], ada[:, :, 1]
    norm = block0.norm1
    if temb.size(1) == 1 and getattr(norm, "weight", None) is None:
        return Modulated(x, scale, shift, norm="rms", eps=float(norm.eps))
    # per-token timesteps (or an affine norm): the modulated input, computed eagerly
    return norm(x) * (1 + scale) + shift


FAMILY = Family(
    name="ltx_video", title="LTX-Video", classes=("LTXVideoTransformer3DModel",),
    variants={
        "0.9.1": Variant((2.14700694e+01, -1.28016453e+01, 2.31279151e+00, 7.92487521e-01, 9.69274326e-03),
                         (0.03, 0.05), "LTX-Video 0.9.1: published thresholds 0.03 / 0.05",
                         reference("TeaCache4LTX-Video/teacache_ltx.py", "TeaCache4LTX-Video/README.md")),
    },
    default_variant="0.9.1",
    blocks=("transformer_blocks",),
    skip_loops=True,
    indicator=indicator,
    tail=("norm_out",), end="proj_out",
    unbatched=("image_rotary_emb",),
    subset=False,
)
