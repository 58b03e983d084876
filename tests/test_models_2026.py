"""The 2025-26 families and variants (issue 16) on tiny random configs:
threshold 0 is bitwise the unwrapped model, a high threshold computes fewer
steps but keeps the forced ones, removal restores the model; the published
sets equal shared/MODELS.md's digits; structure-only presets ask for
coefficients in one clear error; a Wan2.2-style pipeline takes one set per
expert."""
from __future__ import annotations

import statistics

import pytest
import torch

import teacache_fast as tf
from teacache_fast import models

from test_diffusers_native import MiniPipe
from tiny_models import euler_sample, single_thread, tiny_flux, tiny_hidream, tiny_lumina2, tiny_wan
from tiny_models_2026 import TINY_2026, tiny_consisid, tiny_latte, tiny_sd35

STEPS = 8
LINEAR = [1.0, 0.0]  # poly(r) = r: skips follow the measured rel L1

# Digits copied from shared/MODELS.md, "2025-26 models" / "Usable" (written
# out, not parsed from the code, so a typo in a preset fails here).
MODELS_MD_2026 = {
    ("flux", "kontext"): (-1.04655119e+03, 3.12563399e+02, -1.69500694e+01, 4.10995971e-01, 3.74537863e-02),
    ("hidream", "dev"): (1.39997273, -4.30130469, 5.01534416, -2.20504164, 0.93942874),
    ("hidream", "fast"): (2.26509623, -6.88864563, 7.61123826, -3.10849353, 0.99927602),
    ("lumina2", "comfyui"): (-8.74643948e+02, 4.66059906e+02, -7.51559762e+01, 5.32836175e+00, -3.27258296e-02),
    ("consisid", "default"): (-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02),
    ("latte", "default"): (-2.46434137e+03, 3.08044764e+02, 8.07447667e+01, -4.11385132e+00, 1.11001402e-01),
}
# (threshold(s), accumulate, start, end) as MODELS.md states them
MODELS_MD_2026_SETTINGS = {
    ("flux", "kontext"): ((0.22,), "abs", 0.2, 0.9),
    ("hidream", "dev"): ((1.0,), "sum", 0.0, 1.0),
    ("hidream", "fast"): ((1.5,), "sum", 0.0, 0.9),
    ("lumina2", "comfyui"): ((0.38,), "sum", 0.2, 1.0),
    ("consisid", "default"): ((0.1, 0.15, 0.2), "sum", 0.0, 1.0),
    ("latte", "default"): ((0.1, 0.2), "sum", 0.0, 1.0),
}
# MODELS.md: "No trustworthy public set (ship structure only)"
STRUCTURE_ONLY = {("cosmos", "predict2"), ("wan", "2.2-a14b"), ("wan", "2.2-ti2v-5b"), ("sd3", "default"), ("qwen_image", "default"),
                  ("chroma", "default"), ("flux2", "default"), ("z_image", "default"),
                  ("longcat_image", "default"), ("hunyuan_video15", "default")}

# name -> (tiny model, variant, last step forced)
CASES = {name: (make, None, True) for name, make in TINY_2026.items()}
CASES.update({"sd35": (tiny_sd35, None, True), "flux-kontext": (tiny_flux, "kontext", False),
              "consisid-face": (lambda seed: tiny_consisid(seed, face=True), None, True),
              "hidream-dev": (tiny_hidream, "dev", False), "hidream-fast": (tiny_hidream, "fast", False),
              "lumina2-comfyui": (tiny_lumina2, "comfyui", True)})


@pytest.fixture(scope="module", autouse=True)
def _setup():
    with single_thread(), torch.no_grad():
        yield


def _no_shadows(model):
    return not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("key", sorted(MODELS_MD_2026), ids="/".join)
def test_published_sets_equal_models_md(key):
    v = models.family(key[0]).variants[key[1]]
    assert v.coefficients == MODELS_MD_2026[key]
    assert (v.thresholds, v.accumulate, v.start, v.end) == MODELS_MD_2026_SETTINGS[key]
    assert "@" in v.source and "/" in v.source


