"""HostRunner: the default mode. The decision is made on the host, once per call.

The first block of a call runs one host region (:meth:`HostRunner._host_decide`):
place the call on the clock, run the indicator op, read its fp32 partials
(the one sync of a call), decide on the host with the kernel's fp32
arithmetic, set the call's mode. Under torch.compile that region is not
traced (one graph break per call) and the graphs only see the mode, never a
counter, so their number does not grow with the steps.

Modes: ``compute`` (every block runs; the span's end captures ``out - in``),
``skip`` (every block returns its inputs at once; the span's end adds the
residual), and, per sample when samples disagree, ``subset`` (the blocks run
on the computing samples only) or ``mixed`` (the whole batch runs, for
adapters whose code between blocks mixes the batch).
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..cache.clock import CallContext
from ..cache.config import TeaCacheConfig
from ..cache.state import BranchState, CacheState, reduce_partials_, sequence_group
from ..cache.stats import branch_entry, rel_l1_from_rows, summary
from ..models.base import Adapter, BlockCall, signature_of
from ._compat import host_only
from .batch import refill_outputs, select_arguments
from .indicator import indicator_of

__all__ = ["HostRunner"]

COMPUTE, SKIP, SUBSET, MIXED = "compute", "skip", "subset", "mixed"


class HostCall:
    """One transformer call: its arguments; its branch, step and mode once the
    first block ran the host region."""

    __slots__ = ("args", "kwargs", "context", "branch", "state", "step", "mode", "captured",
                 "stream_in", "partials", "flags", "compute_idx", "batch", "skip_out0", "_idx",
                 "finished")

    def __init__(self, args: tuple, kwargs: dict, context: Any = None):
        self.args, self.kwargs = args, kwargs
        self.context = context          # a cache.clock.CallContext when the pipeline gave one
        self.branch = 0
        self.state: Optional[BranchState] = None
        self.step = 0
        self.mode: Optional[str] = None
        self.captured: Dict[str, Any] = {}
        self.stream_in: Optional[Tensor] = None
        self.partials: Optional[Tensor] = None
        self.flags: List[bool] = []
        self.compute_idx: List[int] = []
        self.batch = 0
        self.skip_out0: Any = None      # block 0's passthrough, to refill the batch (subset)
        self.finished = False           # the span's end ran (residual captured or applied)
        self._idx: Dict[torch.device, Tensor] = {}

    def index(self, device: torch.device) -> Tensor:
        """The computing samples' indices on ``device`` (built once per device)."""
        if device not in self._idx:
            self._idx[device] = torch.tensor(self.compute_idx, dtype=torch.long, device=device)
        return self._idx[device]


