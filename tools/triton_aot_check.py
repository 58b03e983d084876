"""Compile every Triton kernel of teacache_fast for real GPUs, without a GPU.

The kernels are tested under the Triton interpreter, which never runs the GPU
compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin). This tool does: it calls the
Triton backend's ops (teacache_fast/backends/triton.py) on meta tensors with a
pretend CUDA device, records every kernel launch instead of running it, and
compiles each recorded launch ahead of time for sm_80 and sm_90 with the
argument specialization (16-byte alignment, divisibility by 16, value 1) and
the options (num_warps, enable_fp_fusion) the launch would have used.

One line per distinct compile: kernel, arch, combination, registers/spills
(from cuobjdump when it is installed) and the widest global load in the PTX
(``ld128`` = 128-bit vector loads). Exit status 1 if any compile failed.

    python tools/triton_aot_check.py            # the full matrix (minutes)
    python tools/triton_aot_check.py --quick    # every kernel/dtype/norm once, sm_90

TRITON_INTERPRET must be unset: under the interpreter @triton.jit functions
are not compilable objects.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_aot_check: unset TRITON_INTERPRET (the interpreter cannot compile kernels)")
# Same default as Triton 3.9 (fusion on); set only to silence its warning.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

from teacache_fast.backends import triton as tb  # noqa: E402
from teacache_fast.kernels import decide, modulate, rel_l1, residual  # noqa: E402

KERNEL_MODULES = (modulate, rel_l1, residual, decide)
ARCHS = (80, 90)  # A100, H100/H200 (the launch math does not depend on the SM count)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WIDTHS = (1, 3000, 3072, 5120, 16384)
TOKENS = 4096
BATCH = 2
LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion", "maxnreg")


@dataclass
class Launch:
    fn: triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict


@dataclass
class Compile:
    fn: triton.runtime.jit.JITFunction
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    combos: list = field(default_factory=list)

    def key(self):
        return (self.fn.__name__, self.arch, tuple(self.signature.items()),
                tuple(sorted(self.constexprs.items())), tuple(sorted(self.attrs.items())),
                tuple(sorted(self.options.items())))


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` records the launch."""

    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Launch(self.fn, args, kwargs))


@contextlib.contextmanager
def recording(arch: int):
    """Backend ops launch nothing; their launches land in the yielded list.

    Tensors are on the meta device; launch_config is told it runs on cuda:0 of
    an sm_<arch> GPU, so block sizes and warps are the GPU ones.
    """
    sink: list[Launch] = []
    saved = []
    for mod in KERNEL_MODULES:
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, sink))
    gpu = torch.device("cuda", 0)
    orig_launch, orig_flat, orig_row = tb.launch_config, tb.flat_config, tb.row_config
    tb.launch_config = lambda w, r, g, device, **kw: orig_launch(w, r, g, gpu, **kw)
    tb.row_config = lambda C, r, g, device, **kw: orig_row(C, r, g, gpu, **kw)
    tb.flat_config = lambda length, groups, device, **kw: orig_flat(length, groups, gpu, **kw)
    try:
        yield sink
    finally:
        tb.launch_config, tb.flat_config, tb.row_config = orig_launch, orig_flat, orig_row
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def specialize(launch: Launch, arch: int) -> Compile:
    """The signature, constexprs, attributes and options the JIT would compile with."""
    bound = launch.fn.signature.bind(*launch.args,
                                     **{k: v for k, v in launch.kwargs.items()
                                        if k not in LAUNCH_OPTIONS})
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(launch.fn.params):
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        ty, attr = native_specialize_impl(CUDABackend, value, param.is_const,
                                          not param.do_not_specialize,
                                          not param.do_not_specialize_on_alignment)
        signature[param.name] = ty
        if ty == "constexpr":  # an int equal to 1
            constexprs[param.name] = attr
        elif isinstance(attr, str) and attr:
            attrs[(i,)] = tuple(map(tuple, CUDABackend.parse_attr(attr)))
    options = {k: v for k, v in launch.kwargs.items() if k in LAUNCH_OPTIONS}
    return Compile(launch.fn, arch, signature, constexprs, attrs, options)


# --------------------------------------------------------------------------- launch matrix

