"""What a calibration records: per run, branch and step, the indicator's
partial sums and the output's relative L1; and the observer that records it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import ops

__all__ = ["CalibrationError", "Recording", "Recorder", "ExpertRecorder"]


class CalibrationError(ValueError):
    """The recordings cannot give a meaningful fit (too few pairs, NaN, ...)."""


@dataclass
class Recording:
    """What one calibration recorded: per run, per CFG branch, per step.

    ``partials[r][b]`` is a float32 ``(num_steps, 2)`` array of the indicator's
    ``[sum|m - prev|, sum|prev|]`` at each call of branch ``b`` in run ``r``
    (row 0 compares with the cache's zero-initialised prev, so its ratio is
    not finite; it is never fitted and the first step is forced); ``out_rel[r][b]``
    is the float64 relative L1 of the block stack's output against the
    previous call of the same branch (row 0 is NaN).
    """

    partials: List[Dict[int, np.ndarray]] = field(default_factory=list)
    out_rel: List[Dict[int, np.ndarray]] = field(default_factory=list)
    model_class: str = "unknown"
    device: str = "cpu"  # where the model ran: the replay decides there, with the same kernels

    @property
    def num_runs(self) -> int:
        return len(self.partials)

    @property
    def branches(self) -> List[int]:
        return sorted(self.partials[0]) if self.partials else []

    @property
    def num_steps(self) -> int:
        self.check()
        return len(next(iter(self.partials[0].values())))

    def check(self) -> None:
        """Raise CalibrationError unless every run has the same branches and step counts."""
        if not self.partials:
            raise CalibrationError("the recording is empty: run_fn never called the model "
                                   "(or calibrate got runs=0)")
        if len(self.out_rel) != len(self.partials):
            raise CalibrationError(f"mismatched recording: {len(self.partials)} runs of inputs, "
                                   f"{len(self.out_rel)} of outputs")
        ref_branches = sorted(self.partials[0])
        ref_steps = len(self.partials[0][ref_branches[0]]) if ref_branches else 0
        for r, (p_run, o_run) in enumerate(zip(self.partials, self.out_rel)):
            if sorted(p_run) != ref_branches or sorted(o_run) != ref_branches:
                raise CalibrationError(
                    f"mismatched branches: run 0 has branches {ref_branches}, run {r} has "
                    f"{sorted(p_run)} (inputs) / {sorted(o_run)} (outputs); every run must call "
                    "the model with the same CFG branches")
            for b in ref_branches:
                n_in, n_out = len(p_run[b]), len(o_run[b])
                if n_in != ref_steps or n_out != ref_steps:
                    raise CalibrationError(
                        f"mismatched branches: run {r} branch {b} has {n_in} input / {n_out} output "
                        f"steps, expected {ref_steps} (run 0 branch {ref_branches[0]}); every branch "
                        "must be called once per step for the same number of steps")
        if ref_steps < 2:
            raise CalibrationError(f"each branch was called {ref_steps} time(s); at least 2 steps "
                                   "are needed to compare consecutive steps")

    def traces(self) -> List[Tuple[int, int]]:
        """(run, branch) pairs in a fixed order: run-major, branches ascending."""
        return [(r, b) for r in range(self.num_runs) for b in self.branches]

    def save(self, path) -> None:
        """Write the raw recordings (.npz) so they can be refitted without running the model."""
        self.check()
        arrays = {"model_class": np.array(self.model_class), "device": np.array(self.device),
                  "branches": np.array(self.branches)}
        for r, b in self.traces():
            arrays[f"partials_{r}_{b}"] = self.partials[r][b]
            arrays[f"out_rel_{r}_{b}"] = self.out_rel[r][b]
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path) -> "Recording":
        with np.load(path) as z:
            branches = [int(b) for b in z["branches"]]
            runs = sorted({int(k.split("_")[1]) for k in z.files if k.startswith("partials_")})
            rec = cls(model_class=str(z["model_class"]),
                      device=str(z["device"]) if "device" in z.files else "cpu")
            for r in runs:
                rec.partials.append({b: z[f"partials_{r}_{b}"].astype(np.float32) for b in branches})
                rec.out_rel.append({b: z[f"out_rel_{r}_{b}"].astype(np.float64) for b in branches})
        rec.check()
        return rec


class Recorder:
    """The wrapper's observer in record mode: collects one run at a time.

    The wrapper calls it after every computed step (with threshold 0 that is
    every call) as ``recorder(branch, step, partials, stream_in, stream_out)``.
    Everything stays on the model's device until :meth:`finish_run`, which
    reads the run back in one go (no host sync per step).
    """

    def __init__(self, model_class: str = "unknown", on_call: Optional[Callable[[int, int], None]] = None):
        self.recording = Recording(model_class=model_class)
        self.on_call = on_call
        self.start_run()

    def start_run(self) -> None:
        self._inputs: Dict[int, List[torch.Tensor]] = {}
        self._outputs: Dict[int, List[Optional[torch.Tensor]]] = {}
        self._prev_out: Dict[int, torch.Tensor] = {}

    def __call__(self, branch: int, step: int, partials: torch.Tensor, stream_in: torch.Tensor,
                 stream_out: torch.Tensor) -> None:
        del stream_in  # the residual is not needed: the output side compares outputs
        inputs = self._inputs.setdefault(branch, [])
        if step != len(inputs):
            raise CalibrationError(
                f"branch {branch} reached step {step} after {len(inputs)} recorded step(s): the run "
                "called the model more (or fewer) times per branch than num_steps, or a skip "
                "happened; calibration needs one call per branch and step, every step computed")
        inputs.append(partials.detach().clone())
        prev = self._prev_out.get(branch)
        out = stream_out.detach()
        if prev is None or prev.shape != out.shape or prev.dtype != out.dtype:
            self._outputs.setdefault(branch, []).append(None)
            self._prev_out[branch] = out.clone()
        else:
            self._outputs.setdefault(branch, []).append(ops.rel_l1_partials(out, prev))
            prev.copy_(out)
        if self.on_call is not None:
            self.on_call(branch, step)

    @property
    def has_calls(self) -> bool:
        """Whether the current run recorded any call."""
        return bool(self._inputs)

    def finish_run(self) -> None:
        """Read the run's recordings back to the host and append them."""
        if not self._inputs:
            raise CalibrationError(
                f"run {self.recording.num_runs} never called the model's block stack: run_fn must "
                "run one whole generation with the model it is given")
        partials, out_rel = {}, {}
        self.recording.device = str(next(iter(self._inputs.values()))[0].device)
        for b, inputs in self._inputs.items():
            partials[b] = torch.stack(inputs).float().cpu().numpy()
            rows = []
            for o in self._outputs[b]:
                if o is None:
                    rows.append(math.nan)
                else:
                    num, den = o.cpu().double().tolist()
                    rows.append(num / den if den != 0 else math.inf if num else math.nan)
            out_rel[b] = np.asarray(rows, dtype=np.float64)
        self.recording.partials.append(partials)
        self.recording.out_rel.append(out_rel)
        self.start_run()


class ExpertRecorder(Recorder):
    """A :class:`Recorder` for a denoiser that runs only part of each generation
    (a Wan2.2 expert runs the high-noise steps, the other one the rest): each
    branch's calls are recorded from the first step it runs in the run, so
    its pairs compare its own consecutive calls."""

    def start_run(self) -> None:
        super().start_run()
        self._first: Dict[int, int] = {}

    def __call__(self, branch: int, step: int, partials: torch.Tensor, stream_in: torch.Tensor,
                 stream_out: torch.Tensor) -> None:
        first = self._first.setdefault(branch, step)
        super().__call__(branch, step - first, partials, stream_in, stream_out)
