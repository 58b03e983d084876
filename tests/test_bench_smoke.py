"""Smoke tests of the demo and the benchmarks: they run on a tiny size and write their files.

No timing is asserted anywhere: benchmarks are not tests.
"""
import csv
import math

import pytest
import torch

pytest.importorskip("diffusers")

from teacache_fast import bench_e2e, bench_ops, demo, sampling  # noqa: E402
from teacache_fast.cli import main as cli_main  # noqa: E402


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_ops_cli_smoke_writes_csv_md_png(tmp_path):
    assert cli_main(["bench", "--smoke", "--no-compile", "--dtypes", "bf16", "--out", str(tmp_path)]) == 0
    slug = bench_ops.device_slug("cpu")
    rows = _read_csv(tmp_path / f"{slug}.csv")
    # 5 array ops + the decision op, each timed as the torch backend and eager
    assert len(rows) == (5 + 1) * 2
    assert {r["impl"] for r in rows} == {"torch", "eager"}
    assert {r["op"] for r in rows} == set(bench_ops.OPS)
    for r in rows:
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        if r["op"] != "teacache_decide_":
            itemsize = 2  # bf16
            passes = 2 if r["op"] in ("modulate", "rel_l1_partials") else 3
            assert int(r["bytes"]) == passes * 8 * 40 * itemsize
            assert float(r["gbps"]) > 0 and float(r["copy_gbps"]) > 0
    md = (tmp_path / f"{slug}.md").read_text()
    assert bench_ops.device_name("cpu") in md and "torch " + torch.__version__ in md
    assert "## modulated_rel_l1_ (the indicator)" in md
    assert (tmp_path / f"{slug}.png").stat().st_size > 0


def test_bench_ops_compile_rows_and_eager_chain_matches_op():
    rows = bench_ops.run_benchmark(["smoke"], ["fp32"], [bench_ops.HEADLINE_OP], "cpu", repeats=1,
                                   max_seconds=0.01, log=lambda *_: None)
    assert [r["impl"] for r in rows] == ["torch", "eager", "compile"]
    assert all(r["speedup_vs_compile"] is not None for r in rows)
    # The timed eager chain and the op compute the same indicator from the same prev.
    impls = bench_ops._indicator_case((1, 8, 40), torch.float32, "cpu", ["torch"])
    eager_first = impls["eager"]()   # its own random prev
    assert math.isfinite(eager_first)
    eager_steady = impls["eager"]()  # prev is now last call's m, and x is fixed: m - prev == 0
    assert eager_steady == pytest.approx(0.0, abs=1e-6)
    partials = impls["torch"]()
    partials = impls["torch"]()      # same for the op: the second call sees its own output
    assert partials[0].item() == pytest.approx(0.0, abs=1e-6) and partials[1].item() > 0


def test_demo_smoke_threshold_zero_is_exact(tmp_path):
    assert demo.main(["--smoke", "--thresholds", "0,0.8", "--out", str(tmp_path)]) == 0
    rows = _read_csv(tmp_path / "demo.csv")
    assert [r["threshold"] for r in rows] == ["", "0.0", "0.8"]
    base, zero, high = rows
    assert base["computed"] == base["total"] == "4"
    assert zero["computed"] == "4" and float(zero["max_abs_err"]) == 0.0 and zero["psnr_db"] == "inf"
    assert int(high["computed"]) < 4 and float(high["ideal_speedup"]) > 1.0
    assert math.isfinite(float(high["psnr_db"]))
    assert (tmp_path / "demo.png").stat().st_size > 0


def test_bench_e2e_smoke_writes_table(tmp_path):
    assert bench_e2e.main(["--smoke", "--out", str(tmp_path)]) == 0
    stem = f"e2e-{bench_ops.device_slug('cpu')}"
    rows = _read_csv(tmp_path / f"{stem}.csv")
    assert [r["threshold"] for r in rows] == ["none", "0.0", "0.25", "0.4", "0.6", "0.8"]
    assert rows[1]["computed"] == rows[1]["total"] and float(rows[1]["max_abs_err"]) == 0.0
    assert all(int(r["op_calls"]) > 0 for r in rows[1:]) and rows[0]["op_calls"] == "0"
    md = (tmp_path / f"{stem}.md").read_text()
    assert "## smoke:" in md and "Threshold 0 (all 4 steps computed)" in md


def test_sampling_helpers():
    x = torch.randn(2, 3, 6, 4)
    tokens = sampling.pack_latents(x)
    assert tokens.shape == (2, 6, 12)
    assert torch.equal(sampling.unpack_latents(tokens, 6, 4), x)
    s = sampling.flux_sigmas(5, image_seq_len=1024)
    assert s.shape == (6,) and s[0] == 1.0 and s[-1] == 0.0 and bool((s[1:] < s[:-1]).all())
    assert torch.allclose(sampling.flux_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    ref = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=torch.float64)
    assert sampling.psnr(ref, ref) == math.inf
    # peak 4, mse 0.01 -> 10 log10(16 / 0.01)
    assert sampling.psnr(ref + 0.1, ref) == pytest.approx(10 * math.log10(1600), rel=1e-9)
    with pytest.raises(ValueError, match="num_steps"):
        sampling.flux_sigmas(0)
    with pytest.raises(ValueError, match="even"):
        sampling.pack_latents(torch.zeros(1, 1, 3, 4))
