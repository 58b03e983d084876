"""Calibration, stronger (issue 17): both fitting conventions, --degree auto,
the stored range and sign, per-expert fits of a two-expert pipeline."""
import json
import os

import numpy as np
import pytest
import torch

import teacache_fast as tf
from teacache_fast import calibrate as cal
from teacache_fast.calibrate.fit import convention_points, select_degree, sign_over
from teacache_fast.preset_json import load_preset_json

TRUE = [300.0, -200.0, 40.0, -2.0, 0.2]


def recording(coeffs, runs=5, steps=40, noise=1e-4, seed=0, jitter=0.0):
    """Runs whose step s has indicator x_s (+ jitter per run) and output poly(x) + noise."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0.02, 0.4, steps)
    rec = cal.Recording(model_class="Toy")
    for _ in range(runs):
        den = rng.uniform(50, 100, steps).astype(np.float32)
        x = base + rng.normal(0, jitter, steps) if jitter else base
        p = np.stack([(x * den).astype(np.float32), den], axis=1)
        p[0] = np.nan
        y = np.polyval(coeffs, cal.relative_l1(p).astype(np.float64)) + rng.normal(0, noise, steps)
        y[0] = np.nan
        rec.partials.append({0: p})
        rec.out_rel.append({0: y})
    return rec


@pytest.mark.parametrize("convention", ["all-pairs", "step-means"])
def test_both_conventions_recover_a_known_polynomial(convention):
    res = cal.fit_recording(recording(TRUE), convention=convention)
    assert res.convention == convention
    assert res.fit.num_pairs == (5 * 39 if convention == "all-pairs" else 39)
    np.testing.assert_allclose(res.coefficients, TRUE, rtol=0.02, atol=2e-3)
    assert res.r2 > 0.999
    assert res.to_dict()["convention"] == convention


def test_step_means_average_per_step():
    x = np.array([0.1, 0.2, 0.3, 0.5])
    y = np.array([1.0, 2.0, 3.0, 7.0])
    steps = np.array([1, 1, 2, 2])
    xm, ym, s = convention_points(x, y, steps, "step-means")
    np.testing.assert_allclose(xm, [0.15, 0.4])
    np.testing.assert_allclose(ym, [1.5, 5.0])
    assert list(s) == [1, 2]
    with pytest.raises(cal.CalibrationError, match="convention must be one of"):
        convention_points(x, y, steps, "means")


@pytest.mark.parametrize("true", [[3.0, -1.0], [5.0, -2.0, 0.3], [40.0, -12.0, 1.5, 0.1],
                                  TRUE])
def test_degree_auto_picks_the_true_degree_on_clean_data(true):
    x = np.linspace(0.02, 0.4, 60)
    degree, errors = select_degree(x, np.polyval(true, x))
    assert degree == len(true) - 1
    assert [d for d, _ in errors] == [1, 2, 3, 4]
    res = cal.fit_recording(recording(true, noise=0.0), degree="auto")
    assert res.fit.degree == len(true) - 1
    assert res.to_dict()["degree_errors"][0][0] == 1
    with pytest.raises(cal.CalibrationError, match="'auto'"):
        cal.fit_recording(recording(true), degree="best")


def test_degree_auto_on_noisy_data_does_not_overfit():
    rng = np.random.default_rng(5)
    x = np.linspace(0.02, 0.4, 200)
    y = np.polyval([5.0, -2.0, 0.3], x) + rng.normal(0, 0.01, x.size)
    assert select_degree(x, y)[0] == 2


def test_stored_range_and_sign(tmp_path):
    res = cal.fit_recording(recording(TRUE))
    x, _, _ = res.pairs()
    path = tmp_path / "p.json"
    res.to_json(path)
    data = load_preset_json(path)
    assert data["fitted_range"] == pytest.approx([float(x.min()), float(x.max())])
    assert data["fitted_range"] == pytest.approx([0.02 + 0.38 / 39, 0.4], rel=1e-5)
    assert data["sign_in_range"] == "positive" and data["negative_in_range"] is False
    # a polynomial that crosses zero inside the recorded range
    crossing = [1.0, -0.2]                           # zero at x = 0.2
    res2 = cal.fit_recording(recording(crossing, noise=0.0), degree=1)
    assert res2.sign_in_range() == "mixed" and res2.negative_in_range()
    negative = [-1.0, -0.01]
    assert cal.fit_recording(recording(negative, noise=0.0), degree=1).sign_in_range() == "negative"
    assert sign_over([1.0, 0.0, 0.01], -1, 1) == "positive"


def test_cli_degree_auto_and_convention(tmp_path, capsys):
    from teacache_fast.cli import main
    out = tmp_path / "out"
    rc = main(["calibrate", "--smoke", "--steps", "8", "--runs", "2", "--degree", "auto",
               "--convention", "step-means", "--out", str(out)])
    assert rc == 0
    data = load_preset_json(out / "preset.json")
    assert data["convention"] == "step-means" and data["num_pairs"] == 7
    chosen = data["degree"]
    errors = dict((d, e) for d, e in data["degree_errors"])
    assert 1 <= chosen <= 4 and chosen in errors and "r2" in data
    printed = capsys.readouterr().out
    assert "held-out MSE per degree" in printed and "R^2 = " in printed and "over it" in printed
    with pytest.raises(SystemExit):
        main(["calibrate", "--degree", "five"])
    assert "--degree" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", "--smoke", "--height", "64", "--out", str(out)])
    assert "--height" in capsys.readouterr().err


@pytest.mark.usefixtures("no_grad")
def test_per_expert_fits_of_a_two_expert_wan_pipeline(tmp_path):
    from test_diffusers_native import MiniPipe
    from tiny_models import tiny_wan
    n = 12
    pipe = MiniPipe(tiny_wan(0), tiny_2=tiny_wan(1))
    x0 = pipe.tiny.latents(1)

    def run_fn(p, r):
        p(x0 + 0.1 * r, n, guidance=3.0, boundary=n // 2)

    results = cal.calibrate(pipe, run_fn, runs=2, degree=2, variant="t2v-1.3b")
    assert sorted(results) == ["transformer", "transformer_2"]
    assert not tf.is_cached(pipe.transformer) and not tf.is_cached(pipe.transformer_2)
    for name, res in results.items():
        # each expert runs half the steps: its own 6 calls per branch, 2 branches, 2 runs
        assert res.recording.num_steps == n // 2 and res.recording.branches == [0, 1]
        assert res.fit.num_pairs == 2 * 2 * (n // 2 - 1)
        path = tmp_path / f"{name}.json"
        res.to_json(path)
        tf.apply_teacache(getattr(pipe, name), preset=str(path), threshold=0.05, num_steps=n,
                          variant="t2v-1.3b")
        try:
            assert tf.inspect(getattr(pipe, name)).config.coefficients == pytest.approx(res.coefficients)
        finally:
            tf.remove_teacache(getattr(pipe, name))
    assert results["transformer"].coefficients != results["transformer_2"].coefficients
    with pytest.raises(cal.CalibrationError, match="record_experts"):
        cal.record(pipe, run_fn, 1, variant="t2v-1.3b")


@pytest.mark.usefixtures("no_grad")
def test_progress_bar_ticks_once_per_step(tiny, capsys):
    from tiny_models import euler_sample
    x0 = tiny.latents(1)
    cal.calibrate(tiny.model, lambda m, r: euler_sample(tiny, x0, 5, guidance=2.0), runs=2,
                  num_steps=5, degree=2, progress=True)
    err = capsys.readouterr().err
    assert "calibrate" in err and "10/10" in err


def test_cli_height_width_reach_the_pipeline(tmp_path, monkeypatch):
    """--model PATH --height/--width: the pipeline gets them on every run."""
    import argparse

    import diffusers

    from teacache_fast.cli import calibrate as cli_cal

    calls = []

    class FakePipe:
        transformer = torch.nn.Linear(1, 1)

        def to(self, device):
            return self

        def set_progress_bar_config(self, **kw):
            pass

        def __call__(self, **kw):
            calls.append(kw)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: FakePipe()))
    args = argparse.Namespace(model=tmp_path, device="cpu", dtype="fp32", seed=3, steps=4,
                              height=320, width=192)
    pipe, run_fn, num_steps, _ = cli_cal.pipeline_setup(args, ["a cat"])
    run_fn(pipe, 0)
    assert num_steps is None
    assert calls[0]["height"] == 320 and calls[0]["width"] == 192
    assert calls[0]["num_inference_steps"] == 4 and calls[0]["output_type"] == "latent"
    args.height = args.width = None
    _, run_fn, _, _ = cli_cal.pipeline_setup(args, ["a cat"])
    run_fn(pipe, 0)
    assert "height" not in calls[1] and "width" not in calls[1]
