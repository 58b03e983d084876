"""apply_teacache / remove_teacache: the model-agnostic wrapper.

The model itself is never copied or re-implemented. Its ``forward`` and the
``forward`` of every block of the cached stack are shadowed by instance
attributes (so parameters, buffers and ``state_dict`` keys stay exactly as
they were, and removing the attributes restores the original objects):

* the model's wrapper tells calls apart: which CFG branch and step a call is,
  whether a new generation started (auto-reset). Given a pipeline, its
  scheduler's set_timesteps() (a new generation, its step count) and step()
  (the end of a denoising step) are watched the same way;
* the first block's wrapper computes the indicator (modulated_rel_l1_ or
  rel_l1_partials) and the decision (teacache_decide_), then reads the flags
  on the host: the one sync of a call;
* under torch.compile the host bookkeeping (which branch and step a call is,
  the indicator op, the decision and its read, the stats) is one region that
  Dynamo does not trace (torch.compiler.disable): one graph break per call,
  and the graphs only see the call's mode (compute / skip / subset / mixed),
  never a counter, so their number does not grow with the steps;
* on a skipped step every block returns its inputs and the span's end adds
  the cached residual (residual_apply_); on a computed step the end captures
  ``out - in`` (residual_capture_);
* per sample, when samples disagree, the blocks run on the computing samples
  only (the batch is sliced at every block) and the others get the residual.

With ``sync_free=True`` the flags are never read: every block runs under
``torch.cond`` and the span's end selects on the device
(teacache_fast.sync_free), so the call compiles with ``fullgraph=True``.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import numbers
import os
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops, sync_free
from .cache import BranchState, CacheState, TeaCacheConfig, decide, indicator_partials_
from .models.base import Adapter, BlockCall, Modulated, signature_of
from .preset_json import load_preset_json, looks_like_preset_path
from .sync_free import SyncFreeBranch

__all__ = ["apply_teacache", "remove_teacache", "reset", "stats", "teacache", "is_cached"]

_ATTR = "_teacache_fast"

COMPUTE, SKIP, SUBSET, MIXED = "compute", "skip", "subset", "mixed"


class _Call:
    """One transformer call: its arguments; its branch, step and decision once
    the first block ran the host region (_Wrapper._host_decide)."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = args, kwargs
        self.branch = 0
        self.state: Optional[BranchState] = None
        self.step = 0
        self.forced = False
        self.mode: Optional[str] = None       # set by the first block
        self.captured: Dict[str, Any] = {}
        self.stream_in: Optional[Tensor] = None
        self.partials: Optional[Tensor] = None
        self.flags: Optional[Tensor] = None
        self.compute_idx: List[int] = []
        self.batch = 0
        self.skip_out0: Any = None             # block 0's passthrough, to refill the batch
        self._idx: Dict[torch.device, Tensor] = {}

    def index(self, device: torch.device) -> Tensor:
        """The computing samples' indices on ``device`` (built once per device)."""
        if device not in self._idx:
            self._idx[device] = torch.tensor(self.compute_idx, dtype=torch.long, device=device)
        return self._idx[device]


