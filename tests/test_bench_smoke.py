"""Smoke tests of the demo and the benchmarks: they run on a tiny size and write their files.

No timing is asserted anywhere: benchmarks are not tests.
"""
import argparse
import csv
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from teacache_fast.cli import bench_ops, demo, host_cost, op_cases, sampling  # noqa: E402
from teacache_fast.cli import main as cli_main  # noqa: E402
from teacache_fast.cli.machine import device_name, device_slug  # noqa: E402


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_ops_cli_smoke_writes_csv_md_png(tmp_path):
    assert cli_main(["bench", "--smoke", "--no-compile", "--dtypes", "bf16", "--out", str(tmp_path)]) == 0
    slug = device_slug("cpu")
    rows = _read_csv(tmp_path / f"{slug}.csv")
    # 5 array ops + the decision op, each timed per CPU backend (native cpu, torch) and eager
    backends = bench_ops.backends_for_device("cpu")
    assert "torch" in backends
    assert len(rows) == (5 + 1) * (len(backends) + 1)
    assert {r["impl"] for r in rows} == set(backends) | {"eager"}
    assert {r["op"] for r in rows} == set(bench_ops.OPS)
    for r in rows:
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        if r["op"] != "teacache_decide_":
            itemsize = 2  # bf16
            passes = 2 if r["op"] in ("modulate", "rel_l1_partials") else 3
            assert int(r["bytes"]) == passes * 8 * 40 * itemsize
            assert float(r["gbps"]) > 0 and float(r["copy_gbps"]) > 0
    md = (tmp_path / f"{slug}.md").read_text()
    assert device_name("cpu") in md and "torch " + torch.__version__ in md
    assert "## modulated_rel_l1_ (the indicator)" in md
    assert (tmp_path / f"{slug}.png").stat().st_size > 0


def test_bench_ops_compile_rows_and_eager_chain_matches_op():
    rows = bench_ops.run_benchmark(["smoke"], ["fp32"], [bench_ops.HEADLINE_OP], "cpu", repeats=1,
                                   max_seconds=0.01, log=lambda *_: None)
    assert [r["impl"] for r in rows] == bench_ops.backends_for_device("cpu") + ["eager", "compile"]
    assert all(r["speedup_vs_compile"] is not None for r in rows)
    launches = {r["impl"]: r["launches"] for r in rows}
    # the eager chain: layer_norm, modulate, sub, abs, mean, mean, div ...; the fused op fewer
    assert launches["eager"] >= 7 and launches["compile"] >= 1
    if "cpu" in launches:
        assert launches["cpu"] == 1   # one native kernel call
    # The timed eager chain and the op compute the same indicator from the same prev.
    impls = op_cases._indicator_case((1, 8, 40), torch.float32, "cpu", ["torch"])
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
    assert cli_main(["bench", "e2e", "--smoke", "--host-cost", "skip", "--out", str(tmp_path)]) == 0
    stem = f"e2e-{device_slug('cpu')}"
    rows = _read_csv(tmp_path / f"{stem}.csv")
    assert [r["threshold"] for r in rows] == ["none", "0.0", "0.25", "0.4", "0.6", "0.8"]
    assert rows[1]["computed"] == rows[1]["total"] and float(rows[1]["max_abs_err"]) == 0.0
    assert all(int(r["op_calls"]) > 0 for r in rows[1:]) and rows[0]["op_calls"] == "0"
    # op_calls and the share come from the profiler's record of the ops: every cached run has some.
    assert all(float(r["machinery_s"]) > 0 and 0 < float(r["machinery_share"]) < 1 for r in rows[1:])
    md = (tmp_path / f"{stem}.md").read_text()
    assert "## smoke:" in md and "Threshold 0 (all 4 steps computed)" in md
    assert not (tmp_path / f"e2e-host-{device_slug('cpu')}.md").exists()  # --host-cost skip


def test_host_cost_row_smoke(tmp_path, capsys):
    """The host-cost row runs every method on one model and reports each figure (no timing asserted)."""
    assert cli_main(["bench", "e2e", "--smoke", "--steps", "4", "--host-cost", "only", "--note",
                     "measured under load", "--out", str(tmp_path)]) == 0
    stem = f"e2e-host-{device_slug('cpu')}"
    rows = _read_csv(tmp_path / f"{stem}.csv")
    assert [r["method"] for r in rows] == list(host_cost.METHODS) == [
        "teacache_fast", "official", "fbcache", "magcache"]
    by = {r["method"]: r for r in rows}
    for r in rows:
        assert r["calls"] == "4" and r["compute_run_computed"] == "4"   # the compute setting never skips
        for key in ("plain_ms", "floor_ms", "computed_ms", "skipped_ms", "skipped_over_plain"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, (r["method"], key, r[key])
        for key in ("extra_us_per_computed_call", "us_per_skipped_block",
                    "us_per_further_skipped_block"):  # differences: any sign under load
            assert math.isfinite(float(r[key])), (r["method"], key, r[key])
        assert int(r["samples_computed"]) == 4 and int(r["samples_skipped"]) == 4 - int(r["skip_run_computed"])
    # TeaCache (both) forces the first and the last call; diffusers' caches compute the first only.
    assert by["teacache_fast"]["skip_run_computed"] == by["official"]["skip_run_computed"] == "2"
    assert by["fbcache"]["skip_run_computed"] == by["magcache"]["skip_run_computed"] == "1"
    assert by["fbcache"]["blocks_skipped"] == "1" and by["teacache_fast"]["blocks_skipped"] == "2"
    md = (tmp_path / f"{stem}.md").read_text()
    assert "measured under load" in md and device_name("cpu") in md
    for label in host_cost.METHODS.values():
        assert f"| {label} |" in md
    printed = capsys.readouterr().out
    assert "[host cost]" in printed and "official TeaCache script (replica)" in printed
    assert not (tmp_path / f"e2e-{device_slug('cpu')}.md").exists()  # --host-cost only


def test_host_cost_leaves_the_model_plain():
    """Attach / detach of every method leaves the model computing what it computed before."""
    from teacache_fast.cli import flux_model

    model, inputs = flux_model.build(flux_model.SPECS["smoke"])
    sigmas = sampling.flux_sigmas(3, image_seq_len=inputs.latents.shape[1])
    before = sampling.euler_sample(model, inputs, sigmas)
    for method in host_cost.METHODS:
        for setting in ("compute", "skip"):
            detach, _ = host_cost._attach(method, setting, model, 3, flux_model.flux_preset()[1])
            sampling.euler_sample(model, inputs, sigmas,
                                  call=lambda m, **kw: _in_context(m, kw))
            detach()
    assert "forward" not in model.__dict__
    assert torch.equal(sampling.euler_sample(model, inputs, sigmas), before)


def _in_context(model, kwargs):
    with model.cache_context("cond"):
        return model(**kwargs)[0]


def test_bench_out_default_is_not_the_committed_results(tmp_path, monkeypatch):
    from teacache_fast.cli import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = Path(parser.parse_args([]).out)
    assert out.resolve() != (Path(__file__).parent.parent / "benchmarks" / "results").resolve()
    assert "results" not in out.parts
    monkeypatch.chdir(tmp_path)
    assert cli_main(["bench", "--smoke", "--no-compile", "--dtypes", "bf16", "--ops", "residual_apply_"]) == 0
    assert (tmp_path / bench.DEFAULT_OUT / f"{device_slug('cpu')}.csv").is_file()
    assert not (tmp_path / "benchmarks").exists()


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
