"""Calibration: fitting, preset files, decision replay, and the end-to-end run."""
import json

import numpy as np
import pytest
import torch

import tiny_models
from teacache_fast import calibrate as cal
import teacache_fast as tf
from teacache_fast.models import first_and_last
from teacache_fast.preset_json import PresetFileError, load_preset_json

TRUE_COEFFS = [300.0, -200.0, 40.0, -2.0, 0.2]


def synthetic_recording(runs=4, branches=(0,), steps=30, noise=1e-3, seed=0, coeffs=TRUE_COEFFS):
    """Recorded partials whose rel-L1 x maps to y = poly(x) + noise (row 0: no previous step)."""
    rng = np.random.default_rng(seed)
    rec = cal.Recording(model_class="Toy")
    for _ in range(runs):
        partials, out_rel = {}, {}
        for b in branches:
            den = rng.uniform(50, 100, steps).astype(np.float32)
            num = (rng.uniform(0.02, 0.4, steps) * den).astype(np.float32)
            p = np.stack([num, den], axis=1)
            p[0] = np.nan
            y = np.polyval(coeffs, cal.relative_l1(p).astype(np.float64)) + rng.normal(0, noise, steps)
            y[0] = np.nan
            partials[b], out_rel[b] = p, y
        rec.partials.append(partials)
        rec.out_rel.append(out_rel)
    return rec


# --------------------------------------------------------------------------- fitting

@pytest.mark.parametrize("degree", [2, 4])
def test_fit_recovers_known_polynomial(degree):
    true = TRUE_COEFFS[-(degree + 1):]
    rec = synthetic_recording(runs=6, branches=(0, 1), steps=40, coeffs=true)
    res = cal.fit_recording(rec, degree=degree)
    assert res.fit.degree == degree
    assert res.fit.num_pairs == 6 * 2 * 39
    np.testing.assert_allclose(res.coefficients, true, rtol=0.03, atol=1e-3)
    assert res.r2 > 0.999


def test_fit_without_noise_is_exact_and_r2_is_one():
    x = np.linspace(0.01, 0.5, 50)
    fit = cal.fit_polynomial(x, np.polyval(TRUE_COEFFS, x), 4)
    np.testing.assert_allclose(fit.coefficients, TRUE_COEFFS, rtol=1e-8)
    assert fit.r2 == pytest.approx(1.0)


def test_step_range_selects_the_fitted_pairs():
    rec = synthetic_recording(runs=2, steps=20)
    res = cal.fit_recording(rec, step_range=(5, 15))
    x, _, steps = res.pairs()
    assert res.step_range == (5, 15)
    assert steps.min() == 5 and steps.max() == 14 and x.size == 2 * 10 == res.fit.num_pairs
    # step 0 has no previous step: a range starting at 0 starts at 1
    assert cal.fit_recording(rec, step_range=(0, 20)).step_range == (1, 20)


# --------------------------------------------------------------------------- errors

def test_too_few_pairs_for_degree():
    with pytest.raises(cal.CalibrationError, match="too few pairs for degree 4: got 4"):
        cal.fit_polynomial([0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4], 4)
    rec = synthetic_recording(runs=1, steps=4)  # 3 pairs
    with pytest.raises(cal.CalibrationError, match="too few pairs for degree 4: got 3"):
        cal.fit_recording(rec, degree=4)
    cal.fit_recording(rec, degree=2)  # 3 pairs fit a parabola


def test_constant_input_is_an_error():
    with pytest.raises(cal.CalibrationError, match="constant input"):
        cal.fit_polynomial(np.full(20, 0.1), np.linspace(0, 1, 20), 4)
    with pytest.raises(cal.CalibrationError, match="only 2 distinct"):
        cal.fit_polynomial(np.tile([0.1, 0.2], 10), np.linspace(0, 1, 20), 2)


