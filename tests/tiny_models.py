"""Tiny diffusers transformers (random init, CPU, fp32) and a sampling loop.

Shared by the wrapper tests, the parity test and other helpers (demo,
calibrate). Each ``tiny_<family>(seed, ...)`` returns a :class:`Tiny`: the
model plus a ``call(latents, t, branch=0)`` that runs one transformer call the
way the family's diffusers pipeline does, and ``latents(batch, seed)``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn

__all__ = ["TINY", "Tiny", "euler_sample", "sigmas", "single_thread", "tiny_flux", "tiny_hunyuan_video",
           "tiny_ltx_video", "tiny_mochi", "tiny_wan", "tiny_cogvideox", "tiny_hidream", "tiny_lumina_next",
           "tiny_lumina2", "tiny_cosmos"]


@contextlib.contextmanager
def single_thread():
    """Tiny matmuls run fastest on one thread (and do not fight other processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class Tiny:
    model: nn.Module
    call: Callable[..., torch.Tensor]        # (latents, t, branch=0) -> model output
    latents: Callable[..., torch.Tensor]     # (batch=1, seed=0) -> initial noise
    name: str = ""


def _seeded(seed: int):
    g = torch.Generator().manual_seed(seed)
    return g


def _randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=_seeded(seed))


def sigmas(num_steps: int) -> List[float]:
    """Flow-matching sigmas from 1 to 0 (num_steps + 1 values)."""
    return torch.linspace(1.0, 0.0, num_steps + 1).tolist()


@torch.no_grad()
def euler_sample(tiny: Tiny, latents: torch.Tensor, num_steps: int, *, guidance: Optional[float] = None,
                 timestep_scale: float = 1.0) -> torch.Tensor:
    """Flow-matching Euler loop: x <- x + (s_next - s) * v(x, s).

    guidance: classifier-free guidance with two calls per step (cond, then
    uncond), v = v_u + guidance * (v_c - v_u).
    """
    x = latents.clone()
    s = sigmas(num_steps)
    for i in range(num_steps):
        t = torch.full((x.shape[0],), s[i] * timestep_scale)
        v = tiny.call(x, t, 0)
        if guidance is not None:
            v_u = tiny.call(x, t, 1)
            v = v_u + guidance * (v - v_u)
        x = x + (s[i + 1] - s[i]) * v
    return x


def _per_sample(branch, batch: int, *conds):
    """Conditioning tensors for a batch: one branch for all samples, or a list
    giving each sample's branch (batch-concatenated CFG)."""
    branches = [branch] * batch if isinstance(branch, int) else list(branch)
    return [torch.cat([c[b] for b in branches]) for c in conds]


