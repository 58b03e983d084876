"""Host cost per transformer call: this library vs the official TeaCache script
vs diffusers' FirstBlockCache and MagCache, on one model, in one run.

The model is the 1+1-block random FLUX transformer of ``flux_model.SPECS["smoke"]``
(about 2 ms per call on one CPU thread, nearly all of it Python), so what a cache
adds on the host is a visible share of a call. Every method is attached to the
same model instance in turn and runs the same Euler loop; each call is timed on
its own, inside ``model.cache_context("cond")`` as FluxPipeline calls it, by
the CPU time of the calling thread on CPU (one intra-op thread runs all of a
call's work, and time the thread is descheduled by other jobs does not count)
or the wall clock up to a synchronize on CUDA. The
runs are interleaved (one pass = every configuration once, the order rotating
from pass to pass), on one thread, so a burst of load from other jobs slows all
of them alike; medians over all calls of all passes are reported.

Per method, two settings:

* ``compute``: every call runs the blocks (this library and the script at
  threshold 0; FirstBlockCache at threshold 0, its relative change of the first
  block's residual is never 0 in a sampling loop; MagCache with
  ``max_skip_steps=0``). The median call minus the plain model's median call is
  the method's extra host cost per computed call.
* ``skip``: a threshold no estimate reaches, so every call skips except the ones
  a method always computes (the first and last for TeaCache, the first for
  diffusers' caches). A skipped call is reported as a fraction of a plain
  call, and per skipped block: ``(skipped call - floor) / blocks skipped``, where
  the floor is the same model with its block lists emptied (embeddings, final
  norm and projection only: the least a skipped call can cost). FirstBlockCache
  always runs its first block, so it skips one block fewer, and that block's
  work is part of its figure.

Which calls computed is read in an untimed first pass (a pre-hook on the last
block's attention counts the calls in which it ran); the timed passes carry no
instrumentation.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

METHODS = {
    "teacache_fast": "teacache_fast (this library)",
    "official": "official TeaCache script (replica)",
    "fbcache": "diffusers FirstBlockCache",
    "magcache": "diffusers MagCache",
}
NEVER = 1e9  # a threshold no accumulated estimate reaches: skip whatever may be skipped


def _blocks(model) -> List[torch.nn.Module]:
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def _attach(method: str, setting: str, model, steps: int, coefficients) -> Tuple[Callable[[], None], str]:
    """Attach ``method`` in ``setting`` ('compute' or 'skip'); return (detach, settings as text)."""
    compute = setting == "compute"
    if method == "teacache_fast":
        import teacache_fast as tf

        threshold = 0.0 if compute else NEVER
        tf.apply_teacache(model, threshold=threshold, num_steps=steps)
        return (lambda: tf.remove_teacache(model)), f"threshold {threshold:g}"
    if method == "official":
        from . import replica

        threshold = 0.0 if compute else NEVER
        replica.patch(model, threshold=threshold, num_steps=steps, coefficients=coefficients)
        return (lambda: replica.unpatch(model)), f"threshold {threshold:g}"
    if method == "fbcache":
        from diffusers.hooks import FirstBlockCacheConfig

        threshold = 0.0 if compute else NEVER
        model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        return model.disable_cache, f"threshold {threshold:g}"
    if method == "magcache":
        from diffusers.hooks import MagCacheConfig
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        threshold, max_skips = (0.0, 0) if compute else (NEVER, steps)
        model.enable_cache(MagCacheConfig(threshold=threshold, max_skip_steps=max_skips, retention_ratio=0.0,
                                          num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS))
        return model.disable_cache, f"threshold {threshold:g}, max_skip_steps {max_skips}, FLUX mag ratios"
    raise ValueError(f"unknown method {method!r}")


class _EmptyBlocks:
    """The model without its blocks while active: what every call costs outside the stack."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.saved = (self.model.transformer_blocks, self.model.single_transformer_blocks)
        self.model.transformer_blocks = torch.nn.ModuleList()
        self.model.single_transformer_blocks = torch.nn.ModuleList()
        return self

    def __exit__(self, *exc):
        self.model.transformer_blocks, self.model.single_transformer_blocks = self.saved
        return False


# CPU time of the calling thread: with one intra-op thread a CPU call's whole
# work runs on it, and time the thread spends descheduled (other jobs on a
# shared machine) does not count. A CUDA call is timed by the wall clock up to
# its synchronize (the device's time is part of the call there).
def _clock_for(device) -> Callable[[], float]:
    return time.perf_counter if torch.device(device).type == "cuda" else time.thread_time