def test_nan_in_recordings_names_run_branch_step():
    rec = synthetic_recording(runs=2, branches=(0, 1), steps=10)
    rec.out_rel[1][1][7] = np.nan
    with pytest.raises(cal.CalibrationError, match="output relative L1 of run 1, branch 1, step 7"):
        cal.fit_recording(rec)
    rec = synthetic_recording(runs=2, steps=10)
    rec.partials[0][0][3] = [1.0, 0.0]  # zero previous tensor -> inf
    with pytest.raises(cal.CalibrationError, match="input .indicator. relative L1 of run 0, branch 0, step 3"):
        cal.fit_recording(rec)
    # excluded steps do not matter
    assert cal.fit_recording(rec, step_range=(4, 10)).fit.num_pairs == 2 * 6


def test_mismatched_branches():
    rec = synthetic_recording(runs=2, branches=(0, 1), steps=10)
    del rec.partials[1][1], rec.out_rel[1][1]
    with pytest.raises(cal.CalibrationError, match=r"mismatched branches: run 0 has branches \[0, 1\], run 1"):
        cal.fit_recording(rec)
    rec = synthetic_recording(runs=1, branches=(0, 1), steps=10)
    rec.partials[0][1] = rec.partials[0][1][:8]
    with pytest.raises(cal.CalibrationError, match="run 0 branch 1 has 8 input"):
        cal.fit_recording(rec)


def test_bad_degree_and_empty_recording():
    with pytest.raises(cal.CalibrationError, match="degree must be an int in 0..8"):
        cal.fit_polynomial(np.linspace(0, 1, 20), np.linspace(0, 1, 20), 9)
    with pytest.raises(cal.CalibrationError, match="empty"):
        cal.fit_recording(cal.Recording())


# --------------------------------------------------------------------------- preset files

def test_json_round_trip_and_plot(tmp_path):
    rec = synthetic_recording(runs=2, steps=12)
    res = cal.fit_recording(rec, variant="toy-v1")
    res.to_json(tmp_path / "out" / "preset.json", thresholds=[0.2, 0.5])
    data = load_preset_json(tmp_path / "out" / "preset.json")
    assert data["coefficients"] == res.coefficients
    assert data["degree"] == 4 and data["num_pairs"] == 22 and data["num_runs"] == 2
    assert data["model_class"] == "Toy" and data["variant"] == "toy-v1"
    assert data["step_range"] == [1, 12] and data["r2"] == pytest.approx(res.r2)
    assert data["library_version"] == tf.__version__
    assert [row["threshold"] for row in data["thresholds"]] == [0.2, 0.5]
    res.plot(tmp_path / "fit.png")
    assert (tmp_path / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("patch, message", [
    ({"coefficients": [1.0, "a"]}, r"'coefficients'\[1\] must be a finite number"),
    ({"coefficients": []}, "'coefficients' must be a list of 1 to 9"),
    ({"degree": 3}, "'degree' must be len.coefficients. - 1 = 4"),
    ({"format_version": 7}, "'format_version' 7 is not supported"),
    ({"step_range": [5, 2]}, "'step_range' must be"),
    ({"auto_threshold": -1.0}, "'auto_threshold' must be a finite number >= 0"),
    ({"sign_in_range": "up"}, "'sign_in_range' must be 'positive', 'negative' or 'mixed'"),
])
def test_preset_file_errors_name_the_field(tmp_path, patch, message):
    data = {"model_class": "Toy", "coefficients": TRUE_COEFFS, "degree": 4, **patch}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PresetFileError, match=message):
        load_preset_json(path)


