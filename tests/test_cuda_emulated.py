"""The CUDA kernels of csrc/, executed on the CPU by the host SIMT emulator.

csrc/emu/ compiles the unchanged kernel sources with the host C++ compiler
(``make -C csrc/emu``, incremental, so the build is cached between runs) into
a library with the C API of ``csrc/teacache_fast.h``; these tests call it
through ctypes on CPU tensors and compare with the torch backend (the oracle
of every backend) and float64, with the tolerances of tests/test_ops.py.

Two builds: the plain one runs in this process; the AddressSanitizer one
(+ alignment checks) reruns this whole file in a child process started with
``LD_PRELOAD=libasan`` (``test_everything_again_under_address_sanitizer``), so
an out-of-bounds or misaligned access by any kernel fails the run.

Without a host C++ compiler and make, the whole file is skipped.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from op_oracles import ATOL, DTYPES, SUM_RTOL, modulate64, partials64

try:  # the torch backend: the oracle of every backend (DESIGN.md calls it "reference")
    from teacache_fast.backends import torch as ref
except ImportError:
    from teacache_fast.backends import reference as ref

ROOT = Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "csrc" / "emu"
BUILD = EMU_DIR / "build"
IN_ASAN_CHILD = os.environ.get("TCF_EMU_ASAN_CHILD") == "1"


def _find_cxx():
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CXX = _find_cxx()
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(
    CXX is None or MAKE is None,
    reason="the emulated CUDA tests build csrc/ with a host C++ compiler: "
           f"{'no g++/clang++/c++ (or $CXX)' if CXX is None else 'no make'} on PATH")

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NORMS = {"none": 0, "layer": 1, "rms": 2}
WIDTHS = (1, 3, 3000, 3072, 5120)
EPS = 1e-6
SUCCESS, INVALID, CUDA_ERROR = 0, 1, 2

_V, _I, _I64, _F, _D, _SZ = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float,
                             ctypes.c_double, ctypes.c_size_t)
_SIGNATURES = {
    "tcf_last_error": ([], ctypes.c_char_p),
    "tcf_device_check": ([], _I),
    "tcf_rel_l1_workspace_size": ([_I64, _I64, _I, ctypes.POINTER(_SZ)], _I),
    "tcf_modulated_rel_l1_workspace_size": ([_I64, _I64, _I64, _I, ctypes.POINTER(_SZ)], _I),
    "tcf_modulate": ([_V, _V, _I64, _V, _I64, _V, _I64, _I64, _I64, _I, _I, _I, _F, _V], _I),
    "tcf_rel_l1_partials": ([_V, _V, _V, _I64, _I64, _I, _I, _V, _SZ, _V], _I),
    "tcf_modulated_rel_l1": ([_V, _V, _I64, _V, _I64, _V, _V, _I64, _I64, _I64, _I, _I, _I, _F, _I,
                              _V, _SZ, _V], _I),
    "tcf_teacache_decide": ([_V, _V, _V, _I, _D, _V, _I64, _I, _V, _I64, _V], _I),
    "tcf_residual_capture": ([_V, _V, _V, _I64, _I, _I, _V], _I),
    "tcf_residual_apply": ([_V, _V, _V, _I64, _I64, _I, _I, _V], _I),
    "tcf_residual_apply_out": ([_V, _V, _V, _V, _I64, _I64, _I, _I, _V], _I),
    "tcf_finish_span": ([_V, _V, _V, _V, _I64, _I, _I, _V], _I),
    "tcf_emu_set_device": ([_I, _I], _I),
    "tcf_emu_set_grid_limits": ([ctypes.c_uint] * 3, None),
    "tcf_emu_set_order": ([_I, _I], None),
    "tcf_emu_counters": ([ctypes.POINTER(ctypes.c_ulonglong)], None),
    "tcf_emu_last_message": ([], ctypes.c_char_p),
}


def _make(target: str) -> Path:
    names = {"plain": "libteacache_fast_emu.so", "asan": "libteacache_fast_emu_asan.so",
             "selftest": "libtcf_emu_selftest.so"}
    proc = subprocess.run([MAKE, "-C", str(EMU_DIR), "-j2", f"CXX={CXX}", target],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"make -C csrc/emu {target} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}",
                    pytrace=False)
    return BUILD / names[target]


class Emu:
    """The C API of the emulated build, on CPU tensors (a ctypes mirror of backends/cuda.py)."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        for name, (args, res) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = args, res
        self.sms = None

    # ---------------------------------------------------------------- emulator control
    def device(self, sms: int) -> None:
        """Run on an emulated device with `sms` SMs (device index = sms: the C API caches per device)."""
        assert self.lib.tcf_emu_set_device(sms, sms) == 0
        self.sms = sms

    def counters(self):
        out = (ctypes.c_ulonglong * 4)()
        self.lib.tcf_emu_counters(out)
        return tuple(out)  # launches, blocks, threads, barriers

    def call(self, name, *args) -> None:
        st = getattr(self.lib, name)(*args)
        if st != SUCCESS:
            raise RuntimeError(f"{name} -> {st}: {self.lib.tcf_last_error().decode()}")

    def status(self, name, *args):
        st = getattr(self.lib, name)(*args)
        return st, self.lib.tcf_last_error().decode()

    def _ws(self, fn, *dims):
        n = _SZ()
        self.call(fn, *dims, ctypes.byref(n))
        ws = torch.full((max(n.value, 1),), float("nan"))
        ws[0] = 0.0  # the ticket word starts at 0 (and every call leaves it there)
        return ws, n.value

    # ---------------------------------------------------------------- the ops
    @staticmethod
    def _params(x, scale, shift, strides):
        """(keep, scale ptr, stride, shift ptr, stride, param code) as backends/cuda.py passes them."""
        ps = [p for p in (scale, shift) if p is not None]
        if not all(p.dtype == x.dtype for p in ps):
            scale = None if scale is None else scale.float()
            shift = None if shift is None else shift.float()
            code = CODES[torch.float32]
        else:
            code = CODES[x.dtype]

        def ptr_stride(p, given):
            if p is None:
                return 0, 0
            if given is not None:
                return p.data_ptr(), given
            return p.data_ptr(), (p.stride(0) if p.shape[0] > 1 else 0)

        s_ptr, s_stride = ptr_stride(scale, strides[0])
        t_ptr, t_stride = ptr_stride(shift, strides[1])
        return (scale, shift), s_ptr, s_stride, t_ptr, t_stride, code

    def modulate(self, x, scale, shift, norm, out=None, strides=(None, None), eps=EPS):
        B, R, C = x.shape
        out = torch.full_like(x, float("nan")) if out is None else out
        keep, sp, ss, tp, ts, pcode = self._params(x, scale, shift, strides)
        self.call("tcf_modulate", x.data_ptr(), sp, ss, tp, ts, out.data_ptr(), B, R, C, CODES[x.dtype],
                  pcode, NORMS[norm], eps, None)
        del keep
        return out

    def rel_l1_partials(self, cur, prev, per_sample):
        B, L = cur.shape
        out = torch.full((B, 2) if per_sample else (2,), float("nan"))
        ws, n = self._ws("tcf_rel_l1_workspace_size", B, L, CODES[cur.dtype])
        self.call("tcf_rel_l1_partials", cur.data_ptr(), prev.data_ptr(), out.data_ptr(), B, L,
                  CODES[cur.dtype], int(per_sample), ws.data_ptr(), n, None)
        return out

    def modulated_rel_l1_(self, x, scale, shift, prev, norm, per_sample, strides=(None, None), eps=EPS):
        B, R, C = x.shape
        out = torch.full((B, 2) if per_sample else (2,), float("nan"))
        ws, n = self._ws("tcf_modulated_rel_l1_workspace_size", B, R, C, CODES[x.dtype])
        keep, sp, ss, tp, ts, pcode = self._params(x, scale, shift, strides)
        self.call("tcf_modulated_rel_l1", x.data_ptr(), sp, ss, tp, ts, prev.data_ptr(), out.data_ptr(),
                  B, R, C, CODES[x.dtype], pcode, NORMS[norm], eps, int(per_sample), ws.data_ptr(), n, None)
        del keep
        return out

    def teacache_decide_(self, partials, state, coefficients, threshold, force_bytes, max_skips,
                         accumulate_abs=False):
        S = partials.shape[0]
        coeffs = torch.tensor(coefficients, dtype=torch.float32)
        compute = torch.full((S,), 7, dtype=torch.uint8)
        self.call("tcf_teacache_decide", partials.data_ptr(), state.data_ptr(), coeffs.data_ptr(),
                  len(coefficients), threshold, 0 if force_bytes is None else force_bytes.data_ptr(),
                  max_skips, int(accumulate_abs), compute.data_ptr(), S, None)
        return compute

    def residual_capture_(self, out, inp, residual):
        self.call("tcf_residual_capture", out.data_ptr(), inp.data_ptr(), residual.data_ptr(),
                  out.numel(), CODES[out.dtype], CODES[residual.dtype], None)

    def residual_apply_(self, hidden, residual, mask_bytes):
        B, L = hidden.shape
        self.call("tcf_residual_apply", hidden.data_ptr(), residual.data_ptr(),
                  0 if mask_bytes is None else mask_bytes.data_ptr(), B, L, CODES[hidden.dtype],
                  CODES[residual.dtype], None)

    def residual_apply_out(self, hidden, residual, mask_bytes, out):
        B, L = hidden.shape
        self.call("tcf_residual_apply_out", hidden.data_ptr(), residual.data_ptr(),
                  0 if mask_bytes is None else mask_bytes.data_ptr(), out.data_ptr(), B, L,
                  CODES[hidden.dtype], CODES[residual.dtype], None)


    def finish_span_(self, compute_byte, out, inp, residual):
        self.call("tcf_finish_span", compute_byte.data_ptr(), out.data_ptr(), inp.data_ptr(),
                  residual.data_ptr(), out.numel(), CODES[out.dtype], CODES[residual.dtype], None)


