"""A model family as data: the :class:`Family` record a preset declares, its
published :class:`Variant` s, and how it becomes an Adapter for one model.

A Family states the Adapter's facts for one diffusers model family as data
(module attribute names, variants with their published coefficients and
sources) plus its model-specific indicator; :meth:`Family.adapter` turns it
into an Adapter. Imports torch, the standard library and models.base only.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, List, Mapping, Optional, Tuple, Union

from torch import nn

from .base import Adapter, BlockCall, Indicator, first_and_last

__all__ = ["Variant", "Family", "pick_variant", "class_names", "structure_only"]


@dataclass(frozen=True)
class Variant:
    """Published numbers of one checkpoint family.

    coefficients: the rescaling polynomial, highest power first; empty for a
        variant with no trustworthy published set (structure only: the user
        gives coefficients= or calibrates, see :func:`structure_only`).
    thresholds: the published thresholds; the first is the default (empty
        with no coefficients).
    source: where the coefficients (and thresholds) were published: a
        repository, file and commit, or a paper.
    indicator / forced: replace the family's for this variant (Wan's "-ret"
        variants read another embedding and force other steps).
    accumulate: "sum" or "abs", the accumulation the set was published with
        (TeaCacheConfig.accumulate's default for this variant).
    start, end: the published window (TeaCacheConfig.start / end defaults).
    """
    coefficients: Tuple[float, ...]
    thresholds: Tuple[float, ...]
    note: str = ""
    source: str = ""
    indicator: Optional[Callable[[BlockCall], Indicator]] = None
    forced: Optional[Callable[[int, int], bool]] = None
    accumulate: str = "sum"
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        if not self.coefficients:  # structure only: no trustworthy published set
            if self.thresholds:
                raise ValueError("a Variant without coefficients (structure only) has no published "
                                 "thresholds either")
        elif not self.thresholds:
            raise ValueError("a Variant needs at least one published threshold (the first is the default)")
        if self.accumulate not in ("sum", "abs"):
            raise ValueError(f"Variant.accumulate must be 'sum' or 'abs', got {self.accumulate!r}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"Variant window must satisfy 0 <= start < end <= 1, got "
                             f"{self.start}, {self.end}")


def structure_only(note: str, source: str = "", **facts) -> Variant:
    """A variant with the family's structure but no coefficients: no public
    set passed review (placeholder, borrowed, failed its quality gate, or
    none exists); ``note`` says which. apply_teacache then asks for
    coefficients= or coefficients="auto"."""
    return Variant((), (), note, source, **facts)


DefaultVariant = Union[None, str, Callable[[nn.Module], Optional[str]]]


def class_names(model: nn.Module) -> List[str]:
    """The names of the model's class and of every base class (subclasses match a family)."""
    return [c.__name__ for c in type(model).__mro__]


def pick_variant(family: str, variants: Mapping[str, Variant], variant: Optional[str],
                 default: Optional[str]) -> Tuple[str, Variant]:
    """The named variant, or the default; a clear error listing the known ones."""
    name = variant if variant is not None else default
    if name is None:
        raise ValueError(f"{family} needs variant=, one of {sorted(variants)}")
    if name not in variants:
        raise ValueError(f"unknown {family} variant {name!r}; known variants: {sorted(variants)}")
    return name, variants[name]


def _modules(names: Tuple[str, ...]) -> Callable[[nn.Module], List[nn.Module]]:
    """model -> the modules under these attributes, in order (a ModuleList is expanded)."""
    def get(model: nn.Module) -> List[nn.Module]:
        out: List[nn.Module] = []
        for name in names:
            value = getattr(model, name)
            out.extend(value if isinstance(value, (nn.ModuleList, list, tuple)) else [value])
        return out
    get.__name__ = "+".join(names)
    return get


def _attributes(names: Tuple[str, ...]) -> Callable[[nn.Module], List[Any]]:
    """model -> the values of these attributes (not expanded)."""
    def get(model: nn.Module) -> List[Any]:
        return [getattr(model, name) for name in names]
    get.__name__ = f"attributes_{'_'.join(names)}"
    return get


def _returns(names: Tuple[str, ...]) -> Callable[[BlockCall], tuple]:
    """A skipped block's output: these arguments of its call, in this order."""
    def passthrough(call: BlockCall) -> tuple:
        return tuple(call[n] for n in names)
    passthrough.__name__ = f"returns_{'_'.join(names)}"
    return passthrough


@dataclass(frozen=True, eq=False)
class Family:
    """One model family as data: what a preset is.

    name: the preset name (``preset="flux"``); title: the family in messages.
    classes: diffusers class names; a subclass of one matches too.
    variants: name -> :class:`Variant`. default_variant: a variant name, None
        (the user must name one), or ``model -> name or None`` (a rule that
        reads the model's config; None asks the user).
    blocks: attributes of the model holding the stack, in the order it runs
        them (``("transformer_blocks", "single_transformer_blocks")``).
    indicator: BlockCall of the first block -> a Modulated or a tensor (the
        family's model-specific part; shared ones live in models.common).
    stream: the block argument that carries the residual.
    returns: when blocks return a tuple, the block arguments it holds, in
        order (a skipped block returns them as it got them; the stream's place
        in it is where the residual goes). Empty: a block returns the stream.
    passthrough: a skipped block's output, for blocks whose output layout is
        not a fixed tuple of arguments (then ``returns`` stays empty).
    capture: name -> attribute of the model whose output the indicator reads
        (``call.captured[name]``).
    tail: attributes of modules after the blocks that belong to the cached
        span; end: the attribute of the module whose INPUT ends the span.
    unbatched, timestep_arg, forced, subset, per_sample: as in :class:`Adapter`.
    skip_loops: the model's forward runs ``blocks`` in plain loops whose bodies
        only run the blocks and feed the stream (read in its diffusers source),
        so a skipped call may leave them after block 0 (Adapter.block_lists).
    expert_variant: the default variant when the model is one of two experts
        of a pipeline (``transformer`` + ``transformer_2``, Wan2.2 A14B),
        whose config alone may look like another checkpoint's.

    A model of another class with the same layout can use a family through
    ``dataclasses.replace(family, classes=family.classes + ("MyModel",))``.
    """
    name: str
    title: str
    classes: Tuple[str, ...]
    variants: Mapping[str, Variant]
    default_variant: DefaultVariant
    blocks: Tuple[str, ...]
    indicator: Callable[[BlockCall], Indicator]
    stream: str = "hidden_states"
    returns: Tuple[str, ...] = ()
    passthrough: Optional[Callable[[BlockCall], Any]] = None
    capture: Mapping[str, str] = field(default_factory=dict)
    tail: Tuple[str, ...] = ()
    end: Optional[str] = None
    unbatched: Tuple[str, ...] = ()
    timestep_arg: Optional[str] = "timestep"
    forced: Callable[[int, int], bool] = first_and_last
    subset: bool = True
    per_sample: bool = True
    skip_loops: bool = False
    expert_variant: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "variants", MappingProxyType(dict(self.variants)))
        object.__setattr__(self, "capture", MappingProxyType(dict(self.capture)))
        if not self.classes or not self.variants or not self.blocks:
            raise ValueError(f"Family {self.name!r} needs classes, variants and blocks")
        if isinstance(self.default_variant, str) and self.default_variant not in self.variants:
            raise ValueError(f"Family {self.name!r}: default variant {self.default_variant!r} is not one "
                             f"of {sorted(self.variants)}")
        if self.expert_variant is not None and self.expert_variant not in self.variants:
            raise ValueError(f"Family {self.name!r}: expert variant {self.expert_variant!r} is not one "
                             f"of {sorted(self.variants)}")
        if self.returns and self.stream not in self.returns:
            raise ValueError(f"Family {self.name!r}: stream {self.stream!r} is not in returns {self.returns}")
        if self.returns and self.passthrough is not None:
            raise ValueError(f"Family {self.name!r}: give returns (a fixed tuple of arguments) or "
                             "passthrough, not both")

    def matches(self, model: nn.Module) -> bool:
        """The model is of one of the family's classes, or of a subclass of one."""
        return any(n in self.classes for n in class_names(model))

    def check_model(self, model: nn.Module) -> None:
        """A clear error when the model is not of this family's classes."""
        if not self.matches(model):
            raise ValueError(f"preset {self.name!r} is for {' or '.join(self.classes)}; this model is "
                             f"{type(model).__name__}. Leave preset= out to pick the preset by the "
                             "model's class, or pass adapter= for another model")

    def default_variant_for(self, model: nn.Module) -> Optional[str]:
        rule = self.default_variant
        return rule(model) if callable(rule) else rule

    def adapter(self, model: nn.Module, variant: Optional[str] = None) -> Adapter:
        """The Adapter for this model (checked to be of the family's classes):
        the named variant, or the family's default one."""
        self.check_model(model)
        name, v = pick_variant(self.title, self.variants, variant, self.default_variant_for(model))
        return Adapter(
            name=self.name, variant=name, blocks=_modules(self.blocks),
            indicator=v.indicator or self.indicator, stream=self.stream,
            output_index=self.returns.index(self.stream) if self.returns else None,
            passthrough=_returns(self.returns) if self.returns else self.passthrough,
            capture={k: operator.attrgetter(attr) for k, attr in self.capture.items()},
            tail=_modules(self.tail) if self.tail else None,
            end=operator.attrgetter(self.end) if self.end else None,
            unbatched=self.unbatched, timestep_arg=self.timestep_arg,
            forced=v.forced or self.forced, subset=self.subset, per_sample=self.per_sample,
            block_lists=_attributes(self.blocks) if self.skip_loops else None,
            coefficients=list(v.coefficients) if v.coefficients else None,
            threshold=v.thresholds[0] if v.thresholds else None,
            accumulate=v.accumulate, window=(v.start, v.end))