class _Wrapper:
    """Everything attached to one cached model."""

    def __init__(self, model: nn.Module, adapter: Adapter, config: TeaCacheConfig,
                 scheduler: Any = None, process_group: Any = None):
        self.model = model
        self.adapter = adapter
        self.config = config
        watch = scheduler is not None and callable(getattr(scheduler, "step", None))
        self.state = CacheState(config, stepped=watch)
        self.scheduler = scheduler
        self.process_group = process_group  # distributed: partials all-reduced in cache.decide
        self.call: Optional[_Call] = None
        self.new_generation = False
        self._patched: List[tuple] = []      # (object, had own forward, its own forward)
        self._handles: List[Any] = []
        blocks = list(adapter.blocks(model))
        if not blocks:
            raise ValueError(f"adapter {adapter.name!r} found no blocks in {type(model).__name__}")
        self.blocks = blocks
        self.model_forward = model.forward
        self.model_signature = signature_of(model.forward)
        # sync-free mode: one SyncFreeBranch per branch, calls go round robin
        self.sf: List[SyncFreeBranch] = []
        self.sf_next = 0
        if config.sync_free and config.num_steps is not None:
            self._sf_build(config.num_steps)
        # modules whose forward calls inspect.signature(self.processor.__call__)
        # (diffusers attention): see _sf_warm_signatures
        self.sf_processors = [mod for b in blocks for mod in b.modules()
                              if getattr(mod, "processor", None) is not None] if config.sync_free else []
        # host-only code, never traced by Dynamo (see the module docstring);
        # wrapped here, not at import: torch.compiler.disable imports Dynamo (~1 s)
        if not config.sync_free:
            self._host_decide = torch.compiler.disable(self._host_decide)
            self._observe = torch.compiler.disable(self._observe)

    # ------------------------------------------------------------------ install

    def install(self) -> None:
        if self.config.sync_free:
            return self._sf_install()
        a, m = self.adapter, self.model
        self._shadow(m, "forward", self._model_forward)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            self._shadow(block, "forward", self._block_forward(block.forward, i, i == last and a.end is None))
        for module in (a.tail(m) if a.tail is not None else ()):
            self._shadow(module, "forward", self._tail_forward(module.forward))
        if a.end is not None:
            end = a.end(m)
            self._shadow(end, "forward", self._end_forward(end.forward))
        for name, get in a.capture.items():
            self._handles.append(get(m).register_forward_hook(self._capture_hook(name)))
        if self.scheduler is not None and hasattr(self.scheduler, "set_timesteps"):
            self._shadow(self.scheduler, "set_timesteps", self._set_timesteps(self.scheduler.set_timesteps))
        if self.state.clock.stepped:
            self._shadow(self.scheduler, "step", self._scheduler_step(self.scheduler.step))

    def _shadow(self, obj: Any, name: str, fn: Callable) -> None:
        """Shadow obj.name with fn (an instance attribute beats the class's method).

        fn takes the original's name, doc and signature (functools.wraps):
        callers inspect them, e.g. diffusers' retrieve_timesteps checks which
        arguments scheduler.set_timesteps accepts.
        """
        own = obj.__dict__.get(name, _MISSING)
        self._patched.append((obj, name, own))

        @functools.wraps(getattr(obj, name))
        def shadow(*args, **kwargs):
            return fn(*args, **kwargs)
        obj.__dict__[name] = shadow

    def uninstall(self) -> None:
        for obj, name, own in reversed(self._patched):
            if own is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = own
        for h in self._handles:
            h.remove()
        self._patched, self._handles = [], []
        self.state.reset()
        self.call = None
        self.sf = []

    # ------------------------------------------------------------------ model call

    def _model_forward(self, *args, **kwargs):
        # branch and step are assigned at the first block, in the host region:
        # here, under torch.compile, they would be guarded on (a graph per step)
        self.call = _Call(args, kwargs)
        try:
            with self._backend():
                return self.model_forward(*args, **kwargs)
        finally:
            self.call = None

    def _begin(self, call: _Call) -> None:
        """Host side: which branch and step the call is; starts generations."""
        st, cfg = self.state, self.config
        bound = _bind(self.model_signature, call.args, call.kwargs)
        if self.new_generation:
            self._start_generation()
        t_arg = bound.get(self.adapter.timestep_arg) if self.adapter.timestep_arg else None
        t = _timestep_value(t_arg, st.clock.needs_timestep())
        if st.clock.went_back(t):
            self._start_generation()  # the timestep went back: a new generation
        signature = tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in bound.items()
                          if isinstance(v, Tensor))
        branch, step = st.clock.tick(t)
        if st.clock.stepped and branch >= st.clock.MAX_CALLS_PER_STEP:
            # the loop never steps the watched scheduler: tell calls apart without it
            st.clock.stepped = False
            self._start_generation()
            t = _timestep_value(t_arg, st.clock.needs_timestep())
            branch, step = st.clock.tick(t)
        if st.num_steps is None and self.scheduler is not None:
            st.num_steps = _scheduler_steps(self.scheduler)
        if st.num_steps is None:
            raise RuntimeError("TeaCache needs num_steps: pass apply_teacache(..., num_steps=N) "
                               "or apply it to a pipeline whose scheduler sets its timesteps")
        bs = st.branches.get(branch)
        if step >= st.num_steps or (bs is not None and bs.signature is not None
                                    and bs.signature != signature):
            self._start_generation()  # the count wrapped, or shape/dtype/device changed
            t = _timestep_value(t_arg, st.clock.needs_timestep())  # relearn the branches
            branch, step = st.clock.tick(t)
        bs = st.branch(branch)
        bs.signature = signature
        st.calls += 1
        call.branch, call.state, call.step = branch, bs, step
        call.forced = cfg.forced(step, st.num_steps, self.adapter.forced)

    def _start_generation(self) -> None:
        if self.config.sync_free:
            return self._sf_start_generation()
        self.state.reset()
        self.state.generations += 1
        self.new_generation = False
        if self.scheduler is not None:
            self.state.num_steps = (_scheduler_steps(self.scheduler) or self.state.num_steps
                                    or self.config.num_steps)

    def _set_timesteps(self, original: Callable) -> Callable:
        def set_timesteps(*args, **kwargs):
            out = original(*args, **kwargs)
            self.new_generation = True
            return out
        return set_timesteps

    def _scheduler_step(self, original: Callable) -> Callable:
        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            self.state.clock.step_done()
            return out
        return step

    def _capture_hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            if self.call is not None:
                self.call.captured[name] = output
        return hook

    # ------------------------------------------------------------------ blocks

    def _block_forward(self, original: Callable, index: int, ends_span: bool) -> Callable:
        def forward(*args, **kwargs):
            call = self.call
            if call is None:  # the block is run outside the model's forward
                return original(*args, **kwargs)
            if index == 0:
                self._decide(call, original, args, kwargs)
            if call.mode == SKIP:
                out = self.adapter.skip_output(BlockCall(original, args, kwargs, self.model))
            elif call.mode == SUBSET:
                args, kwargs = self._select(call, original, args, kwargs)
                out = original(*args, **kwargs)
            else:
                out = original(*args, **kwargs)
            if ends_span:
                out = self._finish(call, out)
            return out
        return forward

    def _tail_forward(self, original: Callable) -> Callable:
        def forward(*args, **kwargs):
            call = self.call
            if call is not None and call.mode == SKIP:
                return args[0] if args else next(iter(kwargs.values()))
            return original(*args, **kwargs)
        return forward

    def _end_forward(self, original: Callable) -> Callable:
        def forward(x, *args, **kwargs):
            call = self.call
            if call is not None and call.mode is not None:
                x = self._finish_stream(call, x)
            return original(x, *args, **kwargs)
        return forward

    # ------------------------------------------------------------------ decision

    def _decide(self, call: _Call, original: Callable, args: tuple, kwargs: dict) -> None:
        """Traced part of the decision: the indicator's inputs (e.g. the
        modulation of the first block, which compiles with the model), then
        the host region. The one graph break of a call is here."""
        first = BlockCall(original, args, kwargs, self.model, call.captured)
        stream = first[self.adapter.stream]
        x, how = self._indicator(first)
        self._host_decide(call, stream, x, how, original, args, kwargs)

    def _indicator(self, first: BlockCall) -> Tuple[Tensor, Dict[str, Any]]:
        """The adapter's indicator as (x, keywords of cache.indicator_partials_)."""
        indicator = self.adapter.indicator(first)
        if isinstance(indicator, Modulated):
            return indicator.x, dict(scale=indicator.scale, shift=indicator.shift,
                                     norm=indicator.norm, eps=indicator.eps)
        if isinstance(indicator, Tensor):
            return indicator, dict(norm=None)  # an embedding, compared as is
        raise TypeError(f"the indicator of adapter {self.adapter.name!r} must be a Modulated or "
                        f"a Tensor, got {type(indicator).__name__}")

    def _host_decide(self, call: _Call, stream: Tensor, x: Tensor, how: Dict[str, Any],
                     original: Callable, args: tuple, kwargs: dict) -> None:
        """Host region (not traced under torch.compile): assign the call's
        branch and step, run the indicator op and the decision, read the
        flags (the one sync), record the stats and set ``call.mode``."""
        if torch.is_grad_enabled() and (stream.requires_grad or x.requires_grad):
            raise RuntimeError(
                f"TeaCache on {type(self.model).__name__} is inference-only (a skipped step has no "
                "gradient): call the model under torch.no_grad() or torch.inference_mode(), as "
                "diffusers pipelines do")
        self._begin(call)
        cfg, bs = self.config, call.state
        with self._backend():
            partials = self._partials(bs, x, how)
            if cfg.per_sample and partials.shape[0] != stream.shape[0]:
                raise RuntimeError(f"per_sample=True: the indicator has batch {partials.shape[0]} but "
                                   f"the hidden states have batch {stream.shape[0]}")
            if bs.decision is None or bs.decision.shape != partials.shape:
                bs.decision = ops.new_decide_state(partials.shape, partials.device)
            force = call.forced or bs.residual is None or bs.residual.shape != stream.shape
            flags = decide(partials, bs.decision, cfg.coefficients, cfg.threshold, force=force,
                           max_consecutive_skips=cfg.max_consecutive_skips,
                           process_group=self.process_group)
        host = flags.tolist()  # the one host read of this call
        host = host if isinstance(host, list) else [host] * stream.shape[0]
        bs.record(host)
        bs.record_partials(call.step, partials, self.state.num_steps)
        call.partials, call.flags, call.stream_in, call.batch = partials, flags, stream, stream.shape[0]
        if all(host):
            call.mode = COMPUTE
            self._residual(bs, stream)  # allocated here: the graphs only fill it
        elif not any(host):
            call.mode = SKIP
        else:
            call.compute_idx = [i for i, f in enumerate(host) if f]
            call.mode = SUBSET if self.adapter.subset else MIXED
            call.index(stream.device)  # built here, not in the graph
            if call.mode == SUBSET:
                call.skip_out0 = self.adapter.skip_output(BlockCall(original, args, kwargs, self.model))

    def _backend(self):
        return ops.use_backend(self.config.backend) if self.config.backend else contextlib.nullcontext()

    def _partials(self, bs: BranchState, x: Tensor, how: Dict[str, Any]) -> Tensor:
        """The indicator's partial sums against the branch's previous one
        (how: see _indicator)."""
        per_sample = self.config.per_sample
        if bs.prev is None or bs.prev.shape != x.shape or bs.prev.dtype != x.dtype \
                or bs.prev.device != x.device:
            bs.prev = torch.zeros(x.shape, dtype=x.dtype, device=x.device)  # first call: forced
        return indicator_partials_(x, bs.prev, per_sample=per_sample, **how)

    # ------------------------------------------------------------------ span end

    def _finish(self, call: _Call, out: Any) -> Any:
        """At the last block's output: capture or apply the residual on the stream."""
        stream = self._finish_stream(call, self.adapter.output_stream(out))
        if call.mode == SUBSET:
            out = self._refill(call, out)
        return self.adapter.with_stream(out, stream)

    def _finish_stream(self, call: _Call, out: Tensor) -> Tensor:
        bs, inp = call.state, call.stream_in
        if call.mode == COMPUTE:
            ops.residual_capture_(out, inp, self._residual(bs, inp))
            if self.config.observer is not None:  # a host callback: a break only when set
                self._observe(call, out)
            return out
        if call.mode == SKIP:
            # the one activation-sized allocation of a skip, kept on purpose: inp
            # (and out, its passthrough) belong to the model's code, which may
            # still hold them (long skip connections), so the sum cannot go in place
            h = inp.clone()
            ops.residual_apply_(h, bs.residual)
            return h
        # some samples computed: out holds them all (SUBSET) or the whole batch (MIXED)
        if call.mode == MIXED:
            out = out.index_select(0, call.index(out.device))
        residual = bs.residual
        fresh = torch.empty(out.shape, dtype=residual.dtype, device=residual.device)
        ops.residual_capture_(out, inp.index_select(0, call.index(inp.device)), fresh)
        residual.index_copy_(0, call.index(residual.device), fresh)
        h = inp.clone()
        ops.residual_apply_(h, residual, mask=~call.flags)
        h.index_copy_(0, call.index(h.device), out)
        return h

    def _refill(self, call: _Call, out: Any) -> Any:
        """SUBSET: give the other outputs of the last block their full batch back."""
        if not isinstance(out, (tuple, list)):
            return out
        items = []
        for j, (o, full) in enumerate(zip(out, call.skip_out0)):
            if j != self.adapter.output_index and isinstance(o, Tensor) and isinstance(full, Tensor) \
                    and full.shape[0] == call.batch and o.shape[0] == len(call.compute_idx):
                full = full.clone()
                full.index_copy_(0, call.index(full.device), o)
                o = full
            items.append(o)
        return type(out)(items) if isinstance(out, tuple) else items

    def _residual(self, bs: BranchState, like: Tensor) -> Tensor:
        cfg = self.config
        device = cfg.cache_device or like.device
        dtype = cfg.cache_dtype or like.dtype
        r = bs.residual
        if r is None or r.shape != like.shape or r.dtype != dtype or r.device != device:
            pin = device.type == "cpu" and like.device.type == "cuda"
            bs.residual = torch.empty(like.shape, dtype=dtype, device=device, pin_memory=pin)
        return bs.residual

    def _observe(self, call: _Call, out: Tensor) -> None:
        """Host side (not traced): the observer gets the call's step as an int."""
        self.config.observer(call.branch, call.step, call.partials, call.stream_in, out)

    # ------------------------------------------------------------------ sync-free mode
    # The decision never leaves the device: every block runs under torch.cond
    # and the span's end selects on the device (teacache_fast.sync_free). No
    # host counter is read inside a call either (only sf_next, which cycles
    # through the branch indices), so torch.compile(fullgraph=True) gives one
    # graph per branch for every step.

    def _sf_install(self) -> None:
        a, m = self.adapter, self.model
        self._shadow(m, "forward", self._sf_model_forward)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            self._shadow(block, "forward", self._sf_block_forward(block.forward, i, i == last and a.end is None))
        for module in (a.tail(m) if a.tail is not None else ()):
            self._shadow(module, "forward", self._sf_tail_forward(module.forward))
        if a.end is not None:
            end = a.end(m)
            self._shadow(end, "forward", self._sf_end_forward(end.forward))
        for name, get in a.capture.items():
            self._handles.append(get(m).register_forward_hook(self._capture_hook(name)))
        if self.scheduler is not None and hasattr(self.scheduler, "set_timesteps"):
            self._shadow(self.scheduler, "set_timesteps", self._sf_set_timesteps(self.scheduler.set_timesteps))

    def _sf_build(self, num_steps: int) -> None:
        """Fresh device state for generations of num_steps steps (host side, eager)."""
        forced = [self.config.forced(s, num_steps, self.adapter.forced) for s in range(num_steps)]
        device = _model_device(self.model)
        self.sf = [SyncFreeBranch(forced, device) for _ in range(self.config.branches)]
        self.sf_next = 0
        self.state.num_steps = num_steps

    def _sf_start_generation(self) -> None:
        for br in self.sf:
            br.reset()
        self.sf_next = 0
        self.state.generations += 1

    def _sf_set_timesteps(self, original: Callable) -> Callable:
        def set_timesteps(*args, **kwargs):
            out = original(*args, **kwargs)
            n = _scheduler_steps(self.scheduler)
            if n is not None and (not self.sf or self.sf[0].schedule.num_steps != n):
                self._sf_build(n)
                self.state.generations += 1
            else:
                self._sf_start_generation()
            return out
        return set_timesteps

    def _sf_model_forward(self, *args, **kwargs):
        if not self.sf:
            raise RuntimeError("TeaCache sync_free=True needs num_steps: pass apply_teacache(..., "
                               "num_steps=N) or apply it to a pipeline and call its scheduler's "
                               "set_timesteps first")
        branch = self.sf_next
        self.sf_next = (branch + 1) % len(self.sf)
        self.call = self.sf[branch]
        self.call.captured = {}
        try:
            if self.config.backend:
                with ops.use_backend(self.config.backend):
                    return self.model_forward(*args, **kwargs)
            return self.model_forward(*args, **kwargs)
        finally:
            self.call = None

    def _sf_decide(self, br: SyncFreeBranch, original: Callable, args: tuple, kwargs: dict) -> None:
        cfg = self.config
        first = BlockCall(original, args, kwargs, self.model, br.captured)
        stream = first[self.adapter.stream]
        x, how = self._indicator(first)
        if torch.compiler.is_compiling():
            self._sf_warm_signatures()
        br.prepare(x, stream, cfg.cache_dtype)
        forced, step = br.schedule.next()
        compute, partials = sync_free.decide_with_partials(
            x, br.prev, br.state, cfg.coefficients, cfg.threshold, force=forced,
            max_consecutive_skips=cfg.max_consecutive_skips, process_group=self.process_group, **how)
        br.record(step, compute, partials)
        br.compute, br.stream_in = compute, stream

    def _sf_warm_signatures(self) -> None:
        """Works around a Dynamo bug (torch 2.13): its inspect.signature cache
        is shared by all torch.cond subgraphs of a trace, but an entry made
        inside one subgraph loses its attributes after it ("'Signature' object
        has no attribute '_parameters'" at the next cond whose block asks for
        the same signature, as every diffusers attention module does). Made
        here, outside any cond, the entries are valid everywhere. Free: only
        traced, never run."""
        for mod in self.sf_processors:
            inspect.signature(mod.processor.__call__)

    def _sf_block_forward(self, original: Callable, index: int, ends_span: bool) -> Callable:
        def forward(*args, **kwargs):
            br = self.call
            if br is None:
                return original(*args, **kwargs)
            if index == 0:
                self._sf_decide(br, original, args, kwargs)
            # built outside the cond: the skip branch closes over the inputs
            skipped = self.adapter.skip_output(BlockCall(original, args, kwargs, self.model))
            out = sync_free.run_or_pass(br.compute, original, lambda *a, **k: skipped, *args, **kwargs)
            if ends_span:
                stream = sync_free.finish_span_(br.compute, self.adapter.output_stream(out),
                                                br.stream_in, br.residual)
                out = self.adapter.with_stream(out, stream)
            return out
        return forward

    def _sf_tail_forward(self, original: Callable) -> Callable:
        def forward(*args, **kwargs):
            br = self.call
            if br is None:
                return original(*args, **kwargs)
            first = args[0] if args else next(iter(kwargs.values()))
            return sync_free.run_or_pass(br.compute, original, lambda *a, **k: first, *args, **kwargs)
        return forward

    def _sf_end_forward(self, original: Callable) -> Callable:
        def forward(x, *args, **kwargs):
            br = self.call
            if br is not None:
                # a copy: x may be a tensor the model still holds
                x = sync_free.finish_span_(br.compute, x.clone(), br.stream_in, br.residual)
            return original(x, *args, **kwargs)
        return forward

    def sf_stats(self) -> Dict[str, Any]:
        """stats() in sync-free mode: the device counters and traces, read now."""
        st = self.state
        out: Dict[str, Any] = {"calls": 0, "num_steps": st.num_steps, "computed": 0, "skipped": 0,
                               "branches": {}}
        wraps = 0
        for index, br in enumerate(self.sf):
            b = br.stats()
            out["calls"] += b.pop("calls")
            wraps = max(wraps, b.pop("wraps"))
            if b["steps"]:
                out["branches"][index] = b
                out["computed"] += b["computed"]
                out["skipped"] += b["skipped"]
        out["generations"] = st.generations + wraps
        return out

    # ------------------------------------------------------------------ per-sample slicing

    def _select(self, call: _Call, original: Callable, args: tuple, kwargs: dict):
        """Slice every batched argument of a block down to the computing samples."""
        sig = signature_of(original)
        skip = set(self.adapter.unbatched)
        if sig is None:
            return args, {k: (v if k in skip else self._take(call, v)) for k, v in kwargs.items()}
        bound = sig.bind_partial(*args, **kwargs)
        for name, value in bound.arguments.items():
            if name not in skip:
                bound.arguments[name] = self._take(call, value)
        return bound.args, bound.kwargs

    def _take(self, call: _Call, value: Any) -> Any:
        if isinstance(value, Tensor):
            if value.dim() >= 1 and value.shape[0] == call.batch:
                return value.index_select(0, call.index(value.device))
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(self._take(call, v) for v in value)
        if isinstance(value, dict):
            return {k: self._take(call, v) for k, v in value.items()}
        return value


