"""Compile cpu_kernels.c with the system C compiler on first use, cache the library.

Like Triton and inductor, nothing is compiled at install time: the first op
call on a CPU tensor runs ``cc -O3 -shared`` (about a second) and keeps the
library under ``$TEACACHE_FAST_HOME/native/`` (default
``~/.cache/teacache_fast``), keyed by a hash of the source, the flags and the
compiler, so an upgrade recompiles and concurrent processes never read a
half-written file (write to a temp name, then rename). OpenMP is used when the
compiler has it. ``TEACACHE_FAST_NATIVE_CPU=0`` turns the native kernels off
(the cpu backend is then unavailable and CPU tensors take the torch backend).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Tuple

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# -ffp-contract=off: each product and sum rounded on its own, as torch does;
# -Wno-psabi: the helpers taking 64-byte vectors are all inlined, no call passes one
FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-Wno-psabi")
ENV_OFF = "TEACACHE_FAST_NATIVE_CPU"


def cache_dir() -> Path:
    home = os.environ.get("TEACACHE_FAST_HOME") or os.path.join(Path.home(), ".cache", "teacache_fast")
    return Path(home) / "native"


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile(cc: str, out: Path, openmp: bool) -> Tuple[bool, str]:
    cmd = [cc, *FLAGS, *(("-fopenmp",) if openmp else ()), str(SOURCE), "-o", str(out), "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"{' '.join(cmd)}: {exc}"
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip()[-2000:]


@functools.lru_cache(maxsize=None)
def library() -> Tuple[Optional[ctypes.CDLL], Optional[str]]:
    """(the loaded library, None) or (None, why it is not available). Built once per process."""
    if os.environ.get(ENV_OFF, "1").strip() in ("0", "false", "off", "no"):
        return None, f"{ENV_OFF}={os.environ[ENV_OFF]!r} turned the native CPU kernels off"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc/clang)"
    key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, cc, sys.platform)).encode()).hexdigest()[:16]
    target = cache_dir() / f"tcf_cpu_{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return None, f"cannot create the kernel cache {target.parent}: {exc}"
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            tmp_out = Path(tmp) / target.name
            ok, log = _compile(cc, tmp_out, openmp=True)
            if not ok:
                ok, log = _compile(cc, tmp_out, openmp=False)
            if not ok:
                return None, f"compiling {SOURCE.name} failed: {log}"
            os.replace(tmp_out, target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        return None, f"loading {target} failed: {exc}"
    _declare(lib)
    return lib, None


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    params = [p, i, p, i, i64, p, i, i64]   # x, x_dt, scale, dt, batch, shift, dt, batch
    lib.tcf_cpu_modulate.argtypes = params + [p, i64, i64, i64, i, f32, i]
    lib.tcf_cpu_modulated_rel_l1.argtypes = params + [p, i64, i64, i64, i, f32, i, p, i]
    lib.tcf_cpu_rel_l1_partials.argtypes = [p, p, i, i64, i64, i, p, i]
    lib.tcf_cpu_decide.argtypes = [p, p, i64, p, i, f32, i, p, i, i64, i, p]
    lib.tcf_cpu_residual.argtypes = [p, p, p, i, i64, i, i, i]
    for fn in (lib.tcf_cpu_modulate, lib.tcf_cpu_modulated_rel_l1, lib.tcf_cpu_rel_l1_partials,
               lib.tcf_cpu_decide, lib.tcf_cpu_residual):
        fn.restype = i
