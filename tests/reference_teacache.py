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


class ReferenceTeaCacheBranch:
    """The same official algorithm for any model, one instance per CFG branch
    and generation (a fresh state is a new instance): ``__call__`` takes the
    modulated input, the stream entering the block stack and a function that
    runs the stack, and returns the stream leaving it. ``margins`` holds
    ``|accumulated - threshold|`` of every non-forced decision (a decision
    closer than rounding to the threshold may differ in fp32).

    One addition to the official script, which would fail there: when the
    stream's shape changes (a batch change), the state starts afresh and the
    call computes, the counter goes on (so the last step stays forced).
    """

    def __init__(self, threshold: float, num_steps: int, coefficients: List[float]):
        self.threshold = threshold
        self.num_steps = num_steps
        self.rescale = np.poly1d(coefficients)
        self.cnt = 0
        self.accumulated = 0.0
        self.previous_modulated_input = None
        self.previous_residual = None
        self.decisions: List[bool] = []
        self.margins: List[float] = []

    @torch.no_grad()
    def __call__(self, modulated_inp, hidden_states, run_blocks):
        prev = self.previous_modulated_input
        if (self.cnt == 0 or self.cnt == self.num_steps - 1 or prev is None
                or prev.shape != modulated_inp.shape):
            should_calc = True
            self.accumulated = 0.0
        else:
            rel = ((modulated_inp - prev).abs().mean() / prev.abs().mean()).cpu().item()
            self.accumulated += self.rescale(rel)
            self.margins.append(abs(self.accumulated - self.threshold))
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
            return hidden_states + self.previous_residual
        ori = hidden_states.clone()
        hidden_states = run_blocks(hidden_states)
        self.previous_residual = hidden_states - ori
        return hidden_states


def reference_flux_call(model, state: ReferenceTeaCacheBranch, hidden_states,
                        encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids):
    """One FLUX call with :class:`ReferenceTeaCacheBranch` (as ReferenceTeaCacheFlux)."""
    m = model
    hidden_states = m.x_embedder(hidden_states)
    timestep = timestep.to(hidden_states.dtype) * 1000
    temb = m.time_text_embed(timestep, pooled_projections)
    enc = [m.context_embedder(encoder_hidden_states)]
    rotary = m.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    modulated_inp = m.transformer_blocks[0].norm1(hidden_states.clone(), emb=temb.clone())[0]

    def run_blocks(h):
        for block in list(m.transformer_blocks) + list(m.single_transformer_blocks):
            enc[0], h = block(hidden_states=h, encoder_hidden_states=enc[0], temb=temb,
                              image_rotary_emb=rotary)
        return h
    hidden_states = state(modulated_inp, hidden_states, run_blocks)
    return m.proj_out(m.norm_out(hidden_states, temb))