_MISSING = object()


def _bind(sig: Optional[inspect.Signature], args: tuple, kwargs: dict) -> Dict[str, Any]:
    if sig is None:
        return dict(kwargs)
    try:
        return dict(sig.bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)


def _timestep_value(t: Any, must_read: bool) -> Optional[float]:
    """The call's timestep on the host, when reading it is free (CPU) or needed.

    A CUDA timestep is read (a sync) only when needed (learning the branches);
    new generations are then spotted by the step count wrapping, set_timesteps
    and shape changes. Called only from the host region, never traced.
    """
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        return float(t)
    if not isinstance(t, Tensor) or t.numel() == 0:
        return None
    if must_read or t.device.type == "cpu":
        return float(t.reshape(-1)[0])
    return None


def _scheduler_steps(scheduler: Any) -> Optional[int]:
    """Transformer calls per branch in the generation the scheduler was set up for."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    begin = getattr(scheduler, "begin_index", None) or 0
    n = len(timesteps) - int(begin)
    return n if n > 0 else None


# ---------------------------------------------------------------------- public API

def _resolve_target(module: Any):
    """(model, scheduler): a diffusers pipeline gives its transformer and scheduler."""
    if isinstance(module, nn.Module):
        return module, None
    model = getattr(module, "transformer", None)
    if isinstance(model, nn.Module):
        return model, getattr(module, "scheduler", None)
    raise TypeError(f"apply_teacache needs a torch.nn.Module or a pipeline with a .transformer, "
                    f"got {type(module).__name__}")


def _model_device(model: nn.Module) -> torch.device:
    """Where the model's activations will live: its first parameter's device."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _load_fitted(path: Any, model: nn.Module, has_threshold: bool) -> dict:
    """Read a ``teacache-fast calibrate`` JSON for ``preset=path`` and check it fits."""
    data = load_preset_json(path)
    if not has_threshold:
        rows = data.get("thresholds") or []
        table = ", ".join(f"{r.get('threshold')} -> {r.get('computed_steps')}" for r in rows
                          if isinstance(r, dict))
        hint = (f"; its 'thresholds' table (threshold -> expected computed steps): {table}"
                if table else "; it has no 'thresholds' table, see `teacache-fast calibrate`")
        raise ValueError(f"preset={os.fspath(path)!r} is a fitted polynomial with no default "
                         f"threshold: pass threshold={hint}")
    names = [c.__name__ for c in type(model).__mro__]
    if data["model_class"] not in names:
        warnings.warn(f"preset file {os.fspath(path)!r} was fitted on {data['model_class']}, "
                      f"not on {type(model).__name__}: its coefficients may not fit this model",
                      stacklevel=3)
    return data


