"""End-to-end benchmark: a random-weight FLUX-shaped transformer sampled with and without TeaCache.

Two model sizes (the demo's small model, and one as wide as FLUX.1 with few
blocks). Per threshold it reports the achieved speedup against the ideal one
(total / computed steps), the share of the run spent inside the cache's ops
(indicator, decision, residual capture / apply; from the torch profiler, see
:class:`OpProfile`), the overhead at threshold 0 (every step computed, so all
of the difference is the cache's own work), peak memory with and without the
cache, and the final latent's PSNR vs the uncached run. Then the host-cost row
(:mod:`.host_cost`): this library, the official TeaCache script and diffusers'
FirstBlockCache / MagCache per call on one tiny model. Writes
``e2e-<device>.md`` / ``.csv`` and ``e2e-host-<device>.md`` / ``.csv``.
"""
from __future__ import annotations

import argparse
import csv
import os
import threading
from pathlib import Path
from typing import Dict, List, Optional

from . import args as cli_args
from . import flux_model, sampling
from .machine import device_name, device_slug, environment_lines
from .runs import compare, timed_run

# The e2e model sizes (flux_model.SPECS names); --quick runs the first, --smoke the tiny one.
MODEL_SIZES = ("demo", "flux-width")
# The public ops the wrapper calls; the time spent inside them is the cache machinery.
MACHINERY_OPS = ("modulated_rel_l1_", "rel_l1_partials", "teacache_decide_", "residual_capture_",
                 "residual_apply_")


# --------------------------------------------------------------------------- measuring

class OpProfile:
    """Time spent inside the wrapper's ops during a run, from the torch profiler.

    The ops are ``torch.library`` custom ops, so each call passes torch's
    dispatcher, and the profiler records it under the registered name
    (``teacache_fast::modulated_rel_l1_``, ...) with its CPU time and, on CUDA,
    the device time of the kernels launched inside it. That needs nothing from
    the library (no patched module attribute, no hook) and sees exactly the calls
    the wrapper makes. The profiler also records every other op of the run, which
    costs time of its own, so the profiled run is an extra run: the timed runs
    carry no instrumentation. ``share`` divides by the profiled run's own wall
    time (both inflated alike).
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds = 0.0
        self.calls = 0

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        if exc[0] is None:
            names = {f"teacache_fast::{op}" for op in MACHINERY_OPS}
            for event in self._prof.key_averages():
                if event.key in names:
                    self.calls += event.count
                    total_us = event.device_time_total if self.cuda else event.cpu_time_total
                    self.seconds += total_us / 1e6
        return False


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or RSS sampled every ms on CPU."""

    def __init__(self, device):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, _rss_bytes()) - self._base
        return False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- running

def bench_model(size: str, steps: int, thresholds: List[float], device, dtype, seed: int,
                passes: int = 2, log=print) -> List[dict]:
    """All runs for one model size, the fastest of ``passes``; one dict per configuration (no cache first)."""
    import torch

    spec = flux_model.SPECS[size]
    model, inputs = flux_model.build(spec, seed=seed, device=device, dtype=dtype)
    sigmas = sampling.flux_sigmas(steps, image_seq_len=inputs.latents.shape[1])
    describe = flux_model.describe(model, spec)
    log(f"[{size}] {describe}")
    timed_run(model, inputs, sigmas[-3:], None)            # warm-up, not reported
    timed_run(model, inputs, sigmas[-3:], 0.0, num_steps=2)

    configs = [None, 0.0] + [t for t in thresholds if t != 0.0]
    # One profiled run per configuration, for the time inside the cache's ops.
    profiles: Dict[Optional[float], tuple] = {}
    for th in configs:
        with OpProfile(cuda=device.type == "cuda") as prof:
            _, r = timed_run(model, inputs, sigmas, th)
        if th is not None and r.computed and not prof.calls:
            raise RuntimeError("the torch profiler recorded no teacache_fast op: eager op calls no longer pass "
                               "torch's dispatcher, so OpProfile cannot see them (give the ops a "
                               "torch.profiler.record_function name)")
        profiles[th] = (prof, r.seconds)
    # Every configuration runs once per pass, the passes interleaved, and the
    # fastest pass counts: on a shared machine, load only ever adds time.
    best: Dict[Optional[float], tuple] = {}
    for _ in range(passes):
        for th in configs:
            with PeakMemory(device) as mem:
                latent_out, r = timed_run(model, inputs, sigmas, th)
            if th not in best or r.seconds < best[th][1].seconds:
                best[th] = (latent_out, r, mem.peak_bytes)
    rows = []
    base_latent, base = best[None][:2]
    for th in configs:
        latent_out, r, peak = best[th]
        prof, profiled_seconds = profiles[th]
        compare(r, latent_out, base, base_latent)
        rows.append({
            "model": size, "describe": describe, "threshold": th, "computed": r.computed, "total": r.total,
            "seconds": r.seconds, "speedup": r.speedup, "ideal_speedup": r.ideal_speedup,
            "of_ideal": r.speedup / r.ideal_speedup, "machinery_s": prof.seconds,
            "machinery_share": prof.seconds / profiled_seconds, "op_calls": prof.calls,
            "peak_mem_mb": peak / 2**20, "cache_mb": r.cache_bytes / 2**20, "psnr_db": r.psnr_db,
            "max_abs_err": r.max_abs_err,
        })
        log(f"[{size}] threshold {'none' if th is None else th}: {r.computed}/{r.total} steps, "
            f"{r.seconds:.2f} s, {r.speedup:.2f}x (ideal {r.ideal_speedup:.2f}x), "
            f"cache ops {prof.seconds / profiled_seconds:.2%} of the run")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- writing

