"""The native CPU backend (backends/cpu.py, native/cpu_kernels.c) beyond the
shared op tests of test_ops.py (which run it against torch and float64 on every
dtype and odd shape): its dtype rounding is torch's bit for bit, its sums do
not depend on the thread count, and without a compiler CPU tensors fall back
to the torch backend with the reason given."""
import math
import struct

import pytest
import torch

from teacache_fast import ops
from teacache_fast.backends import backend_for, cpu, torch as reference
from teacache_fast.backends.native import build

pytestmark = pytest.mark.skipif(build.library()[0] is None,
                                reason=f"native CPU kernels unavailable: {build.library()[1]}")


def _edge_values(dtype) -> torch.Tensor:
    """fp32 values around every rounding edge of ``dtype``: ties, subnormals,
    the overflow threshold, signed zeros, inf, NaN."""
    info = torch.finfo(dtype)
    base = torch.tensor([0.0, -0.0, 1.0, -1.0, info.max, -info.max, info.tiny, info.tiny / 3,
                         info.smallest_normal * 0.5, float("inf"), float("-inf"), float("nan"),
                         info.max * 1.0001, info.max * 1.5, 65520.0, 65519.0, 2.0 ** -25,
                         2.0 ** -24, 3 * 2.0 ** -25, 1e-30])
    g = torch.Generator().manual_seed(0)
    # random bit patterns cover every exponent; ties come from halfway mantissas
    bits = torch.randint(-2**31, 2**31 - 1, (4000,), generator=g, dtype=torch.int64).to(torch.int32)
    randoms = bits.view(torch.float32)
    one = torch.tensor(1.0, dtype=dtype).float()
    ties = (one + torch.arange(1, 200).float() * torch.finfo(dtype).eps * 0.5)
    return torch.cat([base, randoms, ties, -ties])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounding_to_16_bit_is_torchs(dtype):
    # norm none, scale 0: m = x * 1 exactly in fp32, so the stored prev is the
    # fp32 value rounded to dtype by the kernel, compared with torch's .to(dtype)
    v = _edge_values(dtype)
    C = v.numel()
    x32 = v.view(1, 1, C)
    scale = torch.zeros(1, C, dtype=torch.float32)
    # x must be of prev's dtype for the op; pass the fp32 values through shift
    # instead: m = 0 * (1 + 0) + shift = shift (one fp32 add of 0)
    x = torch.zeros(1, 1, C, dtype=dtype)
    prev = torch.zeros(1, 1, C, dtype=dtype)
    cpu.modulated_rel_l1_(x, scale, x32.view(1, C), prev, "none", 1e-6, False)
    want = (torch.zeros_like(x32) + x32).to(dtype)   # the fp32 m (0 + -0 is +0), rounded by torch
    same = (prev.view(torch.int16) == want.view(torch.int16)) | (prev.isnan() & want.isnan())
    assert bool(same.all()), v[~same.view(-1)][:8]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reading_16_bit_is_exact(dtype):
    # modulate with norm none and no params returns x converted to fp32 and back:
    # every 16-bit pattern (NaNs aside) survives the round trip
    patterns = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = patterns.view(1, 1, -1)
    out = cpu.modulate(x, None, None, "none", 1e-6)
    same = (out.view(torch.int16) == x.view(torch.int16)) | (out.isnan() & x.isnan())
    assert bool(same.all())