def _init(model: nn.Module, seed: int, std: float = 0.5) -> nn.Module:
    """Deterministic, larger-than-default random weights: the tiny model's output
    then moves enough between steps for thresholds to matter."""
    g = _seeded(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std / max(1, p.shape[-1]) ** 0.5
                    if p.dim() > 1 else torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def tiny_flux(seed: int = 0, *, height: int = 4, width: int = 4, text_len: int = 3,
              num_layers: int = 1, num_single_layers: int = 1, model: Optional[nn.Module] = None) -> Tiny:
    """FluxTransformer2DModel at the size of diffusers' own tests.

    model: reuse this model (e.g. to run other latent sizes through it).
    """
    if model is None:
        from diffusers import FluxTransformer2DModel
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=num_layers,
                                       num_single_layers=num_single_layers, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        _init(model, seed)
    n = height * width
    # branch 0 = conditional prompt, branch 1 = the "negative" prompt
    text = [_randn((1, text_len, 32), seed + 100 + b) for b in range(2)]
    pooled = [_randn((1, 32), seed + 200 + b) for b in range(2)]
    grid = torch.meshgrid(torch.zeros(1), torch.arange(height).float(), torch.arange(width).float(),
                          indexing="ij")
    img_ids = torch.stack(grid, -1).reshape(n, 3)
    txt_ids = torch.zeros(text_len, 3)

    def call(latents: torch.Tensor, t: torch.Tensor, branch=0) -> torch.Tensor:
        enc, pool = (c.to(latents.dtype) for c in _per_sample(branch, latents.shape[0], text, pooled))
        return model(hidden_states=latents, encoder_hidden_states=enc, pooled_projections=pool,
                     timestep=t, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]

    def latents(batch: int = 1, seed: int = 0) -> torch.Tensor:
        return _randn((batch, n, 4), 1000 + seed)

    return Tiny(model, call, latents, "flux")


def _text_bank(seed: int, length: int, dim: int):
    """One conditioning tensor per branch (0 = prompt, 1 = negative prompt)."""
    return [_randn((1, length, dim), seed + 100 + b) for b in range(2)]


def _tiny_video(model, seed: int, latent_shape, call_model, name: str) -> Tiny:
    """Tiny for models whose call needs only text (+ a mask) besides latents and t."""
    _init(model, seed)

    def latents(batch: int = 1, seed: int = 0) -> torch.Tensor:
        return _randn((batch,) + tuple(latent_shape), 1000 + seed)

    return Tiny(model, lambda x, t, branch=0: call_model(x, t, branch), latents, name)


def tiny_hunyuan_video(seed: int = 0) -> Tiny:
    from diffusers import HunyuanVideoTransformer3DModel
    torch.manual_seed(seed)
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                       attention_head_dim=10, num_layers=1, num_single_layers=1,
                                       num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                       guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                                       rope_axes_dim=(2, 4, 4))
    text, pooled = _text_bank(seed, 3, 16), [_randn((1, 8), seed + 200 + b) for b in range(2)]

    def call(x, t, branch):
        enc, pool = _per_sample(branch, x.shape[0], text, pooled)
        return m(hidden_states=x, timestep=t * 1000, encoder_hidden_states=enc,
                 encoder_attention_mask=torch.ones(enc.shape[:2]), pooled_projections=pool,
                 guidance=torch.full_like(t, 3500.0), return_dict=False)[0]
    return _tiny_video(m, seed, (4, 1, 4, 4), call, "hunyuan_video")


def tiny_ltx_video(seed: int = 0) -> Tiny:
    from diffusers import LTXVideoTransformer3DModel
    torch.manual_seed(seed)
    m = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   cross_attention_dim=16, num_layers=1, caption_channels=16)
    text = _text_bank(seed, 3, 16)

    def call(x, t, branch):
        (enc,) = _per_sample(branch, x.shape[0], text)
        return m(hidden_states=x, encoder_hidden_states=enc, timestep=t * 1000,
                 encoder_attention_mask=torch.ones(enc.shape[:2]), num_frames=2, height=4, width=4,
                 return_dict=False)[0]
    return _tiny_video(m, seed, (2 * 4 * 4, 4), call, "ltx_video")


def tiny_mochi(seed: int = 0) -> Tiny:
    from diffusers import MochiTransformer3DModel
    torch.manual_seed(seed)
    m = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                max_sequence_length=16)
    text = _text_bank(seed, 3, 16)

    def call(x, t, branch):
        (enc,) = _per_sample(branch, x.shape[0], text)
        return m(hidden_states=x, encoder_hidden_states=enc, timestep=t * 1000,
                 encoder_attention_mask=torch.ones(enc.shape[:2]), return_dict=False)[0]
    return _tiny_video(m, seed, (4, 2, 4, 4), call, "mochi")


def tiny_wan(seed: int = 0) -> Tiny:
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                              in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32,
                              num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    text = _text_bank(seed, 3, 16)

    def call(x, t, branch):
        (enc,) = _per_sample(branch, x.shape[0], text)
        return m(hidden_states=x, timestep=t * 1000, encoder_hidden_states=enc, return_dict=False)[0]
    return _tiny_video(m, seed, (4, 2, 4, 4), call, "wan")


def tiny_cogvideox(seed: int = 0) -> Tiny:
    from diffusers import CogVideoXTransformer3DModel
    torch.manual_seed(seed)
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                    out_channels=4, time_embed_dim=2, text_embed_dim=8, num_layers=2,
                                    sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
                                    temporal_compression_ratio=4, max_text_seq_length=8)
    text = _text_bank(seed, 8, 8)

    def call(x, t, branch):
        (enc,) = _per_sample(branch, x.shape[0], text)
        return m(hidden_states=x, encoder_hidden_states=enc, timestep=t * 1000, return_dict=False)[0]
    return _tiny_video(m, seed, (2, 4, 8, 8), call, "cogvideox")


