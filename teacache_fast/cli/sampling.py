"""A small flow-matching Euler sampler for FLUX-style transformers (demo, benchmarks, calibrate).

It does what diffusers' FluxPipeline does around the transformer, minus the text
encoders and the VAE: random "prompt" embeddings, 2x2-packed latents with their
position ids, the shifted sigma schedule, and ``x += (sigma_next - sigma) * v``
per step (in fp32, as FlowMatchEulerDiscreteScheduler does). Nothing here knows
about the cache: the same loop runs a plain or a wrapped transformer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class FluxInputs:
    """Everything a FluxTransformer2DModel call needs besides the latent and timestep."""
    latents: torch.Tensor                 # (B, L, 4 * C) packed noise
    encoder_hidden_states: torch.Tensor   # (B, T, joint_attention_dim)
    pooled_projections: torch.Tensor      # (B, pooled_projection_dim)
    img_ids: torch.Tensor                 # (L, 3)
    txt_ids: torch.Tensor                 # (T, 3)
    guidance: Optional[torch.Tensor]      # (B,) when the model embeds guidance


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def flux_sigmas(num_steps: int, image_seq_len: Optional[int] = None) -> torch.Tensor:
    """``num_steps + 1`` sigmas from 1 down to 0; time-shifted like FLUX when image_seq_len is given."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    if image_seq_len is not None:
        mu = math.exp(calculate_shift(image_seq_len))
        sigmas = mu / (mu + (1.0 / sigmas - 1.0))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FLUX's 2x2 patches as tokens."""
    B, C, H, W = latents.shape
    if H % 2 or W % 2:
        raise ValueError(f"latent height and width must be even, got {H} x {W}")
    x = latents.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a (height, width) latent."""
    B, L, D = tokens.shape
    x = tokens.view(B, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, height, width)


def latent_image_ids(height: int, width: int, device=None) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device)


def make_flux_inputs(model, height: int, width: int, text_len: int, batch: int = 1, seed: int = 0,
                     device="cpu", dtype=torch.float32) -> FluxInputs:
    """Seeded noise latents and random text embeddings shaped for ``model``'s config."""
    cfg = model.config
    channels = cfg.in_channels // 4
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(batch, channels, height, width, generator=g)
    text = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    guidance = torch.full((batch,), 3.5) if cfg.guidance_embeds else None
    return FluxInputs(
        latents=pack_latents(noise).to(device, dtype),
        encoder_hidden_states=text.to(device, dtype),
        pooled_projections=pooled.to(device, dtype),
        img_ids=latent_image_ids(height, width, device),
        txt_ids=torch.zeros(text_len, 3, device=device),
        guidance=None if guidance is None else guidance.to(device),
    )


def flux_call_kwargs(inputs: FluxInputs, x: torch.Tensor, sigma: float) -> dict:
    """The keyword arguments of one FluxTransformer2DModel call at ``sigma`` on latent ``x``."""
    return dict(
        hidden_states=x.to(inputs.latents.dtype),
        encoder_hidden_states=inputs.encoder_hidden_states,
        pooled_projections=inputs.pooled_projections,
        timestep=torch.full((x.shape[0],), sigma, device=x.device, dtype=inputs.latents.dtype),
        img_ids=inputs.img_ids,
        txt_ids=inputs.txt_ids,
        guidance=inputs.guidance,
        return_dict=False,
    )


@torch.inference_mode()
def euler_sample(model, inputs: FluxInputs, sigmas: torch.Tensor,
                 on_step: Optional[Callable[[int], None]] = None,
                 call: Optional[Callable[..., torch.Tensor]] = None) -> torch.Tensor:
    """Run the flow-matching Euler loop; return the final packed latent in fp32.

    call: ``call(model, **kwargs) -> velocity`` instead of ``model(**kwargs)[0]``
    (e.g. to time each call, or to enter the model's cache context as a pipeline does).
    """
    x = inputs.latents.float()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        kwargs = flux_call_kwargs(inputs, x, sigma)
        v = model(**kwargs)[0] if call is None else call(model, **kwargs)
        x = x + (sigma_next - sigma) * v.float()
        if on_step is not None:
            on_step(i)
    return x


def psnr(result: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of result vs reference, peak = the reference's value range; inf when equal."""
    ref = reference.double()
    mse = torch.mean((result.double() - ref) ** 2).item()
    if mse == 0.0:
        return math.inf
    peak = (ref.max() - ref.min()).item()
    return 10.0 * math.log10(peak * peak / mse)
