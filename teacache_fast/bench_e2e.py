"""End-to-end benchmark: a random-weight FLUX-shaped transformer sampled with and without TeaCache.

Two model sizes (the demo's small model, and one as wide as FLUX.1 with few
blocks). Per threshold it reports the achieved speedup against the ideal one
(total / computed steps), the share of the run spent inside the cache's ops
(indicator, decision, residual capture / apply; timed around each op call),
the overhead at threshold 0 (every step computed, so all of the difference is
the cache's own work), peak memory with and without the cache, and the final
latent's PSNR vs the uncached run. Writes ``e2e-<device>.md`` and ``.csv``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from . import bench_ops, sampling
from .demo import DEFAULT_THRESHOLDS, compare, timed_run

# name -> (transformer config overrides of sampling.DEMO_CONFIG, latent height/width/text tokens)
MODEL_SIZES = {
    "small": ({}, dict(sampling.DEMO_LATENT)),
    "flux-width": (dict(num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=24,
                        joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
                   dict(height=32, width=32, text_len=32)),
}
SMOKE_SIZE = {"smoke": (dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                             joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
                        dict(height=8, width=8, text_len=4))}
# The public ops the wrapper calls; the time spent inside them is the cache machinery.
MACHINERY_OPS = ("modulated_rel_l1_", "rel_l1_partials", "teacache_decide_", "residual_capture_",
                 "residual_apply_")


# --------------------------------------------------------------------------- measuring

class OpTimer:
    """Time every call of the wrapper's ops (patched on ``teacache_fast.ops``) while active.

    CPU: wall time around each call. CUDA: events around each call, read once at
    the end, so the instrumentation adds no sync of its own.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds = 0.0
        self.calls = 0
        self._events = []

    def _wrap(self, fn):
        import torch

        def timed(*args, **kwargs):
            self.calls += 1
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self._events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            return out
        return timed

    @contextlib.contextmanager
    def active(self):
        from . import ops

        originals = {name: getattr(ops, name) for name in MACHINERY_OPS}
        try:
            for name, fn in originals.items():
                setattr(ops, name, self._wrap(fn))
            yield self
        finally:
            for name, fn in originals.items():
                setattr(ops, name, fn)
            if self.cuda:
                import torch
                torch.cuda.synchronize()
                self.seconds += sum(s.elapsed_time(e) for s, e in self._events) / 1e3
                self._events.clear()


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

    overrides, latent = {**MODEL_SIZES, **SMOKE_SIZE}[size]
    config = {**sampling.DEMO_CONFIG, **overrides}
    model = sampling.random_flux_transformer(config, seed=seed, device=device, dtype=dtype)
    inputs = sampling.make_flux_inputs(model, latent["height"], latent["width"], latent["text_len"],
                                       seed=seed, device=device, dtype=dtype)
    sigmas = sampling.flux_sigmas(steps, image_seq_len=inputs.latents.shape[1])
    params = sum(p.numel() for p in model.parameters())
    width = config["num_attention_heads"] * config["attention_head_dim"]
    describe = (f"{config['num_layers']}+{config['num_single_layers']} blocks, width {width}, "
                f"{params / 1e6:.0f}M params, {inputs.latents.shape[1]}+{latent['text_len']} tokens")
    log(f"[{size}] {describe}")
    timed_run(model, inputs, sigmas[-3:], None)            # warm-up, not reported
    timed_run(model, inputs, sigmas[-3:], 0.0, num_steps=2)

    # Every configuration runs once per pass, the passes interleaved, and the
    # fastest pass counts: on a shared machine, load only ever adds time.
    configs = [None, 0.0] + [t for t in thresholds if t != 0.0]
    best: Dict[Optional[float], tuple] = {}
    for _ in range(passes):
        for th in configs:
            timer = OpTimer(cuda=device.type == "cuda")
            with PeakMemory(device) as mem, timer.active():
                latent_out, r = timed_run(model, inputs, sigmas, th)
            if th not in best or r.seconds < best[th][1].seconds:
                best[th] = (latent_out, r, timer, mem.peak_bytes)
    rows = []
    base_latent, base = best[None][:2]
    for th in configs:
        latent_out, r, timer, peak = best[th]
        compare(r, latent_out, base, base_latent)
        rows.append({
            "model": size, "describe": describe, "threshold": th, "computed": r.computed, "total": r.total,
            "seconds": r.seconds, "speedup": r.speedup, "ideal_speedup": r.ideal_speedup,
            "of_ideal": r.speedup / r.ideal_speedup, "machinery_s": timer.seconds,
            "machinery_share": timer.seconds / r.seconds, "op_calls": timer.calls,
            "peak_mem_mb": peak / 2**20, "cache_mb": r.cache_bytes / 2**20, "psnr_db": r.psnr_db, "max_abs_err": r.max_abs_err,
        })
        log(f"[{size}] threshold {'none' if th is None else th}: {r.computed}/{r.total} steps, "
            f"{r.seconds:.2f} s, {r.speedup:.2f}x (ideal {r.ideal_speedup:.2f}x), "
            f"cache ops {timer.seconds / r.seconds:.2%} of the run")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- writing

