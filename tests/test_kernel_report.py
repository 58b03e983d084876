"""The compiled kernels keep the promises of DESIGN.md, checked on the machine code.

tools/kernel_report.py compiles csrc/ for sm_90 (nvcc -Xptxas -v, cuobjdump
-sass) and AOT-compiles the Triton kernels at the benchmark shapes, once per
session (module fixture, in a subprocess without TRITON_INTERPRET). The tests
read its JSON facts:

- no register spills and no local memory in any hot loop;
- 128-bit global accesses in the hot loops of aligned rows;
- the resident blocks per SM the grid is sized for fit at the compiled
  register counts;
- each input is read once per row, and all loads of a row are issued before
  its first barrier;
- the indicator holds its row in registers at the benchmark shapes (Triton and
  CUDA), with exactly the resident blocks per SM its grid assumes;
- benchmarks/results/kernels-sm90.md is what a fresh run writes (facts table).

Known shortfalls are not waved through: KNOWN_SHORTFALLS holds each one with
its measured value. A kernel listed there must be no worse than that value
AND still fall short; when a fix lands, the test fails until the entry is
removed (so the table always says what is true today).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "kernel_report.py"
REPORT = ROOT / "benchmarks" / "results" / "kernels-sm90.md"


def _missing() -> str | None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import kernel_report
    finally:
        sys.path.pop(0)
    if kernel_report._nvcc() is None:
        return "nvcc is not installed"
    try:
        import triton
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means no CUDA backend
        return "triton's CUDA backend is not installed"
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not ((bin_dir / "cuobjdump").exists() or shutil.which("cuobjdump")):
        return "cuobjdump is not installed"
    if not ((bin_dir / "ptxas").exists() or shutil.which("ptxas")):
        return "ptxas is not installed"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


# ------------------------------------------------------------------ known shortfalls
# (backend, kernel, dtype or None for every variant) -> {property: measured value}.
# Properties: "blocks" (resident blocks/SM, grid assumes more), "stack" (bytes),
# "local_in_loop" (True), "x_passes" (reads of x per row), "loads_before_barrier" (False).
KNOWN_SHORTFALLS = {}
# By design (csrc/modulate.cu): rows wider than the register budget (more than kMaxRowPacks
# packs per thread: C > 8192 for 16-bit x, C > 4096 for fp32) take the looped
# modulate_rows_kernel, which with LayerNorm reads x three times (mean, variance, output;
# the 2nd and 3rd from L1/L2) with the statistics' barriers between them. Every benchmark
# shape takes modulate_regs_kernel (test_cuda_row_kernel_holds_the_row_in_registers).
for _kernel in ("modulate_rows_kernel<%s>" % v for v in (
        "BF16,BF16,false,8", "BF16,BF16,true,8", "BF16,F32,false,8", "BF16,F32,true,8", "F16,F16,false,8",
        "F16,F16,true,8", "F16,F32,false,8", "F16,F32,true,8", "F32,F32,false,8", "F32,F32,true,6")):
    KNOWN_SHORTFALLS.setdefault(("cuda", _kernel, None), {}).update(x_passes=3, loads_before_barrier=False)

# Kernels whose work is a row / an elementwise range (the bandwidth-bound ones).
ROW_KERNELS = re.compile(r"^(modulate_rows_kernel|modulate_regs_kernel|rel_l1_kernel|capture_kernel|apply_kernel|span_end_kernel|"
                         r"_modulate_kernel|_modulated_rel_l1_kernel|_rel_l1_partials_kernel|"
                         r"_residual_capture_kernel|_residual_apply_kernel|_span_end_kernel)\b")
# The input that holds the row (read once per row is the promise for every input).
MAIN_INPUT = {"modulate_rows_kernel": "x", "modulate_regs_kernel": "x", "_modulate_kernel": "x_ptr", "_modulated_rel_l1_kernel": "x_ptr"}
# Inputs each row kernel must be seen to load (proves the attribution found them).
EXPECTED_INPUTS = {
    "modulate_rows_kernel": {"x", "scale", "shift"}, "modulate_regs_kernel": {"x", "scale", "shift"},
    "rel_l1_kernel": {"cur", "prev"},
    "capture_kernel": {"out", "inp"}, "apply_kernel": {"hidden", "residual"},
    "span_end_kernel": {"out", "inp", "residual"},
    "_modulate_kernel": {"x_ptr", "scale_ptr", "shift_ptr"},
    "_modulated_rel_l1_kernel": {"x_ptr", "scale_ptr", "shift_ptr", "prev_ptr"},
    "_rel_l1_partials_kernel": {"cur_ptr", "prev_ptr"},
    "_residual_capture_kernel": {"out_ptr", "inp_ptr"},
    "_residual_apply_kernel": {"hidden_ptr", "res_ptr"},
    "_span_end_kernel": {"out_ptr", "inp_ptr", "res_ptr"},
}
# Per-sample scalars read once per row loop iteration, not row data.
NOT_ROW_DATA = {"mask", "compute", "compute_ptr"}  # compute: the span end's device flag, one byte
SIZES = {"F32": 4, "F16": 2, "BF16": 2}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel_report")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "triton_cache")  # really compile
    start = time.time()
    proc = subprocess.run([sys.executable, str(TOOL), "--out", str(out), "--json", str(out / "facts.json"),
                           "--jobs", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    facts = json.loads((out / "facts.json").read_text())
    facts["wall_s"] = time.time() - start
    print(f"\nkernel_report: {facts['wall_s']:.1f} s", file=sys.stderr)
    return facts, (out / "kernels-sm90.md").read_text()


def _known(k: dict) -> dict:
    dtype = k.get("extra", {}).get("dtype")
    return {**KNOWN_SHORTFALLS.get((k["backend"], k["name"], None), {}),
            **KNOWN_SHORTFALLS.get((k["backend"], k["name"], dtype), {})}


def _base(k: dict) -> str:
    return k["name"].split("<")[0]


def _check(problems: list, k: dict, prop: str, measured, ok: bool, no_worse):
    """ok: the promise holds. no_worse(known): measured is no worse than the table."""
    known = _known(k)
    label = f"{k['backend']} {k['name']} ({k['case']})"
    if prop in known:
        if ok:
            problems.append(f"{label}: {prop} = {measured!r} now meets the design; "
                            "remove it from KNOWN_SHORTFALLS")
        elif not no_worse(known[prop]):
            problems.append(f"{label}: {prop} = {measured!r}, worse than the known {known[prop]!r}")
    elif not ok:
        problems.append(f"{label}: {prop} = {measured!r} breaks the design")


def test_every_kernel_is_reported(report):
    facts, _ = report
    names = {(k["backend"], _base(k)) for k in facts["kernels"]}
    assert names == {("cuda", n) for n in ("modulate_rows_kernel", "modulate_regs_kernel", "rel_l1_kernel",
                                          "finish_partials_kernel", "capture_kernel", "apply_kernel",
                                          "span_end_kernel", "decide_kernel")} | \
        {("triton", n) for n in ("_modulate_kernel", "_modulated_rel_l1_kernel", "_sum_partials_kernel",
                                 "_rel_l1_partials_kernel", "_residual_capture_kernel",
                                 "_residual_apply_kernel", "_span_end_kernel", "_decide_kernel")}
    cuda = [k for k in facts["kernels"] if k["backend"] == "cuda"]
    # every template instance; the register row kernel: 2 indicator x 2 packs x 3 norms x
    # (scale, shift, both, neither: 4 for the 3 x dtypes, 3 for the 2 fp32-param pairs)
    assert len(cuda) == 10 + 2 * 2 * 3 * (3 * 4 + 2 * 3) + 3 + 1 + 9 + 9 + 9 + 1
    for key in KNOWN_SHORTFALLS:  # the table names real kernels
        assert any((k["backend"], k["name"]) == key[:2] and key[2] in (None, k.get("extra", {}).get("dtype"))
                   for k in facts["kernels"]), key


def test_no_spills_and_no_local_memory_in_hot_loops(report):
    facts, _ = report
    problems = []
    for k in facts["kernels"]:
        if k["spill_st"] or k["spill_ld"] or k["local"]:
            problems.append(f"{k['name']}: spills {k['spill_st']}/{k['spill_ld']} B, local {k['local']} B")
        _check(problems, k, "stack", k["stack"], k["stack"] == 0, lambda known: k["stack"] <= known)
        _check(problems, k, "local_in_loop", k["local_in_loop"], not k["local_in_loop"],
               lambda known: True)
        if k["backend"] == "triton":
            assert k["extra"]["sass_local"] == 0, k["name"]
    assert not problems, "\n".join(problems)


def _expected_bits(k: dict, param: str) -> int:
    """Widest access of `param` on an aligned row: 128 bits, or one pack of VEC
    elements of a narrower second dtype (CUDA: VEC = 16 bytes of the main dtype)."""
    m = re.fullmatch(r"(\w+)<(\w+)(?:,(\w+))?(?:,\w+)*>", k["name"])
    if k["backend"] == "triton" or not m or m.group(3) is None:
        return 128
    kernel, main, other = m.groups()
    vec = 16 // SIZES[main]
    second = {"capture_kernel": {"residual"}, "apply_kernel": {"residual"}, "span_end_kernel": {"residual"},
              "modulate_rows_kernel": {"scale", "shift"}, "modulate_regs_kernel": {"scale", "shift"}}[kernel]
    return min(128, vec * SIZES[other] * 8) if param in second else 128


def _regs_args(name: str) -> dict | None:
    """The template arguments of a modulate_regs_kernel instance, by name."""
    m = re.fullmatch(r"modulate_regs_kernel<(\w+),(\w+),(true|false),(\d+),(\d),(true|false),(true|false),(\d+)>",
                     name)
    if not m:
        return None
    x, p, ind, packs, norm, scale, shift, blocks = m.groups()
    return dict(x=x, params=p, indicator=ind == "true", packs=int(packs), norm=int(norm),
                scale=scale == "true", shift=shift == "true", blocks=int(blocks))


def _expected_inputs(k: dict) -> set:
    """EXPECTED_INPUTS, less the parameters a specialized register row kernel does not read."""
    want = set(EXPECTED_INPUTS[_base(k)])
    args = _regs_args(k["name"]) if k["backend"] == "cuda" else None
    if args is not None:
        want -= {p for p in ("scale", "shift") if not args[p]}
    return want


def test_128_bit_accesses_in_hot_loops(report):
    facts, _ = report
    problems = []
    for k in facts["kernels"]:
        if not ROW_KERNELS.match(k["name"]):
            continue
        inputs = set(k["passes"]) - NOT_ROW_DATA
        missing = _expected_inputs(k) - inputs
        if missing:
            problems.append(f"{k['name']} ({k['case']}): no attributed loads of {sorted(missing)}")
        for p in inputs:
            want = _expected_bits(k, p)
            if k["widest_ld"][p] != want:
                problems.append(f"{k['name']} ({k['case']}): widest load of {p} is {k['widest_ld'][p]} bits, "
                                f"want {want}")
        if any(b >= 128 for b in k["unattributed_bits"]):
            problems.append(f"{k['name']} ({k['case']}): {k['unattributed']} accesses not attributed, "
                            f"widths {k['unattributed_bits']}")
        if k["backend"] == "triton" and k["extra"]["sass_ldg128"] == 0:  # ptxas kept the vectors
            problems.append(f"{k['name']} ({k['case']}): no LDG.E.128 in the SASS")
        if k["hot_loops"] == 0 or max(k["hot_ld_bits"]) != 128:
            problems.append(f"{k['name']}: hot loops {k['hot_loops']}, load bits {k['hot_ld_bits']}")
        if k["hot_st_bits"]:  # the row kernels that write: one pack per store
            out = "residual" if _base(k) == "capture_kernel" else None
            want = _expected_bits(k, out) if out else 128
            if max(k["hot_st_bits"]) != want:
                problems.append(f"{k['name']}: widest hot-loop store {max(k['hot_st_bits'])} bits, want {want}")
    assert not problems, "\n".join(problems)


def test_resident_blocks_match_the_grid(report):
    facts, _ = report
    problems = []
    checked = 0
    for k in facts["kernels"]:
        if k["assumed"] is None:
            continue
        checked += 1
        _check(problems, k, "blocks", k["blocks"], k["blocks"] >= k["assumed"],
               lambda known: k["blocks"] >= known)
        if k["backend"] == "cuda" and _base(k) in MAIN_INPUT and k["blocks"] > k["assumed"]:
            # the row kernels' BLOCKS is per variant: one that fits more must say so
            problems.append(f"{k['name']}: {k['blocks']} blocks fit, the grid assumes {k['assumed']}")
    assert checked >= 30
    assert not problems, "\n".join(problems)


def test_each_input_read_once_per_row(report):
    facts, _ = report
    problems = []
    for k in facts["kernels"]:
        if not ROW_KERNELS.match(k["name"]):
            continue
        main = MAIN_INPUT.get(_base(k))
        for p, n in k["passes"].items():
            if p == main:
                _check(problems, k, "x_passes", n, n == 1, lambda known: n <= known)
            elif n != 1:
                problems.append(f"{k['name']} ({k['case']}): {p} read {n} times per row")
    assert not problems, "\n".join(problems)


def test_all_loads_of_a_row_before_its_first_barrier(report):
    facts, _ = report
    problems = []
    for k in facts["kernels"]:
        if not ROW_KERNELS.match(k["name"]):
            continue
        before = k["loads_before_barrier"]
        _check(problems, k, "loads_before_barrier", before, before in (True, None),
               lambda known: True)
    assert not problems, "\n".join(problems)


def test_triton_row_kernels_hold_the_row_in_registers(report):
    # FLUX C=3072 (bf16, fp32, bf16 with fp32 params) and Wan C=5120 bf16: the
    # row-in-registers path, its tiles covering exactly C lanes (none masked),
    # and x loaded once per element: the loads of x in the row loop, times the
    # threads, are C elements. With every load before the first barrier, no
    # spills and the resident programs the grid assumes (the tests above).
    facts, _ = report
    seen = set()
    for k in facts["kernels"]:
        if k["backend"] != "triton" or k["name"] not in MAIN_INPUT:
            continue
        extra = k["extra"]
        assert extra["single_tile"] and len(extra["widths"]) == 1, (k["name"], k["case"])
        (C,) = extra["widths"]
        assert extra["lanes"] == C, (k["name"], k["case"], extra["lanes"])
        x_elems = extra["row_ld_bits"]["x_ptr"] * k["threads"] // (8 * extra["itemsize"])
        assert x_elems == C, (k["name"], k["case"], extra["row_ld_bits"])
        if k["name"] == "_modulated_rel_l1_kernel":
            assert extra["row_ld_bits"]["prev_ptr"] == extra["row_ld_bits"]["x_ptr"], k["case"]
        assert k["passes"]["x_ptr"] == 1 and k["loads_before_barrier"] is True, k["case"]
        assert k["blocks"] == k["assumed"] and not (k["spill_st"] or k["stack"] or k["local"]), k["case"]
        seen.add((k["name"], C, extra["itemsize"], "fp32 params" in k["case"]))
    assert {(n, C, size, p) for n in MAIN_INPUT if n.startswith("_")
            for C, size, p in ((3072, 2, False), (3072, 4, False), (5120, 2, False), (3072, 2, True))} <= seen


def _cuda_row_kernel(C: int, x: str, params: str, indicator: bool = True, norm: int = 1, scale: bool = True,
                     shift: bool = True) -> str:
    """The register row kernel tcf_modulated_rel_l1 launches at width C (launch_rows in
    csrc/modulate.cu): row_threads(C, vec) threads, packs per thread rounded up to 2 or
    kMaxRowPacks; the name without its last template argument (the assumed blocks)."""
    max_packs = int(re.search(r"constexpr int kMaxRowPacks = (\d+);",
                              (ROOT / "csrc" / "modulate.cu").read_text()).group(1))
    vec = 16 // SIZES[x]
    threads = max(32, min(256, -(-(-(-C // vec)) // 32) * 32))
    packs = -(-(C // vec) // threads)
    assert packs <= max_packs, (C, x)
    return (f"modulate_regs_kernel<{x},{params},{str(indicator).lower()},{2 if packs <= 2 else max_packs},{norm},"
            f"{str(scale).lower()},{str(shift).lower()},")


def test_cuda_row_kernel_holds_the_row_in_registers(report):
    # FLUX C=3072 (bf16 x with bf16 and with fp32 params, fp32 x) and Wan C=5120 bf16: the
    # indicator's LayerNorm-with-scale-and-shift instance holds the row in registers: each input (x, scale, shift, prev =
    # `out`) read once per row, every load of the row before its first barrier, no spills,
    # stack or local memory, and exactly the resident blocks its grid is sized for.
    facts, _ = report
    cuda = {k["name"]: k for k in facts["kernels"] if k["backend"] == "cuda"}
    for C, x, params in ((3072, "BF16", "BF16"), (3072, "BF16", "F32"), (3072, "F32", "F32"),
                         (5120, "BF16", "BF16")):
        prefix = _cuda_row_kernel(C, x, params)
        (name,) = [n for n in cuda if n.startswith(prefix)]
        k = cuda[name]
        assert k["passes"] == {"x": 1, "scale": 1, "shift": 1, "out": 1}, (name, k["passes"])
        assert k["loads_before_barrier"] is True, name
        assert not (k["spill_st"] or k["spill_ld"] or k["stack"] or k["local"] or k["local_in_loop"]), name
        assert k["threads"] == 256 and k["blocks"] == k["assumed"] == int(name[len(prefix):-1]), \
            (name, k["blocks"], k["assumed"])
        assert name not in {key[1] for key in KNOWN_SHORTFALLS}, name


def test_cuda_row_kernel_is_specialized_per_norm_and_params(report):
    # csrc/modulate.cu's launcher picks a register row kernel instance per norm (none, layer,
    # rms) and per present parameter: at FLUX C=3072 (bf16 x with bf16 and with fp32 params,
    # fp32 x) and Wan C=5120 bf16, for modulate and the indicator, every instance it can pick
    # exists, reads exactly the inputs it has (an absent scale or shift is not loaded at
    # all, so no branch on its pointer is left), loads each once before the first barrier,
    # does not spill, and fits the blocks its grid assumes. Its barriers follow the norm:
    # LayerNorm reduces twice, RMSNorm once, none never (modulate has no barrier then).
    facts, _ = report
    cuda = {k["name"]: k for k in facts["kernels"] if k["backend"] == "cuda"}
    problems = []
    for C, x, params in ((3072, "BF16", "BF16"), (3072, "BF16", "F32"), (3072, "F32", "F32"),
                         (5120, "BF16", "BF16")):
        for indicator in (False, True):
            barriers = {}
            for norm in (0, 1, 2):
                combos = [(True, True), (True, False), (False, True)] + ([(False, False)] if x == params else [])
                for scale, shift in combos:
                    prefix = _cuda_row_kernel(C, x, params, indicator, norm, scale, shift)
                    names = [n for n in cuda if n.startswith(prefix)]
                    if len(names) != 1:
                        problems.append(f"{prefix}...: {len(names)} instances")
                        continue
                    k = cuda[names[0]]
                    want = {"x": 1} | ({"out": 1} if indicator else {}) | ({"scale": 1} if scale else {}) \
                        | ({"shift": 1} if shift else {})
                    if k["passes"] != want:
                        problems.append(f"{names[0]}: loads per row {k['passes']}, want {want}")
                    if k["loads_before_barrier"] is not (None if norm == 0 and not indicator else True):
                        problems.append(f"{names[0]}: loads before the first barrier {k['loads_before_barrier']}")
                    if k["spill_st"] or k["spill_ld"] or k["stack"] or k["local"] or k["blocks"] != k["assumed"]:
                        problems.append(f"{names[0]}: spills {k['spill_st']}/{k['spill_ld']}, blocks "
                                        f"{k['blocks']} vs {k['assumed']}")
                    barriers.setdefault(norm, set()).add(k["barriers"])
            if not problems:
                (none,), (layer,), (rms,) = barriers[0], barriers[1], barriers[2]
                if not (none < rms < layer) or (not indicator and none != 0):
                    problems.append(f"{x},{params} C={C} indicator={indicator}: barriers by norm "
                                    f"none {none}, rms {rms}, layer {layer}")
    assert not problems, "\n".join(problems)


def test_elementwise_kernels_are_bounded_for_their_grid(report):
    # capture, apply (in place and out=) and the sync-free span end size their grids for
    # kBlocksPerSm resident blocks (elementwise_blocks) and say so in __launch_bounds__: each
    # instance assumes kBlocksPerSm and fits exactly that many.
    facts, _ = report
    source = (ROOT / "csrc" / "residual.cu").read_text()
    k_blocks = int(re.search(r"constexpr int kBlocksPerSm = (\d+);", (ROOT / "csrc" / "common.cuh").read_text()).group(1))
    for kernel in ("capture_kernel", "apply_kernel", "span_end_kernel"):
        assert re.search(rf"__launch_bounds__\(kThreads, kBlocksPerSm\)\s+{kernel}\(", source), kernel
        instances = [k for k in facts["kernels"] if k["backend"] == "cuda" and _base(k) == kernel]
        assert len(instances) == 9, kernel
        for k in instances:
            assert k["assumed"] == k_blocks == k["blocks"], (k["name"], k["assumed"], k["blocks"])
            assert not (k["spill_st"] or k["spill_ld"] or k["stack"] or k["local"]), k["name"]


def test_triton_residual_apply_out_is_a_case(report):
    # residual_apply_'s out= launch (IN_PLACE=False) is its own Triton specialization.
    facts, _ = report
    apply = [k for k in facts["kernels"] if k["name"] == "_residual_apply_kernel"]
    assert {"IN_PLACE=False" in k["case"] for k in apply} == {True, False}, [k["case"] for k in apply]
    for k in apply:
        if "IN_PLACE=False" in k["case"]:
            assert "residual_apply_out" in k["case"] and k["assumed"] is not None, k["case"]


def test_triton_reductions_finish_in_their_own_launch(report):
    # One launch per reduction: every benchmark case of the indicator and of
    # rel_l1_partials compiles with the fused finish; the second-stage kernel
    # is compiled only for the per-sample batch wider than the fused finish.
    facts, _ = report
    for k in facts["kernels"]:
        if k["name"] in ("_modulated_rel_l1_kernel", "_rel_l1_partials_kernel"):
            wide = "per-sample 80x1M" in k["case"]
            assert ("FUSED=False" if wide else "FUSED=True") in k["case"], k["case"]
        if k["name"] == "_sum_partials_kernel":
            assert k["case"].startswith("rel_l1_partials per-sample 80x1M bf16;"), k["case"]


def test_triton_row_statistics_layout_checked_for_misaligned_rows(report):
    # Every Triton row kernel with a norm was compiled a second time with
    # misaligned rows and its statistics' layouts compared; where they differ
    # the backend copies a misaligned row first (test_triton_kernels checks
    # that the kernels only ever see aligned rows).
    facts, _ = report
    rows = [k for k in facts["kernels"] if k["name"] in ("_modulate_kernel", "_modulated_rel_l1_kernel")]
    assert rows and all(k["extra"]["misaligned_stats"] in ("same", "DIFFERS") for k in rows), \
        [(k["case"], k["extra"].get("misaligned_stats")) for k in rows]
    assert any(k["extra"]["misaligned_stats"] == "same" for k in rows)
    others = [k for k in facts["kernels"] if k["backend"] == "triton" and k not in rows]
    assert all(k["extra"]["misaligned_stats"] == "-" for k in others)


def test_committed_report_is_current(report):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import kernel_report
    finally:
        sys.path.pop(0)
    facts, fresh = report
    assert REPORT.exists(), "run python tools/kernel_report.py"
    committed = kernel_report.extract_facts(REPORT.read_text())
    assert committed == kernel_report.extract_facts(fresh), (
        "benchmarks/results/kernels-sm90.md is stale: run python tools/kernel_report.py")
    assert facts["wall_s"] < 600
