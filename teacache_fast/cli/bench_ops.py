"""``teacache-fast bench``: time every op on this device against eager torch and torch.compile.

For each op, size and dtype it times each backend that runs on the device
(CPU: torch; CUDA: cuda when built, triton, torch), the eager torch code the
reference TeaCache scripts run, and ``torch.compile`` of that eager code. Each
row reports the median and p20/p80 time, GB/s from the op's minimal bytes, the
fraction of the copy bandwidth measured on the same device in the same run
(a copy moving the same bytes), the speedups vs eager and vs compile, and the
launches of one call (:mod:`teacache_fast.cli.launches`).

Timing: on CUDA ``triton.testing.do_bench`` (it flushes L2 before every call,
so each call reads its inputs from HBM); on CPU ``torch.utils.benchmark``.
``teacache-fast bench e2e`` runs the end-to-end benchmark instead
(:mod:`teacache_fast.cli.bench_e2e`); :mod:`teacache_fast.cli.bench` holds the
command line of both.
"""
from __future__ import annotations

import argparse
import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

from .launches import count_launches, enable_compiled_kernel_events
from .machine import device_name, device_slug, environment_lines
from .op_cases import ARRAY_CASES, _decide_case, _torch_dtype

# name -> (B, N, C)
SIZES = {
    "small": (1, 1024, 256),
    "flux": (1, 4096, 3072),
    "hunyuanvideo": (1, 30000, 3072),
    "wan14b": (1, 32760, 5120),
    "flux-b2": (2, 4096, 3072),
}
QUICK_SIZES = ("small", "flux")
# --smoke (tests): an odd width and a handful of rows; its numbers mean nothing.
SMOKE_SIZES = {"smoke": (1, 8, 40)}
HEADLINE_OP = "modulated_rel_l1_"
OPS = (HEADLINE_OP, "modulate", "rel_l1_partials", "residual_capture_", "residual_apply_",
       "teacache_decide_")
DTYPES = ("bf16", "fp32")


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int


def _quantile(sorted_values: List[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _timing(times_ms: List[float]) -> Timing:
    t = sorted(times_ms)
    return Timing(_quantile(t, 0.5), _quantile(t, 0.2), _quantile(t, 0.8), len(t))


def time_cpu(impls: Dict[str, Callable], repeats: int, max_seconds: float, rounds: int = 3
             ) -> Dict[str, Timing]:
    """torch.utils.benchmark samples, taken round-robin over the implementations.

    Interleaving matters on a shared machine: a burst of load then slows every
    implementation of a case alike instead of whichever was running, so the
    speedups stay fair. Each implementation gets about ``repeats`` samples
    (fewer when ``max_seconds`` caps a slow one).
    """
    import torch
    from torch.utils import benchmark

    budgets, timers = {}, {}
    for name, fn in impls.items():
        fn()  # warm-up: allocator, compile, first touch of the pages
        t0 = time.perf_counter()
        fn()
        budgets[name] = min(max_seconds, max(0.05, repeats * (time.perf_counter() - t0))) / rounds
        # Timer defaults to 1 thread; time with the threads everything else uses.
        timers[name] = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    samples: Dict[str, List[float]] = {name: [] for name in impls}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name] += [t * 1e3 for t in timer.blocked_autorange(min_run_time=budgets[name]).times]
    return {name: _timing(times) for name, times in samples.items()}


def time_cuda(impls: Dict[str, Callable], repeats: int, max_seconds: float) -> Dict[str, Timing]:
    """Cold-L2 timing: do_bench clears a 256 MB buffer before each call it times."""
    import torch
    import triton.testing

    del max_seconds  # do_bench's ``rep`` is already a time budget
    out = {}
    for name, fn in impls.items():
        fn()
        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=max(100, 10 * repeats),
                                                quantiles=[0.5, 0.2, 0.8])
        out[name] = Timing(med, p20, p80, -1)
        torch.cuda.synchronize()
    return out


# --------------------------------------------------------------------------- running

def backends_for_device(device: str) -> List[str]:
    """Backends worth timing here: on CPU the native kernels and torch (the Triton
    interpreter is no benchmark)."""
    from teacache_fast.ops import unavailable_reason

    if not device.startswith("cuda"):
        return [b for b in ("cpu", "torch") if unavailable_reason(b, device) is None]
    return [b for b in ("cuda", "triton", "torch") if unavailable_reason(b, device) is None]


