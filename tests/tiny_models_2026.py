"""Tiny random configs of the 2025-26 families (issue 16), in the pattern of
tiny_models.py: ``tiny_<family>(seed)`` returns a Tiny (model, call, latents)."""
from __future__ import annotations

import torch

from tiny_models import Tiny, _init, _per_sample, _randn, _text_bank, _tiny_video

__all__ = ["TINY_2026", "tiny_consisid", "tiny_latte", "tiny_sd3", "tiny_sd35", "tiny_qwen_image",
           "tiny_chroma", "tiny_flux2", "tiny_z_image",
           "tiny_longcat_image", "tiny_hunyuan_video15"]


def tiny_consisid(seed: int = 0, face: bool = False) -> Tiny:
    """face=True: the identity-preserving checkpoints' layout (is_train_face),
    a face cross-attention added to the video tokens after every block."""
    from diffusers import ConsisIDTransformer3DModel
    torch.manual_seed(seed)
    extra = dict(is_train_face=True, cross_attn_interval=1, cross_attn_dim_head=8, cross_attn_num_heads=2,
                 LFE_id_dim=8, LFE_vit_dim=8, LFE_depth=1, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=2,
                 LFE_num_querie=4, LFE_output_dim=32, LFE_ff_mult=1, LFE_num_scale=1) if face else {}
    # with the face modules the cross-attention's kv width (2/3 of the inner dim) is LFE_output_dim
    heads, head_dim = (3, 16) if face else (2, 8)
    m = ConsisIDTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                   out_channels=4, time_embed_dim=2, text_embed_dim=8, num_layers=2, sample_width=8,
                                   sample_height=8, sample_frames=8, patch_size=2, temporal_compression_ratio=4,
                                   max_text_seq_length=8, **extra)
    text = _text_bank(seed, 8, 8)
    id_cond, id_vit = _randn((1, 8), seed + 400), _randn((1, 3, 8), seed + 401)

    def call(x, t, branch):
        (enc,) = _per_sample(branch, x.shape[0], text)
        B = x.shape[0]
        face_kw = dict(id_cond=id_cond.expand(B, -1), id_vit_hidden=[id_vit.expand(B, -1, -1)]) if face else {}
        return m(hidden_states=x, encoder_hidden_states=enc, timestep=t * 1000, return_dict=False, **face_kw)[0]
    return _tiny_video(m, seed, (2, 4, 8, 8), call, "consisid")


def tiny_latte(seed: int = 0, affine: bool = False) -> Tiny:
    """affine=True: block norms with a weight and bias (the checkpoints have none)."""
    from diffusers import LatteTransformer3DModel
    torch.manual_seed(seed)
    m = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                activation_fn="gelu-approximate", norm_type="ada_norm_single",
                                norm_elementwise_affine=affine, norm_eps=1e-6, caption_channels=8,
                                video_length=2)
    text = _text_bank(seed, 3, 8)

    def call(x, t, branch):
        (enc,) = _per_sample(branch, x.shape[0], text)
        return m(hidden_states=x, timestep=t * 1000, encoder_hidden_states=enc, return_dict=False)[0]
    return _tiny_video(m, seed, (4, 2, 8, 8), call, "latte")


def _sd3(seed: int, **extra) -> Tiny:
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8, **extra)
    text, pooled = _text_bank(seed, 3, 16), [_randn((1, 16), seed + 200 + b) for b in range(2)]

    def call(x, t, branch):
        enc, pool = _per_sample(branch, x.shape[0], text, pooled)
        return m(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pool, timestep=t * 1000,
                 return_dict=False)[0]
    return _tiny_video(m, seed, (4, 8, 8), call, "sd3")


def tiny_sd3(seed: int = 0) -> Tiny:
    return _sd3(seed)


def tiny_sd35(seed: int = 0) -> Tiny:
    """SD3.5's layout: block 0 with dual attention (a 9-chunk norm1) and RMS qk-norm."""
    return _sd3(seed, dual_attention_layers=(0,), qk_norm="rms_norm")