def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def row_cases(quick: bool):
    """(label, thunk) for modulate and modulated_rel_l1_ over dtypes, norms, scale/shift, C."""
    norms = ("none", "layer", "rms")
    cases = []
    if quick:
        # Every dtype and norm, both scale/shift dtypes and presence flags, each C.
        picks = [("bf16", "bf16", "layer", True, True, 3072), ("fp16", "fp32", "rms", True, False, 3000),
                 ("fp32", "fp32", "none", False, True, 16384), ("bf16", "fp32", "rms", False, False, 1),
                 ("fp16", "fp16", "layer", True, True, 5120)]
    else:
        picks = [(x, s, n, hs, ht, c) for x, s, n, hs, ht, c in itertools.product(
            DTYPES, DTYPES, norms, (True, False), (True, False), WIDTHS)
            if s in (x, "fp32") and (hs or ht or s == x)]
    for x_name, s_name, norm, has_scale, has_shift, C in picks:
        x = _meta((BATCH, TOKENS, C), DTYPES[x_name])
        scale = _meta((BATCH, C), DTYPES[s_name]) if has_scale else None
        shift = _meta((BATCH, C), DTYPES[s_name]) if has_shift else None
        label = (f"x={x_name} ss={s_name if has_scale or has_shift else '-'} norm={norm} "
                 f"scale={int(has_scale)} shift={int(has_shift)} C={C}")
        cases.append((label, lambda x=x, s=scale, t=shift, n=norm: tb.modulate(x, s, t, n, 1e-6)))
        cases.append((label, lambda x=x, s=scale, t=shift, n=norm, ps=C % 2 == 0:
                      tb.modulated_rel_l1_(x, s, t, torch.empty_like(x), n, 1e-6, ps)))
    return cases