def test_bits_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 300, 257, generator=g)          # above the one-thread size
    scale, shift = torch.randn(3, 257, generator=g), torch.randn(1, 257, generator=g)
    prev0 = torch.randn(3, 300, 257, generator=g)
    cur, other = torch.randn(2, 70001, generator=g), torch.randn(2, 70001, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            prev = prev0.clone()
            results.append((cpu.modulated_rel_l1_(x, scale, shift, prev, "layer", 1e-6, True), prev,
                            cpu.modulate(x, scale, shift, "rms", 1e-6),
                            cpu.rel_l1_partials(cur, other, True)))
    finally:
        torch.set_num_threads(threads)
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            assert torch.equal(a, b)


def _f32(a: float) -> float:
    return struct.unpack("f", struct.pack("f", a))[0]


def _lane_sums(terms: torch.Tensor) -> torch.Tensor:
    """The kernels' documented order, written out: 16 fp32 lanes per row (lane j adds
    elements j, j + 16, ... one at a time), then the lanes added in double, lane 0 first."""
    rows, n = terms.shape
    acc = torch.zeros(rows, 16, dtype=torch.float32)
    for c in range(0, n, 16):
        k = min(16, n - c)
        acc[:, :k] = acc[:, :k] + terms[:, c:c + k]
    total = torch.zeros(rows, dtype=torch.float64)
    for j in range(16):
        total = total + acc[:, j].double()
    return total


# A row start whose double lane sum lands on an fp32 tie only in lane order 0, 1, ..., 15:
# 2^-24 + 1 is exact, then each 2^-53 is lost (ties to even), 1 + 2^-24 rounds to 1.0f;
# added in any other order (reversed, pairwise, bf16 evens then odds) some 2^-53 meet
# before the 1 and the sum rounds up to 1 + 2^-23
_TIE = torch.tensor([2.0 ** -24, 1.0] + [2.0 ** -53] * 14)


def _indicator_in_order(x, scale, shift, prev, eps):
    """modulated_rel_l1_ (layer norm, per sample) and the new prev, op by op in fp32."""
    B, R, C = x.shape
    v = x.float().reshape(B * R, C)
    mu = (_lane_sums(v) / C).float()[:, None]
    var = (_lane_sums((v - mu) * (v - mu)) / C).float()
    # 1 / sqrt(var + eps), each op correctly rounded to fp32 (done in double, which
    # rounds the same for +, / and sqrt; torch's vector sqrt is not always exact)
    r = torch.tensor([_f32(1.0 / _f32(math.sqrt(_f32(w + _f32(eps))))) for w in var.tolist()])[:, None]
    s1p = (1.0 + scale.float()).repeat_interleave(R, 0)
    m = ((v - mu) * r) * s1p + shift.float().repeat_interleave(R, 0)
    stored = m.to(x.dtype)
    q = prev.float().reshape(B * R, C)
    d, p = _lane_sums((stored.float() - q).abs()), _lane_sums(q.abs())
    per_sample = torch.stack([d.view(B, R), p.view(B, R)], -1)
    sums = torch.zeros(B, 2, dtype=torch.float64)
    for row in range(R):                      # rows added in double in row order
        sums = sums + per_sample[:, row]
    return sums.float(), stored.view(B, R, C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [3072, 1000])
def test_bits_are_the_documented_summation_order(dtype, C):
    # values over many binades, so any other order of the fp32 lane sums (pairwise,
    # other lane count, lanes in another order, fp32 row sums) changes the low bits
    g = torch.Generator().manual_seed(5)
    B, R = 2, 40
    wide = lambda *shape: torch.randn(*shape, generator=g) * torch.exp(2 * torch.randn(*shape, generator=g))
    x = (wide(B, R, C) + 3).to(dtype)
    scale, shift = (0.1 * torch.randn(B, C, generator=g)).to(dtype), wide(B, C).clamp(-100, 100).to(dtype)
    prev0 = wide(B, R, C).clamp(-1000, 1000).to(dtype)
    want, want_prev = _indicator_in_order(x, scale, shift, prev0, 1e-6)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            prev = prev0.clone()
            got = cpu.modulated_rel_l1_(x, scale, shift, prev, "layer", 1e-6, True)
            assert torch.equal(got, want), (n, got, want)
            assert torch.equal(prev, want_prev)
            assert torch.equal(cpu.modulate(x, scale, shift, "layer", 1e-6), want_prev)
    finally:
        torch.set_num_threads(threads)


def test_rel_l1_partials_bits_are_the_documented_order():
    # chunks of 4096 elements: 16 fp32 lanes each, combined in double, chunks added in order
    g = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cur = (torch.randn(2, 9000, generator=g) * torch.exp(2 * torch.randn(2, 9000, generator=g))).to(dtype)
        prev = (torch.randn(2, 9000, generator=g) * 10).to(dtype)
        want = torch.zeros(2, 2, dtype=torch.float64)
        for start in range(0, 9000, 4096):
            c, q = cur[:, start:start + 4096].float(), prev[:, start:start + 4096].float()
            want = want + torch.stack([_lane_sums((c - q).abs()), _lane_sums(q.abs())], -1)
        assert torch.equal(cpu.rel_l1_partials(cur, prev, True), want.float()), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])   # (2^-53 is 0 in fp16)
def test_lanes_are_added_in_element_order(dtype):
    # the random rows above rarely reach a tie; these rows sit on one in every sum
    tie = _TIE.to(dtype)
    zeros = torch.zeros(1, 1, 16, dtype=dtype)
    assert cpu.rel_l1_partials(zeros.view(1, 16), tie.view(1, 16), False).tolist() == [1.0, 1.0]
    prev = tie.view(1, 1, 16).clone()
    assert cpu.modulated_rel_l1_(zeros, None, None, prev, "none", 1e-6, False).tolist() == [1.0, 1.0]
    # the row mean: 16 x the tie row sums to 16 (1 + 2^-24), its mean rounds to 1.0f
    x = (16 * tie).view(1, 1, 16)
    prev = torch.zeros_like(x)
    _, want = _indicator_in_order(x, torch.zeros(1, 16), torch.zeros(1, 16), prev, 1e-6)
    assert torch.equal(cpu.modulate(x, None, None, "layer", 1e-6), want)


