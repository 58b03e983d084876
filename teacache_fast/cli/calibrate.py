"""``teacache-fast calibrate``: fit a model's TeaCache polynomial and write a preset file.

Runs K generations without skipping, records the (input, output) relative-L1
pairs of every step, fits the polynomial and writes to --out:

* ``preset.json``: the preset (``apply_teacache(model, preset="preset.json")``
  or ``coefficients=load_preset_json(path)["coefficients"]``);
* ``fit.png``: the pairs, the fitted curve and the residuals;
* ``recording.npz``: the raw recordings, to refit with another degree or step
  range without running the model (``Recording.load`` + ``fit_recording``);
* the threshold -> computed steps table, R^2, the fitted indicator range and
  the polynomial's sign over it, printed (and in preset.json).

A pipeline with several denoisers (Wan2.2's two experts) gets one fit per
denoiser: ``preset.json`` etc. for ``transformer``, ``preset-transformer_2.json``
etc. for the next. ``--degree auto`` picks the degree by held-out error;
``--convention step-means`` fits per-step means instead of all pairs.

Models: ``--model demo`` (default) is the demo's seeded random-weight FLUX
transformer; prompts only choose seeds of random text embeddings there, so
the fit says nothing about a real model, but the command works on a fresh
machine without downloads. ``--model PATH`` loads a local diffusers pipeline
folder (the one with model_index.json, text encoders included) and runs the
pipeline itself on each prompt with ``output_type="latent"``; its transformer
is calibrated with the preset of its class.
"""
from __future__ import annotations

import argparse
import sys
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

from ..calibrate import MAX_DEGREE
from ..calibrate.fit import CONVENTIONS
from . import args as cli_args

HELP = "fit a model's TeaCache polynomial from recorded runs and write a preset JSON + plot"

DEFAULT_PROMPTS = (
    "a photo of a red fox in the snow", "an isometric illustration of a tiny city",
    "a watercolor painting of a lighthouse at dusk", "a close-up of a dewy spider web",
    "a bowl of ramen on a wooden table", "a futuristic train crossing a desert",
    "an astronaut reading in a library", "a field of sunflowers under storm clouds",
)


def _model(text: str) -> Union[str, Path]:
    """``type=`` for --model: 'demo', or an existing local pipeline folder (never a Hub id)."""
    if text == "demo":
        return text
    path = Path(text).expanduser()
    if not (path / "model_index.json").is_file():
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither 'demo' nor a diffusers pipeline folder (no model_index.json in it; "
            "nothing is downloaded)")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = HELP + (
        "\n\nWrites preset.json, fit.png and recording.npz to --out and prints the "
        "threshold -> computed steps table.\n"
        "--model demo (default): the demo's random-weight FLUX transformer, no download; each "
        "prompt only\n  seeds random text embeddings (run r: prompt r mod P, noise seed --seed + r).\n"
        "--model PATH: a local diffusers pipeline folder (model_index.json, text encoders included);"
        "\n  the pipeline runs each prompt with output_type='latent' and its transformer is recorded.")
    parser.add_argument("--model", type=_model, default="demo", metavar="PATH_OR_DEMO",
                        help="'demo' (default) or a local diffusers pipeline folder")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="text file, one prompt per line (blank lines and lines starting with # "
                             "are skipped); default: 8 built-in prompts. With the demo model a prompt "
                             "only seeds random text embeddings")
    parser.add_argument("--steps", type=cli_args.int_in("--steps", 2), default=28,
                        help="sampling steps per run (default 28)")
    parser.add_argument("--runs", type=cli_args.int_in("--runs", 1), default=None,
                        help="number of generations (default: one per prompt); run r uses prompt "
                             "r mod P and noise seed --seed + r")
    parser.add_argument("--degree", type=_degree, default=4,
                        help=f"polynomial degree 0..{MAX_DEGREE} (default 4, as the published presets), "
                             "or 'auto': the degree 1..4 with the lowest held-out error (5-fold)")
    parser.add_argument("--convention", choices=CONVENTIONS, default="all-pairs",
                        help="fitted points: 'all-pairs' (default: every run, branch and step, as the "
                             "official scripts) or 'step-means' (per step, the mean over runs and "
                             "branches)")
    parser.add_argument("--height", type=int, default=None,
                        help="--model PATH: image height in pixels passed to the pipeline "
                             "(default: the pipeline's)")
    parser.add_argument("--width", type=int, default=None,
                        help="--model PATH: image width in pixels passed to the pipeline "
                             "(default: the pipeline's)")
    parser.add_argument("--step-range", type=int, nargs=2, default=None, metavar=("START", "END"),
                        help="fit only the pairs of steps START <= step < END (default: all)")
    parser.add_argument("--thresholds", type=cli_args.thresholds, default=None,
                        help="comma-separated thresholds for the table (default: a grid from the fit)")
    parser.add_argument("--variant", default=None,
                        help="variant name stored in the preset (e.g. your checkpoint's name)")
    cli_args.add_device_dtype(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo weights and the noise")
    parser.add_argument("--out", default="teacache-calibration", metavar="DIR",
                        help="output folder (default ./teacache-calibration)")
    parser.add_argument("--smoke", action="store_true",
                        help="demo only: a tiny model (for tests); --steps and --runs still apply")


def _degree(text: str):
    """``type=`` for --degree: an int in 0..MAX_DEGREE or 'auto'."""
    if text == "auto":
        return text
    return cli_args.int_in("--degree", 0, MAX_DEGREE)(text)


def read_prompts(path: Optional[str]) -> List[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise cli_args.UsageError(f"--prompts: cannot read {path!r} ({exc})") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise cli_args.UsageError(f"--prompts: {path!r} holds no prompt (one per line)")
    return prompts


def prompt_seed(prompt: str) -> int:
    """A stable seed for a prompt's random text embeddings (same on every machine)."""
    return zlib.crc32(prompt.encode("utf-8"))


def _device_dtype(args):
    device = cli_args.resolve_device(args.device)
    return device, cli_args.resolve_dtype(args.dtype, device)


def demo_setup(args, prompts: List[str]) -> Tuple[object, Callable, Optional[int], str]:
    """(model, run_fn, num_steps, description) for the demo's random FLUX transformer."""
    from . import flux_model, sampling

    device, dtype = _device_dtype(args)
    spec = flux_model.SPECS["smoke" if args.smoke else "demo"]
    model = flux_model.random_flux_transformer(spec.config, seed=args.seed, device=device, dtype=dtype)

    def inputs_for(r: int):
        shape = (spec.height, spec.width, spec.text_len)
        text = sampling.make_flux_inputs(model, *shape, seed=prompt_seed(prompts[r % len(prompts)]),
                                         device=device, dtype=dtype)
        noise = sampling.make_flux_inputs(model, *shape, seed=args.seed + r, device=device, dtype=dtype)
        return replace(text, latents=noise.latents)

    def run_fn(m, r: int) -> None:
        inputs = inputs_for(r)
        sigmas = sampling.flux_sigmas(args.steps, image_seq_len=inputs.latents.shape[1])
        sampling.euler_sample(m, inputs, sigmas)

    what = (f"demo random FLUX transformer ({flux_model.describe(model, spec)}), "
            f"{cli_args.dtype_name(dtype)} on {device}")
    return model, run_fn, args.steps, what


def pipeline_setup(args, prompts: List[str]) -> Tuple[object, Callable, Optional[int], str]:
    """(pipeline, run_fn, None, description) for a local diffusers pipeline folder.

    The pipeline does its own text encoding and scheduling; num_steps is left
    to the scheduler (some schedulers call the transformer more than once
    per inference step).
    """
    import torch

    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise cli_args.UsageError("--model PATH needs diffusers: pip install 'teacache_fast[diffusers]'") from None
    device, dtype = _device_dtype(args)
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, local_files_only=True).to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # our own bar counts the steps

    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}

    def run_fn(p, r: int) -> None:
        generator = torch.Generator(device="cpu").manual_seed(args.seed + r)
        p(prompt=prompts[r % len(prompts)], num_inference_steps=args.steps, generator=generator,
          output_type="latent", **size)

    what = f"{args.model} ({type(pipe.transformer).__name__}), {cli_args.dtype_name(dtype)} on {device}"
    return pipe, run_fn, None, what


