"""coefficients="auto": self-calibration on the tiny FLUX and a two-expert pipeline (issue 17)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings

import pytest
import torch

import teacache_fast as tf
from teacache_fast.calibrate.auto import AutoSettings, calibration_home, calibration_path
from teacache_fast.models import adapter_for
from tiny_models import euler_sample, tiny_flux

pytestmark = pytest.mark.usefixtures("no_grad")

STEPS = 12
LOOSE = {"min_r2": 0.5}   # the tiny random model's fit: R^2 ~0.66 on one generation


def _run(tiny, x0):
    return euler_sample(tiny, x0, STEPS, guidance=3.0)


def test_auto_calibrates_in_generation_one_and_caches_from_two(tiny, tmp_path, caplog):
    x0 = tiny.latents(1)
    reference = _run(tiny, x0)
    tf.apply_teacache(tiny.model, coefficients="auto", threshold=0.3, num_steps=STEPS,
                      calibration_dir=tmp_path, calibration=LOOSE)
    try:
        with caplog.at_level(logging.INFO, logger="teacache_fast.calibrate"):
            first = _run(tiny, x0)
        st = tf.stats(tiny.model)
        assert torch.equal(first, reference)               # uncached: bitwise the model
        assert st["skipped"] == 0 and st["computed"] == 2 * STEPS
        cal = st["calibration"]
        assert cal["state"] == "calibrated" and cal["generation"] == 1
        path = cal["path"]
        assert os.path.dirname(path) == str(tmp_path) and os.path.isfile(path)
        assert path == str(calibration_path(tiny.model, "dev", None, tmp_path))
        logged = [r.getMessage() for r in caplog.records if "calibrated" in r.getMessage()]
        assert len(logged) == 1 and "generation 1" in logged[0] and path in logged[0]
        stored = tf.calibrate.load_preset_json(path)
        assert stored["coefficients"] == cal["coefficients"]
        assert stored["calibrated_generation"] == 1 and stored["num_pairs"] == 2 * (STEPS - 1)
        second = _run(tiny, x0)
        st2 = tf.stats(tiny.model)
        assert st2["skipped"] > 0 and st2["threshold"] == 0.3
    finally:
        tf.remove_teacache(tiny.model)
    # the same run with the fitted set given explicitly
    tf.apply_teacache(tiny.model, coefficients=stored["coefficients"], threshold=0.3, num_steps=STEPS)
    try:
        explicit = _run(tiny, x0)
        assert tf.stats(tiny.model)["branches"] == st2["branches"]
    finally:
        tf.remove_teacache(tiny.model)
    assert torch.equal(second, explicit)

    # a later apply on the same model config loads the stored fit: no recording
    tf.apply_teacache(tiny.model, coefficients="auto", threshold=0.3, num_steps=STEPS,
                      calibration_dir=tmp_path)
    try:
        again = _run(tiny, x0)
        st3 = tf.stats(tiny.model)
        assert st3["calibration"]["state"] == "loaded" and st3["calibration"]["path"] == path
        assert torch.equal(again, explicit) and st3["branches"] == st2["branches"]
    finally:
        tf.remove_teacache(tiny.model)


def test_default_threshold_comes_from_the_fit(tiny, tmp_path):
    x0 = tiny.latents(1)
    tf.apply_teacache(tiny.model, coefficients="auto", num_steps=STEPS, calibration_dir=tmp_path,
                      calibration=LOOSE)
    try:
        _run(tiny, x0)
        st = tf.stats(tiny.model)
        stored = json.loads(open(st["calibration"]["path"]).read())
        table = {r["threshold"]: r["speedup"] for r in stored["thresholds"]}
        t = stored["auto_threshold"]
        assert t in table and table[t] <= 1.5
        assert all(s > 1.5 for th, s in table.items() if th > t)
        assert st["threshold"] == t
    finally:
        tf.remove_teacache(tiny.model)


def test_failed_fit_stays_uncached_with_a_warning_naming_the_figure(tiny, tmp_path):
    """A constant indicator: no curve can be fitted; the model stays uncached."""
    constant = dataclasses.replace(adapter_for(tiny.model),
                                   indicator=lambda call: torch.ones(1, 8))
    x0 = tiny.latents(1)
    reference = _run(tiny, x0)
    tf.apply_teacache(tiny.model, coefficients="auto", threshold=0.3, num_steps=STEPS,
                      calibration_dir=tmp_path, adapter=constant)
    try:
        with pytest.warns(RuntimeWarning, match="fit not used.*constant input"):
            first = _run(tiny, x0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = _run(tiny, x0)
        st = tf.stats(tiny.model)
        assert st["calibration"]["state"] == "failed" and "constant input" in st["calibration"]["failure"]
        assert st["skipped"] == 0 and st["threshold"] == 0.0
        assert torch.equal(first, reference) and torch.equal(second, reference)
        assert not any(tmp_path.iterdir())           # nothing stored
    finally:
        tf.remove_teacache(tiny.model)


def test_low_r2_names_r2(tiny, tmp_path):
    x0 = tiny.latents(1)
    tf.apply_teacache(tiny.model, coefficients="auto", threshold=0.3, num_steps=STEPS,
                      calibration_dir=tmp_path, calibration={"min_r2": 0.99})
    try:
        with pytest.warns(RuntimeWarning, match=r"R\^2 = 0\.\d+ < min_r2 0\.99"):
            _run(tiny, x0)
        assert tf.stats(tiny.model)["calibration"]["state"] == "failed"
    finally:
        tf.remove_teacache(tiny.model)


def test_home_env_and_bad_arguments(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TEACACHE_FAST_HOME", str(tmp_path / "home"))
    assert calibration_home() == tmp_path / "home" / "calibrations"
    assert calibration_path(tiny.model).parent == tmp_path / "home" / "calibrations"
    with pytest.raises(ValueError, match="calibration runs"):
        tf.apply_teacache(tiny.model, coefficients="auto", num_steps=4, calibration={"runs": 0})
    with pytest.raises(TypeError, match="unknown key"):
        tf.apply_teacache(tiny.model, coefficients="auto", num_steps=4, calibration={"rnus": 2})
    with pytest.raises(ValueError, match="coefficients='auto' only"):
        tf.apply_teacache(tiny.model, num_steps=4, calibration_dir=tmp_path)
    with pytest.raises(ValueError, match="sync_free"):
        tf.apply_teacache(tiny.model, coefficients="auto", num_steps=4, sync_free=True,
                          calibration_dir=tmp_path)
    assert not tf.is_cached(tiny.model)
    assert AutoSettings.of(None).needed_pairs == 10


def test_per_expert_fits_on_a_two_expert_wan_pipeline(tmp_path):
    """Wan2.2-style: one fit and one JSON per transformer, each loaded again by apply_teacache."""
    from test_diffusers_native import MiniPipe
    from tiny_models import tiny_wan
    n = 16
    pipe = MiniPipe(tiny_wan(0), tiny_2=tiny_wan(1))
    x0 = pipe.tiny.latents(1)
    reference = pipe(x0, n, guidance=3.0, boundary=n // 2)
    kw = dict(coefficients="auto", threshold=0.1, variant="t2v-1.3b", calibration_dir=tmp_path)
    tf.apply_teacache(pipe, calibration={"min_r2": 0.0}, **kw)
    try:
        first = pipe(x0, n, guidance=3.0, boundary=n // 2)
        st = tf.stats(pipe)
    finally:
        tf.remove_teacache(pipe)
    assert torch.equal(first, reference)
    cals = {name: s["calibration"] for name, s in st.items()}
    assert sorted(cals) == ["transformer", "transformer_2"]
    assert all(c["state"] == "calibrated" and c["generation"] == 1 for c in cals.values())
    paths = {name: c["path"] for name, c in cals.items()}
    assert len(set(paths.values())) == 2 and sorted(os.listdir(tmp_path)) == sorted(
        os.path.basename(p) for p in paths.values())
    assert "transformer_2" in os.path.basename(paths["transformer_2"])
    assert cals["transformer"]["coefficients"] != cals["transformer_2"]["coefficients"]
    for name, path in paths.items():   # each expert's own pairs: 2 branches x (8 calls - 1)
        assert tf.calibrate.load_preset_json(path)["num_pairs"] == 2 * (n // 2 - 1)

    tf.apply_teacache(pipe, **kw)      # loads both, records nothing
    try:
        st = tf.stats(pipe)
        assert {k: v["calibration"]["state"] for k, v in st.items()} == {
            "transformer": "loaded", "transformer_2": "loaded"}
        assert {k: v["calibration"]["path"] for k, v in st.items()} == paths
        pipe(x0, n, guidance=3.0, boundary=n // 2)
        assert all(s["skipped"] > 0 for s in tf.stats(pipe).values())
    finally:
        tf.remove_teacache(pipe)
    # a stored JSON is a preset file too (the adapter still comes from the class + variant)
    wan = adapter_for(pipe.transformer_2, variant="t2v-1.3b")
    tf.apply_teacache(pipe.transformer_2, preset=paths["transformer_2"], threshold=0.1, num_steps=n,
                      adapter=wan)
    try:
        assert tf.inspect(pipe.transformer_2).config.coefficients == pytest.approx(
            cals["transformer_2"]["coefficients"])
    finally:
        tf.remove_teacache(pipe.transformer_2)


def _result(coeffs, steps=12, runs=1):
    import numpy as np
    from teacache_fast import calibrate as cal
    rec = cal.Recording(model_class="Toy")
    for _ in range(runs):
        x = np.linspace(0.05, 0.4, steps)
        p = np.stack([(x * 80).astype(np.float32), np.full(steps, 80, np.float32)], axis=1)
        p[0] = np.nan
        y = np.polyval(coeffs, cal.relative_l1(p).astype(np.float64))
        y[0] = np.nan
        rec.partials.append({0: p})
        rec.out_rel.append({0: y})
    return cal.fit_recording(rec, degree=2)


def test_checks_name_pairs_r2_and_positivity():
    from teacache_fast.calibrate.auto import check_fit
    good = _result([2.0, -0.5, 0.1])
    assert check_fit(good, AutoSettings(degree=2)) is None
    assert check_fit(good, AutoSettings(degree=2, min_pairs=12)) == (
        "pairs = 11 < 12 needed (record more steps or runs: calibration runs=)")
    crossing = _result([1.0, 0.0, -0.04])        # zero at x = 0.2, inside [0.05, 0.4]
    assert crossing.r2 == pytest.approx(1.0)
    assert check_fit(crossing, AutoSettings(degree=2)).startswith("positivity: the polynomial is not "
                                                                  "positive over the recorded")


def test_stored_fit_loads_in_sync_free_mode(tiny, tmp_path):
    x0 = tiny.latents(1)
    tf.apply_teacache(tiny.model, coefficients="auto", threshold=0.3, num_steps=STEPS,
                      calibration_dir=tmp_path, calibration=LOOSE)
    try:
        _run(tiny, x0)
        coefficients = tf.stats(tiny.model)["calibration"]["coefficients"]
    finally:
        tf.remove_teacache(tiny.model)
    tf.apply_teacache(tiny.model, coefficients="auto", threshold=0.3, num_steps=STEPS,
                      calibration_dir=tmp_path, sync_free=True, branches=2)
    try:
        view = tf.inspect(tiny.model)
        assert view.mode == "sync_free" and list(view.config.coefficients) == pytest.approx(coefficients)
        assert tf.stats(tiny.model)["calibration"]["state"] == "loaded"
    finally:
        tf.remove_teacache(tiny.model)


def test_several_calibration_runs(tiny, tmp_path):
    """calibration runs=2: generations 1 and 2 record (uncached), the fit comes at the end of 2."""
    x0, x1 = tiny.latents(1), tiny.latents(1, seed=1)
    references = [_run(tiny, x0), _run(tiny, x1)]
    tf.apply_teacache(tiny.model, coefficients="auto", threshold=0.3, num_steps=STEPS,
                      calibration_dir=tmp_path, calibration=dict(LOOSE, runs=2))
    try:
        assert torch.equal(_run(tiny, x0), references[0])
        assert tf.stats(tiny.model)["calibration"]["state"] == "recording"
        assert not any(tmp_path.iterdir())
        assert torch.equal(_run(tiny, x1), references[1])
        cal = tf.stats(tiny.model)["calibration"]
        assert cal["state"] == "calibrated" and cal["generation"] == 2 and cal["runs_recorded"] == 2
        stored = tf.calibrate.load_preset_json(cal["path"])
        assert stored["num_runs"] == 2 and stored["num_pairs"] == 2 * 2 * (STEPS - 1)
        _run(tiny, x0)
        assert tf.stats(tiny.model)["skipped"] > 0
    finally:
        tf.remove_teacache(tiny.model)