def test_structure_only_presets_carry_no_coefficients():
    for preset, name in STRUCTURE_ONLY:
        v = models.family(preset).variants[name]
        assert v.coefficients == () and v.thresholds == () and v.note
        with pytest.raises(ValueError, match="no published coefficients"):
            models.published(preset, name)
    listed = models.presets()
    assert listed["sd3"]["variants"]["default"]["coefficients"] == ()
    # every structure-only variant of the registry is one MODELS.md lists
    empty = {(p, n) for p, fam in models.families().items() for n, v in fam.variants.items()
             if not v.coefficients}
    assert empty == STRUCTURE_ONLY


@pytest.mark.filterwarnings("ignore:In CPU autocast")
@pytest.mark.parametrize("case", sorted(CASES))
def test_new_adapter_exact_skips_and_removal(case):
    make, variant, last_forced = CASES[case]
    tiny = make(0)
    model = tiny.model
    fam = models.family_for(model)
    keys = list(model.state_dict())
    x0 = tiny.latents(2)
    plain = euler_sample(tiny, x0, STEPS)
    # threshold 0: bitwise the unwrapped model, every step computed (the
    # preset's window does not matter: nothing skips)
    tf.apply_teacache(model, threshold=0.0, num_steps=STEPS, variant=variant, coefficients=LINEAR)
    assert torch.equal(euler_sample(tiny, x0, STEPS), plain)
    st = tf.stats(model)
    assert st["computed"] == STEPS and st["skipped"] == 0 and st["preset"] == fam.name
    rel = st["branches"][0]["rel_l1"][1:]
    tf.remove_teacache(model)
    assert _no_shadows(model) and list(model.state_dict()) == keys

    # a high threshold, over the whole schedule: fewer steps, forced ones kept
    threshold = 2.5 * statistics.median(rel)
    tf.apply_teacache(model, threshold=threshold, num_steps=STEPS, variant=variant, coefficients=LINEAR,
                      start=0.0, end=1.0)
    cached = euler_sample(tiny, x0, STEPS)
    b = tf.stats(model)["branches"][0]
    tf.remove_teacache(model)
    assert 2 <= b["computed"] < STEPS and b["computed"] + b["skipped"] == STEPS, b["steps"]
    assert b["steps"][0] and (b["steps"][-1] or not last_forced)
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()

    # removed: the original model, bit for bit
    assert _no_shadows(model) and list(model.state_dict()) == keys
    assert torch.equal(euler_sample(tiny, x0, STEPS), plain)


@pytest.mark.parametrize("case", ["sd3", "qwen_image", "chroma", "flux2", "z_image"])
def test_structure_only_apply_names_both_ways_out(case):
    model = TINY_2026[case](0).model
    with pytest.raises(ValueError) as info:
        tf.apply_teacache(model, num_steps=STEPS)
    msg = str(info.value)
    assert "no trustworthy published coefficients" in msg and "coefficients=[" in msg
    assert 'coefficients="auto"' in msg and "\n" not in msg
    assert _no_shadows(model)


def test_kontext_variant_brings_abs_accumulation_and_its_window():
    tiny = tiny_flux(0)
    tf.apply_teacache(tiny.model, variant="kontext", num_steps=10)
    try:
        view = tf.inspect(tiny.model)
        cfg = view.config
        assert (cfg.accumulate, cfg.start, cfg.end, cfg.threshold) == ("abs", 0.2, 0.9, 0.22)
        assert cfg.forced_table(10, view.adapter.forced) == [True, True] + [False] * 7 + [True]
        assert view.adapter.forced(9, 10) is False  # the source forces no last step; the window does
    finally:
        tf.remove_teacache(tiny.model)
    # the user's own settings win over the preset's
    tf.apply_teacache(tiny.model, variant="kontext", num_steps=10, accumulate="sum", start=0.0)
    try:
        assert (tf.inspect(tiny.model).config.accumulate, tf.inspect(tiny.model).config.start) == ("sum", 0.0)
    finally:
        tf.remove_teacache(tiny.model)


def test_cosmos_predict2_config_never_gets_the_cosmos1_set():
    from types import SimpleNamespace
    fam = models.family("cosmos")
    for kind, want in (("learnable", "default"), (None, "predict2")):
        fake = SimpleNamespace(config=SimpleNamespace(extra_pos_embed_type=kind))
        assert fam.default_variant_for(fake) == want


