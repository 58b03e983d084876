"""The registered ops: each op's implementation (shaping, then its backend)
and its ``torch.library.custom_op`` registration with a fake (meta) kernel.

teacache_fast.ops is the checked front: it validates the arguments, then
:func:`_dispatch` picks what runs them. Nothing here checks arguments; the
cache's prepared calls (teacache_fast.lanes) reach the implementations after
the same checks ran once for the same argument signature.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .backends import backend_for, get_backend

# --------------------------------------------------------------------------- plumbing

_profiling = torch._C._autograd._profiler_enabled


def _untraced() -> bool:
    """Nothing traces or intercepts op calls now (no Dynamo, no dispatch mode
    such as make_fx or FakeTensor, no profiler): the rule for calling an
    implementation without torch.library dispatch (ops, and teacache_fast.lanes)."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or _profiling())


def _dispatch(impl, op, ref: Tensor):
    """What runs a checked call: the implementation itself in eager mode (the
    arguments are checked already; torch.library dispatch would add 25-130 us
    per call), the registered op when anything traces or intercepts (or ref
    is a tensor subclass), so torch.compile sees one node per op; under the
    profiler the op is recorded by its registered name."""
    return impl if type(ref) is Tensor and _untraced() else op


def _backend(t: Tensor):
    return get_backend(backend_for(t))


def _as_rows3(x: Tensor) -> Tensor:
    if x.dim() == 3 and x.is_contiguous():
        return x
    return x.reshape(x.shape[0], -1, x.shape[-1]).contiguous()


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _write_back(dst: Tensor, fn):
    """``fn(buf)`` on a contiguous view of dst, copied back when dst was
    strided; returns what fn returned."""
    if dst.is_contiguous():
        return fn(dst)
    buf = dst.contiguous()
    result = fn(buf)
    dst.copy_(buf)
    return result


# --------------------------------------------------------------------------- modulate

def _modulate_impl(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], norm: str, eps: float) -> Tensor:
    x3 = _as_rows3(x)
    m = _backend(x).modulate(x3, _contig(scale), _contig(shift), norm, eps)
    return m.view(x.shape)


_modulate = torch.library.custom_op("teacache_fast::modulate", _modulate_impl, mutates_args=())


@_modulate.register_fake
def _(x, scale, shift, norm, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- rel_l1_partials

def _partials_shape(t: Tensor, per_sample: bool):
    return (t.shape[0], 2) if per_sample else (2,)


def _rel_l1_partials_impl(cur: Tensor, prev: Tensor, per_sample: bool) -> Tensor:
    rows = cur.shape[0] if per_sample else 1
    c2 = cur.reshape(rows, -1).contiguous()
    p2 = prev.reshape(rows, -1).contiguous()
    return _backend(cur).rel_l1_partials(c2, p2, per_sample)


_rel_l1_partials = torch.library.custom_op("teacache_fast::rel_l1_partials", _rel_l1_partials_impl,
                                           mutates_args=())


@_rel_l1_partials.register_fake
def _(cur, prev, per_sample):
    return cur.new_empty(_partials_shape(cur, per_sample), dtype=torch.float32)


# --------------------------------------------------------------------------- modulated_rel_l1_

def _modulated_rel_l1_impl(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], prev: Tensor,
                      norm: str, eps: float, per_sample: bool) -> Tensor:
    x3 = _as_rows3(x)
    be = _backend(x)
    scale, shift = _contig(scale), _contig(shift)
    return _write_back(prev, lambda buf: be.modulated_rel_l1_(x3, scale, shift, buf.view(x3.shape), norm,
                                                              eps, per_sample))


_modulated_rel_l1 = torch.library.custom_op("teacache_fast::modulated_rel_l1_", _modulated_rel_l1_impl,
                                            mutates_args=("prev",))


@_modulated_rel_l1.register_fake
def _(x, scale, shift, prev, norm, eps, per_sample):
    return x.new_empty(_partials_shape(x, per_sample), dtype=torch.float32)


# --------------------------------------------------------------------------- teacache_decide_

