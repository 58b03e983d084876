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
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from . import args as cli_args
from .runs import RunResult, compare, timed_run

HELP = "run a sampling loop with and without TeaCache and print speedup and error per threshold"


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

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=cli_args.local_dir("transformer"), default=None,
                        metavar="PATH",
                        help="local diffusers FLUX checkpoint folder (its transformer/ subfolder is loaded, "
                             "nothing is downloaded); default: a small random-weight FLUX transformer")
    parser.add_argument("--steps", type=cli_args.int_in("--steps", 2), default=28,
                        help="sampling steps (default 28)")
    from .flux_model import flux_preset

    published = ",".join(f"{t:g}" for t in flux_preset()[2])
    parser.add_argument("--thresholds", type=cli_args.thresholds, default=None,
                        help=f"comma-separated TeaCache thresholds (default: the FLUX preset's published "
                             f"ones, {published})")
    cli_args.add_device_dtype(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the noise")
    parser.add_argument("--height", type=cli_args.even_int("--height"), default=None,
                        help="latent height, even (default: 96 random, 128 --model)")
    parser.add_argument("--width", type=cli_args.even_int("--width"), default=None,
                        help="latent width, even (default: 80 random, 128 --model)")
    parser.add_argument("--out", default="teacache-demo", help="output folder for CSV and PNG")
    parser.add_argument("--smoke", action="store_true", help="tiny model and 4 steps (for tests)")


def build(args):
    """(model, inputs, sigmas, description) for the demo's arguments."""
    from dataclasses import replace

    from . import flux_model, sampling

    device = cli_args.resolve_device(args.device)
    dtype = cli_args.resolve_dtype(args.dtype, device)
    steps = 4 if args.smoke else args.steps
    if args.model is not None:
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel.from_pretrained(args.model, subfolder="transformer", torch_dtype=dtype,
                                                       local_files_only=True).to(device).eval()
        h, w, text_len = args.height or 128, args.width or 128, 512
        inputs = sampling.make_flux_inputs(model, h, w, text_len, seed=args.seed, device=device, dtype=dtype)
        what = f"{args.model} (random prompt embeddings)"
    else:
        spec = flux_model.SPECS["smoke" if args.smoke else "demo"]
        spec = replace(spec, height=args.height or spec.height, width=args.width or spec.width)
        model, inputs = flux_model.build(spec, seed=args.seed, device=device, dtype=dtype)
        what = f"random FLUX transformer ({flux_model.describe(model, spec)})"
        text_len = spec.text_len
    sigmas = sampling.flux_sigmas(steps, image_seq_len=inputs.latents.shape[1])
    if args.model is not None:
        what += f", {inputs.latents.shape[1]} image + {text_len} text tokens"
    what += f", {steps} steps, {cli_args.dtype_name(dtype)} on {device}"
    return model, inputs, sigmas, what


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .flux_model import flux_preset

    model, inputs, sigmas, what = build(args)
    steps = len(sigmas) - 1
    thresholds = args.thresholds or flux_preset()[2]
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
    return cli_args.run_parsed(parser, run, argv)