ASAN_TEST = "test_everything_again_under_address_sanitizer"
_background = {}


@pytest.fixture(scope="session")
def emu_lib(request):
    path = os.environ.get("TCF_EMU_LIB") if IN_ASAN_CHILD else None
    lib = Emu(Path(path) if path else _make("plain"))
    if path is None and any(item.name == ASAN_TEST for item in request.session.items) and _asan_runtime():
        # the sanitizer build compiles while the in-process tests run
        log = BUILD / "asan-build.log"
        with open(log, "w") as f:
            _background["asan"] = (subprocess.Popen(
                [MAKE, "-C", str(EMU_DIR), "-j2", f"CXX={CXX}", "asan"], stdout=f, stderr=subprocess.STDOUT), log)
        request.addfinalizer(_background["asan"][0].wait)
    return lib


@pytest.fixture
def emu(emu_lib):
    """The emulated C API on a 2-SM device, threads and blocks in forward order."""
    emu_lib.device(2)
    emu_lib.lib.tcf_emu_set_order(0, 0)
    emu_lib.lib.tcf_emu_set_grid_limits(0, 0, 0)
    yield emu_lib
    emu_lib.lib.tcf_emu_set_order(0, 0)
    emu_lib.lib.tcf_emu_set_grid_limits(0, 0, 0)


# --------------------------------------------------------------------------- inputs

def _rand(shape, dtype, seed, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + offset).to(dtype)


def _shifted(t, shift: int):
    """A copy of `t` whose data starts `shift` elements into its allocation (a misaligned base)."""
    if shift == 0:
        return t.clone()
    store = torch.full((t.numel() + shift,), 0.5).to(t.dtype)
    view = store[shift:].view(t.shape)
    view.copy_(t)
    return view


def _lead(t):
    """The elements of the allocation before a shifted view (must stay untouched)."""
    off = t.storage_offset()
    return torch.tensor([], dtype=t.dtype) if off == 0 else \
        torch.as_strided(t, (off,), (1,), 0).clone()


def _params(B, C, dtype, seed, kind):
    if kind is None:
        return None
    return _rand((B if kind == "bc" else 1, C), dtype, seed, 0.5)