def flat_cases(quick: bool):
    """rel_l1 partials (fused finish, or + sum_partials for many samples), residual capture/apply,
    the sync-free span end, decide."""
    cases = []
    widths = (3000, 3072) if quick else WIDTHS
    for (x_name, dtype), C in itertools.product(DTYPES.items(), widths):
        if quick and (x_name, C) not in (("bf16", 3072), ("fp16", 3000), ("fp32", 3072)):
            continue
        for per_sample in (False, True):
            G = BATCH if per_sample else 1
            cur = _meta((G, BATCH * TOKENS * C // G), dtype)
            cases.append((f"x={x_name} C={C} per_sample={int(per_sample)}",
                          lambda c=cur, ps=per_sample: tb.rel_l1_partials(c, torch.empty_like(c), ps)))
        for r_name, r_dtype in DTYPES.items():
            if quick and r_name == x_name and x_name != "fp32":
                continue
            out = _meta((BATCH * TOKENS * C,), dtype)
            res = _meta((BATCH * TOKENS * C,), r_dtype)
            cases.append((f"out={x_name} residual={r_name} C={C}",
                          lambda o=out, r=res: tb.residual_capture_(o, torch.empty_like(o), r)))
            cases.append((f"span end out={x_name} residual={r_name} C={C}",
                          lambda o=out, r=res: tb.finish_span_(_meta((), torch.bool), o, torch.empty_like(o), r)))
            for has_mask in (False, True):
                hidden = out.view(BATCH, -1)
                mask = _meta((BATCH,), torch.bool) if has_mask else None
                cases.append((f"hidden={x_name} residual={r_name} mask={int(has_mask)} C={C}",
                              lambda h=hidden, r=res.view(BATCH, -1), m=mask: tb.residual_apply_(h, r, m)))
    # More samples than the fused finish takes: the partials, then _sum_partials_kernel.
    many = _meta((80, 1 << 20), torch.bfloat16)
    cases.append(("x=bf16 per_sample=1 B=80 L=1M", lambda: tb.rel_l1_partials(many, torch.empty_like(many), True)))
    for S in ((2,) if quick else (1, 2, 4)):
        parts, state = _meta((S, 2), torch.float32), _meta((S, 2), torch.float32)
        cases.append((f"S={S}", lambda p=parts, s=state, n=S: tb.teacache_decide_(
            p, s, [1.0, -2.0, 3.0], 0.1, _meta((n,), torch.bool), 3)))
    return cases


def collect(archs, quick: bool) -> list[Compile]:
    """Distinct compiles over the matrix, each with the combinations that need it."""
    unique: dict = {}
    for arch in archs:
        for label, thunk in row_cases(quick) + flat_cases(quick):
            with recording(arch) as launches:
                thunk()
            for launch in launches:
                comp = specialize(launch, arch)
                unique.setdefault(comp.key(), comp).combos.append(label)
    return list(unique.values())


# --------------------------------------------------------------------------- compile + inspect

_LOAD = re.compile(r"\bld\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def widest_load(ptx: str) -> int:
    """Bits of the widest global load in the PTX (0 if none)."""
    return max((int(v or 1) * int(bits) for v, bits in _LOAD.findall(ptx)), default=0)


def cuobjdump_path() -> str | None:
    """Triton's bundled cuobjdump (it reads the cubins its ptxas writes), else one on PATH."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.access(bundled, os.X_OK) else shutil.which("cuobjdump")


def resource_counts(cubin: bytes) -> dict[str, dict[str, int]]:
    """{function: {"REG": n, "STACK": s, "SHARED": b, "LOCAL": l, ...}} from
    ``cuobjdump --dump-resource-usage``; {} when cuobjdump is not found."""
    tool = cuobjdump_path()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    usage: dict[str, dict[str, int]] = {}
    for name, body in re.findall(r"^\s*Function (\S+):\n(.*)$", text, re.M):
        usage[name] = {k: int(v) for k, v in re.findall(r"\b([A-Z]+(?:\[\d+\])?):(\d+)", body)}
    return usage


def resource_usage(cubin: bytes) -> str:
    """'regs=N stack=S local=L' from cuobjdump, or '' when cuobjdump is not found."""
    counts = resource_counts(cubin)
    if not counts:
        return ""
    usage = next(iter(counts.values()))  # a Triton cubin holds one kernel
    # Register spills go to local memory: LOCAL > 0 (or STACK > 0) means spilling.
    return f"regs={usage.get('REG', '?')} stack={usage.get('STACK', '?')} local={usage.get('LOCAL', '?')}"


def compile_one(comp: Compile):
    """Returns (ok, compiled kernel or error text)."""
    src = ASTSource(fn=comp.fn, signature=comp.signature, constexprs=comp.constexprs,
                    attrs={k: [list(a) for a in v] for k, v in comp.attrs.items()})
    try:
        return True, triton.compile(src, target=GPUTarget("cuda", comp.arch, 32), options=comp.options)
    except Exception as exc:  # noqa: BLE001 - report every failure, keep going
        return False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a representative subset on sm_90 only (every kernel, dtype and norm)")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS,
                        help="compute capability to compile for (repeatable; default 80 and 90)")
    parser.add_argument("--ptx-dir", help="also write each kernel's PTX here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    archs = args.arch or ([90] if args.quick else [80, 90])

    start = time.time()
    compiles = collect(archs, args.quick)
    failures = 0
    for n, comp in enumerate(compiles):
        ok, result = compile_one(comp)
        opts = " ".join(f"{k}={v}" for k, v in sorted(comp.options.items()))
        consts = " ".join(f"{k}={v}" for k, v in comp.constexprs.items())
        head = f"{comp.fn.__name__:28s} sm_{comp.arch} {consts} {opts}"
        combos = comp.combos[0] + (f" (+{len(comp.combos) - 1} more)" if len(comp.combos) > 1 else "")
        if not ok:
            failures += 1
            print(f"FAIL {head} | {combos} | {result}", flush=True)
            continue
        ptx = result.asm["ptx"]
        if args.ptx_dir:
            os.makedirs(args.ptx_dir, exist_ok=True)
            with open(os.path.join(args.ptx_dir, f"{comp.fn.__name__}_sm{comp.arch}_{n}.ptx"), "w") as f:
                f.write("".join(f"// combo: {c}\n" for c in comp.combos) + ptx)
        usage = resource_usage(result.asm["cubin"])
        print(f"ok   {head} | {combos} | ld{widest_load(ptx)} {usage}", flush=True)
    print(f"{len(compiles) - failures}/{len(compiles)} compiles ok in {time.time() - start:.1f}s "
          f"(archs: {', '.join(f'sm_{a}' for a in archs)})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