def test_preset_file_unreadable(tmp_path):
    with pytest.raises(PresetFileError, match="no such file"):
        load_preset_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PresetFileError, match="not valid JSON"):
        load_preset_json(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text('{"coefficients": [1.0]}')
    with pytest.raises(PresetFileError, match=r"missing field\(s\) \['model_class', 'degree'\]"):
        load_preset_json(tmp_path / "partial.json")


# --------------------------------------------------------------------------- replay

def _reference_replay(partials, coeffs, threshold, forced):
    """The reference scripts' loop, host-side in float32, one trace."""
    acc, flags = np.float32(0.0), []
    for i, (num, den) in enumerate(partials):
        if forced[i]:
            acc, compute = np.float32(0.0), True
        else:
            rel = np.float32(num) / np.float32(den)
            poly = np.float32(0.0)
            for c in coeffs:
                poly = np.float32(poly * rel + np.float32(c))
            acc = np.float32(acc + poly)
            compute = bool(acc >= threshold)
            if compute:
                acc = np.float32(0.0)
        flags.append(compute)
    return np.array(flags)


@pytest.mark.parametrize("threshold", [0.3, 0.8, 2.0])
def test_replay_matches_a_plain_reference_loop(threshold):
    rec = synthetic_recording(runs=3, branches=(0, 1), steps=25)
    res = cal.fit_recording(rec)
    flags = res.predict(threshold)
    assert flags.shape == (3, 2, 25)
    forced = cal.forced_mask(first_and_last, 25)
    for r, b in rec.traces():
        expected = _reference_replay(rec.partials[r][b], res.coefficients, threshold, forced)
        np.testing.assert_array_equal(flags[r, b], expected)
    assert flags[..., 0].all() and flags[..., -1].all()
    assert 2 < flags.sum(-1).min() < 25


def test_replay_threshold_zero_never_skips_and_table_is_monotonic():
    res = cal.fit_recording(synthetic_recording(runs=2, steps=20))
    assert res.predict(0.0).all()
    table = res.threshold_table([0.0, 0.2, 0.5, 1.0, 3.0])
    counts = [row["computed_steps"] for row in table]
    assert counts[0] == 20 and table[0]["speedup"] == 1.0
    assert counts == sorted(counts, reverse=True) and counts[-1] < counts[1]
    default = res.threshold_table()
    assert 2 <= len(default) <= 8 and default[-1]["computed_steps"] < default[0]["computed_steps"]


def test_replay_with_abs_accumulation_adds_the_magnitude():
    rec = synthetic_recording(runs=1, steps=20)
    # a constant negative polynomial: summed, the estimate never rises (only the
    # forced steps compute); as |poly| it reaches 1.0 every third step
    summed = cal.replay_decisions(rec, [-0.4], 1.0)
    absolute = cal.replay_decisions(rec, [-0.4], 1.0, accumulate="abs")
    np.testing.assert_array_equal(np.flatnonzero(summed[0, 0]), [0, 19])
    np.testing.assert_array_equal(np.flatnonzero(absolute[0, 0]), [0, 3, 6, 9, 12, 15, 18, 19])
    with pytest.raises(ValueError, match="accumulate"):
        cal.replay_decisions(rec, [-0.4], 1.0, accumulate="max")


def test_replay_forced_steps_and_max_skips():
    rec = synthetic_recording(runs=1, steps=20)
    flags = cal.replay_decisions(rec, [0.0], 1.0, forced=lambda i, n: i < 3)
    np.testing.assert_array_equal(flags[0, 0], np.arange(20) < 3)  # poly == 0: never reaches 1.0
    flags = cal.replay_decisions(rec, [0.0], 1.0, max_consecutive_skips=4)
    # poly == 0 never reaches the threshold: a compute every 5th step, plus the last
    np.testing.assert_array_equal(np.flatnonzero(flags[0, 0]), [0, 5, 10, 15, 19])


# --------------------------------------------------------------------------- end to end (tiny FLUX)

STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with tiny_models.single_thread():
        yield


def _cfg_sample(tiny, r):
    """One generation with classifier-free guidance: two calls (branches) per step."""
    return tiny_models.euler_sample(tiny, tiny.latents(1, seed=r), STEPS, guidance=2.0)



@pytest.fixture(scope="module")
def calibrated(tiny):
    return cal.calibrate(tiny.model, lambda m, r: _cfg_sample(tiny, r), runs=3, num_steps=STEPS)


def test_calibrate_records_every_step_of_every_branch(tiny, calibrated):
    rec = calibrated.recording
    assert not tf.is_cached(tiny.model)  # the record-mode wrapper is removed
    assert rec.model_class == "FluxTransformer2DModel"
    assert rec.num_runs == 3 and rec.branches == [0, 1] and rec.num_steps == STEPS
    assert calibrated.fit.num_pairs == 3 * 2 * (STEPS - 1) and calibrated.fit.degree == 4
    x, y, _ = calibrated.pairs()
    assert (x > 0).all() and (y > 0).all()
    # the input side is exactly the cache's own indicator: compare with a threshold-0 run's trace
    tf.apply_teacache(tiny.model, threshold=0.0, coefficients=[1.0, 0.0], num_steps=STEPS)
    try:
        _cfg_sample(tiny, 2)
        trace = tf.stats(tiny.model)["branches"]
    finally:
        tf.remove_teacache(tiny.model)
    for b in (0, 1):
        expected = torch.tensor(trace[b]["rel_l1"][1:], dtype=torch.float32).numpy()
        np.testing.assert_array_equal(cal.relative_l1(rec.partials[2][b][1:]), expected)


def test_output_side_is_relative_l1_of_the_block_stack_output(tiny):
    outs = []
    blocks = tiny.model.single_transformer_blocks
    handle = blocks[-1].register_forward_hook(lambda mod, args, out: outs.append(out[1].detach().clone()))
    try:
        rec, _ = cal.record(tiny.model, lambda m, r: tiny_models.euler_sample(tiny, tiny.latents(1), 4),
                            runs=1, num_steps=4)
    finally:
        handle.remove()
    expected = [float((outs[i] - outs[i - 1]).abs().mean() / outs[i - 1].abs().mean()) for i in range(1, 4)]
    np.testing.assert_allclose(rec.out_rel[0][0][1:], expected, rtol=1e-5)
    assert np.isnan(rec.out_rel[0][0][0])


def test_preset_json_loads_back_and_replay_predicts_the_cached_run(tiny, calibrated, tmp_path):
    """In a sampling loop a skip changes the next steps' inputs, so the replay (made on
    the never-skip trajectory) is exact up to the first skip and close after it."""
    path = tmp_path / "tiny_flux.json"
    calibrated.to_json(path)
    data = load_preset_json(path)
    assert data["model_class"] == "FluxTransformer2DModel" and data["branches"] == [0, 1]
    table = [row for row in data["thresholds"] if row["computed_steps"] < STEPS]
    assert len(table) >= 2, "the default thresholds should include some that skip"
    exact = 0
    for row in table[:3]:
        predicted = calibrated.predict(row["threshold"])  # (runs, branches, steps)
        assert predicted.sum(-1).mean() == pytest.approx(row["computed_steps"])
        for r in range(3):
            tf.apply_teacache(tiny.model, preset=str(path), threshold=row["threshold"], num_steps=STEPS)
            try:
                _cfg_sample(tiny, r)
                st = tf.stats(tiny.model)
            finally:
                tf.remove_teacache(tiny.model)
            got = np.array([st["branches"][b]["steps"] for b in (0, 1)])
            skips = np.flatnonzero(~predicted[r].all(axis=0))
            first_skip = int(skips[0]) if skips.size else STEPS - 1
            np.testing.assert_array_equal(got[:, :first_skip + 1], predicted[r][:, :first_skip + 1])
            assert np.abs(got.sum(-1) - predicted[r].sum(-1)).max() <= 1, (row["threshold"], r)
            exact += int(st["computed"] == predicted[r].sum())
    # measured here: 8 of 9 counts exact; a borderline decision after a skip may flip
    assert exact >= 2 * len(table[:3])


def _preset_file(tmp_path, model_class="FluxTransformer2DModel", thresholds=None):
    data = {"model_class": model_class, "coefficients": [2.0, 0.0], "degree": 1}
    if thresholds is not None:
        data["thresholds"] = thresholds
    path = tmp_path / "fitted.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_preset_json_needs_a_threshold_and_names_the_table(tiny, tmp_path):
    path = _preset_file(tmp_path, thresholds=[{"threshold": 0.3, "computed_steps": 7.5}])
    with pytest.raises(ValueError, match=r"no default threshold: pass threshold=.*0\.3 -> 7\.5"):
        tf.apply_teacache(tiny.model, preset=path, num_steps=STEPS)
    with pytest.raises(ValueError, match="no 'thresholds' table"):
        tf.apply_teacache(tiny.model, preset=_preset_file(tmp_path), num_steps=STEPS)
    assert not tf.is_cached(tiny.model)


def test_preset_json_coefficients_adapter_and_class_warning(tiny, tmp_path):
    path = _preset_file(tmp_path)
    tf.apply_teacache(tiny.model, preset=path, threshold=0.5, num_steps=STEPS)
    try:
        w = tf.inspect(tiny.model)
        assert list(w.config.coefficients) == [2.0, 0.0] and w.adapter.name == "flux"
    finally:
        tf.remove_teacache(tiny.model)
    tf.apply_teacache(tiny.model, preset=path, threshold=0.5, coefficients=[1.0, 0.0], num_steps=STEPS)
    try:
        assert list(tf.inspect(tiny.model).config.coefficients) == [1.0, 0.0]
    finally:
        tf.remove_teacache(tiny.model)
    with pytest.warns(UserWarning, match="fitted on WanTransformer3DModel, not on FluxTransformer2DModel"):
        tf.apply_teacache(tiny.model, preset=_preset_file(tmp_path, "WanTransformer3DModel"),
                             threshold=0.5, num_steps=STEPS)
    tf.remove_teacache(tiny.model)
    with pytest.raises(PresetFileError, match="no such file"):
        tf.apply_teacache(tiny.model, preset=str(tmp_path / "nope.json"), threshold=0.5, num_steps=STEPS)


def test_replay_is_exact_step_by_step_when_inputs_are_the_recorded_ones(tiny):
    """Skips change later inputs in a sampling loop; fed the same inputs, the cache
    must take exactly the replayed decision at every step."""
    n, s = 12, tiny_models.sigmas(12)
    trajectories = []
    for r in range(2):
        x, xs = tiny.latents(1, seed=r), []
        with torch.no_grad():
            for i in range(n):
                xs.append(x)
                x = x + (s[i + 1] - s[i]) * tiny.call(x, torch.full((1,), s[i]))
        trajectories.append(xs)

    def replay_inputs(model, r):
        with torch.no_grad():
            for i, x in enumerate(trajectories[r]):
                tiny.call(x, torch.full((1,), s[i]))

    res = cal.calibrate(tiny.model, replay_inputs, runs=2, num_steps=n, degree=2)
    for row in res.threshold_table():
        predicted = res.predict(row["threshold"])
        for r in range(2):
            tf.apply_teacache(tiny.model, threshold=row["threshold"], coefficients=res.coefficients,
                                 num_steps=n)
            try:
                replay_inputs(tiny.model, r)
                steps = tf.stats(tiny.model)["branches"][0]["steps"]
            finally:
                tf.remove_teacache(tiny.model)
            assert steps == predicted[r, 0].tolist(), row["threshold"]


def test_record_errors(tiny):
    def uneven(model, r):  # run 1 makes one call less
        tiny_models.euler_sample(tiny, tiny.latents(1), 4 - r)

    with pytest.raises(cal.CalibrationError, match="mismatched branches: run 1 branch 0 has 3 input"):
        cal.calibrate(tiny.model, uneven, runs=2)
    assert not tf.is_cached(tiny.model)
    with pytest.raises(cal.CalibrationError, match="num_steps=5 but each branch was called 4 times"):
        cal.calibrate(tiny.model, lambda m, r: tiny_models.euler_sample(tiny, tiny.latents(1), 4),
                      runs=1, num_steps=5)
    with pytest.raises(cal.CalibrationError, match="runs must be an int >= 1"):
        cal.calibrate(tiny.model, uneven, runs=0)
    with pytest.raises(TypeError, match="set threshold themselves"):
        cal.calibrate(tiny.model, uneven, runs=1, threshold=0.3)
    with pytest.raises(cal.CalibrationError, match="run 0 never called the model"):
        cal.calibrate(tiny.model, lambda m, r: None, runs=1)
    with pytest.raises(cal.CalibrationError, match="at least 2 steps"):
        cal.calibrate(tiny.model, lambda m, r: tiny_models.euler_sample(tiny, tiny.latents(1), 1), runs=1)


class _ToyBlock(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.mlp = torch.nn.Linear(width, width)

    def forward(self, hidden_states, scale, shift):
        h = torch.nn.functional.layer_norm(hidden_states, hidden_states.shape[-1:], eps=1e-6)
        return hidden_states + self.mlp(h * (1 + scale[:, None]) + shift[:, None]).tanh()


class _ToyModel(torch.nn.Module):
    """Not a diffusers model: calibrated through a custom Adapter."""

    def __init__(self, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.temb = torch.nn.Linear(1, 2 * width)
        self.blocks = torch.nn.ModuleList(_ToyBlock(width) for _ in range(2))

    def forward(self, hidden_states, timestep):
        scale, shift = self.temb(timestep[:, None]).chunk(2, dim=-1)
        for block in self.blocks:
            hidden_states = block(hidden_states=hidden_states, scale=scale, shift=shift)
        return hidden_states


def test_calibrate_any_model_with_a_custom_adapter():
    from teacache_fast.models import Adapter, Modulated

    adapter = Adapter(name="toy", blocks=lambda m: list(m.blocks),
                      indicator=lambda call: Modulated(call["hidden_states"], call["scale"], call["shift"]))

    def run_fn(model, r):
        x = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(r))
        with torch.no_grad():
            for t in torch.linspace(1.0, 0.1, 8):
                x = x - 0.1 * model(x, t.reshape(1))

    res = cal.calibrate(_ToyModel, run_fn, runs=3, num_steps=8, degree=2, adapter=adapter, ret_steps=2)
    assert res.recording.model_class == "_ToyModel" and res.fit.num_pairs == 3 * 7
    assert np.flatnonzero(cal.forced_mask(res.forced, 8)).tolist() == [0, 1, 7]  # ret_steps + last
    assert res.predict(1e9)[..., [0, 1, 7]].all() and not res.predict(1e9)[..., 2:7].any()
    with pytest.raises(cal.CalibrationError, match="per_sample=True is not supported"):
        cal.calibrate(_ToyModel, run_fn, runs=1, adapter=adapter, per_sample=True)


# --------------------------------------------------------------------------- command line

def test_cli_calibrate_smoke(tmp_path, capsys):
    from teacache_fast.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration prompts\na cat\n\na dog\n")
    out = tmp_path / "out"
    rc = main(["calibrate", "--smoke", "--steps", "6", "--runs", "3", "--degree", "3",
               "--prompts", str(prompts), "--thresholds", "0,0.05,0.2", "--out", str(out)])
    assert rc == 0
    data = load_preset_json(out / "preset.json")
    assert data["degree"] == 3 and data["num_runs"] == 3 and data["num_pairs"] == 3 * 5
    assert [row["threshold"] for row in data["thresholds"]] == [0.0, 0.05, 0.2]
    assert data["thresholds"][0]["computed_steps"] == 6
    assert (out / "fit.png").stat().st_size > 0
    refit = cal.fit_recording(cal.Recording.load(out / "recording.npz"), degree=3)
    assert refit.coefficients == data["coefficients"]
    printed = capsys.readouterr().out
    assert "R^2 = " in printed and "threshold" in printed


def test_cli_calibrate_bad_arguments(tmp_path, capsys):
    """Each bad argument ends as an argparse error: exit code 2, the message on stderr."""
    from teacache_fast.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    for argv, message in (
            (["calibrate", "--smoke", "--prompts", str(empty)], "holds no prompt"),
            (["calibrate", "--model", str(tmp_path)], "neither 'demo' nor a diffusers pipeline folder"),
            (["calibrate", "--smoke", "--step-range", "5", "2"], "--step-range needs 0 <= START < END, got 5 2"),
            (["calibrate", "--steps", "1"], "--steps must be >= 2, got 1"),
            (["calibrate", "--degree", "9"], "--degree must be in 0..8, got 9")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err
        assert "teacache-fast calibrate: error: " in err and message in err, (argv, err)