def _copy_fn(nbytes: int, dtype, device: str):
    """A device-to-device copy that reads and writes ``nbytes`` in total."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = max(1, nbytes // (2 * itemsize))
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def run_benchmark(sizes, dtypes, ops, device: str, repeats: int, max_seconds: float,
                  include_compile: bool = True, log=print) -> List[dict]:
    """Time every (op, size, dtype, impl); return one dict per row (the CSV columns).

    include_compile=False drops the torch.compile rows (compiling costs seconds per shape).
    """
    import torch

    timer = time_cuda if device.startswith("cuda") else time_cpu
    if not device.startswith("cuda"):
        enable_compiled_kernel_events()  # before anything compiles: the launches column counts them
    # Each (size, dtype) is a new specialisation of the same compiled code objects.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    backends = backends_for_device(device)
    rows: List[dict] = []

    def measure(op, size, shape, dtype_name, nbytes, impls):
        if not include_compile:
            impls.pop("compile")  # never called, so never compiled
        if nbytes:  # a copy of the same bytes, timed alongside: the ceiling to compare with
            impls["copy"] = _copy_fn(nbytes, _torch_dtype(dtype_name), device)
        results = timer(impls, repeats, max_seconds)
        launches = {name: count_launches(fn, device) for name, fn in impls.items() if name != "copy"}
        copy = results.pop("copy", None)
        copy_gbps = nbytes / copy.median_ms / 1e6 if copy else None
        for impl, t in results.items():
            gbps = nbytes / t.median_ms / 1e6 if nbytes else None
            row = {
                "op": op, "impl": impl, "size": size, "shape": "x".join(map(str, shape)),
                "dtype": dtype_name, "median_ms": t.median_ms, "p20_ms": t.p20_ms,
                "p80_ms": t.p80_ms, "samples": t.samples, "bytes": nbytes, "gbps": gbps,
                "copy_gbps": copy_gbps,
                "frac_copy": (gbps / copy_gbps) if gbps and copy_gbps else None,
                "speedup_vs_eager": results["eager"].median_ms / t.median_ms,
                "speedup_vs_compile": (results["compile"].median_ms / t.median_ms
                                       if "compile" in results else None),
                "launches": launches[impl],
            }
            rows.append(row)
            log(f"{op:<18} {size:<13} {dtype_name:<5} {impl:<8} {t.median_ms:10.3f} ms"
                + (f" {gbps:8.1f} GB/s ({row['frac_copy']:.0%} of copy)" if gbps else ""))
        del impls, results
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    with torch.inference_mode():
        for op in ops:
            if op == "teacache_decide_":
                measure(op, "1 state", (2,), "fp32", 0, _decide_case(device, backends))
                continue
            make, passes = ARRAY_CASES[op]
            for size in sizes:
                shape = {**SIZES, **SMOKE_SIZES}[size]
                for dtype_name in dtypes:
                    dtype = _torch_dtype(dtype_name)
                    numel = shape[0] * shape[1] * shape[2]
                    nbytes = passes * numel * torch.empty((), dtype=dtype).element_size()
                    measure(op, size, shape, dtype_name, nbytes, make(shape, dtype, device, backends))
    return rows


# --------------------------------------------------------------------------- writing

CSV_COLUMNS = ["op", "impl", "size", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "samples",
               "bytes", "gbps", "copy_gbps", "frac_copy", "speedup_vs_eager", "speedup_vs_compile",
               "launches"]


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def markdown_table(rows: List[dict]) -> List[str]:
    out = ["| op | size | dtype | impl | median ms | p20-p80 ms | GB/s | of copy BW | vs eager | vs compile "
           "| launches |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r['op']} | {r['size']} | {r['dtype']} | {r['impl']} | {r['median_ms']:.3f} | "
            f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f} | {_fmt(r['gbps'], '.1f')} | "
            f"{_fmt(r['frac_copy'], '.0%')} | {r['speedup_vs_eager']:.2f}x | "
            f"{_fmt(r['speedup_vs_compile'], '.2f')}x | {_fmt(r.get('launches'), 'd')} |")
    return out


def write_results(rows: List[dict], device: str, out_dir: Path, note: str = "") -> Dict[str, Path]:
    """Write <slug>.csv, <slug>.png and <slug>.md into out_dir; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = device_slug(device)
    paths = {"csv": out_dir / f"{slug}.csv", "png": out_dir / f"{slug}.png", "md": out_dir / f"{slug}.md"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in CSV_COLUMNS})
    plotted = plot(rows, paths["png"], device_name(device))
    head = [r for r in rows if r["op"] == HEADLINE_OP]
    import torch

    timing = ("triton.testing.do_bench, cold L2" if device.startswith("cuda")
              else f"torch.utils.benchmark, {torch.get_num_threads()} threads")
    lines = [f"# Op benchmark: {device_name(device)}", "", *environment_lines(device, timing), ""]
    if note:
        lines += [note, ""]
    lines += [
        "GB/s counts the op's minimal bytes (indicator and residual ops: 3 x numel x itemsize; "
        "modulate and rel_l1_partials: 2 x). 'of copy BW' divides by a device-to-device copy of "
        "the same bytes timed in the same run. `eager` is the reference TeaCache scripts' torch "
        "code (for the indicator: layer_norm, modulate, sub, abs, mean, mean, div, `.item()`); "
        "`compile` is torch.compile of that code (the host read stays outside the graph). "
        "Backend rows time the op alone: its partials stay on the device for the decision op. "
        "`launches`: per call, counted from one call under the torch profiler "
        + ("(the device operations it records: kernels, memsets, copies)."
           if device.startswith("cuda") else
           "(the kernels it runs: data-touching leaf aten ops, native cpu-backend kernel calls and "
           "torch.compile's C++ kernels; views, allocations and scalar reads are none); see "
           "teacache_fast/cli/launches.py."),
        "",
    ]
    if not device.startswith("cuda"):
        lines += ["On CPU the copy is no hard ceiling: caches hold part of a working set of a few tens "
                  "of MB, so an in-place op can pass 100% of it; eager rows that allocate fresh "
                  "outputs also pay page faults there. All implementations of a case were timed "
                  "round-robin, so a burst of load from other jobs slows them alike.", ""]
    if head:
        lines += [f"## {HEADLINE_OP} (the indicator)", "", *markdown_table(head), ""]
    lines += ["## All ops", "", *markdown_table(rows), ""]
    if plotted:
        lines += [f"![plot]({paths['png'].name})", ""]
    paths["md"].write_text("\n".join(lines))
    if not plotted:
        del paths["png"]
    return paths