def test_agrees_with_the_torch_backend_on_a_flux_sized_row():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(1, 64, 3072, generator=g) * 3 + 5).to(torch.bfloat16)
    scale = torch.randn(1, 3072, generator=g, dtype=torch.float32) * 0.1
    shift = torch.randn(1, 3072, generator=g).to(torch.bfloat16)
    p_native, p_torch = torch.randn(1, 64, 3072, generator=g).to(torch.bfloat16), None
    p_torch = p_native.clone()
    a = cpu.modulated_rel_l1_(x, scale, shift, p_native, "layer", 1e-6, False)
    b = reference.modulated_rel_l1_(x, scale, shift, p_torch, "layer", 1e-6, False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    # the stored indicators differ at most by one bf16 ulp where m sat on a rounding edge
    differ = (p_native != p_torch).float().mean().item()
    assert differ < 0.01
    torch.testing.assert_close(p_native.float(), p_torch.float(), rtol=2 ** -7, atol=2 ** -7)


def test_without_a_compiler_cpu_tensors_take_the_torch_backend(monkeypatch, tmp_path):
    monkeypatch.setenv("TEACACHE_FAST_HOME", str(tmp_path))   # nothing cached there
    monkeypatch.setattr(build, "_compiler", lambda: None)
    build.library.cache_clear()
    try:
        assert "no C compiler" in ops.unavailable_reason("cpu", "cpu")
        assert backend_for(torch.zeros(1)) == "torch"
        out = ops.modulated_rel_l1_(torch.randn(1, 2, 8), None, None, torch.zeros(1, 2, 8))
        assert out.shape == (2,)
        with ops.use_backend("cpu"), pytest.raises(ops.BackendUnavailableError, match="no C compiler"):
            ops.modulate(torch.randn(1, 2, 8), None, None)
    finally:
        build.library.cache_clear()


def test_a_failing_compile_is_reported_and_nothing_half_written_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("TEACACHE_FAST_HOME", str(tmp_path))
    monkeypatch.setattr(build, "_compile", lambda cc, out, openmp: (False, "error: boom"))
    build.library.cache_clear()
    try:
        assert "compiling cpu_kernels.c failed: error: boom" in build.library()[1]
        assert not list((tmp_path / "native").glob("*.so"))
    finally:
        build.library.cache_clear()


def test_the_library_is_built_once_into_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TEACACHE_FAST_HOME", str(tmp_path))
    build.library.cache_clear()
    try:
        lib, reason = build.library()
        assert reason is None and lib is not None
        built = list((tmp_path / "native").glob("tcf_cpu_*.so"))
        assert len(built) == 1
        mtime = built[0].stat().st_mtime_ns
        build.library.cache_clear()
        assert build.library()[0] is not None          # a new process reuses the file
        assert built[0].stat().st_mtime_ns == mtime
    finally:
        build.library.cache_clear()


@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "serial"])
def test_the_source_compiles_warning_free(tmp_path, openmp):
    # the runtime build takes any warning; CI holds the source to -Wall -Wextra -Werror
    import subprocess
    cc = build._compiler()
    cmd = [cc, *build.FLAGS, "-Wall", "-Wextra", "-Werror", *(["-fopenmp"] if openmp else []),
           str(build.SOURCE), "-o", str(tmp_path / "k.so"), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- decide

def _decide_inputs(S, seed):
    g = torch.Generator().manual_seed(seed)
    num = torch.rand(S, generator=g) * 0.3
    den = torch.rand(S, generator=g) + 0.5
    partials = torch.stack([num, den], dim=1)
    state = torch.stack([torch.rand(S, generator=g) * 0.4, torch.randint(0, 4, (S,), generator=g).float()], 1)
    # the edge cases every backend must agree on: a zero and a NaN denominator,
    # an inf numerator, a corrupt (NaN, negative) skip counter
    if S >= 6:
        partials[0, 1] = 0.0
        partials[1, 1] = float("nan")
        partials[2, 0] = float("inf")
        state[3, 1] = float("nan")
        state[4, 1] = -1.0
    return partials, state


@pytest.mark.parametrize("S", [1, 7, 300])
@pytest.mark.parametrize("threshold", [0.0, 0.15, 0.3])
@pytest.mark.parametrize("max_skips", [-1, 0, 2])
@pytest.mark.parametrize("accumulate_abs", [False, True])
@pytest.mark.parametrize("force_kind", ["no", "all", "mask"])
def test_native_decide_matches_the_torch_backend_bitwise(S, threshold, max_skips, accumulate_abs, force_kind):
    coefficients = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]
    partials, state = _decide_inputs(S, seed=S)
    if force_kind == "mask":
        force = torch.arange(S) % 3 == 0
    else:
        force = force_kind == "all"
    s_ref, s_cpu = state.clone(), state.clone()
    for step in range(4):   # the state carries over: accumulation, skip counting, resets
        want = reference.teacache_decide_(partials, s_ref, coefficients, threshold, force, max_skips,
                                              accumulate_abs)
        got = cpu.teacache_decide_(partials, s_cpu, coefficients, threshold, force, max_skips,
                                   accumulate_abs)
        assert torch.equal(got, want), step
        assert torch.equal(s_cpu.view(torch.int32), s_ref.view(torch.int32)), step   # bits, NaN-safe
        partials = partials * 1.1