def run(args: argparse.Namespace) -> int:
    from ..calibrate import CalibrationError, calibrate

    if args.step_range is not None:
        start, end = args.step_range
        if not 0 <= start < end:
            raise cli_args.UsageError(f"--step-range needs 0 <= START < END, got {start} {end}")
    prompts = read_prompts(args.prompts)
    runs = args.runs or len(prompts)
    if args.model == "demo":
        if args.height is not None or args.width is not None:
            raise cli_args.UsageError("--height / --width apply to --model PATH only (the demo "
                                      "model has a fixed latent size)")
        target, run_fn, num_steps, what = demo_setup(args, prompts)
    else:
        if args.smoke:
            raise cli_args.UsageError("--smoke applies to --model demo only")
        target, run_fn, num_steps, what = pipeline_setup(args, prompts)
    print(f"calibrating {what}: {runs} runs x {args.steps} steps, degree {args.degree}, "
          f"{args.convention}")
    try:
        found = calibrate(target, run_fn, runs=runs, num_steps=num_steps, degree=args.degree,
                          step_range=tuple(args.step_range) if args.step_range else None,
                          variant=args.variant, progress=True, convention=args.convention)
    except CalibrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = found if isinstance(found, dict) else {None: found}
    for name, result in results.items():
        _write_result(result, out, name, args.thresholds)
    return 0


def _write_result(result, out: Path, name: Optional[str], thresholds) -> None:
    """preset.json, fit.png, recording.npz (suffixed -NAME for a pipeline's further experts)."""
    suffix = "" if name in (None, "transformer") else f"-{name}"
    files = [out / f"preset{suffix}.json", out / f"fit{suffix}.png", out / f"recording{suffix}.npz"]
    result.to_json(files[0], thresholds=thresholds)
    result.plot(files[1])
    result.recording.save(files[2])
    r2 = "undefined (constant output)" if result.r2 is None else f"{result.r2:.4f}"
    low, high = result.fitted_range()
    if name is not None:
        print(f"\n{name}:")
    print(f"coefficients (highest power first, degree {result.fit.degree}): "
          f"{[float(f'{c:.8g}') for c in result.coefficients]}")
    if result.degree_errors:
        print("held-out MSE per degree: " + ", ".join(f"{d}: {e:.3g}" for d, e in result.degree_errors))
    print(f"R^2 = {r2} on {result.fit.num_pairs} points ({result.convention}; steps "
          f"{result.step_range[0]}..{result.step_range[1] - 1}, branches {result.recording.branches})")
    print(f"fitted indicator range [{low:.4g}, {high:.4g}]; the polynomial is "
          f"{result.sign_in_range()} over it")
    print("expected computed steps per threshold (decision replayed on the recorded indicators):")
    print(result.format_table(thresholds))
    print(f"wrote {', '.join(str(f) for f in files)}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="teacache-fast calibrate")
    add_arguments(parser)
    return cli_args.run_parsed(parser, run, argv)