class HostRunner:
    """Routes one cached model's events in host-read mode."""

    def __init__(self, model: nn.Module, adapter: Adapter, config: TeaCacheConfig,
                 scheduler: Any = None, process_group: Any = None):
        self.model, self.adapter, self.config = model, adapter, config
        self.state = CacheState(config, scheduler)
        self.process_group = process_group
        self.model_signature = signature_of(model.forward)
        self.call: Optional[HostCall] = None
        # what a traced call runs (the one graph break); eager calls run the
        # methods themselves: the disabled wrapper would swap Dynamo's frame
        # callback in and out on every call, host time for nothing
        self._host_region = host_only(self._host_decide)
        self._observe_region = host_only(self._observe)
        self._fast_skip = adapter.passthrough is None   # a skipped block returns its stream
        self._warned: Dict[str, int] = {}               # warning kind -> generation it was given in
        self._busy = threading.Lock()
        # coefficients="auto": told where each call sits and when a generation
        # ends (placed(tick, last) / boundary(reason)); None: no calibration
        self.calibration: Any = None

    # ------------------------------------------------------------ events

    def model_call(self, forward: Callable, args: tuple, kwargs: dict, context: Any = None) -> Any:
        # branch and step are placed at the first block, in the host region:
        # here, under torch.compile, they would be guarded on (a graph per step)
        eager = not torch.compiler.is_compiling()
        if eager:
            enter_call(self._busy, self.model)
        self.call = call = HostCall(args, kwargs, _call_context(context))
        try:
            out = forward(*args, **kwargs)
            if eager and call.mode is not None and not call.finished:
                self.state.abandon()
                raise RuntimeError(
                    f"TeaCache adapter {self.adapter.name!r}: the span's end never ran in this call "
                    f"(its last block{' or end module' if self.adapter.end else ''} was not "
                    "called), so the residual was neither captured nor applied. Adapter.blocks "
                    "must return exactly the blocks the model runs, in the order it runs them")
            return out
        except BaseException:
            self.state.abandon()   # an interrupted generation: the next call starts afresh
            raise
        finally:
            self.call = None
            if eager:
                self._busy.release()

    def block(self, index: int, ends_span: bool, original: Callable, args: tuple, kwargs: dict):
        call = self.call
        if call is None:  # the block is run outside the model's forward
            return original(*args, **kwargs)
        if index == 0:
            self._decide(call, original, args, kwargs)
        elif call.mode is None:
            raise RuntimeError(
                f"TeaCache adapter {self.adapter.name!r}: block {index} of the stack ran before "
                "block 0 in this call. Adapter.blocks must return exactly the blocks the model "
                "runs, in the order it runs them")
        mode = call.mode
        if mode == SKIP:
            out = kwargs.get(self.adapter.stream) if self._fast_skip else None
            if out is None:  # no binding when the stream came by name
                out = self.adapter.skip_output(BlockCall(original, args, kwargs, self.model))
            elif not ends_span:
                return out
        elif mode == SUBSET:
            args, kwargs = select_arguments(original, args, kwargs, self.adapter.unbatched,
                                            call.batch, call.index)
            out = original(*args, **kwargs)
        else:
            out = original(*args, **kwargs)
        if ends_span:
            out = self._finish(call, out)
        return out

    def loop_gate(self, offset: int, span_end: Optional[int]) -> Callable[[int], Optional[bool]]:
        """keep(i) for the block list whose first block is block ``offset`` of
        the stack: a skipped call runs block 0 and the span's end only; once
        the call is known to run its blocks (or runs outside a call), None:
        the rest of the list, unasked."""
        def keep(i: int) -> Optional[bool]:
            call = self.call
            if call is None:
                return None
            mode = call.mode
            if mode == SKIP:
                index = offset + i
                return index == 0 or index == span_end
            return True if mode is None else None   # not decided yet: ask again at the next block
        return keep

    def tail(self, original: Callable, args: tuple, kwargs: dict):
        call = self.call
        if call is not None and call.mode == SKIP:
            return args[0] if args else next(iter(kwargs.values()))
        return original(*args, **kwargs)

    def end(self, original: Callable, args: tuple, kwargs: dict):
        call = self.call
        if call is not None and call.mode is not None:
            args, kwargs = _with_first_argument(args, kwargs,
                                                lambda x: self._finish_stream(call, x))
        return original(*args, **kwargs)

    def captured(self, name: str, output: Any) -> None:
        if self.call is not None:
            self.call.captured[name] = output

    def set_timesteps_done(self) -> None:
        self.state.clock.set_timesteps_done()

    def scheduler_step_done(self) -> None:
        self.state.clock.step_done()

    def generation_ended(self) -> None:
        """The pipeline finished a call (diffusers resets stateful hooks): the
        next call starts a new generation; the stats stay readable until then."""
        self.state.clock.abandon("pipeline call ended")
        if self.calibration is not None:
            self.calibration.boundary("pipeline call ended")

    def watch_scheduler(self, scheduler: Any) -> None:
        """Calls now come from a pipeline with another scheduler, already set
        up for its generation."""
        clock = self.state.clock
        clock.scheduler = scheduler
        clock.stepped = callable(getattr(scheduler, "step", None))
        clock.set_timesteps_done()

    def restart(self) -> None:
        self.state.restart()
        if self.calibration is not None:
            self.calibration.boundary("reset")

    def close(self) -> None:
        self.state.restart()
        self.call = None

    # ------------------------------------------------------------ the decision

    def _decide(self, call: HostCall, original: Callable, args: tuple, kwargs: dict) -> None:
        """Traced part of the decision: the indicator's inputs (e.g. the
        modulation of the first block, which compiles with the model), then
        the host region. The one graph break of a call is here."""
        first = BlockCall(original, args, kwargs, self.model, call.captured)
        stream = first[self.adapter.stream]
        x, how = indicator_of(self.adapter, first)
        region = self._host_region if torch.compiler.is_compiling() else self._host_decide
        region(call, stream, x, how, first)

    def _host_decide(self, call: HostCall, stream: Tensor, x: Tensor, how: Dict[str, Any],
                     first: BlockCall) -> None:
        """Host region: place the call, run the indicator op, read the
        partials (the one sync), decide, record, set ``call.mode``."""
        if torch.is_grad_enabled() and (stream.requires_grad or x.requires_grad):
            raise RuntimeError(
                f"TeaCache on {type(self.model).__name__} is inference-only (a skipped step has no "
                "gradient): call the model under torch.no_grad() or torch.inference_mode(), as "
                "diffusers pipelines do")
        cfg = self.config
        tick = self._place(call)
        if self.calibration is not None:  # may retune cfg before this call decides
            self.calibration.placed(tick, self.state.clock.closed is not None)
        bs = call.state
        partials = bs.partials_(x, how, cfg.per_sample)
        if cfg.per_sample and partials.shape[0] != stream.shape[0]:
            raise RuntimeError(f"per_sample=True: the indicator has batch {partials.shape[0]} but "
                               f"the hidden states have batch {stream.shape[0]}")
        forced = cfg.forced(tick.step, tick.num_steps, self.adapter.forced) or (
            tick.shadow is not None and cfg.forced(tick.shadow, tick.num_steps, self.adapter.forced)
        ) or bs.must_compute(stream)
        if sequence_group(self.process_group, stream.device) is not None:
            # sequence parallel: the same partials, force and facts on every rank
            forced = reduce_partials_(partials, self.process_group, force=forced, facts=dict(
                branch=tick.branch, step=tick.step, num_steps=tick.num_steps,
                generation=self.state.generations, batch=stream.shape[0]))
        rows = partials.tolist()   # the one host read of this call: [num, den] or B of them
        if partials.dim() == 1:
            rows = [rows]
        flags = bs.decide(tick.step, rows, cfg, force=forced)
        self._check_estimate(bs, tick.step)
        if len(flags) == 1:
            flags = flags * stream.shape[0]   # one decision for the whole batch
        bs.record(flags)
        call.partials, call.flags, call.stream_in, call.batch = partials, flags, stream, stream.shape[0]
        if all(flags):
            call.mode = COMPUTE
            bs.residual_buffer(stream, cfg)  # allocated here: the graphs only fill it
        elif not any(flags):
            call.mode = SKIP
        else:
            call.compute_idx = [i for i, f in enumerate(flags) if f]
            call.mode = SUBSET if self.adapter.subset else MIXED
            call.index(stream.device)  # built here, not in the graph
            if call.mode == SUBSET:
                call.skip_out0 = self.adapter.skip_output(first)

    def _check_estimate(self, bs: BranchState, step: int) -> None:
        """Warn (once per generation and kind) when the polynomial does not fit
        where the indicator lands: a negative estimate shrinks the accumulator
        (and can make every later step skip), and a calibrated polynomial is
        only known inside its fitted range. The decision itself keeps the
        reference behaviour."""
        d, cfg, gen = bs.decision, self.config, self.state.generations
        if d.decreased and self._warned.get("negative") != gen:
            self._warned["negative"] = gen
            rel = next((r for r in d.rel if r == r), float("nan"))
            warnings.warn(
                f"TeaCache ({self.adapter.name}): the rescaling polynomial is negative at the "
                f"indicator {rel:.4g} (step {step}), so the accumulated estimate decreased: the "
                "indicator is outside this polynomial's fitted range and the preset may not fit "
                "this checkpoint. Calibrate it (teacache-fast calibrate), or set "
                "max_consecutive_skips=N to bound the skips", RuntimeWarning, stacklevel=2)
        rng = cfg.fitted_range
        if rng is not None and self._warned.get("range") != gen:
            outside = [r for r in d.rel if r == r and not rng[0] <= r <= rng[1]]
            if outside:
                self._warned["range"] = gen
                warnings.warn(
                    f"TeaCache ({self.adapter.name}): the indicator {outside[0]:.4g} (step {step}) "
                    f"is outside the range the coefficients were fitted on [{rng[0]:.4g}, "
                    f"{rng[1]:.4g}]; the estimate there is an extrapolation", RuntimeWarning,
                    stacklevel=2)

    def _place(self, call: HostCall):
        """The call's branch and step on the clock (may start a generation)."""
        # a call by keywords only needs no binding (diffusers pipelines call so)
        bound = call.kwargs if not call.args else _bind(self.model_signature, call.args, call.kwargs)
        t_arg = bound.get(self.adapter.timestep_arg) if self.adapter.timestep_arg else None
        signature, inputs = [], []
        for k, v in bound.items():
            if isinstance(v, Tensor):
                signature.append((k, v.shape, v.dtype, v.device))
                inputs.append(v)
        signature = tuple(signature)
        # the latents first: CFG branches of a step are told apart from a
        # restarted run by sharing them (cache/clock.py)
        latents = bound.get("hidden_states")
        if isinstance(latents, Tensor) and inputs[0] is not latents:
            inputs = [latents] + [v for v in inputs if v is not latents]
        tick = self.state.begin_call(t_arg, signature, call.context, inputs)
        call.branch, call.step, call.state = tick.branch, tick.step, self.state.branch(tick.branch)
        return tick

    # ------------------------------------------------------------ span end

    def _finish(self, call: HostCall, out: Any) -> Any:
        """At the last block's output: capture or apply the residual on the stream."""
        stream = self._finish_stream(call, self.adapter.check_output(out, call.stream_in))
        if call.mode == SUBSET:
            out = refill_outputs(out, call.skip_out0, self.adapter.output_index, call.batch,
                                 len(call.compute_idx), call.index)
        return self.adapter.with_stream(out, stream)

    def _finish_stream(self, call: HostCall, out: Tensor) -> Tensor:
        call.finished = True
        bs, inp = call.state, call.stream_in
        if call.mode == COMPUTE:
            bs.capture(out, inp, self.config)
            if self.config.observer is not None:  # a host callback: a break only when set
                observe = self._observe_region if torch.compiler.is_compiling() else self._observe
                observe(call, out)
            return out
        if call.mode == SKIP:
            return bs.apply(inp)
        # some samples computed: out holds them all (SUBSET) or the whole batch (MIXED)
        if call.mode == MIXED:
            out = out.index_select(0, call.index(out.device))
        skip_mask = torch.tensor([not f for f in call.flags], dtype=torch.bool, device=inp.device)
        return bs.capture_and_apply_(out, inp, call.index(inp.device), skip_mask)

    def _observe(self, call: HostCall, out: Tensor) -> None:
        """Host side (not traced): the observer gets the call's step as an int."""
        self.config.observer(call.branch, call.step, call.partials, call.stream_in, out)

    # ------------------------------------------------------------ inspection

    def stats(self) -> Dict[str, Any]:
        st = self.state
        branches = {i: branch_entry(computed=b.computed, skipped=b.skipped, steps=b.steps,
                                    sample_computed=b.sample_computed or [],
                                    sample_skipped=b.sample_skipped or [],
                                    rel_l1=rel_l1_from_rows(b.partials),
                                    negative_estimates=b.decision.negative_calls if b.decision else 0)
                    for i, b in st.branches.items()}
        return summary(branches, calls=st.calls, num_steps=st.num_steps,
                       generations=st.generations, restarts=st.restarts)

    def tensors(self) -> List[Tensor]:
        return list(self.state.tensors())


