"""Model presets: one :class:`Family` record per family, and the registry.

Each family module (flux.py, wan.py, ...) declares ``FAMILY``: its diffusers
class names, variants (coefficients, thresholds and their source), the
default-variant rule and its adapter facts. This module maps preset names and
model classes to them and turns them into Adapters. Classes match by name
(a subclass of a family's class matches too), so importing it needs no
diffusers.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

from torch import nn

from . import (chroma, cogvideox, consisid, cosmos, flux, flux2, hidream, hunyuan_video, hunyuan_video15, latte,
               ltx_video,
               longcat_image, lumina2, lumina_next, mochi, qwen_image, sd3, wan, z_image)
from .base import (Adapter, BlockCall, Modulated, first_and_last, first_fraction, first_n, first_only,
                   signature_of)
from .record import Family, Variant, pick_variant

__all__ = ["Adapter", "BlockCall", "Modulated", "Variant", "Family", "adapter_for", "presets", "families",
           "family", "family_for", "published", "signature_of", "first_and_last", "first_only", "first_n",
           "first_fraction"]

# preset name -> Family, in the order a model's class is matched
_FAMILIES: Dict[str, Family] = {
    mod.FAMILY.name: mod.FAMILY
    for mod in (flux, hunyuan_video, ltx_video, mochi, wan, cogvideox, hidream, lumina_next, lumina2, cosmos,
                consisid, latte, sd3, qwen_image, chroma, flux2, z_image, longcat_image, hunyuan_video15)
}


def families() -> Dict[str, Family]:
    """preset name -> Family, for every built-in preset."""
    return dict(_FAMILIES)


def _known() -> str:
    return ", ".join(f"{n} ({' / '.join(f.classes)})" for n, f in _FAMILIES.items())


def family(name: str) -> Family:
    """The built-in family of a preset name; an unknown name lists the known ones."""
    try:
        return _FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown preset {name!r}; known presets: {_known()}") from None


def family_for(model: nn.Module) -> Optional[Family]:
    """The family whose class the model is (or subclasses), or None."""
    for fam in _FAMILIES.values():
        if fam.matches(model):
            return fam
    return None


def adapter_for(model: nn.Module, preset: Union[str, Family, None] = None,
                variant: Optional[str] = None) -> Adapter:
    """The preset's adapter for this model: by the model's class, or the named
    preset (a name or a Family), which must be for the model's class."""
    if preset is None:
        fam = family_for(model)
        if fam is None:
            raise ValueError(
                f"no TeaCache preset for {type(model).__name__}. Presets: {_known()}. For another model "
                "pass a custom adapter: apply_teacache(model, adapter=teacache_fast.models.Adapter("
                "name=..., blocks=lambda m: list(m.blocks), indicator=lambda call: "
                "Modulated(call['hidden_states'], scale, shift)), coefficients=[...], num_steps=N)")
    else:
        fam = preset if isinstance(preset, Family) else family(preset)
    return fam.adapter(model, variant)


def published(preset: str, variant: Optional[str] = None) -> Tuple[float, ...]:
    """A preset's published coefficients (highest power first): the named
    variant, or the family's default when it does not depend on the model.
    Benchmarks and docs read them from here instead of restating them."""
    fam = family(preset)
    static = None if callable(fam.default_variant) else fam.default_variant
    name, v = pick_variant(fam.title, fam.variants, variant, static)
    if not v.coefficients:
        raise ValueError(f"{fam.title} variant {name!r} has no published coefficients ({v.note})")
    return v.coefficients


def presets() -> Dict[str, dict]:
    """preset name -> {classes, default variant, variants: {name: {coefficients,
    thresholds, note, source}}}; ``default_variant`` is None when the model
    must say (``default_rule`` then describes how it is read from the config).
    A variant with empty coefficients carries the structure only (no
    trustworthy published set: give coefficients= or calibrate)."""
    out = {}
    for name, fam in _FAMILIES.items():
        rule = fam.default_variant
        entry = {"classes": fam.classes, "default_variant": None if callable(rule) else rule,
                 "variants": {k: {"coefficients": v.coefficients, "thresholds": v.thresholds,
                                  "note": v.note, "source": v.source}
                              for k, v in fam.variants.items()}}
        if callable(rule):
            entry["default_rule"] = " ".join((rule.__doc__ or "from the model's config").split())
        out[name] = entry
    return out