def _assert_bits(a, b, msg=""):
    """Same values bit for bit (NaN matches any NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape, msg
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=msg or None)


# --------------------------------------------------------------------------- conversions

def _f32_patterns():
    """fp32 bit patterns: every top 16 bits x low 16 bits around each rounding boundary."""
    low = {0, 1, 2, 0xffff, 0xfffe}
    for j in range(16):
        low |= {1 << j, (1 << j) - 1, (1 << j) + 1}
    low = torch.tensor(sorted(v & 0xffff for v in low), dtype=torch.int64)
    top = torch.arange(1 << 16, dtype=torch.int64) << 16
    bits = (top[:, None] | low[None, :]).reshape(-1)
    return bits.to(torch.int32).view(torch.float32)  # wraps to the signed patterns: same bits


@pytest.mark.skipif(IN_ASAN_CHILD, reason="pure arithmetic on 2M values: the plain build covers it")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp16_bf16_conversions_round_to_nearest_even_like_torch(emu, dtype):
    # fp32 -> 16 bit through the kernels' own store path: capture(out, 0) into a 16-bit residual.
    f = _f32_patterns()
    zero = torch.zeros_like(f)
    got = torch.empty(f.shape, dtype=dtype)
    emu.residual_capture_(f, zero, got)
    want = f.to(dtype)
    nan = torch.isnan(f)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan]), \
        [(hex(int(a)), hex(int(b)), float(x)) for a, b, x in
         zip(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan], f[~nan])
         if a != b][:5]
    # NaN becomes the canonical NaN 0x7fff (the CUDA headers' host paths do the same).
    assert bool((got.view(torch.int16)[nan] == 0x7fff).all())
    # 16 bit -> fp32, every pattern.
    all16 = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    up = torch.empty(all16.shape, dtype=torch.float32)
    emu.residual_capture_(all16, torch.zeros_like(all16), up)
    _assert_bits(up, all16.float())


# --------------------------------------------------------------------------- modulate

def _check_modulate(m, x, scale, shift, norm, dtype):
    exact = modulate64(x, scale, shift, norm, EPS)
    mag = exact.abs().max().clamp(min=1.0)
    torch.testing.assert_close(m.double(), exact, atol=ATOL[dtype] * mag, rtol=0)
    with torch.no_grad():
        want = ref.modulate(x, scale, shift, norm, EPS)
    torch.testing.assert_close(m, want, atol=ATOL[dtype] * mag, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("C", WIDTHS)
def test_modulate(emu, dtype, norm, C):
    B, R = 2, 3
    x = _rand((B, R, C), dtype, C, 3.0, 1.0)
    scale = _params(B, C, dtype, 1, "bc")
    shift = _params(B, C, torch.float32, 2, "1c")  # another dtype: both go as fp32
    m = emu.modulate(x, scale, shift, norm)
    _check_modulate(m, x, scale, shift, norm, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("params", ["none", "scale", "shift", "both-same", "both-fp32", "1c-same"])
def test_modulate_params(emu, dtype, params):
    B, R, C = 3, 2, 1000
    x = _rand((B, R, C), dtype, 3, 2.0)
    pdt = torch.float32 if params == "both-fp32" else dtype
    kind = "1c" if params == "1c-same" else "bc"
    scale = _params(B, C, pdt, 4, kind) if params not in ("none", "shift") else None
    shift = _params(B, C, pdt, 5, kind) if params not in ("none", "scale") else None
    m = emu.modulate(x, scale, shift, "layer")
    _check_modulate(m, x, scale, shift, "layer", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shifted", ["x", "out", "scale", "shift", "all"])
@pytest.mark.parametrize("C", [3, 3000, 5120])
def test_modulate_misaligned(emu, dtype, shifted, C):
    B, R = 2, 2
    x0 = _rand((B, R, C), dtype, 6, 2.0)
    s0, t0 = _params(B, C, dtype, 7, "bc"), _params(B, C, dtype, 8, "bc")
    x = _shifted(x0, 1 if shifted in ("x", "all") else 0)
    scale = _shifted(s0, 1 if shifted in ("scale", "all") else 0)
    shift = _shifted(t0, 1 if shifted in ("shift", "all") else 0)
    out = _shifted(torch.zeros_like(x0), 1 if shifted in ("out", "all") else 0)
    lead = _lead(out)
    emu.modulate(x, scale, shift, "rms", out=out)
    _check_modulate(out, x0, s0, t0, "rms", dtype)
    assert torch.equal(_lead(out), lead), "wrote before the output"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_modulate_strided_params(emu, dtype):
    # scale/shift rows `C + 5` elements apart (a slice of a wider tensor); a broadcast row (stride 0)
    B, R, C = 3, 2, 67
    x = _rand((B, R, C), dtype, 9)
    wide = _rand((B, C + 5), dtype, 10, 0.5)
    scale = wide[:, :C]
    shift = _rand((1, C), dtype, 11, 0.5)
    m = emu.modulate(x, scale, shift, "layer", strides=(C + 5, 0))
    _check_modulate(m, x, scale.contiguous(), shift, "layer", dtype)


def test_modulate_special_values(emu):
    B, R, C = 1, 4, 37
    x = _rand((B, R, C), torch.float32, 12)
    x[0, 0, 5] = float("nan")   # a NaN row
    x[0, 1, :] = 0.0            # a zero row: norm(0) = 0
    x[0, 2, 3] = float("inf")   # an inf row
    # a constant huge row whose statistics stay finite (at 1e30 the squares of
    # the mean's rounding residue overflow fp32 in one backend and not in the
    # other: both then follow the NaN policy, see test_bad_input_regressions)
    x[0, 3, :] = 1e15
    scale, shift = _params(B, C, torch.float32, 13, "bc"), _params(B, C, torch.float32, 14, "bc")
    for norm in NORMS:
        m = emu.modulate(x, scale, shift, norm)
        with torch.no_grad():
            want = ref.modulate(x, scale, shift, norm, EPS)
        assert torch.equal(torch.isnan(m), torch.isnan(want)), norm
        assert torch.equal(torch.isinf(m), torch.isinf(want)), norm
        finite = torch.isfinite(want)
        torch.testing.assert_close(m[finite], want[finite], atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- rel_l1_partials

def _check_partials(p, cur, prev, per_sample):
    assert p.shape == ((cur.shape[0], 2) if per_sample else (2,))
    # Inputs are exact in every dtype: only the fp32 summation order differs.
    torch.testing.assert_close(p.double(), partials64(cur, prev, per_sample), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p, ref.rel_l1_partials(cur, prev, per_sample), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", WIDTHS + (70001,))
@pytest.mark.parametrize("per_sample", [False, True])
def test_rel_l1_partials(emu, dtype, L, per_sample):
    B = 3
    cur, prev = _rand((B, L), dtype, 15), _rand((B, L), dtype, 16)
    _check_partials(emu.rel_l1_partials(cur, prev, per_sample), cur, prev, per_sample)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shift_cur,shift_prev", [(1, 0), (0, 1), (1, 1), (3, 1)])
def test_rel_l1_partials_misaligned(emu, dtype, shift_cur, shift_prev):
    B, L = 2, 3001
    c0, p0 = _rand((B, L), dtype, 17), _rand((B, L), dtype, 18)
    cur, prev = _shifted(c0, shift_cur), _shifted(p0, shift_prev)
    _check_partials(emu.rel_l1_partials(cur, prev, True), c0, p0, True)


def test_rel_l1_partials_special_values_and_empty(emu):
    cur, prev = _rand((3, 50), torch.float32, 19), _rand((3, 50), torch.float32, 20)
    cur[0, 7] = float("nan")
    prev[1, 9] = float("inf")
    cur[2] = 0.0
    prev[2] = 0.0
    p = emu.rel_l1_partials(cur, prev, True)
    _assert_bits(torch.isnan(p), torch.isnan(ref.rel_l1_partials(cur, prev, True)))
    assert bool(torch.isnan(p[0, 0])) and bool(torch.isinf(p[1]).all()) and p[2].tolist() == [0.0, 0.0]
    for B, L in [(0, 5), (2, 0)]:  # empty: zero sums, nothing launched but the memset
        e = torch.empty((B, L))
        assert emu.rel_l1_partials(e, e, False).tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- modulated_rel_l1_

def _check_indicator(emu, x, scale, shift, prev, norm, per_sample, dtype, strides=(None, None)):
    prev0 = prev.clone()
    p = emu.modulated_rel_l1_(x, scale, shift, prev, norm, per_sample, strides=strides)
    sc = scale.contiguous() if scale is not None else None
    exact_m = modulate64(x, sc, shift, norm, EPS)
    mag = exact_m.abs().max().clamp(min=1.0)
    # prev now holds m rounded to the dtype ...
    torch.testing.assert_close(prev.double(), exact_m, atol=ATOL[dtype] * mag, rtol=0)
    ref_prev = prev0.clone()
    with torch.no_grad():
        ref_p = ref.modulated_rel_l1_(x, sc, shift, ref_prev, norm, EPS, per_sample)
    torch.testing.assert_close(prev, ref_prev, atol=ATOL[dtype] * mag, rtol=0)
    # ... the partials compare what was stored with the old prev ...
    torch.testing.assert_close(p.double(), partials64(prev, prev0, per_sample), rtol=1e-5, atol=1e-5)
    # ... and stay close to the exact indicator and to the torch backend's.
    torch.testing.assert_close(p.double(), partials64(exact_m, prev0, per_sample),
                               rtol=SUM_RTOL[dtype], atol=1e-3)
    torch.testing.assert_close(p, ref_p, rtol=SUM_RTOL[dtype], atol=1e-3)
    return p


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("C", WIDTHS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_modulated_rel_l1_(emu, dtype, norm, C, per_sample):
    B, R = 2, 3
    x = _rand((B, R, C), dtype, 21, 2.0)
    scale, shift = _params(B, C, dtype, 22, "1c"), _params(B, C, dtype, 23, "bc")
    prev = _rand((B, R, C), dtype, 24)
    _check_indicator(emu, x, scale, shift, prev, norm, per_sample, dtype)


# (x dtype, C) -> resident blocks per SM the row kernel's grid is sized for (fp32 params):
# the register kernel's BLOCKS (2 packs per thread or kMaxRowPacks = 4), the looped
# kernel's past that.
ROW_PATHS = [(torch.bfloat16, 3072, 3), (torch.bfloat16, 4104, 1), (torch.bfloat16, 8192, 1),
             (torch.bfloat16, 8200, 8), (torch.float16, 5120, 1), (torch.float32, 2048, 4),
             (torch.float32, 3072, 2), (torch.float32, 4096, 2), (torch.float32, 4100, 6)]


@pytest.mark.parametrize("dtype,C,per_sm", ROW_PATHS, ids=str)
def test_modulated_rel_l1_row_paths_at_their_width_bounds(emu, dtype, C, per_sm):
    """Each side of each register-budget bound (2 and 4 packs per thread; wider rows loop)
    gives the right m and sums, on a grid sized for that kernel's resident blocks (1 SM,
    4 rows per chunk: min(per_sm, chunks) blocks)."""
    emu.device(1)
    B, R = 1, 40
    x = _rand((B, R, C), dtype, 81, 2.0)
    scale, shift = _params(B, C, torch.float32, 82, "bc"), _params(B, C, torch.float32, 83, "1c")
    prev = _rand((B, R, C), dtype, 84)
    before = emu.counters()[:2]
    _check_indicator(emu, x, scale, shift, prev, "layer", False, dtype)
    launches, blocks = (a - b for a, b in zip(emu.counters()[:2], before))
    assert (launches, blocks) == (1, min(per_sm, R // 4)), (launches, blocks)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shifted", ["x", "prev", "scale", "all"])
def test_modulated_rel_l1_misaligned_and_fp32_params(emu, dtype, shifted):
    B, R, C = 2, 2, 3003
    x = _shifted(_rand((B, R, C), dtype, 25, 2.0), 1 if shifted in ("x", "all") else 0)
    scale = _shifted(_params(B, C, torch.float32, 26, "bc"), 1 if shifted in ("scale", "all") else 0)
    shift = _params(B, C, torch.float32, 27, "1c")
    prev = _shifted(_rand((B, R, C), dtype, 28), 1 if shifted in ("prev", "all") else 0)
    lead = _lead(prev)
    _check_indicator(emu, x, scale, shift, prev, "layer", True, dtype)
    assert torch.equal(_lead(prev), lead), "wrote before prev"


def test_modulated_rel_l1_strided_params_and_special_values(emu):
    B, R, C = 3, 2, 40
    x = _rand((B, R, C), torch.bfloat16, 29)
    x[1, 0, 3] = float("inf")
    wide = _rand((B, C + 3), torch.bfloat16, 30, 0.5)
    prev = _rand((B, R, C), torch.bfloat16, 31)
    prev[2] = 0.0   # a zero previous input: |prev| = 0
    prev0 = prev.clone()
    p = emu.modulated_rel_l1_(x, wide[:, :C], None, prev, "layer", True, strides=(C + 3, None))
    ref_prev = prev0.clone()
    with torch.no_grad():
        want = ref.modulated_rel_l1_(x, wide[:, :C].contiguous(), None, ref_prev, "layer", EPS, True)
    assert bool(torch.isnan(p[1, 0])) and bool(torch.isnan(want[1, 0]))
    assert p[2, 1].item() == 0.0 and want[2, 1].item() == 0.0
    torch.testing.assert_close(p, want, rtol=SUM_RTOL[torch.bfloat16], atol=1e-3, equal_nan=True)
    torch.testing.assert_close(prev, ref_prev, atol=ATOL[torch.bfloat16] * 4, rtol=0, equal_nan=True)


def test_empty_inputs_launch_nothing_and_give_zero_sums(emu):
    before = emu.counters()[0]
    for B, R, C in [(0, 2, 3), (2, 0, 3), (2, 3, 0)]:
        x = torch.empty((B, R, C))
        assert emu.modulate(x, None, None, "layer").numel() == 0
        prev = torch.empty((B, R, C))
        assert emu.modulated_rel_l1_(x, None, None, prev, "layer", True).tolist() == [[0.0, 0.0]] * B
        assert emu.modulated_rel_l1_(x, None, None, prev, "layer", False).tolist() == [0.0, 0.0]
    e = torch.empty(0)
    emu.residual_capture_(e, e, e)
    emu.residual_apply_(e.view(0, 4), e.view(0, 4), None)
    assert emu.counters()[0] == before, "an empty op launched a kernel"


# --------------------------------------------------------------------------- decide

def _decide_case(emu, partials, state, coefficients, threshold, force, max_skips, accumulate_abs=False):
    """Run both backends on copies; the same fp32 operations in the same order: same bits."""
    force_bytes = None if force is None else force.clone()
    st_emu, st_ref = state.clone(), state.clone()
    got = emu.teacache_decide_(partials, st_emu, coefficients, threshold, force_bytes, max_skips,
                               accumulate_abs)
    force_bool = torch.zeros(partials.shape[0], dtype=torch.bool) if force is None else force != 0
    want = ref.teacache_decide_(partials, st_ref, coefficients, threshold, force_bool, max_skips,
                                accumulate_abs)
    assert set(got.tolist()) <= {0, 1}
    assert torch.equal(got.bool(), want), (got, want)
    _assert_bits(st_emu, st_ref)
    return got.bool(), st_emu


@pytest.mark.parametrize("S", [1, 7, 300])
@pytest.mark.parametrize("threshold", [0.3, 0.0, -1.0, 1e30])
@pytest.mark.parametrize("max_skips", [-1, 0, 2])
def test_decide_matches_torch_bit_for_bit(emu, S, threshold, max_skips):
    g = torch.Generator().manual_seed(S)
    num = torch.rand(S, generator=g) * 0.3
    den = torch.rand(S, generator=g) + 0.5
    special = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, 3e38]
    for i in range(min(S, 2 * len(special))):
        (num if i % 2 else den)[i] = special[i // 2]
    partials = torch.stack((num, den), 1)
    state = torch.stack((torch.rand(S, generator=g) * 0.5, torch.randint(0, 4, (S,), generator=g).float()), 1)
    force = (torch.rand(S, generator=g) < 0.2).to(torch.uint8) * 2   # "true" stored as byte 2
    coefficients = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]
    for step in range(3):  # the state carries over
        _, state = _decide_case(emu, partials, state, coefficients, threshold,
                                force if step != 1 else None, max_skips)


@pytest.mark.parametrize("accumulate_abs", [False, True])
def test_decide_abs_accumulation_matches_torch_and_host_bitwise(emu, accumulate_abs):
    from teacache_fast.cache.decision import HostDecision
    # FLUX.1-Kontext's set: negative for rel > 0.2407 (abs and sum part there)
    kontext = [-1.04655119e+03, 3.12563399e+02, -1.69500694e+01, 4.10995971e-01, 3.74537863e-02]
    g = torch.Generator().manual_seed(5)
    state, host = torch.zeros(6, 2), HostDecision(6)
    for _ in range(4):
        partials = torch.stack((torch.rand(6, generator=g) * 0.45, torch.ones(6)), 1)
        flags, state = _decide_case(emu, partials, state, kontext, 0.6, None, -1, accumulate_abs)
        assert host.step(partials.tolist(), kontext, 0.6, False, None, accumulate_abs) == flags.tolist()
        _assert_bits(torch.tensor(host.as_rows(), dtype=torch.float32), state)
    assert bool((state[:, 0] >= 0).all()) or not accumulate_abs


@pytest.mark.parametrize("max_skips", [-1, 1])
def test_decide_host_bool_force_as_never_skip_matches_forced_flags(emu, max_skips):
    """What backends/cuda.py passes for force=True (NULL flags, threshold 0) gives
    the flags and state of a force byte set for every state, bit for bit."""
    g = torch.Generator().manual_seed(11)
    S = 9
    partials = torch.stack((torch.rand(S, generator=g), torch.rand(S, generator=g) + 0.5), 1)
    partials[0, 1] = 0.0
    state = torch.stack((torch.rand(S, generator=g), torch.randint(0, 3, (S,), generator=g).float()), 1)
    state[1, 1] = float("nan")
    coeffs = [1.0, -0.5, 0.25]
    st_flags, st_scalar = state.clone(), state.clone()
    want = emu.teacache_decide_(partials, st_flags, coeffs, 0.4, torch.ones(S, dtype=torch.uint8), max_skips)
    got = emu.teacache_decide_(partials, st_scalar, coeffs, 0.0, None, max_skips)
    assert torch.equal(got, want) and bool(got.all())
    _assert_bits(st_scalar, st_flags)


def test_decide_hand_worked_sequence(emu):
    inf, nan = float("inf"), float("nan")
    steps = [(0.0, 0.0, 1), (0.2, 1.0, 0), (0.2, 1.0, 0), (0.2, 1.0, 0), (nan, 1.0, 0), (0.1, 0.0, 0),
             (0.1, 1.0, 0), (inf, 1.0, 0), (0.1, 1.0, 2), (0.3, 1.0, 0)]
    state = torch.zeros(1, 2)
    flags, accs = [], []
    for num, den, force in steps:
        f, state = _decide_case(emu, torch.tensor([[num, den]]), state, [1.0, 0.0], 0.5,
                                torch.tensor([force], dtype=torch.uint8), -1)
        flags.append(bool(f[0]))
        accs.append(float(state[0, 0]))
    assert flags == [True, False, False, True, True, True, False, True, True, False]
    assert accs == pytest.approx([0.0, 0.2, 0.4, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.3])


# --------------------------------------------------------------------------- residuals

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("res_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", WIDTHS + (40000,))
def test_residual_capture(emu, dtype, res_dtype, n):
    out, inp = _rand((n,), dtype, 32, 2.0), _rand((n,), dtype, 33)
    got = torch.full((n,), float("nan")).to(res_dtype)
    emu.residual_capture_(out, inp, got)
    want = torch.empty((n,), dtype=res_dtype)
    ref.residual_capture_(out, inp, want)
    _assert_bits(got, want)   # fp32 difference rounded once, in both
    torch.testing.assert_close(got.double(), out.double() - inp.double(), atol=2 * ATOL[res_dtype], rtol=0)


@pytest.mark.parametrize("dtype,res_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=str)
@pytest.mark.parametrize("shifts", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1), (3, 1, 2)])
def test_residual_capture_misaligned(emu, dtype, res_dtype, shifts):
    n = 3001
    out, inp = _shifted(_rand((n,), dtype, 34), shifts[0]), _shifted(_rand((n,), dtype, 35), shifts[1])
    got = _shifted(torch.zeros((n,), dtype=res_dtype), shifts[2])
    lead = _lead(got)
    emu.residual_capture_(out, inp, got)
    want = torch.empty((n,), dtype=res_dtype)
    ref.residual_capture_(out.contiguous(), inp.contiguous(), want)
    _assert_bits(got, want)
    assert torch.equal(_lead(got), lead), "wrote before the residual"


def test_residual_capture_special_values(emu):
    vals = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 65504.0, 65520.0, 1e-8,
                         3.0e38, -3.0e38])
    out = vals.repeat(3)
    inp = torch.cat([torch.zeros(10), vals, -vals])
    for res_dtype in DTYPES:
        got = torch.empty(30, dtype=res_dtype)
        emu.residual_capture_(out, inp, got)
        want = torch.empty(30, dtype=res_dtype)
        ref.residual_capture_(out, inp, want)
        _assert_bits(got, want, str(res_dtype))


MASKS = {
    "none": None,
    "mixed": [1, 0, 1, 1, 0],
    "all-off": [0, 0, 0, 0, 0],
    "byte-2": [2, 0, 2, 0, 255],   # any nonzero byte means "apply"
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("res_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("L", [1, 3, 3072])
def test_residual_apply(emu, dtype, res_dtype, mask, L):
    B = 5
    hidden, residual = _rand((B, L), dtype, 36), _rand((B, L), res_dtype, 37, 0.5)
    mask_bytes = None if MASKS[mask] is None else torch.tensor(MASKS[mask], dtype=torch.uint8)
    want = hidden.clone()
    ref.residual_apply_(want, residual, None if mask_bytes is None else mask_bytes != 0)
    got = hidden.clone()
    emu.residual_apply_(got, residual, mask_bytes)
    _assert_bits(got, want)
    if mask_bytes is not None:
        off = mask_bytes == 0
        assert torch.equal(got[off], hidden[off]), "a masked-out sample changed"


@pytest.mark.parametrize("dtype,res_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.float16)], ids=str)
@pytest.mark.parametrize("shifts", [(1, 0), (0, 1), (1, 1)])
def test_residual_apply_misaligned(emu, dtype, res_dtype, shifts):
    B, L = 3, 1001
    h0, r0 = _rand((B, L), dtype, 38), _rand((B, L), res_dtype, 39)
    hidden, residual = _shifted(h0, shifts[0]), _shifted(r0, shifts[1])
    lead = _lead(hidden)
    mask = torch.tensor([1, 0, 2], dtype=torch.uint8)
    emu.residual_apply_(hidden, residual, mask)
    want = h0.clone()
    ref.residual_apply_(want, r0, mask != 0)
    _assert_bits(hidden, want)
    assert torch.equal(_lead(hidden), lead)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("res_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("L", [1, 3, 3072])
def test_residual_apply_out(emu, dtype, res_dtype, mask, L):
    """out = hidden + residual: the in-place op's bits, hidden untouched, masked-out
    samples copied, and every element of out written (it starts as NaN)."""
    B = 5
    hidden, residual = _rand((B, L), dtype, 36), _rand((B, L), res_dtype, 37, 0.5)
    mask_bytes = None if MASKS[mask] is None else torch.tensor(MASKS[mask], dtype=torch.uint8)
    want = hidden.clone()
    emu.residual_apply_(want, residual, mask_bytes)
    h0 = hidden.clone()
    out = torch.full_like(hidden, float("nan"))
    emu.residual_apply_out(hidden, residual, mask_bytes, out)
    _assert_bits(out, want)
    _assert_bits(hidden, h0)
    ref_out = torch.empty_like(hidden)
    ref.residual_apply_(hidden, residual, None if mask_bytes is None else mask_bytes != 0, out=ref_out)
    _assert_bits(out, ref_out)


@pytest.mark.parametrize("dtype,res_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.float16)], ids=str)
@pytest.mark.parametrize("shifts", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)])
def test_residual_apply_out_misaligned(emu, dtype, res_dtype, shifts):
    B, L = 3, 1001
    h0, r0 = _rand((B, L), dtype, 38), _rand((B, L), res_dtype, 39)
    hidden, residual = _shifted(h0, shifts[0]), _shifted(r0, shifts[1])
    out = _shifted(torch.full_like(h0, float("nan")), shifts[2])
    lead = _lead(out)
    mask = torch.tensor([1, 0, 2], dtype=torch.uint8)
    emu.residual_apply_out(hidden, residual, mask, out)
    want = h0.clone()
    ref.residual_apply_(want, r0, mask != 0)
    _assert_bits(out, want)
    _assert_bits(hidden, h0)
    assert torch.equal(_lead(out), lead), "wrote before out"


def test_residual_apply_out_rejects_out_equal_to_hidden(emu):
    h = torch.zeros(2, 4)
    st, msg = emu.status("tcf_residual_apply_out", h.data_ptr(), h.data_ptr(), None, h.data_ptr(),
                         2, 4, 0, 0, None)
    assert st == INVALID and "out must not be hidden" in msg, msg
    st, msg = emu.status("tcf_residual_apply_out", h.data_ptr(), h.data_ptr(), None, None, 2, 4, 0, 0,
                         None)
    assert st == INVALID and "out must not be NULL" in msg, msg


def _span_end_reference(compute: bool, out, inp, residual):
    """The composed span end (capture, select, masked apply) of the torch backend."""
    out, residual = out.clone(), residual.clone()
    ref.finish_span_(torch.tensor(compute), out, inp, residual)
    return out, residual


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("res_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flag", [0, 1, 2])   # byte 2: "compute" too
@pytest.mark.parametrize("n", [1, 3, 3072, 40001])
def test_finish_span_one_pass_matches_the_composed_ops(emu, dtype, res_dtype, flag, n):
    out, inp = _rand((n,), dtype, 50, 2.0), _rand((n,), dtype, 51)
    residual = _rand((n,), res_dtype, 52, 0.5)
    want_out, want_res = _span_end_reference(flag != 0, out, inp, residual)
    inp0 = inp.clone()
    before = emu.counters()
    emu.finish_span_(torch.tensor([flag], dtype=torch.uint8), out, inp, residual)
    assert emu.counters()[0] - before[0] == 1, "one launch"
    _assert_bits(out, want_out)
    _assert_bits(residual, want_res)
    _assert_bits(inp, inp0)


@pytest.mark.parametrize("shifts", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)])
@pytest.mark.parametrize("flag", [0, 1])
def test_finish_span_misaligned(emu, shifts, flag):
    n = 1001
    o0, i0, r0 = _rand((n,), torch.bfloat16, 53), _rand((n,), torch.bfloat16, 54), _rand((n,), torch.float32, 55)
    out, inp, residual = _shifted(o0, shifts[0]), _shifted(i0, shifts[1]), _shifted(r0, shifts[2])
    lead_o, lead_r = _lead(out), _lead(residual)
    want_out, want_res = _span_end_reference(bool(flag), o0, i0, r0)
    emu.finish_span_(torch.tensor([flag], dtype=torch.uint8), out, inp, residual)
    _assert_bits(out, want_out)
    _assert_bits(residual, want_res)
    assert torch.equal(_lead(out), lead_o) and torch.equal(_lead(residual), lead_r)


def test_finish_span_bad_arguments(emu):
    h = torch.zeros(4)
    st, msg = emu.status("tcf_finish_span", None, h.data_ptr(), h.data_ptr(), h.data_ptr(), 4, 0, 0, None)
    assert st == INVALID and "compute must not be NULL" in msg, msg
    flag = torch.ones(1, dtype=torch.uint8)
    st, msg = emu.status("tcf_finish_span", flag.data_ptr(), h.data_ptr(), h.data_ptr(), h.data_ptr(), -1,
                         0, 0, None)
    assert st == INVALID and "numel must be >= 0" in msg, msg
    st, msg = emu.status("tcf_finish_span", flag.data_ptr(), h.data_ptr(), h.data_ptr(), h.data_ptr(), 4,
                         0, 9, None)
    assert st == INVALID and "residual_dtype code 9" in msg, msg


@pytest.mark.skipif(IN_ASAN_CHILD, reason="65535 blocks of 256 fibers: 12 s under ASan; the plain build runs it")
def test_residual_apply_batch_beyond_the_grid_y_limit(emu):
    # batch > 65535: the grid's y dimension is clamped and blocks stride over the samples.
    B = 65535 + 3
    hidden, residual = _rand((B, 1), torch.float32, 40), _rand((B, 1), torch.float32, 41)
    mask = (torch.arange(B) % 3 != 1).to(torch.uint8)
    mask[-3:] = torch.tensor([2, 0, 1], dtype=torch.uint8)   # the samples of the second sweep
    # the torch backend's formula (its per-sample loop is slow at this batch): fp32 add where set
    want = torch.where((mask != 0)[:, None], hidden + residual, hidden)
    before = emu.counters()
    emu.residual_apply_(hidden, residual, mask)
    blocks = emu.counters()[1] - before[1]
    assert blocks == 65535, blocks
    _assert_bits(hidden, want)


def test_modulate_batch_beyond_the_grid_y_limit(emu):
    # the row kernel's sweep over samples (b += gridDim.y), per-sample scale rows included;
    # norm "none" has no block reduction, which keeps 65535 blocks cheap here
    B = 65535 + 3
    x = _rand((B, 1, 3), torch.float32, 42)
    scale, shift = _params(B, 3, torch.float32, 43, "bc"), _params(B, 3, torch.float32, 44, "1c")
    before = emu.counters()
    m = emu.modulate(x, scale, shift, "none")
    assert emu.counters()[1] - before[1] == 65535
    # the torch backend's arithmetic for norm "none" (its per-sample loop is slow at this batch):
    # (1 + scale), the product and the sum each rounded to fp32: the same bits
    _assert_bits(m, x * (1.0 + scale)[:, None, :] + shift)
    _assert_bits(m[-4:], ref.modulate(x[-4:], scale[-4:], shift, "none", EPS))


def test_launch_beyond_the_devices_grid_limit_is_a_cuda_error(emu):
    # The C API clamps grid.y at 65535 itself; a device with a smaller limit refuses the launch,
    # and the op reports it as a CUDA error naming the op and the reason.
    emu.lib.tcf_emu_set_grid_limits(0, 2, 0)
    h = torch.zeros(3, 4)
    st, msg = emu.status("tcf_residual_apply", h.data_ptr(), h.data_ptr(), None, 3, 4, 0, 0, None)
    assert st == CUDA_ERROR, msg
    assert "tcf_residual_apply" in msg and "cudaErrorInvalidConfiguration" in msg and "exceeds" in msg, msg


# --------------------------------------------------------------------------- determinism

def _all_ops(emu, seed=42):
    """One call of every op on odd-sized inputs; every output, as tensors."""
    B, R, C = 3, 5, 1001
    x = _rand((B, R, C), torch.bfloat16, seed, 4.0)
    scale, shift = _params(B, C, torch.bfloat16, seed + 1, "bc"), _params(B, C, torch.float32, seed + 2, "1c")
    prev = _rand((B, R, C), torch.bfloat16, seed + 3)
    p_ind = emu.modulated_rel_l1_(x, scale, shift, prev, "layer", True)
    p_all = emu.modulated_rel_l1_(x, scale, shift, prev.clone(), "rms", False)
    m = emu.modulate(x, scale, shift, "layer")
    cur = _rand((B, 30001), torch.float16, seed + 4)
    q = emu.rel_l1_partials(cur, _rand((B, 30001), torch.float16, seed + 5), True)
    res = torch.empty((B * R * C,), dtype=torch.float32)
    emu.residual_capture_(x.reshape(-1), prev.reshape(-1), res)
    hidden = x.clone().reshape(B, -1)
    emu.residual_apply_(hidden, res.view(B, -1), torch.tensor([1, 0, 1], dtype=torch.uint8))
    state = torch.zeros(B, 2)
    flags = emu.teacache_decide_(p_ind, state, [1.0, 0.5, 0.0], 0.3, None, -1)
    return {"partials": p_ind, "partials_all": p_all, "prev": prev, "modulate": m, "rel_l1": q,
            "residual": res, "hidden": hidden, "flags": flags, "state": state}


def test_bitwise_deterministic_across_runs_and_schedules(emu):
    first = _all_ops(emu)
    for threads, blocks in [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)]:
        # threads of a block and blocks of a grid run in another order (or one warp runs
        # ahead of the others from barrier to barrier): same bits
        emu.lib.tcf_emu_set_order(threads, blocks)
        again = _all_ops(emu)
        for k in first:
            _assert_bits(again[k], first[k], f"{k} with thread order {threads}, block order {blocks}")


def test_across_sm_counts(emu):
    """What the design promises across devices, checked on emulated SM counts 1, 3 and 8:
    every result bit for bit, the partial sums included. The SM count changes how many
    blocks share the work (asserted: the grids differ), never the partition of a
    reduction (a fixed chunk size, so the workspace is the same) or its order."""
    results, ws, blocks = {}, {}, {}
    for sms in (1, 3, 8):
        emu.device(sms)
        before = emu.counters()[1]
        results[sms] = _all_ops(emu)
        blocks[sms] = emu.counters()[1] - before
        n = _SZ()
        emu.call("tcf_rel_l1_workspace_size", 3, 30001, CODES[torch.float16], ctypes.byref(n))
        ws[sms] = n.value
    assert blocks[1] < blocks[8], f"the SM count must change the grids here: {blocks}"
    assert len(set(ws.values())) == 1, f"the partition must not follow the SM count: {ws}"
    base = results[1]
    for sms in (3, 8):
        for k in base:
            _assert_bits(results[sms][k], base[k], f"{k} on {sms} SMs")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_rows_give_the_bits_of_aligned_ones(emu, dtype):
    """The vector/scalar choice only changes how elements are loaded, never which thread
    adds them in which order: an offset view gives the bits of an aligned copy."""
    B, R, C, L = 2, 5, 3003, 20011
    x, prev = _rand((B, R, C), dtype, 61, 2.0), _rand((B, R, C), dtype, 62)
    scale, shift = _params(B, C, torch.float32, 63, "bc"), _params(B, C, torch.float32, 64, "1c")
    cur, old = _rand((B, L), dtype, 65), _rand((B, L), dtype, 66)
    aligned_prev = prev.clone()
    want = (emu.modulated_rel_l1_(x, scale, shift, aligned_prev, "layer", True),
            emu.modulate(x, scale, shift, "rms"), emu.rel_l1_partials(cur, old, True))
    for sx, sp, ss in [(1, 0, 0), (0, 3, 0), (0, 0, 1), (5, 7, 3)]:
        xs, ps, scs = _shifted(x, sx), _shifted(prev, sp), _shifted(scale, ss)
        got = (emu.modulated_rel_l1_(xs, scs, shift, ps, "layer", True),
               emu.modulate(xs, scs, shift, "rms"), emu.rel_l1_partials(_shifted(cur, sx), _shifted(old, sp), True))
        for g, w, name in zip(got, want, ("indicator", "modulate", "rel_l1")):
            _assert_bits(g, w, f"{name} with offsets {(sx, sp, ss)}")
        _assert_bits(ps, aligned_prev, f"new prev with offsets {(sx, sp, ss)}")


def test_one_launch_per_reduction_and_the_ticket_is_reset(emu):
    """Up to 64 outputs the last block finishes the sums: one launch per reduction, a
    whole decision (indicator + decide) in two; the ticket word is 0 after every call
    (the next call reuses the workspace as is); more outputs take the finishing kernel
    and give the same bits per sample."""
    B, R, C, L = 3, 9, 1003, 9001
    x, prev = _rand((B, R, C), torch.bfloat16, 71, 2.0), _rand((B, R, C), torch.bfloat16, 72)
    scale, shift = _params(B, C, torch.bfloat16, 73, "bc"), _params(B, C, torch.bfloat16, 74, "bc")
    cur, old = _rand((B, L), torch.float16, 75), _rand((B, L), torch.float16, 76)
    for per_sample in (False, True):
        before = emu.counters()[0]
        p = emu.modulated_rel_l1_(x, scale, shift, prev.clone(), "layer", per_sample)
        q = emu.rel_l1_partials(cur, old, per_sample)
        assert emu.counters()[0] - before == 2, "one launch per reduction"
        _check_partials(q, cur, old, per_sample)
        assert torch.isfinite(p).all()
    before = emu.counters()[0]
    p = emu.modulated_rel_l1_(x, scale, shift, prev.clone(), "layer", True)
    emu.teacache_decide_(p, torch.zeros(B, 2), [1.0, 0.5, 0.0], 0.3, None, -1)
    assert emu.counters()[0] - before == 2, "indicator + decide"
    for fn, dims in (("tcf_rel_l1_workspace_size", (B, L, CODES[torch.float16])),
                     ("tcf_modulated_rel_l1_workspace_size", (B, R, C, CODES[torch.bfloat16]))):
        ws, n = emu._ws(fn, *dims)
        if fn.startswith("tcf_rel"):
            out = torch.full((B, 2), float("nan"))
            for _ in range(2):  # the same workspace twice: the ticket was reset
                emu.call("tcf_rel_l1_partials", cur.data_ptr(), old.data_ptr(), out.data_ptr(), B, L,
                         CODES[torch.float16], 1, ws.data_ptr(), n, None)
                assert ws[:1].view(torch.int32).item() == 0
                _assert_bits(out, q)
    # 70 samples: two launches, and each sample's bits are those of a fused call on it alone
    big_x, big_prev = _rand((70, 2, 257), torch.float32, 77), _rand((70, 2, 257), torch.float32, 78)
    before = emu.counters()[0]
    big = emu.modulated_rel_l1_(big_x, None, None, big_prev.clone(), "rms", True)
    assert emu.counters()[0] - before == 2
    for b in (0, 41, 69):
        one = emu.modulated_rel_l1_(big_x[b:b + 1].clone(), None, None, big_prev[b:b + 1].clone(), "rms", True)
        _assert_bits(one[0], big[b], f"sample {b}")


# --------------------------------------------------------------------------- the C API around the kernels

def test_device_check_and_argument_errors(emu):
    before = emu.counters()
    assert emu.lib.tcf_device_check() == SUCCESS, emu.lib.tcf_last_error()
    # no probe launch (a first op call inside a CUDA-graph capture must not launch or sync)
    assert emu.counters() == before, "tcf_device_check launched a kernel"
    st, msg = emu.status("tcf_modulate", None, None, 0, None, 0, None, 1, 1, 8, 0, 0, 1, EPS, None)
    assert st == INVALID and "x must not be NULL" in msg
    x = torch.zeros(4, dtype=torch.float16)
    st, msg = emu.status("tcf_residual_capture", x.data_ptr() + 1, x.data_ptr(), x.data_ptr(), 1, 1, 1, None)
    assert st == INVALID and "not aligned" in msg
    p = torch.zeros(2)
    st, msg = emu.status("tcf_rel_l1_partials", x.data_ptr(), x.data_ptr(), p.data_ptr(), 1, 4, 1, 0,
                         p.data_ptr(), 0, None)
    assert st == INVALID and "workspace holds 0 floats" in msg


@pytest.fixture(scope="session")
def selftest_lib():
    lib = ctypes.CDLL(str(_make("selftest")))
    lib.tcf_emu_selftest.argtypes = [_I, _V, ctypes.c_uint]
    lib.tcf_emu_selftest_message.restype = ctypes.c_char_p
    return lib


@pytest.mark.skipif(IN_ASAN_CHILD, reason="the emulator's own checks: the plain build covers them")
@pytest.mark.parametrize("which,threads,expect", [
    (0, 64, "32 of 64 threads exited without reaching the __syncthreads()"),
    (1, 128, "threads wait at different __syncthreads() calls"),
    (2, 40, "mask 0xffffffff, but warp 1 has only lanes 0x000000ff"),
    (3, 64, "deadlock: thread 0: exited; threads 1-31: wait at __shfl_xor_sync"),
    (5, 64, "dynamic shared memory"),
])
def test_emulator_reports_barrier_misuse_instead_of_hanging(selftest_lib, which, threads, expect):
    out = torch.zeros(5 * threads)
    code = selftest_lib.tcf_emu_selftest(which, out.data_ptr(), threads)
    assert code != 0
    assert expect in selftest_lib.tcf_emu_selftest_message(code).decode()


@pytest.mark.skipif(IN_ASAN_CHILD, reason="the emulator's own checks: the plain build covers them")
def test_emulator_shuffles_and_shared_memory(selftest_lib):
    n = 64
    out = torch.zeros(5 * n)
    assert selftest_lib.tcf_emu_selftest(4, out.data_ptr(), n) == 0
    t = torch.arange(n, dtype=torch.float32)
    lane, base = t % 32, t - t % 32
    want = torch.stack([
        base + (lane.long() ^ 1).float(),
        torch.where(lane < 31, t + 1, t),
        torch.where(lane > 0, t - 1, t),
        base,
        t.flip(0),
    ])
    assert torch.equal(out.view(5, n), want)


# --------------------------------------------------------------------------- AddressSanitizer

def _asan_runtime():
    out = subprocess.run([CXX, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return out if out and os.path.isabs(out) and os.path.exists(out) else None


@pytest.mark.skipif(IN_ASAN_CHILD, reason="this is the run under AddressSanitizer")
def test_everything_again_under_address_sanitizer(emu_lib):
    """Every test above, with the kernels built with -fsanitize=address,alignment."""
    runtime = _asan_runtime()
    if runtime is None:
        pytest.skip(f"{CXX} has no AddressSanitizer runtime (libasan.so)")
    if "asan" in _background:
        build, log = _background["asan"]
        if build.wait() != 0:
            pytest.fail(f"make -C csrc/emu asan failed:\n{log.read_text()[-12000:]}", pytrace=False)
    lib = _make("asan")  # nothing left to do after the background build
    env = dict(os.environ, TCF_EMU_ASAN_CHILD="1", TCF_EMU_LIB=str(lib), LD_PRELOAD=runtime,
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    # -v names each test before it runs; --capture=sys lets a sanitizer report (written to fd 2
    # by a process about to exit) reach us instead of pytest's capture file.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-x", "--capture=sys", "-p", "no:cacheprovider",
                           str(Path(__file__))], capture_output=True, text=True, env=env, cwd=ROOT)
    tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-12000:]).strip()
    assert proc.returncode == 0, f"under AddressSanitizer (rc {proc.returncode}):\n{tail}"
    assert " passed" in proc.stdout, tail