def tiny_qwen_image(seed: int = 0) -> Tiny:
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(seed)
    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                    axes_dims_rope=(8, 4, 4))
    text = _text_bank(seed, 3, 16)

    def call(x, t, branch):
        (enc,) = _per_sample(branch, x.shape[0], text)
        return m(hidden_states=x, encoder_hidden_states=enc, encoder_hidden_states_mask=torch.ones(enc.shape[:2]),
                 timestep=t, img_shapes=[(1, 4, 4)] * x.shape[0], return_dict=False)[0]
    return _tiny_video(m, seed, (16, 16), call, "qwen_image")


def tiny_chroma(seed: int = 0) -> Tiny:
    from diffusers import ChromaTransformer2DModel
    torch.manual_seed(seed)
    m = ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
                                 approximator_hidden_dim=16, approximator_layers=1)
    text = _text_bank(seed, 3, 32)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(4).float(), torch.arange(4).float(), indexing="ij")
    img_ids, txt_ids = torch.stack(grid, -1).reshape(16, 3), torch.zeros(3, 3)

    def call(x, t, branch):
        (enc,) = _per_sample(branch, x.shape[0], text)
        return m(hidden_states=x, encoder_hidden_states=enc, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                 return_dict=False)[0]
    return _tiny_video(m, seed, (16, 4), call, "chroma")


def tiny_flux2(seed: int = 0) -> Tiny:
    from diffusers import Flux2Transformer2DModel
    torch.manual_seed(seed)
    m = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    text = _text_bank(seed, 3, 32)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(4).float(), torch.arange(4).float(), torch.zeros(1),
                          indexing="ij")
    img_ids, txt_ids = torch.stack(grid, -1).reshape(16, 4), torch.zeros(3, 4)

    def call(x, t, branch):
        (enc,) = _per_sample(branch, x.shape[0], text)
        return m(hidden_states=x, encoder_hidden_states=enc, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                 return_dict=False)[0]
    return _tiny_video(m, seed, (16, 4), call, "flux2")


def tiny_z_image(seed: int = 0) -> Tiny:
    from diffusers import ZImageTransformer2DModel
    torch.manual_seed(seed)
    m = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                 n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                 axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])
    text = _text_bank(seed, 3, 16)

    def call(x, t, branch):
        (enc,) = _per_sample(branch, x.shape[0], text)
        out = m(list(x.unbind(0)), t, list(enc.unbind(0)), return_dict=False)[0]
        return torch.stack(list(out))
    return _tiny_video(m, seed, (4, 1, 8, 8), call, "z_image")


def tiny_longcat_image(seed: int = 0) -> Tiny:
    from diffusers import LongCatImageTransformer2DModel
    torch.manual_seed(seed)
    m = LongCatImageTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    text = _text_bank(seed, 3, 32)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(4).float(), torch.arange(4).float(), indexing="ij")
    img_ids, txt_ids = torch.stack(grid, -1).reshape(16, 3), torch.zeros(3, 3)

    def call(x, t, branch):
        (enc,) = _per_sample(branch, x.shape[0], text)
        return m(hidden_states=x, encoder_hidden_states=enc, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                 return_dict=False)[0]
    return _tiny_video(m, seed, (16, 4), call, "longcat_image")


def tiny_hunyuan_video15(seed: int = 0) -> Tiny:
    from diffusers import HunyuanVideo15Transformer3DModel
    torch.manual_seed(seed)
    m = HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=2, num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8,
                                         image_embed_dim=8, rope_axes_dim=(2, 2, 4))
    text, byt5 = _text_bank(seed, 3, 16), _text_bank(seed + 7, 2, 8)

    def call(x, t, branch):
        enc, enc2 = _per_sample(branch, x.shape[0], text, byt5)
        B = x.shape[0]
        return m(hidden_states=x, timestep=t * 1000, encoder_hidden_states=enc,
                 encoder_attention_mask=torch.ones(B, enc.shape[1]), encoder_hidden_states_2=enc2,
                 encoder_attention_mask_2=torch.ones(B, enc2.shape[1]), image_embeds=torch.zeros(B, 2, 8),
                 return_dict=False)[0]
    return _tiny_video(m, seed, (4, 1, 4, 4), call, "hunyuan_video15")


TINY_2026 = {"consisid": tiny_consisid, "latte": tiny_latte, "sd3": tiny_sd3, "qwen_image": tiny_qwen_image,
             "chroma": tiny_chroma, "flux2": tiny_flux2, "z_image": tiny_z_image,
             "longcat_image": tiny_longcat_image, "hunyuan_video15": tiny_hunyuan_video15}