def _timed_calls(model, inputs, sigmas) -> List[float]:
    """One Euler loop; the seconds of each transformer call."""
    from .sampling import euler_sample

    times: List[float] = []
    cuda = inputs.latents.device.type == "cuda"
    _clock = _clock_for(inputs.latents.device)

    def call(m, **kwargs):
        start = _clock()
        with m.cache_context("cond"):
            out = m(**kwargs)[0]
        if cuda:
            torch.cuda.synchronize()
        times.append(_clock() - start)
        return out

    euler_sample(model, inputs, sigmas, call=call)
    return times


def _computed_calls(model, inputs, sigmas) -> List[bool]:
    """One Euler loop with a counter on the last block's attention: per call, whether the blocks ran."""
    counts = [0]
    handle = _blocks(model)[-1].attn.register_forward_pre_hook(lambda *_: counts.__setitem__(0, counts[0] + 1))
    flags: List[bool] = []

    def call(m, **kwargs):
        before = counts[0]
        with m.cache_context("cond"):
            out = m(**kwargs)[0]
        flags.append(counts[0] > before)
        return out

    from .sampling import euler_sample

    try:
        euler_sample(model, inputs, sigmas, call=call)
    finally:
        handle.remove()
    return flags


def _run_config(config: Tuple[str, str], model, inputs, sigmas, coefficients, probe: bool):
    """Run one configuration ('plain' / 'floor' or (method, setting)) once; return (times or flags, text)."""
    method, setting = config
    steps = len(sigmas) - 1
    measure = _computed_calls if probe else _timed_calls
    if method == "plain":
        return measure(model, inputs, sigmas), ""
    if method == "floor":
        with _EmptyBlocks(model):
            return (measure(model, inputs, sigmas) if not probe else [False] * steps), "block lists emptied"
    detach, text = _attach(method, setting, model, steps, coefficients)
    try:
        return measure(model, inputs, sigmas), text
    finally:
        detach()


def _median_ms(values: List[float]) -> float:
    return statistics.median(values) * 1e3 if values else float("nan")


def measure_host_cost(steps: int = 28, passes: int = 10, device="cpu", dtype=torch.float32, seed: int = 0,
                      methods=tuple(METHODS), log=print) -> Dict:
    """All configurations of all ``methods``, interleaved; returns {'describe', 'plain_ms', 'floor_ms', 'rows'}."""
    from . import flux_model
    from .sampling import flux_sigmas

    spec = flux_model.SPECS["smoke"]
    model, inputs = flux_model.build(spec, seed=seed, device=device, dtype=dtype)
    deep, deep_inputs = flux_model.build(flux_model.SPECS["smoke-deep"], seed=seed, device=device,
                                         dtype=dtype)
    sigmas = flux_sigmas(steps, image_seq_len=inputs.latents.shape[1])
    coefficients = flux_model.flux_preset()[1]
    n_blocks = len(_blocks(model))
    configs = [("plain", ""), ("floor", "")] + [(m, s) for m in methods for s in ("compute", "skip")]
    deep_configs = [(m, "skip") for m in methods]
    extra_blocks = len(_blocks(deep)) - n_blocks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Untimed first pass: warms every path up and records which calls computed.
        flags, texts = {}, {}
        for config in configs:
            flags[config], texts[config] = _run_config(config, model, inputs, sigmas, coefficients, probe=True)
        deep_flags = {c: _run_config(c, deep, deep_inputs, sigmas, coefficients, probe=True)[0]
                      for c in deep_configs}
        samples: Dict[Tuple[str, str], List[List[float]]] = {c: [] for c in configs}
        deep_samples: Dict[Tuple[str, str], List[List[float]]] = {c: [] for c in deep_configs}
        for p in range(passes):
            k = p % len(configs)
            for config in configs[k:] + configs[:k]:
                samples[config].append(_run_config(config, model, inputs, sigmas, coefficients, probe=False)[0])
            for config in deep_configs:
                deep_samples[config].append(
                    _run_config(config, deep, deep_inputs, sigmas, coefficients, probe=False)[0])
    finally:
        torch.set_num_threads(threads)

    plain_ms = _median_ms([t for run in samples[("plain", "")] for t in run])
    floor_ms = _median_ms([t for run in samples[("floor", "")] for t in run])
    rows = [_row(m, samples, flags, texts, deep_samples, deep_flags, plain_ms, floor_ms, n_blocks,
                 extra_blocks, steps) for m in methods]
    describe = f"{flux_model.describe(model, spec)}, {steps} calls per run, {passes} passes, 1 thread"
    log(f"[host cost] {describe}: plain call {plain_ms:.3f} ms, floor {floor_ms:.3f} ms")
    for line in format_rows(rows):
        log(f"[host cost] {line}")
    return {"describe": describe, "plain_ms": plain_ms, "floor_ms": floor_ms, "rows": rows, "steps": steps,
            "passes": passes}