def _decide_impl(partials: Tensor, state: Tensor, coefficients: List[float], threshold: float,
                 force: Optional[Tensor], max_consecutive_skips: int, accumulate_abs: bool = False,
                 force_all: bool = False) -> Tensor:
    """force: the per-state flags, or None for a host bool (force_all): no
    flag tensor is made for it, the backend takes the bool as a scalar."""
    lead = partials.shape[:-1]
    p2 = partials.reshape(-1, 2).contiguous()
    f1 = bool(force_all) if force is None else force.reshape(-1).contiguous()
    be = _backend(partials)
    flags = _write_back(state, lambda buf: be.teacache_decide_(p2, buf.view(-1, 2), coefficients, threshold,
                                                               f1, max_consecutive_skips, accumulate_abs))
    return flags.view(lead)


_decide = torch.library.custom_op("teacache_fast::teacache_decide_", _decide_impl,
                                  mutates_args=("state",))


@_decide.register_fake
def _(partials, state, coefficients, threshold, force, max_consecutive_skips, accumulate_abs=False,
      force_all=False):
    return partials.new_empty(partials.shape[:-1], dtype=torch.bool)


# --------------------------------------------------------------------------- residual ops

def _residual_capture_impl(out: Tensor, inp: Tensor, residual: Tensor) -> None:
    o1 = out.reshape(-1).contiguous()
    i1 = inp.reshape(-1).contiguous()
    be = _backend(out)
    if residual.device == out.device:
        _write_back(residual, lambda buf: be.residual_capture_(o1, i1, buf.view(-1)))
    else:  # e.g. a CPU (pinned) cache of GPU activations: compute here, copy asynchronously
        tmp = torch.empty(o1.shape, dtype=residual.dtype, device=out.device)
        be.residual_capture_(o1, i1, tmp)
        residual.copy_(tmp.view(residual.shape), non_blocking=True)


_residual_capture = torch.library.custom_op("teacache_fast::residual_capture_", _residual_capture_impl,
                                            mutates_args=("residual",))


@_residual_capture.register_fake
def _(out, inp, residual):
    return None


def _residual_apply_impl(hidden: Tensor, residual: Tensor, mask: Optional[Tensor]) -> None:
    B = hidden.shape[0]
    if residual.device != hidden.device:
        residual = residual.to(hidden.device, non_blocking=True)
    r2 = residual.reshape(B, -1).contiguous()
    m1 = _contig(mask)
    be = _backend(hidden)
    _write_back(hidden, lambda buf: be.residual_apply_(buf.view(B, -1), r2, m1))


_residual_apply = torch.library.custom_op("teacache_fast::residual_apply_", _residual_apply_impl,
                                          mutates_args=("hidden",))


@_residual_apply.register_fake
def _(hidden, residual, mask):
    return None


def _residual_apply_out_impl(hidden: Tensor, residual: Tensor, mask: Optional[Tensor],
                             out: Tensor) -> None:
    B = hidden.shape[0]
    if residual.device != hidden.device:
        residual = residual.to(hidden.device, non_blocking=True)
    h2 = hidden.reshape(B, -1).contiguous()
    r2 = residual.reshape(B, -1).contiguous()
    m1 = _contig(mask)
    be = _backend(hidden)
    _write_back(out, lambda buf: be.residual_apply_(h2, r2, m1, out=buf.view(B, -1)))


# residual_apply_(..., out=): its own registration, mutating out only, so that a
# compiled graph keeps hidden as is (declaring hidden mutated would make the
# functionalized graph copy it first: the pass out= exists to save)
_residual_apply_out = torch.library.custom_op("teacache_fast::residual_apply_out_",
                                              _residual_apply_out_impl, mutates_args=("out",))


@_residual_apply_out.register_fake
def _(hidden, residual, mask, out):
    return None


# --------------------------------------------------------------------------- span end (sync-free)

def _finish_span_impl(compute: Tensor, out: Tensor, inp: Tensor, residual: Tensor) -> None:
    i1 = inp.reshape(-1).contiguous()
    be = _backend(out)

    def run(o: Tensor) -> None:
        _write_back(residual, lambda r: be.finish_span_(compute, o.view(-1), i1, r.view(-1)))

    _write_back(out, run)


_finish_span = torch.library.custom_op("teacache_fast::finish_span_", _finish_span_impl,
                                       mutates_args=("out", "residual"))


@_finish_span.register_fake
def _(compute, out, inp, residual):
    return None
