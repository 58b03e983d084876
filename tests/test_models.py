"""The model families as data: the published numbers against the survey of the
reference scripts, the Family records' invariants, a preset applied to a model
of another class, and the layering of teacache_fast/models/."""
import ast
import dataclasses
import math
import pathlib
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import teacache_fast as tf
from teacache_fast import models, ops, preset_json
from teacache_fast.models import record as family_records

from tiny_models import TINY, euler_sample, single_thread, tiny_flux
from tiny_models_2026 import TINY_2026

MODELS_DIR = pathlib.Path(models.__file__).parent

# Digits copied from the project's survey of the reference scripts
# (shared/MODELS.md: "Model families: what the reference TeaCache scripts
# compute", read from ali-vilab/TeaCache at commit 7c10efc). Written out here,
# not parsed, so a typo in a preset fails this test.
MODELS_MD_COEFFICIENTS = {
    # "Wan coefficient sets": e for the default variants, e0 for the ret_steps ("-ret") ones
    ("wan", "t2v-1.3b"): (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01),
    ("wan", "t2v-14b"): (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    ("wan", "i2v-480p"): (-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01),
    ("wan", "i2v-720p"): (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
    ("wan", "t2v-1.3b-ret"): (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01,
                              -4.99875664e-02),
    ("wan", "t2v-14b-ret"): (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
    ("wan", "i2v-480p-ret"): (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01),
    ("wan", "i2v-720p-ret"): (8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02),
    # "an alternative "v2" set" of Lumina2
    ("lumina2", "v2"): (225.7042019806413, -608.8453716535591, 304.1869942338369, 124.21267720116742,
                        -1.4089066892956552),
    # ConsisID "the CogVideoX-5b set"
    ("cogvideox", "5b"): (-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02),
}
# "A typo'd CogVideoX1.5-5B-I2V set with -3.06001e-01 (official: -3.06009921e-01)"
MODELS_MD_COGVIDEOX_15_I2V_X1 = -3.06009921e-01

MODELS_MD_THRESHOLDS = {
    # "Published Wan thresholds"
    ("wan", "t2v-1.3b"): (0.05, 0.08), ("wan", "t2v-1.3b-ret"): (0.05, 0.10),
    ("wan", "t2v-14b"): (0.14, 0.20), ("wan", "t2v-14b-ret"): (0.10, 0.20),
    ("wan", "i2v-480p"): (0.13, 0.26), ("wan", "i2v-480p-ret"): (0.20, 0.30),
    ("wan", "i2v-720p"): (0.20, 0.30),
    # "Other published thresholds"
    ("hidream", "full"): (0.17, 0.25, 0.3, 0.45),
    ("lumina_next", "default"): (0.2, 0.3, 0.4, 0.5),
    ("lumina2", "default"): (0.2, 0.3, 0.4, 0.5),   # "Lumina2 reuses the Lumina-Next set"
    ("cogvideox", "2b"): (0.1, 0.2, 0.3), ("cogvideox", "5b"): (0.1, 0.2, 0.3),
    ("cogvideox", "1.5-5b"): (0.1, 0.2, 0.3), ("cogvideox", "1.5-5b-i2v"): (0.1, 0.2, 0.3),
    ("cosmos", "default"): (0.3, 0.4),
}

# The MODELS.md table: diffusers class -> (block stack, modules after it inside the cached span)
MODELS_MD_LAYOUT = {
    "FluxTransformer2DModel": (("transformer_blocks", "single_transformer_blocks"), ()),
    "HunyuanVideoTransformer3DModel": (("transformer_blocks", "single_transformer_blocks"), ()),
    "LTXVideoTransformer3DModel": (("transformer_blocks",), ("norm_out",)),
    "MochiTransformer3DModel": (("transformer_blocks",), ("norm_out",)),
    "WanTransformer3DModel": (("blocks",), ()),
    "CogVideoXTransformer3DModel": (("transformer_blocks",), ()),
    "HiDreamImageTransformer2DModel": (("double_stream_blocks", "single_stream_blocks"), ()),
    "LuminaNextDiT2DModel": (("layers",), ()),
    "Lumina2Transformer2DModel": (("layers",), ()),
    "CosmosTransformer3DModel": (("transformer_blocks",), ()),
}

# MODELS.md "forced (reference)", over 20 steps: (preset, variant) -> the forced steps
N = 20
MODELS_MD_FORCED = {
    ("flux", "dev"): [0, 19], ("hunyuan_video", "t2v"): [0, 19], ("ltx_video", "0.9.1"): [0, 19],
    ("mochi", "preview"): [0, 19], ("wan", "t2v-1.3b"): [0, 19], ("wan", "i2v-720p-ret"): [0, 1, 2, 3, 4],
    ("wan", "t2v-14b-ret"): [0, 1, 2, 3, 4], ("cogvideox", "5b"): [0, 19],
    ("hidream", "full"): [0, 1],  # ceil(0.1 n), last not forced
    ("lumina_next", "default"): [0, 19], ("lumina2", "default"): [0, 19], ("cosmos", "default"): [0, 19],
}

# MODELS.md "Never ship these"
NEVER_SHIP = {
    "Qwen-Image placeholder": (-4.5e+02, 2.8e+02, -4.5e+01, 3.2, -2.0e-02),
    "Wan2.2 A14B high": (3343659.82, -780127.00, 26239.45, -276.915, 1.1724),
    "Wan2.2 A14B low": (1713.908, -633.165, 62.123, 0.58611, 0.184166),
    "identity": (1.0, 0.0),
}


def _variants():
    return [(n, v) for n, fam in models.families().items() for v in fam.variants]


def _variant(preset, variant):
    return models.family(preset).variants[variant]


@pytest.fixture(scope="module", autouse=True)
def _setup():
    with single_thread(), torch.no_grad():
        yield


# ------------------------------------------------------------------- the published numbers

@pytest.mark.parametrize("key", sorted(MODELS_MD_COEFFICIENTS), ids="/".join)
def test_coefficients_match_models_md(key):
    assert _variant(*key).coefficients == MODELS_MD_COEFFICIENTS[key]


@pytest.mark.parametrize("key", sorted(MODELS_MD_THRESHOLDS), ids="/".join)
def test_thresholds_match_models_md(key):
    assert _variant(*key).thresholds == MODELS_MD_THRESHOLDS[key]


def test_reused_and_corrected_sets_match_models_md():
    assert _variant("lumina2", "default").coefficients == _variant("lumina_next", "default").coefficients
    assert _variant("cogvideox", "1.5-5b-i2v").coefficients[3] == MODELS_MD_COGVIDEOX_15_I2V_X1


@pytest.mark.parametrize("key", sorted(MODELS_MD_FORCED), ids="/".join)
def test_forced_rule_matches_models_md(key):
    preset, variant = key
    fam = models.family(preset)
    forced = _variant(*key).forced or fam.forced
    assert [s for s in range(N) if forced(s, N)] == MODELS_MD_FORCED[key]


def test_layout_matches_models_md():
    # the table's classes (the 2025-26 families have no such table: test_models_2026.py)
    layout = {c: (fam.blocks, fam.tail) for fam in models.families().values() for c in fam.classes
              if c in MODELS_MD_LAYOUT}
    assert layout == MODELS_MD_LAYOUT


def test_every_variant_is_sourced_and_fits_the_decision_op():
    for preset, name in _variants():
        v = _variant(preset, name)
        if not v.coefficients:  # structure only: says why, no numbers
            assert v.thresholds == () and v.note, (preset, name)
            continue
        assert "@" in v.source and "/" in v.source, (preset, name, v.source)  # repository@commit path
        assert 1 <= len(v.coefficients) <= ops.MAX_COEFFICIENTS, (preset, name)
        assert all(math.isfinite(c) for c in v.coefficients), (preset, name)
        assert all(0 < a < b for a, b in zip(v.thresholds, v.thresholds[1:])) and v.thresholds[0] > 0


def test_no_borrowed_or_withdrawn_set_ships():
    owners = {}
    for preset, name in _variants():
        if _variant(preset, name).coefficients:
            owners.setdefault(_variant(preset, name).coefficients, set()).add(preset)
    # one family per set, but for the documented reuses: Lumina-Next's set by
    # Lumina2, CogVideoX-5b's by ConsisID (MODELS.md)
    shared = {c: p for c, p in owners.items() if len(p) > 1}
    assert sorted(map(sorted, shared.values())) == [["cogvideox", "consisid"], ["lumina2", "lumina_next"]]
    for label, coefficients in NEVER_SHIP.items():
        assert coefficients not in owners, label
    assert all(-3.06001e-01 not in c for c in owners)  # the typo'd CogVideoX1.5-5B-I2V digit


def test_each_class_belongs_to_one_family_and_every_family_has_a_tiny_model():
    classes = [c for fam in models.families().values() for c in fam.classes]
    assert len(classes) == len(set(classes))
    tiny = dict(TINY, **TINY_2026)
    assert set(models.families()) == set(tiny)
    for name, fam in models.families().items():
        assert fam.name == name
        assert models.family_for(tiny[name](0).model) is fam


def test_published_and_presets_read_the_families():
    assert models.published("flux") == _variant("flux", "dev").coefficients
    assert models.published("wan", "t2v-14b-ret") == MODELS_MD_COEFFICIENTS[("wan", "t2v-14b-ret")]
    with pytest.raises(ValueError, match=r"Wan needs variant=, one of .*'i2v-480p'"):
        models.published("wan")
    listed = models.presets()
    assert listed["flux"]["variants"]["dev"]["coefficients"] == models.published("flux")
    assert listed["flux"]["variants"]["dev"]["source"].startswith("ali-vilab/TeaCache@7c10efc")
    assert listed["wan"]["default_variant"] is None and "480p" in listed["wan"]["default_rule"]


def test_preset_json_takes_its_limit_from_the_decision_op(tmp_path):
    assert preset_json.MAX_DEGREE == ops.MAX_COEFFICIENTS - 1
    too_many = [1.0] * (ops.MAX_COEFFICIENTS + 1)
    with pytest.raises(preset_json.PresetFileError, match=f"1 to {ops.MAX_COEFFICIENTS} numbers"):
        preset_json.validate_preset({"model_class": "X", "coefficients": too_many, "degree": len(too_many) - 1})
    most = [1.0] * ops.MAX_COEFFICIENTS
    assert preset_json.validate_preset({"model_class": "X", "coefficients": most,
                                        "degree": len(most) - 1})["coefficients"] == most


# ------------------------------------------------------------------- a preset and a model

def _assert_untouched(model):
    """A refused apply left nothing behind: no shadowed forward, and it applies anew."""
    assert not any("forward" in m.__dict__ for m in model.modules())
    tf.apply_teacache(model, num_steps=4)
    tf.remove_teacache(model)


def test_a_preset_for_another_class_fails_at_apply_time():
    tiny = tiny_flux(0)
    for preset, cls in (("wan", "WanTransformer3DModel"), ("ltx_video", "LTXVideoTransformer3DModel")):
        msg = f"preset '{preset}' is for {cls}; this model is FluxTransformer2DModel"
        with pytest.raises(ValueError, match=msg):
            tf.apply_teacache(tiny.model, preset=preset, num_steps=4)
        _assert_untouched(tiny.model)
        with pytest.raises(ValueError, match=msg):
            models.adapter_for(tiny.model, preset=preset)
        with pytest.raises(ValueError, match=msg):
            models.family(preset).adapter(tiny.model)


def test_unknown_preset_lists_the_known_ones_and_unknown_variant_the_familys():
    tiny = tiny_flux(0)
    with pytest.raises(ValueError, match="unknown preset 'sdxl'; known presets: ") as err:
        tf.apply_teacache(tiny.model, preset="sdxl", num_steps=4)
    assert all(f"{n} (" in str(err.value) for n in models.families())
    with pytest.raises(ValueError, match=r"unknown FLUX variant 'schnell'; known variants: \['dev', 'kontext'\]"):
        tf.apply_teacache(tiny.model, variant="schnell", num_steps=4)
    with pytest.raises(ValueError, match=r"unknown Lumina2 variant 'v3'; known variants: \['comfyui', 'default', 'v2'\]"):
        models.adapter_for(TINY["lumina2"](0).model, variant="v3")
    _assert_untouched(tiny.model)


def test_a_subclass_of_a_family_class_takes_its_preset():
    from diffusers import FluxTransformer2DModel

    class MyFlux(FluxTransformer2DModel):
        pass

    ref = tiny_flux(0)
    sub = MyFlux.from_config(ref.model.config).eval()
    sub.load_state_dict(ref.model.state_dict())
    tiny = tiny_flux(0, model=sub)
    x0 = tiny.latents(1)
    plain = euler_sample(tiny, x0, 4)
    assert models.adapter_for(sub).name == "flux"
    for preset in (None, "flux"):
        tf.apply_teacache(sub, preset=preset, threshold=0.0, num_steps=4)
        assert torch.equal(euler_sample(tiny, x0, 4), plain)
        assert tf.stats(sub)["preset"] == "flux" and tf.stats(sub)["computed"] == 4
        tf.remove_teacache(sub)


def test_a_family_record_serves_a_lookalike_class():
    class Lookalike(nn.Module):  # the layout of FLUX under another class name
        def __init__(self, inner):
            super().__init__()
            self.transformer_blocks = inner.transformer_blocks
            self.single_transformer_blocks = inner.single_transformer_blocks

    model = Lookalike(tiny_flux(0).model)
    flux = models.family("flux")
    with pytest.raises(ValueError, match="this model is Lookalike"):
        models.adapter_for(model, preset=flux)
    widened = dataclasses.replace(flux, classes=flux.classes + ("Lookalike",))
    adapter = models.adapter_for(model, preset=widened)
    assert adapter.name == "flux" and adapter.output_index == 1
    assert adapter.blocks(model) == list(model.transformer_blocks) + list(model.single_transformer_blocks)


def test_default_variant_rules_read_the_config():
    def fake(cls_name, **cfg):  # only the class name and the config matter for the choice
        model = type(cls_name, (nn.Module,), {})()
        model.config = SimpleNamespace(**cfg)
        return model

    wan13 = fake("WanTransformer3DModel", num_attention_heads=12, attention_head_dim=128, num_layers=30,
                 image_dim=None)
    wan14 = fake("WanTransformer3DModel", num_attention_heads=40, attention_head_dim=128, num_layers=40,
                 image_dim=None)
    i2v = fake("WanTransformer3DModel", num_attention_heads=40, attention_head_dim=128, num_layers=40,
               image_dim=1280)
    assert models.adapter_for(wan13).variant == "t2v-1.3b"
    assert models.adapter_for(wan14).variant == "t2v-14b"
    with pytest.raises(ValueError, match="Wan needs variant="):
        models.adapter_for(i2v)
    cog = {"num_attention_heads": 30, "patch_size_t": None, "ofs_embed_dim": None}
    assert models.adapter_for(fake("CogVideoXTransformer3DModel", **cog)).variant == "2b"
    cog.update(num_attention_heads=48, patch_size_t=2, ofs_embed_dim=512)
    assert models.adapter_for(fake("CogVideoXTransformer3DModel", **cog)).variant == "1.5-5b-i2v"


def test_variant_overrides_reach_the_adapter():
    model = TINY["wan"](0).model
    plain, ret = (models.adapter_for(model, variant=v) for v in ("i2v-720p", "i2v-720p-ret"))
    assert plain.indicator.__name__ == "captured_output(condition, 0)"
    assert ret.indicator.__name__ == "captured_output(condition, 1)"
    assert plain.forced(N - 1, N) and not ret.forced(N - 1, N) and ret.forced(4, N)
    assert ret.coefficients == list(MODELS_MD_COEFFICIENTS[("wan", "i2v-720p-ret")]) and ret.threshold == 0.20


def test_family_records_refuse_inconsistent_facts():
    v = family_records.Variant((1.0, 0.0), (0.1,), source="x/y@0 f")
    common = dict(name="toy", title="Toy", classes=("Toy",), variants={"a": v}, blocks=("blocks",),
                  indicator=lambda call: call["x"])
    with pytest.raises(ValueError, match="default variant 'b' is not one of"):
        family_records.Family(default_variant="b", **common)
    with pytest.raises(ValueError, match="stream 'hidden_states' is not in returns"):
        family_records.Family(default_variant="a", returns=("x", "y"), **common)
    with pytest.raises(ValueError, match="at least one published threshold"):
        family_records.Variant((1.0,), ())


# ------------------------------------------------------------------- layering

def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""


def test_models_import_only_base_common_record_torch_and_the_stdlib():
    families = {p.stem for p in MODELS_DIR.glob("*.py")} - {"__init__", "base", "common", "record"}
    for path in sorted(MODELS_DIR.glob("*.py")):
        allowed = {"base"} if path.stem in ("base", "common", "record") else {"base", "common", "record"}
        if path.stem == "__init__":
            allowed |= families | {""}  # the registry imports the family modules
        for level, name in _imports(path):
            if level:
                assert level == 1 and name in allowed, f"{path.name} imports {'.' * level}{name}"
            else:
                top = name.split(".")[0]
                assert top == "torch" or top in sys.stdlib_module_names, f"{path.name} imports {name}"