CSV_COLUMNS = ["model", "describe", "threshold", "computed", "total", "seconds", "speedup", "ideal_speedup",
               "of_ideal", "machinery_s", "machinery_share", "op_calls", "peak_mem_mb", "cache_mb", "psnr_db",
               "max_abs_err"]


def markdown(rows: List[dict], device: str, steps: int, dtype, passes: int, note: str = "") -> List[str]:
    lines = [f"# End-to-end benchmark: {bench_ops.device_name(device)}", "",
             *[line for line in bench_ops.environment_lines(device) if not line.startswith("- timing")],
             f"- {steps} flow-matching Euler steps, {str(dtype).replace('torch.', '')}, batch 1, "
             "random-weight FluxTransformer2DModel, FLUX.1-dev preset coefficients",
             f"- each configuration ran {passes} time(s), interleaved; the fastest run is reported", ""]
    if note:
        lines += [note, ""]
    lines += [
        "`of ideal`: achieved speedup / (total / computed steps). `cache ops`: time inside the "
        "wrapper's op calls (indicator, decision, residual) as a share of the run; the host read "
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
    stem = f"e2e-{bench_ops.device_slug(device)}"
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("none" if r[k] is None else r[k]) for k in CSV_COLUMNS})
    md_path.write_text("\n".join(markdown(rows, device, steps, dtype, passes, note)))
    return csv_path, md_path


# --------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    bench_ops.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``teacache-fast bench e2e`` (shares the bench options: --device --out --quick --smoke)."""
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA device")
    dtypes = getattr(args, "dtypes", None)
    dtype = (bench_ops._torch_dtype(dtypes[0]) if dtypes
             else torch.bfloat16 if device.type == "cuda" else torch.float32)
    smoke = getattr(args, "smoke", False)
    sizes = ["smoke"] if smoke else ["small"] if getattr(args, "quick", False) else list(MODEL_SIZES)
    steps = getattr(args, "steps", None) or (4 if smoke else 28)
    thresholds = getattr(args, "thresholds", None) or list(DEFAULT_THRESHOLDS)
    passes = getattr(args, "repeats", None) or (1 if smoke else 2)
    rows = []
    with torch.inference_mode():
        for size in sizes:
            rows += bench_model(size, steps, thresholds, device, dtype, seed=0, passes=passes)
    note = "Smoke run on a tiny model: these numbers mean nothing." if smoke else ""
    paths = write_results(rows, str(device), Path(args.out), steps, dtype, passes, note)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_e2e", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(what="e2e")
    args = parser.parse_args(argv)
    args.what = "e2e"
    return run(args)
