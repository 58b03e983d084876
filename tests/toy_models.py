"""A toy DiT without a preset (embed, two block lists, project out) and the
Adapter that describes it: the custom-model path of the wrapper, at a cost
of well under a millisecond per call. Shared by the wrapper, bad-input and
native-diffusers tests."""
from __future__ import annotations

import torch
from torch import nn

from teacache_fast.models import Adapter, Modulated

__all__ = ["Block", "ToyDiT", "toy_adapter", "sample"]


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mod = nn.Linear(dim, 2 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, emb):
        scale, shift = self.mod(emb).chunk(2, dim=-1)
        h = nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return x + self.mlp(h)


class ToyDiT(nn.Module):
    """Embed, a stack of blocks in two lists, project out: the usual DiT shape."""

    def __init__(self, dim=16, depth=(2, 1)):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth[0]))
        self.late_blocks = nn.ModuleList(Block(dim) for _ in range(depth[1]))
        self.out = nn.Linear(dim, 4)

    def forward(self, x, timestep):
        h, emb = self.embed(x), self.time(timestep[:, None])
        for blk in list(self.blocks) + list(self.late_blocks):
            h = blk(h, emb)
        return self.out(h)


def toy_adapter(**changes) -> Adapter:
    """The toy's Adapter; ``changes`` replace its fields (e.g. a wrong ``blocks=``)."""
    def indicator(call):
        mod = call.model.blocks[0].mod
        scale, shift = mod(call["emb"]).chunk(2, dim=-1)
        return Modulated(call["x"], scale, shift, norm="layer")
    kw = dict(name="toy", blocks=lambda m: list(m.blocks) + list(m.late_blocks),
              indicator=indicator, stream="x")
    kw.update(changes)
    return Adapter(**kw)


def sample(model, x, steps: int):
    """Flow-matching Euler loop over ``steps`` calls."""
    s = torch.linspace(1, 0, steps + 1)
    for i in range(steps):
        x = x + (s[i + 1] - s[i]) * model(x, torch.full((x.shape[0],), float(s[i])))
    return x