def test_native_decide_is_one_kernel_call_through_the_op():
    partials, state = _decide_inputs(4, seed=0)
    with ops.use_backend("cpu"):
        flags = ops.teacache_decide_(partials, state, [1.0, 0.0], 0.5)
    assert flags.dtype == torch.bool and flags.shape == (4,)
    from teacache_fast.cli.launches import count_launches
    with ops.use_backend("cpu"):
        assert count_launches(lambda: ops.teacache_decide_(partials, state, [1.0, 0.0], 0.5), "cpu") == 1


# --------------------------------------------------------------------------- streamed residual ops

_BIG = {torch.float32: (cpu._STREAM_MIN_BYTES // 4) + 37, torch.bfloat16: (cpu._STREAM_MIN_BYTES // 2) + 37,
        torch.float16: (cpu._STREAM_MIN_BYTES // 2) + 37}


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor):
    ints = {4: torch.int32, 2: torch.int16}[got.element_size()]
    same = (got.view(ints) == want.view(ints)) | (got.isnan() & want.isnan())
    assert bool(same.all()), (got[~same][:4], want[~same][:4])


@pytest.mark.parametrize("dtype,res_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                             (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=str)
@pytest.mark.parametrize("offset", [0, 1, 3], ids=lambda o: f"off{o}")
def test_streamed_residual_ops_are_torchs_bits(dtype, res_dtype, offset):
    # Above _STREAM_MIN_BYTES the out-of-place residual ops write with streaming
    # stores (an aligned body, scalar head and tail): the torch backend's bits,
    # with destinations that start 0, 1 or 3 elements past 16-byte alignment,
    # a ragged length, and rounding edges in the data.
    n = _BIG[res_dtype] if res_dtype.itemsize <= dtype.itemsize else _BIG[dtype]
    g = torch.Generator().manual_seed(5)
    out = (torch.randn(n, generator=g) * 3).to(dtype)
    inp = (torch.randn(n, generator=g)).to(dtype)
    edges = _edge_values(torch.bfloat16)[:1000].to(dtype)
    out[:1000] = edges
    res = torch.empty(n + offset, dtype=res_dtype)[offset:]
    want = torch.empty(n, dtype=res_dtype)
    cpu.residual_capture_(out, inp, res)
    reference.residual_capture_(out, inp, want)
    _assert_same_bits(res, want)
    dst = torch.empty(n + offset, dtype=dtype)[offset:]
    want_out = torch.empty(n, dtype=dtype)
    cpu.residual_apply_(out.view(1, -1), res.view(1, -1), None, out=dst.view(1, -1))
    reference.residual_apply_(out.view(1, -1), res.view(1, -1), None, out=want_out.view(1, -1))
    _assert_same_bits(dst, want_out)


def test_streamed_residual_is_one_native_call_and_small_ones_are_torch(monkeypatch):
    calls = []
    real = cpu._run
    monkeypatch.setattr(cpu, "_run", lambda op, kernel, *a: calls.append(kernel) or real(op, kernel, *a))
    small = torch.randn(1000)
    cpu.residual_capture_(small, small, torch.empty(1000))
    assert calls == []
    big = torch.randn(_BIG[torch.float32])
    cpu.residual_capture_(big, big * 2, torch.empty_like(big))
    cpu.residual_apply_(big.view(1, -1), big.view(1, -1), None)  # fp32 in place: torch's add_
    assert calls == ["tcf_cpu_residual"]
    hidden = torch.randn(_BIG[torch.bfloat16]).bfloat16()
    res = torch.randn(hidden.numel()).bfloat16()
    want = hidden + res
    cpu.residual_apply_(hidden.view(1, -1), res.view(1, -1), None)  # bf16 in place: native blocks
    assert calls == ["tcf_cpu_residual"] * 2
    _assert_same_bits(hidden, want)
