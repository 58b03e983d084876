"""What the wrapper needs to know about a model family: the Adapter.

An adapter says which blocks form the cached stack, where the indicator comes
from, which tensor of a block's input/output carries the residual, and which
steps are forced. It holds no state and touches no kernels: the wrapper
(teacache_fast.hooks) calls the ops.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["Adapter", "Modulated", "BlockCall", "Variant", "first_and_last", "first_only",
           "first_n", "first_fraction", "pick_variant", "ada_norm_zero", "rms_scaled"]


_SIGNATURES: Dict[Any, Optional[inspect.Signature]] = {}


def signature_of(fn: Callable) -> Optional[inspect.Signature]:
    """inspect.signature, cached per function (bound methods share their function's)."""
    key = getattr(fn, "__func__", fn)
    if key not in _SIGNATURES:
        try:
            sig = inspect.signature(key)
            if hasattr(fn, "__func__"):  # drop ``self``
                sig = sig.replace(parameters=list(sig.parameters.values())[1:])
        except (TypeError, ValueError):
            sig = None
        _SIGNATURES[key] = sig
    return _SIGNATURES[key]


@dataclass
class Modulated:
    """The indicator as ``norm(x) * (1 + scale) + shift`` (fused by modulated_rel_l1_).

    x: (B, *, C); scale/shift: (B, C), (B, 1, C) or None; norm: "layer", "rms"
    or "none".
    """
    x: Tensor
    scale: Optional[Tensor] = None
    shift: Optional[Tensor] = None
    norm: str = "layer"
    eps: float = 1e-6


Indicator = Union[Modulated, Tensor]  # a Tensor is used as is (e.g. a timestep embedding)


class BlockCall:
    """The arguments of one block call, readable by parameter name or position."""

    def __init__(self, forward: Callable, args: tuple, kwargs: dict, model: nn.Module,
                 captured: Optional[Dict[str, Any]] = None):
        self.forward = forward
        self.args = args
        self.kwargs = kwargs
        self.model = model
        self.captured = captured if captured is not None else {}
        self._bound: Optional[Dict[str, Any]] = None

    @property
    def bound(self) -> Dict[str, Any]:
        """name -> value for every argument given (positional ones included)."""
        if self._bound is None:
            sig = signature_of(self.forward)
            try:
                self._bound = dict(sig.bind_partial(*self.args, **self.kwargs).arguments)
            except (TypeError, AttributeError):  # no signature: keyword arguments only
                self._bound = dict(self.kwargs)
        return self._bound

    def __getitem__(self, name: str) -> Any:
        try:
            return self.bound[name]
        except KeyError:
            raise KeyError(f"the block was called without argument {name!r}; got "
                           f"{sorted(self.bound)}") from None

    def get(self, name: str, default: Any = None) -> Any:
        return self.bound.get(name, default)


def first_and_last(step: int, num_steps: int) -> bool:
    """The reference rule of most scripts: the first and the last step compute."""
    return step == 0 or step == num_steps - 1


def first_only(step: int, num_steps: int) -> bool:
    return step == 0


def first_n(n: int) -> Callable[[int, int], bool]:
    """Force the first n steps (Wan's ret_steps mode); the last is not forced."""
    def rule(step: int, num_steps: int) -> bool:
        return step < n
    rule.__name__ = f"first_{n}"
    return rule


def first_fraction(fraction: float) -> Callable[[int, int], bool]:
    """Force the first ceil(fraction * n) steps (HiDream: 10%); the last is not forced."""
    def rule(step: int, num_steps: int) -> bool:
        return step < max(1, math.ceil(fraction * num_steps))
    rule.__name__ = f"first_{fraction:g}"
    return rule


@dataclass
class Adapter:
    """How TeaCache attaches to one model.

    blocks: model -> the blocks of the stack in the order the model runs them
        (e.g. ``list(m.transformer_blocks) + list(m.single_transformer_blocks)``).
    indicator: BlockCall of the FIRST block -> a :class:`Modulated` or a tensor
        (an embedding compared as is). ``call.captured`` holds the outputs of the
        modules named in ``capture``.
    stream: name of the block argument that carries the residual (the image
        hidden states); every block of the stack takes it under this name.
    output_index: where the stream sits in a block's tuple output; None when
        a block returns the tensor itself.
    passthrough: BlockCall -> what a skipped block returns (its inputs in its
        output's layout). Needed when blocks return tuples.
    capture: name -> (model -> module): the output of that module during the
        current call is stored in ``call.captured[name]`` (Wan's
        condition_embedder, HiDream's t_embedder).
    tail: model -> modules after the blocks that belong to the cached span
        (LTX, Mochi: norm_out); skipped steps pass their first argument through.
    end: model -> module whose INPUT ends the cached span (used with tail:
        the residual covers everything before it). None: the span ends at the
        output of the last block.
    unbatched: block argument names whose tensors have no batch dimension
        (rotary embeddings), never sliced by per-sample selection.
    timestep_arg: the model's forward argument holding the timestep (used to
        tell CFG branches and new generations apart), or None.
    forced: (step, num_steps) -> bool, the family's forced-step rule.
    subset: per-sample runs may slice the batch through the stack (False when
        code between the blocks mixes the batch, e.g. with a tail).
    """
    name: str
    blocks: Callable[[nn.Module], Sequence[nn.Module]]
    indicator: Callable[[BlockCall], Indicator]
    stream: str = "hidden_states"
    output_index: Optional[int] = None
    passthrough: Optional[Callable[[BlockCall], Any]] = None
    capture: Dict[str, Callable[[nn.Module], nn.Module]] = field(default_factory=dict)
    tail: Optional[Callable[[nn.Module], Sequence[nn.Module]]] = None
    end: Optional[Callable[[nn.Module], nn.Module]] = None
    unbatched: Tuple[str, ...] = ()
    timestep_arg: Optional[str] = "timestep"
    forced: Callable[[int, int], bool] = first_and_last
    subset: bool = True
    coefficients: Optional[List[float]] = None
    threshold: Optional[float] = None
    variant: Optional[str] = None

    def __post_init__(self):
        if (self.tail is None) != (self.end is None) and self.tail is not None:
            raise ValueError("Adapter.tail needs Adapter.end (the module whose input ends the span)")
        if self.output_index is not None and self.passthrough is None:
            raise ValueError("Adapter.passthrough is required when blocks return tuples "
                             "(output_index is set): it builds a skipped block's output")

    def skip_output(self, call: BlockCall) -> Any:
        """What a block returns on a skipped step: its inputs, in its output's layout."""
        if self.passthrough is not None:
            return self.passthrough(call)
        return call[self.stream]

    def output_stream(self, out: Any) -> Tensor:
        return out if self.output_index is None else out[self.output_index]

    def with_stream(self, out: Any, stream: Tensor) -> Any:
        if self.output_index is None:
            return stream
        items = list(out)
        items[self.output_index] = stream
        return type(out)(items) if isinstance(out, tuple) else items


@dataclass(frozen=True)
class Variant:
    """Published numbers of one checkpoint family: coefficients and thresholds."""
    coefficients: Tuple[float, ...]
    thresholds: Tuple[float, ...]   # the published ones, the first is the default
    note: str = ""


def pick_variant(family: str, variants: Dict[str, Variant], variant: Optional[str],
                 default: Optional[str]) -> Tuple[str, Variant]:
    """The named variant, or the default; a clear error listing the known ones."""
    name = variant if variant is not None else default
    if name is None:
        raise ValueError(f"{family} needs variant=, one of {sorted(variants)}")
    if name not in variants:
        raise ValueError(f"unknown {family} variant {name!r}; known variants: {sorted(variants)}")
    return name, variants[name]


def ada_norm_zero(norm1: nn.Module, x: Tensor, temb: Tensor) -> Modulated:
    """Indicator of an AdaLayerNormZero ``norm1`` (FLUX, HunyuanVideo): the msa
    shift/scale of ``linear(silu(temb))`` on a LayerNorm without affine."""
    lin, h = norm1.linear, norm1.silu(temb)
    if type(lin) is nn.Linear and lin.out_features % 6 == 0:
        # Only the first two of the six chunks are needed: a third of the
        # weight is read (the full linear is ~100 MB for FLUX; the block runs
        # it again anyway). Quantized or wrapped linears take the full path.
        rows = 2 * (lin.out_features // 6)
        bias = None if lin.bias is None else lin.bias[:rows]
        shift, scale = F.linear(h, lin.weight[:rows], bias).chunk(2, dim=1)
    else:
        shift, scale = lin(h).chunk(6, dim=1)[:2]
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