CSV_COLUMNS = ["model", "describe", "threshold", "computed", "total", "seconds", "speedup", "ideal_speedup",
               "of_ideal", "machinery_s", "machinery_share", "op_calls", "peak_mem_mb", "cache_mb", "psnr_db",
               "max_abs_err"]


def markdown(rows: List[dict], device: str, steps: int, dtype, passes: int, note: str = "") -> List[str]:
    lines = [f"# End-to-end benchmark: {device_name(device)}", "",
             *environment_lines(device),
             f"- {steps} flow-matching Euler steps, {cli_args.dtype_name(dtype)}, batch 1, "
             "random-weight FluxTransformer2DModel, FLUX.1-dev preset coefficients",
             f"- each configuration ran {passes} time(s), interleaved; the fastest run is reported", ""]
    if note:
        lines += [note, ""]
    lines += [
        "`of ideal`: achieved speedup / (total / computed steps). `cache ops`: time inside the "
        "wrapper's op calls (indicator, decision, residual) as a share of the run, from the torch "
        "profiler's record of the ops (" + ("device time of their kernels" if device.startswith("cuda")
                                            else "CPU time") + ") in one extra profiled run; the host read "
        "of the decision and the wrapper's Python are not in it, but they are in the threshold-0 "
        "row, where every step is computed, so its extra time over `none` is the whole cost of the "
        "cache. `cache MB`: the tensors the cache holds (stats()['cache_bytes']: previous "
        "indicator, residual, decision state, trace). `peak mem`: "
        + ("torch.cuda.max_memory_allocated above the level before the run." if device.startswith("cuda")
           else "peak RSS above the level before the run (sampled every ms)."), ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        base = sub[0]
        lines += [f"## {model}: {sub[0]['describe']}", "",
                  "| threshold | computed | wall s | speedup | ideal | of ideal | cache ops | cache MB "
                  "| peak mem MB | PSNR dB | max abs err |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sub:
            th = "none" if r["threshold"] is None else f"{r['threshold']:g}"
            of_ideal = "-" if r["threshold"] is None else f"{r['of_ideal']:.1%}"
            share = "-" if r["threshold"] is None else f"{r['machinery_share']:.2%}"
            lines.append(f"| {th} | {r['computed']}/{r['total']} | {r['seconds']:.2f} | {r['speedup']:.2f}x | "
                         f"{r['ideal_speedup']:.2f}x | {of_ideal} | {share} | {r['cache_mb']:.1f} | {r['peak_mem_mb']:.0f} | "
                         f"{r['psnr_db']:.2f} | {r['max_abs_err']:.3g} |")
        zero = next((r for r in sub if r["threshold"] == 0.0), None)
        if zero is not None:
            lines += ["", f"Threshold 0 (all {zero['total']} steps computed): {zero['seconds']:.2f} s vs "
                          f"{base['seconds']:.2f} s without the cache, "
                          f"{zero['seconds'] / base['seconds'] - 1:+.2%}."]
        lines.append("")
    return lines


def write_results(rows: List[dict], device: str, out_dir: Path, steps: int, dtype, passes: int,
                  note: str = ""):
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"e2e-{device_slug(device)}"
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("none" if r[k] is None else r[k]) for k in CSV_COLUMNS})
    md_path.write_text("\n".join(markdown(rows, device, steps, dtype, passes, note)))
    return csv_path, md_path


def write_host_results(result: Dict, device: str, out_dir: Path, note: str = ""):
    """e2e-host-<device>.csv and .md (the host-cost row); return their paths."""
    from . import host_cost

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"e2e-host-{device_slug(device)}"
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=host_cost.CSV_COLUMNS)
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: r[k] for k in host_cost.CSV_COLUMNS})
    lines = [f"# Host cost per call: {device_name(device)}", "", *environment_lines(device),
             "- timing: time.perf_counter around each transformer call, 1 thread", ""]
    if note:
        lines += [note, ""]
    md_path.write_text("\n".join(lines + host_cost.markdown(result)))
    return csv_path, md_path


# --------------------------------------------------------------------------- command line

def run(args: argparse.Namespace) -> int:
    """``teacache-fast bench e2e`` (options: :func:`teacache_fast.cli.bench.add_arguments`)."""
    import torch

    from . import host_cost

    device = cli_args.resolve_device(args.device)
    dtype = (cli_args.torch_dtype(args.dtypes[0]) if args.dtypes else cli_args.resolve_dtype(None, device))
    sizes = ["smoke"] if args.smoke else list(MODEL_SIZES[:1] if args.quick else MODEL_SIZES)
    steps = args.steps or (4 if args.smoke else 28)
    thresholds = args.thresholds or flux_model.flux_preset()[2]
    passes = args.repeats or (1 if args.smoke else 2)
    note = "Smoke run on a tiny model: these numbers mean nothing." if args.smoke else ""
    if args.note:
        note = f"{note} {args.note}".strip()
    written = []
    if args.host_cost != "only":
        rows = []
        with torch.inference_mode():
            for size in sizes:
                rows += bench_model(size, steps, thresholds, device, dtype, seed=0, passes=passes)
        written += write_results(rows, str(device), Path(args.out), steps, dtype, passes, note)
    if args.host_cost != "skip":
        result = host_cost.measure_host_cost(steps=steps, passes=args.repeats or (1 if args.smoke else 10),
                                             device=device, dtype=dtype)
        written += write_host_results(result, str(device), Path(args.out), note)
    print("wrote " + ", ".join(map(str, written)))
    return 0