def enter_call(busy: threading.Lock, model: nn.Module) -> None:
    """Take the model's one-call-at-a-time lock, or raise a clear error."""
    if not busy.acquire(blocking=False):
        raise RuntimeError(
            f"TeaCache: this {type(model).__name__} is already running a call (from another "
            "thread, or nested): a cached model holds the state of one call at a time. Call it "
            "from one thread at a time, or give each thread its own model copy")


def _call_context(context: Any) -> Optional[CallContext]:
    """diffusers' CacheContext (what ``transformer.cache_context(name, ...)`` set)
    as the clock's CallContext; None when the pipeline said nothing."""
    if context is None or isinstance(context, CallContext):
        return context
    name = getattr(context, "name", None)
    if not isinstance(name, str):
        return None
    step = getattr(context, "step_index", None)
    total = getattr(context, "num_inference_steps", None)
    return CallContext(name, int(step) if step is not None else None,
                       int(total) if total is not None else None)


def _with_first_argument(args: tuple, kwargs: dict, fn: Callable[[Any], Any]):
    """(args, kwargs) with the first argument (positional or keyword) replaced by fn(it)."""
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    name = next(iter(kwargs))
    return args, dict(kwargs, **{name: fn(kwargs[name])})


def _bind(sig, args: tuple, kwargs: dict) -> Dict[str, Any]:
    if sig is None:
        return dict(kwargs)
    try:
        return dict(sig.bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)