def test_hidream_dev_reads_the_embedded_image_tokens():
    tiny = tiny_hidream(0)
    adapter = models.adapter_for(tiny.model, variant="dev")
    assert adapter.indicator.__name__ == "captured_output(x_embedder)"
    assert models.adapter_for(tiny.model, variant="full").indicator.__name__ == "captured_output(t_embedder)"


def test_wan22_two_experts_take_one_coefficient_set_each():
    pipe = MiniPipe(tiny_wan(0), tiny_2=tiny_wan(1))
    x0 = pipe.tiny.latents(1)
    plain = pipe(x0, STEPS, boundary=STEPS // 2)
    # the experts' preset is structure only: no coefficients is one clear error, nothing attached
    with pytest.raises(ValueError, match=r"wan variant '2.2-a14b'.*coefficients=\"auto\""):
        tf.apply_teacache(pipe)
    assert not tf.is_cached(pipe.transformer) and not tf.is_cached(pipe.transformer_2)
    high, low = [2.0, 0.0], [0.5, 0.01]
    tf.apply_teacache(pipe, threshold=0.0, coefficients={"transformer": high, "transformer_2": low})
    try:
        views = tf.inspect(pipe)
        assert views["transformer"].config.coefficients == high
        assert views["transformer_2"].config.coefficients == low
        assert views["transformer"].adapter.variant == views["transformer_2"].adapter.variant == "2.2-a14b"
        assert torch.equal(pipe(x0, STEPS, boundary=STEPS // 2), plain)
    finally:
        tf.remove_teacache(pipe)
    # a high threshold: each expert decides with its own set
    tf.apply_teacache(pipe, threshold=0.2, coefficients={"transformer": high, "transformer_2": low})
    try:
        pipe(x0, STEPS, boundary=STEPS // 2)
        st = tf.stats(pipe)
        assert st["transformer"]["calls"] == st["transformer_2"]["calls"] == STEPS // 2
    finally:
        tf.remove_teacache(pipe)
    for bad in ({"transformer": high}, {"transformer": high, "transformer_2": low, "transformer_3": low}):
        with pytest.raises(ValueError, match="per denoiser"):
            tf.apply_teacache(pipe, coefficients=bad)
        assert not tf.is_cached(pipe.transformer)
    with pytest.raises(ValueError, match="needs a pipeline with several denoisers"):
        tf.apply_teacache(pipe.transformer, num_steps=STEPS, variant="2.2-a14b",
                          coefficients={"transformer": high})


def _first_block_call(tiny, x0):
    """The BlockCall the wrapper would build for block 0, and what block 0's
    own modulation computed in that call."""
    from teacache_fast.models import BlockCall
    model = tiny.model
    block = models.adapter_for(model).blocks(model)[0]
    seen = {}
    def hook(module, args, kwargs):
        seen.setdefault("call", BlockCall(module.forward, args, kwargs, model))
    pre = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        tiny.call(x0, torch.full((x0.shape[0],), 0.7), 0)
    finally:
        pre.remove()
    return seen["call"]


def _modulated_value(ind):
    from teacache_fast import ops
    if isinstance(ind, torch.Tensor):
        return ind
    return ops.modulate(ind.x, ind.scale, ind.shift, norm=ind.norm, eps=ind.eps)


@pytest.mark.parametrize("case", ["sd3", "sd35", "chroma", "qwen_image", "latte", "latte-affine", "flux2",
                                  "z_image", "longcat_image", "hunyuan_video15"])
def test_indicator_is_block_zeros_modulated_input(case):
    special = {"sd35": tiny_sd35, "latte-affine": lambda seed: tiny_latte(seed, affine=True)}
    tiny = special[case](0) if case in special else TINY_2026[case](0)
    call = _first_block_call(tiny, tiny.latents(2))
    got = _modulated_value(models.adapter_for(tiny.model).indicator(call))
    block = models.adapter_for(tiny.model).blocks(tiny.model)[0]
    x = call["x"] if case == "z_image" else call["hidden_states"]
    if case == "flux2":
        mod = call["temb_mod_img"]
        mod = mod.unsqueeze(1) if mod.dim() == 2 else mod
        shift, scale = mod.chunk(6, dim=-1)[:2]
        want = (1 + scale) * block.norm1(x) + shift
    elif case == "z_image":
        scale = block.adaLN_modulation(call["adaln_input"]).unsqueeze(1).chunk(4, dim=2)[0]
        want = block.attention_norm1(x) * (1.0 + scale)
    elif case in ("sd3", "sd35", "longcat_image", "hunyuan_video15"):
        want = block.norm1(x, emb=call["temb"])[0]
    elif case == "chroma":
        want = block.norm1(x, emb=call["temb"][:, :6])[0]
    elif case == "qwen_image":
        want = block._modulate(block.img_norm1(x), block.img_mod(call["temb"]).chunk(2, dim=-1)[0])[0]
    else:  # Latte
        t = call["timestep"].reshape(x.shape[0], 6, -1)
        shift, scale = (block.scale_shift_table[None] + t).chunk(6, dim=1)[:2]
        want = block.norm1(x) * (1 + scale) + shift
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_wan22_configs_pick_structure_only_variants_never_a_wan21_set():
    from types import SimpleNamespace
    fam = models.family("wan")

    def pick(**cfg):
        return fam.default_variant_for(SimpleNamespace(config=SimpleNamespace(**cfg)))
    assert pick(in_channels=48, image_dim=None, num_attention_heads=24, attention_head_dim=128,
                num_layers=30) == "2.2-ti2v-5b"
    assert pick(in_channels=36, image_dim=None, num_attention_heads=40, attention_head_dim=128,
                num_layers=40) == "2.2-a14b"                      # Wan2.2 I2V-A14B: no CLIP image input
    assert pick(in_channels=36, image_dim=1280, num_attention_heads=40, attention_head_dim=128,
                num_layers=40) is None                            # Wan2.1 I2V: 480p or 720p, ask
    assert pick(in_channels=16, image_dim=None, num_attention_heads=12, attention_head_dim=128,
                num_layers=30) == "t2v-1.3b"
    assert fam.expert_variant == "2.2-a14b"


def test_wan22_ti2v_per_token_timesteps():
    """TI2V-5B passes one timestep per latent token (B, seq_len); the indicator
    (the time embedding e) is then per token too."""
    from tiny_models import Tiny
    base = tiny_wan(0)
    m, text = base.model, torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(3))

    def call(x, t, branch=0):
        ts = (t * 1000)[:, None].expand(x.shape[0], 8).clone()  # 2 x 4 x 4 latents, 1x2x2 patches
        return m(hidden_states=x, timestep=ts, encoder_hidden_states=text.expand(x.shape[0], -1, -1),
                 return_dict=False)[0]
    tiny = Tiny(m, call, base.latents)
    x0 = tiny.latents(1)
    plain = euler_sample(tiny, x0, STEPS)
    tf.apply_teacache(m, threshold=0.0, num_steps=STEPS, variant="2.2-ti2v-5b", coefficients=LINEAR)
    assert torch.equal(euler_sample(tiny, x0, STEPS), plain)
    rel = tf.stats(m)["branches"][0]["rel_l1"][1:]
    tf.remove_teacache(m)
    tf.apply_teacache(m, threshold=2.5 * statistics.median(rel), num_steps=STEPS, variant="2.2-ti2v-5b",
                      coefficients=LINEAR)
    euler_sample(tiny, x0, STEPS)
    b = tf.stats(m)["branches"][0]
    tf.remove_teacache(m)
    assert 2 <= b["computed"] < STEPS and b["steps"][0] and b["steps"][-1]
    assert torch.equal(euler_sample(tiny, x0, STEPS), plain) and _no_shadows(m)


def test_latte_refuses_per_sample_decisions():
    # its stream's batch is batch x frames: per_sample=True would decide per frame
    tiny = tiny_latte(0)
    with pytest.raises(ValueError, match="per_sample=True is not available for 'latte'"):
        tf.apply_teacache(tiny.model, threshold=0.1, num_steps=4, per_sample=True)
    assert not tf.is_cached(tiny.model)
    tf.apply_teacache(tiny.model, threshold=0.1, num_steps=4)   # without it, fine
    tf.remove_teacache(tiny.model)