def _row(m, samples, flags, texts, deep_samples, deep_flags, plain_ms, floor_ms, n_blocks,
         extra_blocks, steps) -> dict:
    """One method's figures from the interleaved samples."""
    def pick(config, computed: bool) -> List[float]:
        return [t for run in samples[config] for t, f in zip(run, flags[config]) if f == computed]

    comp, skip = (m, "compute"), (m, "skip")
    computed_ms = _median_ms(pick(comp, True))
    skipped_ms = _median_ms(pick(skip, False))
    deep_skipped_ms = _median_ms([t for run in deep_samples[skip]
                                  for t, f in zip(run, deep_flags[skip]) if not f])
    blocks_skipped = n_blocks - 1 if m == "fbcache" else n_blocks
    return {
        "method": m, "label": METHODS[m], "compute_settings": texts[comp], "skip_settings": texts[skip],
        "compute_run_computed": sum(flags[comp]), "skip_run_computed": sum(flags[skip]), "calls": steps,
        "plain_ms": plain_ms, "floor_ms": floor_ms, "computed_ms": computed_ms,
        "extra_us_per_computed_call": (computed_ms - plain_ms) * 1e3,
        "skipped_ms": skipped_ms, "skipped_over_plain": skipped_ms / plain_ms,
        "blocks_skipped": blocks_skipped,
        "us_per_skipped_block": (skipped_ms - floor_ms) * 1e3 / blocks_skipped,
        # a deeper model's skipped call minus this one's, per further block
        "us_per_further_skipped_block": (deep_skipped_ms - skipped_ms) * 1e3 / extra_blocks,
        "samples_computed": len(pick(comp, True)), "samples_skipped": len(pick(skip, False)),
    }


def _fmt(v: float, spec: str) -> str:
    return "-" if v != v else format(v, spec)  # NaN (no such call) -> "-"


def format_rows(rows: List[dict]) -> List[str]:
    """The table as plain text (what the bench prints)."""
    out = [f"{'method':<36} {'computed call':>13} {'extra/call':>11} {'skipped call':>12} {'skip/plain':>10} "
           f"{'per skipped block':>17} {'per further block':>17}"]
    for r in rows:
        out.append(f"{r['label']:<36} {_fmt(r['computed_ms'], '.3f'):>10} ms {_fmt(r['extra_us_per_computed_call'], '+.0f'):>8} us "
                   f"{_fmt(r['skipped_ms'], '.3f'):>9} ms {_fmt(r['skipped_over_plain'], '.1%'):>10} "
                   f"{_fmt(r['us_per_skipped_block'], '.0f'):>14} us "
                   f"{_fmt(r['us_per_further_skipped_block'], '.1f'):>14} us")
    return out


CSV_COLUMNS = ["method", "label", "compute_settings", "skip_settings", "calls", "compute_run_computed",
               "skip_run_computed", "plain_ms", "floor_ms", "computed_ms", "extra_us_per_computed_call",
               "skipped_ms", "skipped_over_plain", "blocks_skipped", "us_per_skipped_block",
               "us_per_further_skipped_block", "samples_computed",
               "samples_skipped"]


def markdown(result: Dict) -> List[str]:
    rows = result["rows"]
    lines = [f"## Host cost per call: {result['describe']}", "",
             f"Plain model: {result['plain_ms']:.3f} ms per call (median); floor (block lists emptied: "
             f"embeddings, final norm, projection): {result['floor_ms']:.3f} ms.", "",
             "| method | computed call ms | extra per computed call | skipped call ms | skipped / plain "
             "| per skipped block | per further skipped block | computed (compute run / skip run) "
             "| settings (compute; skip) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {_fmt(r['computed_ms'], '.3f')} | {_fmt(r['extra_us_per_computed_call'], '+.0f')} us | "
            f"{_fmt(r['skipped_ms'], '.3f')} | {_fmt(r['skipped_over_plain'], '.1%')} | "
            f"{_fmt(r['us_per_skipped_block'], '.0f')} us ({r['blocks_skipped']} blocks) | "
            f"{_fmt(r['us_per_further_skipped_block'], '.1f')} us | "
            f"{r['compute_run_computed']}/{r['calls']} / {r['skip_run_computed']}/{r['calls']} | "
            f"{r['compute_settings']}; {r['skip_settings']} |")
    lines += ["", "Calls are timed by the calling thread's CPU time on CPU (1 intra-op thread), by the wall "
              "clock up to a synchronize on CUDA.",
              "", "`extra per computed call`: median call with every call computed minus the plain model's "
              "median call. `skipped / plain`: median skipped call over the plain call. `per skipped block`: "
              "(skipped call - floor) / blocks the skip avoided; FirstBlockCache still runs its first block "
              "on a skipped call. `per further skipped block`: the skipped call of the same model with 2 + 38 "
              "blocks minus this one's, per extra block (the marginal cost of one more skipped block). Method and settings in teacache_fast/cli/host_cost.py.", ""]
    return lines