def _wrapper(module: Any) -> _Wrapper:
    model, _ = _resolve_target(module)
    w = model.__dict__.get(_ATTR)
    if w is None:
        raise ValueError(f"{type(model).__name__} has no TeaCache attached (call apply_teacache first)")
    return w


def is_cached(module: Any) -> bool:
    model, _ = _resolve_target(module)
    return _ATTR in model.__dict__


def apply_teacache(module: Any, config: Optional[TeaCacheConfig] = None, *,
                   threshold: Optional[float] = None, preset: Optional[str] = None,
                   variant: Optional[str] = None, adapter: Optional[Adapter] = None,
                   process_group: Any = None, **overrides) -> nn.Module:
    """Attach TeaCache to a transformer (or a diffusers pipeline's transformer).

    config: a TeaCacheConfig; ``overrides`` (any of its fields) replace its
    fields. threshold: the skip threshold (default: config's, else the
    preset's first published one). preset / variant: pick a preset by name
    instead of by model class, and one of its variants (e.g. Wan's
    "t2v-14b"). preset="path/to.json": the coefficients fitted by
    ``teacache-fast calibrate`` (unless coefficients= is given); threshold=
    is then required (pick one from the file's thresholds table), and the
    adapter still comes from the model's class (or adapter=). adapter: a
    custom :class:`~teacache_fast.models.Adapter` for models without a
    preset. sync_free=True (a TeaCacheConfig field): the skip is a torch.cond
    and the decision never reaches the host, so the model compiles with
    torch.compile(fullgraph=True). process_group: a torch.distributed group whose
    ranks each hold a token shard of the same call (sequence / context
    parallel): the indicator's partial sums are added over it before every
    decision, so all ranks take bitwise the same decision (see
    teacache_fast.distributed; NCCL groups for CUDA activations, gloo for
    CPU). None: no communication. Returns the transformer.
    """
    from .models import adapter_for  # models import this module's siblings only
    model, scheduler = _resolve_target(module)
    if _ATTR in model.__dict__:
        raise RuntimeError(f"TeaCache is already attached to this {type(model).__name__}; "
                           "call remove_teacache first")
    fitted = None  # a calibrated JSON preset: its coefficients, the model's own adapter
    if looks_like_preset_path(preset):
        fitted = _load_fitted(preset, model, threshold is not None or config is not None)
        preset = None
    if adapter is None:
        adapter = adapter_for(model, preset=preset, variant=variant)
    elif preset is not None or variant is not None:
        raise ValueError("pass either adapter= or preset=/variant=, not both")
    if config is not None and not isinstance(config, TeaCacheConfig):
        raise TypeError(f"config must be a TeaCacheConfig, got {type(config).__name__}")
    cfg = config if config is not None else TeaCacheConfig(
        threshold=adapter.threshold if adapter.threshold is not None else 0.0)
    cfg = cfg.replace(**overrides)
    if threshold is not None:
        cfg = cfg.replace(threshold=threshold)
    if cfg.sync_free and cfg.branches is None:
        cfg = cfg.replace(branches=1)  # sync-free calls go round robin: no timestep read
    if cfg.coefficients is None:
        cfg = cfg.replace(coefficients=fitted["coefficients"] if fitted else adapter.coefficients)
    cfg.validate()
    if cfg.num_steps is None and scheduler is None:
        raise ValueError("num_steps is required (transformer calls per branch in one generation), "
                         "unless apply_teacache is given the pipeline")
    if process_group is not None:
        from .distributed import check_process_group
        check_process_group(process_group, _model_device(model))
    w = _Wrapper(model, adapter, cfg, scheduler=scheduler, process_group=process_group)
    model.__dict__[_ATTR] = w
    try:
        w.install()
    except Exception:
        w.uninstall()
        del model.__dict__[_ATTR]
        raise
    return model