def tiny_hidream(seed: int = 0) -> Tiny:
    from diffusers import HiDreamImageTransformer2DModel
    torch.manual_seed(seed)
    m = HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                       num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
                                       caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
                                       num_activated_experts=2, axes_dims_rope=(4, 2, 2),
                                       max_resolution=(32, 32), llama_layers=(0, 1))
    t5, pooled = _text_bank(seed, 3, 8), [_randn((1, 8), seed + 200 + b) for b in range(2)]
    llama = [_randn((2, 1, 3, 4), seed + 300 + b) for b in range(2)]

    def call(x, t, branch):
        enc, pool = _per_sample(branch, x.shape[0], t5, pooled)
        branches = [branch] * x.shape[0] if isinstance(branch, int) else list(branch)
        lla = torch.cat([llama[b] for b in branches], dim=1)
        return m(hidden_states=x, timesteps=t * 1000, encoder_hidden_states_t5=enc,
                 encoder_hidden_states_llama3=lla, pooled_embeds=pool, return_dict=False)[0]
    return _tiny_video(m, seed, (4, 8, 8), call, "hidream")


def tiny_lumina_next(seed: int = 0) -> Tiny:
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
    torch.manual_seed(seed)
    m = LuminaNextDiT2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2,
                             num_attention_heads=3, num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None,
                             norm_eps=1e-5, learn_sigma=False, qk_norm=True, cross_attention_dim=32,
                             scaling_factor=1.0)
    text = _text_bank(seed, 3, 32)
    rope = get_2d_rotary_pos_embed_lumina(24 // 3, 32, 32, linear_factor=1.0, ntk_factor=1.0)

    def call(x, t, branch):
        (enc,) = _per_sample(branch, x.shape[0], text)
        return m(hidden_states=x, timestep=t, encoder_hidden_states=enc,
                 encoder_mask=torch.ones(enc.shape[:2]), image_rotary_emb=rope, cross_attention_kwargs={},
                 return_dict=False)[0]
    return _tiny_video(m, seed, (4, 8, 8), call, "lumina_next")


def tiny_lumina2(seed: int = 0) -> Tiny:
    from diffusers import Lumina2Transformer2DModel
    torch.manual_seed(seed)
    m = Lumina2Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, hidden_size=8, num_layers=2,
                                  num_refiner_layers=1, num_attention_heads=1, num_kv_heads=1, multiple_of=16,
                                  ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
                                  axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128), cap_feat_dim=8)
    text = _text_bank(seed, 3, 8)

    def call(x, t, branch):
        (enc,) = _per_sample(branch, x.shape[0], text)
        return m(hidden_states=x, timestep=t, encoder_hidden_states=enc,
                 encoder_attention_mask=torch.ones(enc.shape[:2], dtype=torch.bool), return_dict=False)[0]
    return _tiny_video(m, seed, (4, 4, 4), call, "lumina2")


def tiny_cosmos(seed: int = 0) -> Tiny:
    from diffusers import CosmosTransformer3DModel
    torch.manual_seed(seed)
    m = CosmosTransformer3DModel(in_channels=5, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                 num_layers=2, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4,
                                 max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
                                 concat_padding_mask=False, extra_pos_embed_type="learnable")
    text = _text_bank(seed, 3, 16)

    def call(x, t, branch):
        (enc,) = _per_sample(branch, x.shape[0], text)
        B = x.shape[0]
        return m(hidden_states=x, timestep=t * 1000, encoder_hidden_states=enc,
                 attention_mask=torch.ones(enc.shape[:2]), fps=30,
                 condition_mask=torch.ones(B, 1, 1, 8, 8), return_dict=False)[0]
    return _tiny_video(m, seed, (4, 1, 8, 8), call, "cosmos")


TINY = {"flux": tiny_flux, "hunyuan_video": tiny_hunyuan_video, "ltx_video": tiny_ltx_video,
        "mochi": tiny_mochi, "wan": tiny_wan, "cogvideox": tiny_cogvideox, "hidream": tiny_hidream,
        "lumina_next": tiny_lumina_next, "lumina2": tiny_lumina2, "cosmos": tiny_cosmos}
