"""``teacache-fast demo``: sample with and without TeaCache, compare speed and output.

With no arguments it needs no download: a seeded random-weight FLUX
transformer (diffusers' FluxTransformer2DModel from a small config) runs a
28-step flow-matching Euler loop once without the cache and once per
threshold, then prints steps computed, wall time, speedup (achieved and
ideal = total / computed) and the final latent's PSNR and max abs error vs
the uncached run, and writes the table as CSV and a PNG plot. ``--model PATH``
uses the transformer of a local diffusers checkpoint instead.
"""
from __future__ import annotations

import argparse
import csv
import math
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

HELP = "run a sampling loop with and without TeaCache and print speedup and error per threshold"

DEFAULT_THRESHOLDS = (0.25, 0.4, 0.6, 0.8)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class RunResult:
    """One sampling run: its threshold (None = no cache) and what came out."""
    threshold: Optional[float]
    computed: int
    total: int
    seconds: float
    speedup: float = 1.0
    ideal_speedup: float = 1.0
    psnr_db: float = math.inf
    max_abs_err: float = 0.0
    cache_bytes: int = 0        # tensors the cache held at the end (stats()["cache_bytes"])


def timed_run(model, inputs, sigmas, threshold: Optional[float], on_step: Optional[Callable] = None,
              num_steps: Optional[int] = None):
    """Sample once (with TeaCache at ``threshold`` unless None); return (latent, RunResult)."""
    import torch

    from .api import apply_teacache, remove_teacache, stats
    from .sampling import euler_sample

    steps = len(sigmas) - 1
    if threshold is not None:
        apply_teacache(model, threshold=threshold, num_steps=num_steps or steps)
    try:
        device = inputs.latents.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        latent = euler_sample(model, inputs, sigmas, on_step=on_step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        st = stats(model) if threshold is not None else {"computed": steps, "cache_bytes": 0}
    finally:
        if threshold is not None:
            remove_teacache(model)
    return latent, RunResult(threshold, st["computed"], steps, seconds, cache_bytes=st["cache_bytes"])


def compare(result: RunResult, latent, base: RunResult, base_latent) -> RunResult:
    """Fill in the speedups and errors of ``result`` against the uncached run."""
    from .sampling import psnr

    result.speedup = base.seconds / result.seconds
    result.ideal_speedup = result.total / max(1, result.computed)
    result.psnr_db = psnr(latent, base_latent)
    result.max_abs_err = (latent - base_latent).abs().max().item()
    return result


def format_table(results: List[RunResult]) -> List[str]:
    lines = [f"{'threshold':>9}  {'computed':>9}  {'wall s':>7}  {'speedup':>7}  {'ideal':>6}  "
             f"{'PSNR dB':>8}  {'max abs err':>11}"]
    for r in results:
        th = "none" if r.threshold is None else f"{r.threshold:g}"
        lines.append(f"{th:>9}  {f'{r.computed}/{r.total}':>9}  {r.seconds:7.2f}  {r.speedup:6.2f}x  "
                     f"{r.ideal_speedup:5.2f}x  {r.psnr_db:8.2f}  {r.max_abs_err:11.4g}")
    return lines


def write_csv(results: List[RunResult], path: Path) -> None:
    fields = list(asdict(results[0]))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            w.writerow(asdict(r))


def plot(results: List[RunResult], path: Path, title: str) -> bool:
    """Speedup (achieved and ideal) and PSNR vs threshold; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cached = [r for r in results if r.threshold is not None]
    th = [r.threshold for r in cached]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(th, [r.speedup for r in cached], "o-", label="speedup (wall time)")
    ax.plot(th, [r.ideal_speedup for r in cached], "s--", label="ideal (total / computed steps)")
    ax.set_xlabel("threshold")
    ax.set_ylabel("speedup vs no cache")
    ax2 = ax.twinx()
    finite = [(t, r.psnr_db) for t, r in zip(th, cached) if math.isfinite(r.psnr_db)]
    if finite:
        ax2.plot(*zip(*finite), "^:", color="tab:red", label="PSNR")
    ax2.set_ylabel("PSNR of final latent vs no cache (dB)", color="tab:red")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- command line

def _thresholds(text: str) -> List[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--thresholds must be comma-separated numbers, got {text!r}")
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"--thresholds must be finite numbers >= 0, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(f"--steps must be an int >= 2, got {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="local diffusers FLUX checkpoint (its transformer/ subfolder is loaded); "
                             "default: a small random-weight FLUX transformer, no download")
    parser.add_argument("--steps", type=_positive_int, default=28, help="sampling steps (default 28)")
    parser.add_argument("--thresholds", type=_thresholds, default=list(DEFAULT_THRESHOLDS),
                        help="comma-separated TeaCache thresholds (default 0.25,0.4,0.6,0.8)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="model dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the noise")
    parser.add_argument("--height", type=int, default=None, help="latent height, even (default: 96 random, 128 --model)")
    parser.add_argument("--width", type=int, default=None, help="latent width, even (default: 80 random, 128 --model)")
    parser.add_argument("--out", default="teacache-demo", help="output folder for CSV and PNG")
    parser.add_argument("--smoke", action="store_true", help="tiny model and 4 steps (for tests)")


def build(args):
    """(model, inputs, sigmas, description) for the demo's arguments."""
    import torch

    from . import sampling

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA device")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")])
    steps = 4 if args.smoke else args.steps
    if args.model:
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel.from_pretrained(args.model, subfolder="transformer",
                                                       torch_dtype=dtype).to(device).eval()
        h, w, text_len = args.height or 128, args.width or 128, 512
        what = f"{args.model} (random prompt embeddings)"
    else:
        config = dict(sampling.DEMO_CONFIG)
        latent = dict(sampling.DEMO_LATENT)
        if args.smoke:
            config.update(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                          joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
            latent = dict(height=8, width=8, text_len=4)
        model = sampling.random_flux_transformer(config, seed=args.seed, device=device, dtype=dtype)
        h, w, text_len = args.height or latent["height"], args.width or latent["width"], latent["text_len"]
        n_params = sum(p.numel() for p in model.parameters())
        what = (f"random FLUX transformer ({config['num_layers']}+{config['num_single_layers']} blocks, "
                f"width {config['num_attention_heads'] * config['attention_head_dim']}, "
                f"{n_params / 1e6:.0f}M params)")
    inputs = sampling.make_flux_inputs(model, h, w, text_len, seed=args.seed, device=device, dtype=dtype)
    sigmas = sampling.flux_sigmas(steps, image_seq_len=inputs.latents.shape[1])
    what += (f", {inputs.latents.shape[1]} image + {text_len} text tokens, {steps} steps, "
             f"{str(dtype).replace('torch.', '')} on {device}")
    return model, inputs, sigmas, what


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    model, inputs, sigmas, what = build(args)
    steps = len(sigmas) - 1
    thresholds = args.thresholds
    print(f"teacache-fast demo: {what}")
    # Warm-up (allocator, kernels, lazy init) so the first timed run is not penalised.
    timed_run(model, inputs, sigmas[-3:] if steps > 2 else sigmas, None)

    results, latents = [], []
    with tqdm(total=steps * (1 + len(thresholds)), unit="step", desc="sampling") as bar:
        for th in [None] + list(thresholds):
            bar.set_postfix_str("no cache" if th is None else f"threshold {th:g}")
            latent, r = timed_run(model, inputs, sigmas, th, on_step=lambda i: bar.update(1))
            results.append(r)
            latents.append(latent)
    base, base_latent = results[0], latents[0]
    for r, latent in zip(results, latents):
        compare(r, latent, base, base_latent)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print()
    print("\n".join(format_table(results)))
    write_csv(results, out / "demo.csv")
    written = [out / "demo.csv"]
    if plot(results, out / "demo.png", what):
        written.append(out / "demo.png")
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="teacache-fast demo", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))
