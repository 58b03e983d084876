"""A replica of the official TeaCache FLUX script, for the host-cost benchmark.

ali-vilab/TeaCache's ``TeaCache4FLUX/teacache_flux.py`` replaces
``FluxTransformer2DModel.forward`` with a copy of diffusers' forward that, after
the embeddings, computes ``modulated_inp`` with
``transformer_blocks[0].norm1(hidden_states.clone(), emb=temb.clone())``, reads
the relative L1 distance to the previous call back to the host
(``.cpu().item()``), rescales it with ``numpy.poly1d`` (built on every call),
accumulates it, and either adds the stored residual in place or runs both block
stacks and stores ``output - input``; its counter counts transformer calls and
wraps at ``num_steps``, with the first and the last call forced. Its state lives
in attributes of the transformer.

The algorithm is the one tests/reference_teacache.py re-implements as the test
oracle (tests/test_replica.py checks both decide and output alike). Here it is
applied the way the script applies it, as a monkeypatched forward, around
diffusers 0.42's own FluxTransformer2DModel forward steps, so that a call costs
what a call of the script costs. Unlike the script it patches the instance,
not the class, so a plain model in the same process stays plain; and it has no
ControlNet or IP-Adapter path (the benchmark passes neither).
"""
from __future__ import annotations

import types
from typing import List, Sequence

import numpy as np
import torch

_ATTRS = ("enable_teacache", "cnt", "num_steps", "rel_l1_thresh", "coefficients",
          "accumulated_rel_l1_distance", "previous_modulated_input", "previous_residual", "teacache_decisions")


def _forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
             img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None,
             controlnet_block_samples=None, controlnet_single_block_samples=None, return_dict=True,
             controlnet_blocks_repeat=False):
    if controlnet_block_samples is not None or controlnet_single_block_samples is not None:
        raise NotImplementedError("the TeaCache replica has no ControlNet path")
    # The layers before the block stack, as diffusers' forward runs them.
    hidden_states = self.x_embedder(hidden_states)
    timestep = timestep.to(hidden_states.dtype) * 1000
    if guidance is not None:
        guidance = guidance.to(hidden_states.dtype) * 1000
    temb = (self.time_text_embed(timestep, pooled_projections) if guidance is None
            else self.time_text_embed(timestep, guidance, pooled_projections))
    encoder_hidden_states = self.context_embedder(encoder_hidden_states)
    if txt_ids.ndim == 3:
        txt_ids = txt_ids[0]
    if img_ids.ndim == 3:
        img_ids = img_ids[0]
    image_rotary_emb = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

    # TeaCache, as the script does it: everything on the host, every call.
    should_calc = True
    if self.enable_teacache:
        inp = hidden_states.clone()
        temb_ = temb.clone()
        modulated_inp, _gate_msa, _shift_mlp, _scale_mlp, _gate_mlp = self.transformer_blocks[0].norm1(inp, emb=temb_)
        if self.cnt == 0 or self.cnt == self.num_steps - 1:
            self.accumulated_rel_l1_distance = 0
        else:
            rescale = np.poly1d(self.coefficients)
            prev = self.previous_modulated_input
            rel = ((modulated_inp - prev).abs().mean() / prev.abs().mean()).cpu().item()
            self.accumulated_rel_l1_distance += rescale(rel)
            if self.accumulated_rel_l1_distance < self.rel_l1_thresh:
                should_calc = False
            else:
                self.accumulated_rel_l1_distance = 0
        self.previous_modulated_input = modulated_inp
        self.cnt += 1
        if self.cnt == self.num_steps:
            self.cnt = 0
        self.teacache_decisions.append(should_calc)

    if not should_calc:
        hidden_states += self.previous_residual
    else:
        ori_hidden_states = hidden_states.clone() if self.enable_teacache else None
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                    image_rotary_emb=image_rotary_emb, joint_attention_kwargs=joint_attention_kwargs)
        for block in self.single_transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                    image_rotary_emb=image_rotary_emb, joint_attention_kwargs=joint_attention_kwargs)
        if self.enable_teacache:
            self.previous_residual = hidden_states - ori_hidden_states

    hidden_states = self.norm_out(hidden_states, temb)
    output = self.proj_out(hidden_states)
    if not return_dict:
        return (output,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    return Transformer2DModelOutput(sample=output)


def _with_lora_scale(fn):
    """diffusers' own forward runs under ``apply_lora_scale``; so does the script's copy of it."""
    try:
        from diffusers.utils import apply_lora_scale
    except ImportError:  # older diffusers: the script scaled LoRA layers inline
        return fn
    return apply_lora_scale("joint_attention_kwargs")(fn)


_PATCHED_FORWARD = _with_lora_scale(_forward)


def patch(model, threshold: float, num_steps: int, coefficients: Sequence[float]) -> None:
    """Make ``model`` (a FluxTransformer2DModel) run the script's TeaCache forward."""
    if "forward" in model.__dict__:
        raise RuntimeError("this model's forward is already patched")
    model.forward = types.MethodType(_PATCHED_FORWARD, model)
    model.enable_teacache = True
    model.cnt = 0
    model.num_steps = num_steps
    model.rel_l1_thresh = threshold
    model.coefficients = list(coefficients)
    model.accumulated_rel_l1_distance = 0
    model.previous_modulated_input = None
    model.previous_residual = None
    model.teacache_decisions = []


def decisions(model) -> List[bool]:
    """Per call since :func:`patch`: True where the blocks ran."""
    return list(model.teacache_decisions)


def unpatch(model) -> None:
    """Restore the model's own forward and drop the script's attributes."""
    model.__dict__.pop("forward", None)
    for name in _ATTRS:
        model.__dict__.pop(name, None)
