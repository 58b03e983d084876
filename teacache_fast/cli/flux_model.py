"""The random-weight FLUX transformers the demo, the benchmarks and calibrate run.

One place for their configs, so ``demo --smoke``, ``bench e2e --smoke`` and
``calibrate --smoke`` run the same tiny model, and for the FLUX.1-dev preset
values (read from :mod:`teacache_fast.models`, never copied here).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch


@dataclass(frozen=True)
class FluxSpec:
    """A FluxTransformer2DModel config and the latent it samples."""
    config: dict
    height: int       # latent height / width (even: FLUX packs 2 x 2 patches into a token)
    width: int
    text_len: int     # text tokens
    note: str = field(default="", compare=False)

    @property
    def image_tokens(self) -> int:
        return self.height * self.width // 4


# diffusers' FLUX.1 layout at a small size: patch 1, 64 input channels (16 latent x 2 x 2).
_BASE = dict(patch_size=1, in_channels=64, guidance_embeds=False)

SPECS = {
    # The demo's model: 2 double + 4 single blocks, 8 heads x 64 = 512 wide (36M
    # parameters), 96 x 80 latent (1920 image tokens) + 64 text tokens. Measured
    # on the project's 2-core CPU: 0.66 s per step on one thread, so the demo's
    # 1 + 4 runs of 28 steps (about 85 computed steps) take about a minute.
    "demo": FluxSpec(dict(_BASE, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=8,
                          joint_attention_dim=256, pooled_projection_dim=128, axes_dims_rope=(8, 28, 28)),
                     96, 80, 64, "the demo's model"),
    # FLUX.1's width (24 heads x 128 = 3072) with 1 double + 2 single blocks.
    "flux-width": FluxSpec(dict(_BASE, num_layers=1, num_single_layers=2, attention_head_dim=128,
                                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                axes_dims_rope=(16, 56, 56)),
                           32, 32, 32, "FLUX.1's width, few blocks"),
    # 1 + 1 blocks, width 32, 16 + 4 tokens: about 2 ms per call on one CPU thread,
    # nearly all of it host (Python) time. The tests' model, and the host-cost row's.
    "smoke": FluxSpec(dict(_BASE, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                           joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
                      8, 8, 4, "tiny: for tests and host costs"),
    # "smoke" with 2 + 38 blocks: against "smoke", what each further skipped block costs
    # (38 further blocks: the difference of two medians divided by 38, well above the noise).
    "smoke-deep": FluxSpec(dict(_BASE, num_layers=2, num_single_layers=38, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                axes_dims_rope=(4, 6, 6)),
                           8, 8, 4, "smoke with 2 + 38 blocks: the marginal cost of a skipped block"),
}


def random_flux_transformer(config: dict, seed: int = 0, device="cpu", dtype=torch.float32):
    """A FluxTransformer2DModel with seeded random weights (no download)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**config)
    # diffusers zero-initialises the output projection; without a real
    # checkpoint that would make every velocity zero, so give it random weights.
    with torch.no_grad():
        for p in model.proj_out.parameters():
            p.normal_(0.0, 0.02)
    # Module.float()/bfloat16()/half() rather than ModelMixin.to(dtype), which warns
    # about fp32-pinned modules (FLUX has none).
    cast = {torch.float32: model.float, torch.bfloat16: model.bfloat16, torch.float16: model.half}
    if dtype not in cast:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return cast[dtype]().to(device).eval()


def build(spec: FluxSpec, seed: int = 0, device="cpu", dtype=torch.float32):
    """(model, inputs) for a spec: seeded weights, seeded noise and random text embeddings."""
    from .sampling import make_flux_inputs

    model = random_flux_transformer(spec.config, seed=seed, device=device, dtype=dtype)
    inputs = make_flux_inputs(model, spec.height, spec.width, spec.text_len, seed=seed, device=device, dtype=dtype)
    return model, inputs


def describe(model, spec: FluxSpec) -> str:
    """e.g. ``2+4 blocks, width 512, 36M params, 1920+64 tokens``."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    size = f"{params / 1e6:.0f}M" if params >= 1e6 else f"{params / 1e3:.0f}k"
    return (f"{cfg.num_layers}+{cfg.num_single_layers} blocks, width "
            f"{cfg.num_attention_heads * cfg.attention_head_dim}, {size} params, "
            f"{spec.image_tokens}+{spec.text_len} tokens")


def flux_preset() -> Tuple[str, List[float], List[float]]:
    """(variant, coefficients, published thresholds) of the FLUX preset's default variant.

    Read from teacache_fast.models, the one place the published values live.
    """
    from ..models import flux, presets

    info = presets()["flux"]
    variant = info["default_variant"]
    return (variant, [float(c) for c in flux.VARIANTS[variant].coefficients],
            [float(t) for t in info["variants"][variant]["thresholds"]])