def plot(rows: List[dict], path: Path, title: str) -> bool:
    """GB/s of the headline op per size and impl, one panel per dtype; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    head = [r for r in rows if r["op"] == HEADLINE_OP and r["gbps"]]
    if not head:
        return False
    dtypes = sorted({r["dtype"] for r in head})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.2), squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        sub = [r for r in head if r["dtype"] == dt]
        sizes = list(dict.fromkeys(r["size"] for r in sub))
        impls = list(dict.fromkeys(r["impl"] for r in sub))
        width = 0.8 / (len(impls) + 1)
        for i, impl in enumerate(impls):
            vals = [next((r["gbps"] for r in sub if r["size"] == s and r["impl"] == impl), 0) for s in sizes]
            ax.bar([k + i * width for k in range(len(sizes))], vals, width, label=impl)
        copy = [next(r["copy_gbps"] for r in sub if r["size"] == s) for s in sizes]
        ax.bar([k + len(impls) * width for k in range(len(sizes))], copy, width, label="copy (same bytes)",
               color="lightgray", edgecolor="gray")
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(sizes))], sizes, rotation=15)
        ax.set_ylabel("GB/s (minimal bytes)")
        ax.set_title(f"{HEADLINE_OP}, {dt}")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- command line

def run(args: argparse.Namespace) -> int:
    """``teacache-fast bench [ops]`` (options: :func:`teacache_fast.cli.bench.add_arguments`)."""
    from .args import resolve_device

    device = str(resolve_device(args.device))
    sizes = args.sizes or (["smoke"] if args.smoke else list(QUICK_SIZES if args.quick else SIZES))
    dtypes = args.dtypes or list(DTYPES)
    ops = args.ops or list(OPS)
    repeats = args.repeats or (2 if args.smoke else 3 if args.quick else 7)
    max_seconds = args.max_seconds or (0.01 if args.smoke else 1.0 if args.quick else 20.0)
    start = time.perf_counter()
    rows = run_benchmark(sizes, dtypes, ops, device, repeats, max_seconds,
                         include_compile=not args.no_compile)
    note = ("Smoke run on a tiny size: these numbers mean nothing." if args.smoke else "")
    if args.note:
        note = f"{note} {args.note}".strip()
    paths = write_results(rows, device, Path(args.out), note=note)
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s; wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0

