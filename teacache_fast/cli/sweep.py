"""``teacache-fast sweep``: the speed / quality frontier of a model, per threshold.

One uncached generation and one cached generation per threshold (the same
noise and prompt embeddings), each timed; the final latents are compared with
the uncached one by :mod:`teacache_fast.quality` (PSNR, SSIM; the packed FLUX
latent is unpacked to ``(B, C, H, W)`` first, the data range is the uncached
latent's). Writes ``sweep.csv`` (one row per run) and ``sweep.png`` (PSNR and
SSIM against the wall-time and the ideal speedup, each point labelled with its
threshold);
``--save-latents`` also writes ``latents.pt`` ({"uncached": tensor,
"thresholds": [...], "cached": [tensor, ...]}, packed, fp32).

Models: as ``teacache-fast demo``: the seeded random-weight FLUX transformer
by default (no download), ``--model PATH`` the transformer of a local FLUX
checkpoint. ``--smoke`` runs the tests' tiny model.
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import List, Optional

from . import args as cli_args
from .demo import add_arguments as demo_arguments
from .demo import build
from .runs import compare, timed_run

HELP = "speedup vs PSNR / SSIM of cached runs against the uncached one, per threshold (CSV + PNG)"

FIELDS = ("threshold", "computed", "total", "seconds", "speedup", "ideal_speedup", "psnr_db",
          "ssim", "max_abs_err")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    demo_arguments(parser)
    parser.description = HELP + (". Runs one uncached and one cached generation per threshold "
                                 "(same noise), writes sweep.csv and sweep.png to --out.")
    parser.set_defaults(out="teacache-sweep")
    parser.add_argument("--size", type=cli_args.even_int("--size"), default=None,
                        help="latent height and width at once (even; --height / --width win)")
    parser.add_argument("--save-latents", action="store_true",
                        help="also write latents.pt: the uncached and every cached final latent")


def image_of(latent, img_ids):
    """The packed FLUX latent (B, L, 4C) as (B, C, H, W), its size read from the image ids."""
    from .sampling import unpack_latents

    height = 2 * (int(img_ids[:, 1].max()) + 1)
    width = 2 * (int(img_ids[:, 2].max()) + 1)
    return unpack_latents(latent, height, width)


def quality_row(latent, base_latent, img_ids) -> dict:
    from .. import quality

    report = quality.compare(image_of(latent, img_ids), image_of(base_latent, img_ids))
    return {"psnr_db": report.psnr, "ssim": report.ssim}


def write_csv(rows: List[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("none" if row[k] is None else row[k]) for k in FIELDS})


def plot(rows: List[dict], path: Path, title: str) -> None:
    """Two panels: PSNR and SSIM against the speedup, labelled by threshold."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cached = [r for r in rows if r["threshold"] is not None]
    fig = Figure(figsize=(9, 4), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, key, label in zip(fig.subplots(1, 2), ("psnr_db", "ssim"),
                              ("PSNR vs uncached (dB)", "SSIM vs uncached")):
        for speed, style, what in (("speedup", "o-", "wall time"),
                                   ("ideal_speedup", "s--", "ideal (total / computed steps)")):
            pts = [(r[speed], r[key], r["threshold"]) for r in cached if math.isfinite(r[key])]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=what,
                        fillstyle="full" if speed == "speedup" else "none")
                for x, y, t in pts:
                    ax.annotate(f"{t:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                                fontsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_xlabel("speedup vs no cache")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(textwrap.fill(title, 110), fontsize=8)
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .flux_model import flux_preset

    if args.size is not None:
        args.height, args.width = args.height or args.size, args.width or args.size
    model, inputs, sigmas, what = build(args)
    steps = len(sigmas) - 1
    thresholds = args.thresholds or flux_preset()[2]
    print(f"teacache-fast sweep: {what}")
    timed_run(model, inputs, sigmas[-3:] if steps > 2 else sigmas, None)   # warm-up
    results, latents = [], []
    with tqdm(total=steps * (1 + len(thresholds)), unit="step", desc="sweep") as bar:
        for th in [None] + list(thresholds):
            bar.set_postfix_str("no cache" if th is None else f"threshold {th:g}")
            latent, r = timed_run(model, inputs, sigmas, th, on_step=lambda i: bar.update(1))
            results.append(r)
            latents.append(latent)
    rows = []
    for r, latent in zip(results, latents):
        compare(r, latent, results[0], latents[0])
        rows.append(dict(threshold=r.threshold, computed=r.computed, total=r.total, seconds=r.seconds,
                         speedup=r.speedup, ideal_speedup=r.ideal_speedup,
                         max_abs_err=r.max_abs_err, **quality_row(latent, latents[0], inputs.img_ids)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"\n{'threshold':>9}  {'computed':>9}  {'speedup':>7}  {'ideal':>6}  {'PSNR dB':>8}  {'SSIM':>7}")
    for row in rows:
        th = "none" if row["threshold"] is None else f"{row['threshold']:g}"
        print(f"{th:>9}  {row['computed']:>4}/{row['total']:<4}  {row['speedup']:6.2f}x  "
              f"{row['ideal_speedup']:5.2f}x  {row['psnr_db']:8.2f}  {row['ssim']:7.4f}")
    write_csv(rows, out / "sweep.csv")
    plot(rows, out / "sweep.png", what)
    written = [out / "sweep.csv", out / "sweep.png"]
    if args.save_latents:
        torch.save({"uncached": latents[0], "thresholds": list(thresholds), "cached": latents[1:]},
                   out / "latents.pt")
        written.append(out / "latents.pt")
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="teacache-fast sweep", description=HELP)
    add_arguments(parser)
    return cli_args.run_parsed(parser, run, argv)
