"""Model presets (one file per family) and their registry by diffusers class name.

A family module exposes CLASSES (diffusers class names), VARIANTS (name ->
Variant), DEFAULT_VARIANT and ``adapter(model, variant) -> Adapter``. The
registry matches by class name, so importing it needs no diffusers.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional

from torch import nn

from .base import Adapter, BlockCall, Modulated, Variant, first_and_last, first_fraction, first_only

__all__ = ["Adapter", "BlockCall", "Modulated", "Variant", "adapter_for", "presets",
           "first_and_last", "first_only", "first_fraction"]

# preset name -> module under teacache_fast.models
_FAMILIES = ("flux", "hunyuan_video", "ltx_video", "mochi", "wan", "cogvideox", "hidream",
             "lumina_next", "lumina2", "cosmos")


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def presets() -> Dict[str, dict]:
    """preset name -> {classes, variants, default variant, published thresholds}."""
    out = {}
    for name in _FAMILIES:
        mod = _module(name)
        out[name] = {"classes": mod.CLASSES, "default_variant": mod.DEFAULT_VARIANT,
                     "variants": {k: {"thresholds": v.thresholds, "note": v.note}
                                  for k, v in mod.VARIANTS.items()}}
    return out


def _by_class(model: nn.Module) -> Optional[str]:
    names = [c.__name__ for c in type(model).__mro__]
    for family in _FAMILIES:
        if any(n in _module(family).CLASSES for n in names):
            return family
    return None


def adapter_for(model: nn.Module, preset: Optional[str] = None, variant: Optional[str] = None) -> Adapter:
    """The preset's adapter for this model (by class, or the named preset)."""
    if preset is None:
        preset = _by_class(model)
        if preset is None:
            known = ", ".join(f"{c} ({n})" for n in _FAMILIES for c in _module(n).CLASSES)
            raise ValueError(
                f"no TeaCache preset for {type(model).__name__}. Presets: {known}. For another model "
                "pass a custom adapter: apply_teacache(model, adapter=teacache_fast.models.Adapter("
                "name=..., blocks=lambda m: list(m.blocks), indicator=lambda call: "
                "Modulated(call['hidden_states'], scale, shift)), coefficients=[...], num_steps=N)")
    elif preset not in _FAMILIES:
        raise ValueError(f"unknown preset {preset!r}; known presets: {list(_FAMILIES)}")
    return _module(preset).adapter(model, variant)
