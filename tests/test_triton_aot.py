"""Every Triton kernel compiles for a real GPU (sm_90), and the hot one vectorizes.

The other Triton tests run the kernels under the interpreter, which never
invokes the GPU compiler; this one compiles them ahead of time (no GPU needed)
through tools/triton_aot_check.py, in a subprocess without TRITON_INTERPRET.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "triton_aot_check.py"
# A 128-bit global load: ld.global[.nc...].v4.b32 / .v2.b64 (Triton emits b32 words).
VECTOR_LOAD = re.compile(r"\bld\.global(?:\.[a-z0-9_:]+)*\.(?:v4\.[bfu]32|v2\.[bfu]64)\b")


def _ptxas_available() -> bool:
    try:
        import triton
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means no CUDA backend
        return False
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return bundled.exists() or shutil.which("ptxas") is not None


pytestmark = pytest.mark.skipif(not _ptxas_available(),
                                reason="triton's CUDA backend or ptxas is not installed")


@pytest.fixture(scope="module")
def aot_run(tmp_path_factory):
    ptx_dir = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # really compile
    proc = subprocess.run([sys.executable, str(TOOL), "--quick", "--ptx-dir", str(ptx_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, ptx_dir


def test_every_kernel_compiles_for_sm90(aot_run):
    proc, _ = aot_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "FAIL" not in proc.stdout
    compiled = {m for m in re.findall(r"^ok\s+(\w+)\s+sm_90", proc.stdout, re.M)}
    assert compiled == {"_modulate_kernel", "_modulated_rel_l1_kernel", "_sum_partials_kernel",
                        "_rel_l1_partials_kernel", "_residual_capture_kernel",
                        "_residual_apply_kernel", "_span_end_kernel", "_decide_kernel"}, proc.stdout


def _ptx_for(ptx_dir: Path, kernel: str, *labels: str) -> str:
    for path in sorted(ptx_dir.glob(f"{kernel}_sm90_*.ptx")):
        text = path.read_text()
        combos = re.findall(r"^// combo: (.*)$", text, re.M)
        if any(all(label in combo.split() for label in labels) for combo in combos):
            return text
    raise AssertionError(f"no PTX of {kernel} for {labels} in {ptx_dir}")


def test_modulated_rel_l1_bf16_uses_128_bit_loads(aot_run):
    proc, ptx_dir = aot_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ptx = _ptx_for(ptx_dir, "_modulated_rel_l1_kernel", "x=bf16", "C=3072")
    assert VECTOR_LOAD.search(ptx), "bf16 rows of 3072 channels are read without 128-bit loads"


# Rounding that differs from torch's: a fused multiply-add, an approximate
# reciprocal square root or division (div.full / div.approx / rcp.approx).
INEXACT = re.compile(r"\b(?:fma\.rn\.f32|rsqrt\.approx|div\.(?:full|approx)\.f32|rcp\.approx|sqrt\.approx)\b")


@pytest.mark.parametrize("kernel", ["_modulate_kernel", "_modulated_rel_l1_kernel"])
def test_modulate_kernels_round_like_torch(aot_run, kernel):
    # The launch turns fp fusion off and the kernels use div_rn / sqrt_rn, so
    # every fp32 op rounds once, as in the torch backend (under the
    # interpreter the same is checked bitwise, tests/test_triton_kernels.py).
    proc, ptx_dir = aot_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    paths = sorted(ptx_dir.glob(f"{kernel}_sm90_*.ptx"))
    assert paths
    normed = 0
    for path in paths:
        ptx = path.read_text()
        assert not INEXACT.findall(ptx), (path.name, sorted(set(INEXACT.findall(ptx))))
        if "norm=none" not in ptx.split("\n", 1)[0]:
            assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx, path.name
            normed += 1
    assert normed >= 3


def test_modulated_rel_l1_loads_x_once_per_row(aot_run):
    # The row in registers (C=3072 bf16: tiles of 2048 + 1024 lanes): x and prev
    # each loaded by exactly two instructions per row loop iteration (one per
    # tile), where the blocked path had three passes over x.
    proc, ptx_dir = aot_run
    ptx = _ptx_for(ptx_dir, "_modulated_rel_l1_kernel", "x=bf16", "C=3072")
    assert "SINGLE=True" in proc.stdout
    loop = ptx.split("Loop Header", 1)[1].split("%._crit_edge", 1)[0]
    loads = re.findall(r"ld\.global\S*", loop)
    assert len(loads) == 4, loads   # x a, prev a, x b, prev b


ATOMIC = re.compile(r"@(%p\d+) atom\.global\.gpu\.acq_rel\.add\.u32")
STORE = re.compile(r"@(%p\d+) st\.global\.b32")


@pytest.mark.parametrize("kernel,labels", [("_rel_l1_partials_kernel", ("x=bf16", "C=3072", "per_sample=0")),
                                           ("_modulated_rel_l1_kernel", ("x=bf16", "C=3072"))])
def test_fused_finish_publishes_the_pair_before_the_ticket(aot_run, kernel, labels):
    # One launch per reduction rests on memory order: the thread that stores a
    # program's pair takes the ticket (one acq_rel atomic at gpu scope, under the
    # same predicate, after both stores), so the last program's loads see every
    # pair; the ticket's reset is a store by that thread after the sums.
    proc, ptx_dir = aot_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ptx = _ptx_for(ptx_dir, kernel, *labels)
    atomics = ATOMIC.findall(ptx)
    assert len(atomics) == 1, atomics
    before, after = ptx.split(ATOMIC.search(ptx).group(0), 1)
    pair = STORE.findall(before)[-2:]
    assert pair == [atomics[0]] * 2, pair          # the pair, by the atomic's thread
    assert "bar.sync" in after.split("ld.global", 1)[0]  # the result broadcast before any finish load
    assert re.search(r"ld\.global\.cg", after)     # the pairs read from L2
    assert STORE.findall(after)[-1] == atomics[0]  # the ticket reset
