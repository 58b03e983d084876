"""What the wrapper needs to know about a model: the Adapter.

An adapter says which blocks form the cached stack, where the indicator comes
from, which tensor of a block's input/output carries the residual, and which
steps are forced. It holds no state and touches no kernels: the wrapper calls
the ops. The presets declare themselves as :class:`~teacache_fast.models.record.Family`
records, which become Adapters.

This module imports torch and the standard library only.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

__all__ = ["Adapter", "check_adapter", "Modulated", "BlockCall", "Indicator", "signature_of",
           "first_and_last", "first_only", "first_n", "first_fraction"]


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
        # an argument given by name needs no binding (diffusers passes them so)
        if name in self.kwargs:
            return self.kwargs[name]
        try:
            return self.bound[name]
        except KeyError:
            raise KeyError(f"the block was called without argument {name!r}; got "
                           f"{sorted(self.bound)}") from None

    def get(self, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
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
    per_sample: the stream's batch dimension holds the samples, so
        ``per_sample=True`` can decide per sample (False: e.g. Latte, whose
        stream's batch is batch x frames; per_sample=True is then an error).
    block_lists: model -> the ModuleLists the model's forward loops over to run
        the stack (their items, in order, are exactly ``blocks``), or None. When
        given, a skipped call leaves those loops after block 0 (only the block
        that ends the span still runs): a further skipped block costs nothing.
        Only for models whose loop bodies do nothing but run the blocks and
        feed the stream (whatever else they compute is dropped on a skip).
    coefficients, threshold, accumulate, window: the preset's defaults for
        TeaCacheConfig's coefficients, threshold, accumulate and (start, end)
        (coefficients None: the family has no trustworthy published set, the
        user gives one); variant: the preset variant they come from.
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
    per_sample: bool = True
    block_lists: Optional[Callable[[nn.Module], Sequence[nn.Module]]] = None
    coefficients: Optional[List[float]] = None
    threshold: Optional[float] = None
    variant: Optional[str] = None
    accumulate: str = "sum"
    window: Tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"Adapter.name must be a str, got {type(self.name).__name__}")
        for attr in ("blocks", "indicator", "forced"):
            _check_callable(self.name, attr, getattr(self, attr))
        for attr in ("passthrough", "tail", "end", "block_lists"):
            _check_callable(self.name, attr, getattr(self, attr), optional=True)
        if not isinstance(self.stream, str) or not self.stream:
            raise TypeError(f"Adapter {self.name!r}: stream must be the name (a str) of the block "
                            f"argument that carries the residual, got {self.stream!r}")
        if self.output_index is not None and (isinstance(self.output_index, bool)
                                              or not isinstance(self.output_index, int)):
            raise TypeError(f"Adapter {self.name!r}: output_index must be None or an int (the "
                            f"position of {self.stream!r} in a block's tuple output), got "
                            f"{self.output_index!r}")
        if not isinstance(self.capture, Mapping):
            raise TypeError(f"Adapter {self.name!r}: capture must be a dict name -> (model -> "
                            f"module), got {type(self.capture).__name__}")
        for key, get in self.capture.items():
            _check_callable(self.name, f"capture[{key!r}]", get)
        if isinstance(self.unbatched, str) or not all(isinstance(u, str) for u in self.unbatched):
            raise TypeError(f"Adapter {self.name!r}: unbatched must be a tuple of argument names "
                            f"(str), got {self.unbatched!r}")
        self.unbatched = tuple(self.unbatched)
        if self.timestep_arg is not None and not isinstance(self.timestep_arg, str):
            raise TypeError(f"Adapter {self.name!r}: timestep_arg must be None or the name (a str) "
                            f"of the model's timestep argument, got {self.timestep_arg!r}")
        if not isinstance(self.per_sample, bool):
            raise TypeError(f"Adapter {self.name!r}: per_sample must be a bool, got "
                            f"{type(self.per_sample).__name__}")
        if not isinstance(self.subset, bool):
            raise TypeError(f"Adapter {self.name!r}: subset must be a bool, got "
                            f"{type(self.subset).__name__}")
        if (self.tail is None) != (self.end is None) and self.tail is not None:
            raise ValueError("Adapter.tail needs Adapter.end (the module whose input ends the span)")
        if self.output_index is not None and self.passthrough is None:
            raise ValueError("Adapter.passthrough is required when blocks return tuples "
                             "(output_index is set): it builds a skipped block's output")
        # every caller (the wrapper, device runner, calibration) gets a checked list;
        # dataclasses.replace re-wraps the given function under the new name
        fn = self.blocks.fn if isinstance(self.blocks, _CheckedBlocks) else self.blocks
        self.blocks = _CheckedBlocks(self.name, fn)

    def check_output(self, out: Any, stream_in: Tensor) -> Tensor:
        """The stream in a block's output (:meth:`output_stream`), checked against
        the stream that entered the span: a clear error naming output_index (or
        stream) instead of a shape mismatch deep in the residual op. The batch
        dimension may differ (a per-sample run computes a subset)."""
        idx = self.output_index
        if idx is None:
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"Adapter {self.name!r}: output_index is None, so a block must return the "
                    f"{self.stream!r} tensor itself, but the last block returned "
                    f"{_describe(out)}; set output_index= to the position of {self.stream!r} in "
                    "its output (and passthrough=)")
            t = out
        else:
            if not isinstance(out, (tuple, list)) or not -len(out) <= idx < len(out):
                raise ValueError(
                    f"Adapter {self.name!r}: output_index={idx} must index the last block's tuple "
                    f"output, which is {_describe(out)}")
            t = out[idx]
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"Adapter {self.name!r}: output_index={idx} must point at the {self.stream!r} "
                    f"tensor of a block's output ({_describe(out)}); that item is "
                    f"{type(t).__name__}")
        if t.dim() != stream_in.dim() or t.shape[1:] != stream_in.shape[1:]:
            where = "the block's output" if idx is None else f"output_index={idx} of {_describe(out)}"
            raise ValueError(
                f"Adapter {self.name!r}: {where} has shape {tuple(t.shape)}, but the stream "
                f"{self.stream!r} that entered the cached span has shape {tuple(stream_in.shape)}; "
                + ("output_index must point at the stream's tensor in the block's output"
                   if idx is not None else f"the block's output must be the {self.stream!r} tensor"))
        return t

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


def _describe(v: Any) -> str:
    """A short description of a value for messages: tensors by shape."""
    if v is None:
        return "None"
    if isinstance(v, Tensor):
        return f"a tensor of shape {tuple(v.shape)}"
    if isinstance(v, (tuple, list)):
        items = ", ".join(f"tensor{tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
                          for x in v)
        return f"a {type(v).__name__} of {len(v)} ({items})"
    return type(v).__name__


def _check_callable(name: str, attr: str, fn: Any, optional: bool = False) -> None:
    if fn is None and optional:
        return
    if not callable(fn):
        expected = "a callable" + (" or None" if optional else "")
        hint = " (model -> the list of blocks, e.g. lambda m: list(m.blocks))" if attr == "blocks" else ""
        raise TypeError(f"Adapter {name!r}: {attr} must be {expected}{hint}, got "
                        f"{_describe(fn)}")


class _CheckedBlocks:
    """An Adapter's ``blocks`` function, whose result is checked: a sequence of
    nn.Module (tensors, ints, strings are clear errors, not an AttributeError
    when the wrapper patches them)."""

    def __init__(self, name: str, fn: Callable[[nn.Module], Sequence[nn.Module]]):
        self.name, self.fn = name, fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.__wrapped__ = fn

    def __call__(self, model: nn.Module) -> List[nn.Module]:
        got = self.fn(model)
        if isinstance(got, (nn.ModuleList, nn.Sequential)):
            got = list(got)
        what = (f"Adapter {self.name!r}: blocks(model) must return a sequence of torch.nn.Module "
                "(the blocks of the stack, in the order the model runs them)")
        if isinstance(got, (Tensor, str, bytes, nn.Module)) or not hasattr(got, "__iter__"):
            hint = "; return [module] for a stack of one block" if isinstance(got, nn.Module) else ""
            raise TypeError(f"{what}, got {_describe(got)}{hint}")
        blocks = list(got)
        for i, b in enumerate(blocks):
            if not isinstance(b, nn.Module):
                raise TypeError(f"{what}; item {i} is {_describe(b)}")
        return blocks

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, _CheckedBlocks):
            return self.fn == other.fn
        return self.fn == other

    def __hash__(self) -> int:
        return hash(self.fn)

    def __repr__(self) -> str:
        return f"checked({self.fn!r})"


def check_adapter(adapter: Any) -> "Adapter":
    """``adapter=`` of apply_teacache: an Adapter, or a clear error (a preset name
    passed as adapter= is the common mistake)."""
    if not isinstance(adapter, Adapter):
        hint = (f"; to pick a preset by name use preset={adapter!r}"
                if isinstance(adapter, str) else "")
        raise TypeError(f"adapter must be a teacache_fast.models.Adapter (or None to pick the "
                        f"preset by the model's class), got {type(adapter).__name__}{hint}")
    return adapter