def remove_teacache(module: Any) -> nn.Module:
    """Restore the original forwards and free every cached tensor."""
    w = _wrapper(module)
    w.uninstall()
    del w.model.__dict__[_ATTR]
    return w.model


def reset(module: Any) -> None:
    """Forget the cached state (as at the start of a new generation)."""
    _wrapper(module)._start_generation()


def stats(module: Any) -> Dict[str, Any]:
    """Calls, steps computed / skipped per branch and per sample, indicator trace.

    ``rel_l1`` is the relative L1 distance of every call (NaN or inf on a
    branch's first call); reading it is the only host sync of the trace.
    """
    w = _wrapper(module)
    out = w.sf_stats() if w.config.sync_free else w.state.stats()
    out.update(threshold=w.config.threshold, preset=w.adapter.name, variant=w.adapter.variant,
               cache_bytes=_cache_bytes(list(w.state.branches.values()) + list(w.sf)))
    return out


def _cache_bytes(branch_states: List[Any]) -> int:
    """Bytes of the tensors the cache holds (prev indicator, residual, decision
    state, trace), each storage counted once: what TeaCache adds to memory."""
    seen, total = set(), 0
    for state in branch_states:
        for value in vars(state).values():
            if isinstance(value, Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


@contextlib.contextmanager
def teacache(module: Any, config: Optional[TeaCacheConfig] = None, **kwargs) -> Iterator[nn.Module]:
    """``with teacache(pipe, threshold=0.4): pipe(...)``: apply, then always remove."""
    model = apply_teacache(module, config, **kwargs)
    try:
        yield model
    finally:
        remove_teacache(model)
