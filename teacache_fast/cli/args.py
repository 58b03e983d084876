"""Argument helpers shared by the subcommands: parsers for argparse ``type=``,
device / dtype resolution, and the usage error every subcommand raises.

A :class:`UsageError` raised by a subcommand's ``run`` ends like an argparse
error: the subcommand's usage line, ``<prog>: error: <message>``, exit code 2.
Whatever can be checked while parsing is checked there (``type=`` functions
below), so a bad flag fails before anything is imported or loaded.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, List, Optional, Sequence

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class UsageError(Exception):
    """A bad argument found after parsing; reported as ``error: <message>`` with exit code 2."""


def int_in(flag: str, minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    """``type=`` for an int in ``[minimum, maximum]`` (no upper bound when maximum is None)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an int, got {text!r}") from None
        if v < minimum or (maximum is not None and v > maximum):
            bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise argparse.ArgumentTypeError(f"{flag} must be {bound}, got {v}")
        return v
    return parse


def even_int(flag: str, minimum: int = 2) -> Callable[[str], int]:
    """``type=`` for an even int >= minimum (latent sizes: FLUX packs 2 x 2 patches)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an even int, got {text!r}") from None
        if v < minimum or v % 2:
            raise argparse.ArgumentTypeError(f"{flag} must be an even int >= {minimum}, got {v}")
        return v
    return parse


def thresholds(text: str) -> List[float]:
    """``type=`` for comma-separated thresholds, each finite and >= 0."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--thresholds must be comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"--thresholds must be finite numbers >= 0, got {text!r}")
    return values


def csv_list(choices: Sequence[str]) -> Callable[[str], List[str]]:
    """``type=`` for a comma-separated subset of ``choices``."""
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}; "
                                             f"got {text!r}")
        return items
    return parse


def local_dir(must_contain: str) -> Callable[[str], Path]:
    """``type=`` for an existing local folder holding ``must_contain`` (a file or folder name).

    Checked while parsing, so a mistyped path ends in one line and never reaches
    a loader that would take it for a Hub repository id and go online.
    """
    def parse(text: str) -> Path:
        path = Path(text).expanduser()
        if not path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a local folder (a diffusers checkpoint folder is expected; "
                "nothing is downloaded)")
        if not (path / must_contain).exists():
            raise argparse.ArgumentTypeError(f"{text!r} has no {must_contain} in it")
        return path
    return parse


def add_device_dtype(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    if dtype:
        parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                            help="model dtype (default: bf16 on CUDA, fp32 on CPU)")


def resolve_device(name: Optional[str]):
    """torch.device for --device (default: cuda when torch sees one); UsageError when it cannot run."""
    import torch

    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise UsageError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device")
    return device


def torch_dtype(name: str):
    """torch dtype for a short name: fp32, bf16 or fp16."""
    import torch

    return getattr(torch, DTYPES[name])


def resolve_dtype(name: Optional[str], device):
    """torch dtype for --dtype (default: bf16 on CUDA, fp32 elsewhere)."""
    return torch_dtype(name or ("bf16" if device.type == "cuda" else "fp32"))


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def run_parsed(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
               argv: Optional[List[str]] = None) -> int:
    """Parse argv with ``parser`` and run; a UsageError becomes ``parser.error`` (exit code 2)."""
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except UsageError as exc:
        parser.error(str(exc))
    return 2  # not reached: parser.error exits
