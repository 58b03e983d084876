"""Indicators and sources shared by several families.

Each helper builds an indicator (``BlockCall -> Modulated | Tensor``) from the
attribute names of a family's layout, so a family file names its facts and
reuses the mechanics. Imports models.base, torch and the standard library only.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn
from torch.nn import functional as F

from .base import BlockCall, Indicator, Modulated

__all__ = ["REFERENCE", "COMFYUI_TEACACHE", "reference", "ada_norm_zero", "rms_scaled", "ada_norm_zero_msa", "rms_scale_msa",
           "block_argument", "captured_output", "image_and_text_passthrough"]

# The reference implementation the published presets are read from.
REFERENCE = "ali-vilab/TeaCache@7c10efc4702c6b619f47805f7abe4a7a08085aa0"
# The ComfyUI node pack whose FLUX.1-Kontext, HiDream-I1 Dev/Fast and
# Lumina-Image-2.0 sets pass the project's survey (shared/MODELS.md).
COMFYUI_TEACACHE = "welltop-cn/ComfyUI-TeaCache@a8012e85"


def reference(*paths: str) -> str:
    """A source string: files of the reference repository at its commit."""
    return f"{REFERENCE} {', '.join(paths)}"


def ada_norm_zero(norm1: nn.Module, x: Tensor, temb: Tensor) -> Modulated:
    """Indicator of an AdaLayerNormZero ``norm1`` (FLUX, HunyuanVideo, SD3; SD3.5's
    SD35AdaLayerNormZeroX): the msa shift/scale (the first two chunks of
    ``linear(silu(temb))``) on a LayerNorm without affine."""
    act = norm1.silu
    # the functional form of a plain SiLU: no module call on the host path
    h = F.silu(temb) if type(act) is nn.SiLU else act(temb)
    lin, rows = norm1.linear, 2 * x.shape[-1]
    if type(lin) is nn.Linear and lin.out_features >= rows:
        # Only the first two chunks (shift_msa, scale_msa) are needed: a third
        # of the weight is read (the full linear is ~100 MB for FLUX; the block
        # runs it again anyway). SD3.5's 9-chunk norm1 starts the same way.
        # Quantized or wrapped linears take the full path.
        bias = None if lin.bias is None else lin.bias[:rows]
        shift, scale = F.linear(h, lin.weight[:rows], bias).chunk(2, dim=1)
    else:
        shift, scale = lin(h)[:, :rows].chunk(2, dim=1)
    return Modulated(x, scale, shift, norm="layer", eps=float(norm1.norm.eps))


def rms_scaled(norm: nn.Module, x: Tensor, scale: Tensor) -> Modulated:
    """Indicator ``RMSNorm(x) * (1 + scale)`` with no shift (Mochi, Lumina).

    An RMSNorm weight w is folded into the scale, ``w * (1 + scale) - 1``, in
    fp32, so the fused op (an RMSNorm without weight) computes the same value.
    """
    weight = getattr(norm, "weight", None)
    eps = float(getattr(norm, "eps", 1e-6))
    if weight is not None:
        scale = weight.float() * (1 + scale.float()) - 1
    return Modulated(x, scale, None, norm="rms", eps=eps)


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = fn.__qualname__ = name
    return fn


def ada_norm_zero_msa(blocks: str) -> Callable[[BlockCall], Indicator]:
    """``blocks[0].norm1(hidden_states, emb=temb)[0]`` of an AdaLayerNormZero
    norm1 (FLUX, HunyuanVideo, SD3), as a fused Modulated."""
    def indicator(call: BlockCall) -> Indicator:
        norm1 = getattr(call.model, blocks)[0].norm1
        return ada_norm_zero(norm1, call["hidden_states"], call["temb"])
    return _named(indicator, f"ada_norm_zero_msa({blocks})")


def rms_scale_msa(blocks: str) -> Callable[[BlockCall], Indicator]:
    """``blocks[0].norm1(hidden_states, temb)[0]`` of a norm1 that returns
    ``RMSNorm(h) * (1 + scale_msa)`` with no shift (Mochi's
    MochiRMSNormZero, Lumina's LuminaRMSNormZero): the first of four chunks
    of ``linear(silu(temb))``."""
    def indicator(call: BlockCall) -> Indicator:
        norm1 = getattr(call.model, blocks)[0].norm1
        scale = norm1.linear(norm1.silu(call["temb"])).chunk(4, dim=1)[0]
        return rms_scaled(norm1.norm, call["hidden_states"], scale)
    return _named(indicator, f"rms_scale_msa({blocks})")


def block_argument(name: str) -> Callable[[BlockCall], Indicator]:
    """The first block's argument ``name`` as is (an embedding; CogVideoX's temb)."""
    def indicator(call: BlockCall) -> Indicator:
        return call[name]
    return _named(indicator, f"block_argument({name})")


def captured_output(name: str, index: Optional[int] = None) -> Callable[[BlockCall], Indicator]:
    """The output of the module captured as ``name`` (Family.capture), or its
    item ``index`` when it returns a tuple (Wan's condition_embedder)."""
    def indicator(call: BlockCall) -> Indicator:
        out = call.captured[name]
        return out if index is None else out[index]
    return _named(indicator, f"captured_output({name}{'' if index is None else f', {index}'})")


def image_and_text_passthrough(call: BlockCall):
    """A skipped block's output for stacks whose dual-stream blocks return
    ``(encoder_hidden_states, hidden_states)`` and whose single-stream blocks
    get no text and return ``hidden_states`` (Chroma, FLUX.2)."""
    h, enc = call["hidden_states"], call.get("encoder_hidden_states")
    return h if enc is None else (enc, h)
