"""A plain re-implementation of the reference TeaCache for FLUX (the oracle).

Written the way ali-vilab/TeaCache's TeaCache4FLUX/teacache_flux.py works,
adapted to diffusers 0.42's FluxTransformer2DModel: host-side numpy poly1d,
``.item()`` every call, eager indicator chain, state on a plain object, the
counter counting transformer calls and wrapping at num_steps. It re-runs the
model's forward itself (embeddings, blocks, norm_out, proj_out) instead of
wrapping blocks, so it shares no code with teacache_fast.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch


class ReferenceTeaCacheFlux:
    def __init__(self, model, threshold: float, num_steps: int, coefficients: List[float]):
        self.model = model
        self.threshold = threshold
        self.num_steps = num_steps
        self.rescale = np.poly1d(coefficients)
        self.cnt = 0
        self.accumulated = 0.0
        self.previous_modulated_input = None
        self.previous_residual = None
        self.decisions: List[bool] = []

    @torch.no_grad()
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                 img_ids, txt_ids):
        m = self.model
        hidden_states = m.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        temb = m.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = m.context_embedder(encoder_hidden_states)
        image_rotary_emb = m.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

        inp = hidden_states.clone()
        modulated_inp = m.transformer_blocks[0].norm1(inp, emb=temb.clone())[0]
        if self.cnt == 0 or self.cnt == self.num_steps - 1:
            should_calc = True
            self.accumulated = 0.0
        else:
            rel = ((modulated_inp - self.previous_modulated_input).abs().mean()
                   / self.previous_modulated_input.abs().mean()).cpu().item()
            self.accumulated += self.rescale(rel)
            if self.accumulated < self.threshold:
                should_calc = False
            else:
                should_calc = True
                self.accumulated = 0.0
        self.previous_modulated_input = modulated_inp
        self.cnt += 1
        if self.cnt == self.num_steps:
            self.cnt = 0
        self.decisions.append(should_calc)

        if not should_calc:
            hidden_states = hidden_states + self.previous_residual
        else:
            ori_hidden_states = hidden_states.clone()
            for block in list(m.transformer_blocks) + list(m.single_transformer_blocks):
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                    temb=temb, image_rotary_emb=image_rotary_emb)
            self.previous_residual = hidden_states - ori_hidden_states
        hidden_states = m.norm_out(hidden_states, temb)
        return m.proj_out(hidden_states)
