"""Every wrong call of every public op: the exception type, and a message that names the argument.

The table below is the single source of docs/bad_input.md (rendered by
tools/gen_bad_input_table.py, which runs each call and records the message it
really gets); ``test_docs_table_is_current`` fails when the two disagree, so the
README's link always points at a true table.

Each row is ``(call, exception type, argument named in the message)``. ``call``
is Python source evaluated in :func:`namespace`, so the documented call is
exactly the tested one. A device mismatch is provoked with 'meta' tensors,
which need no GPU.
"""
from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest
import torch
from torch import nn

from teacache_fast import TeaCacheConfig, ops
from teacache_fast.models import Adapter

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad_input.md"
B, N, C = 2, 3, 4


def namespace() -> dict:
    """Fresh, valid arguments; each row breaks exactly one of them."""
    x = torch.randn(B, N, C)
    return dict(
        ops=ops, torch=torch,
        x=x, scale=torch.randn(B, C), shift=torch.randn(B, C), prev=torch.randn(B, N, C),
        x_grad=x.clone().requires_grad_(True),
        partials=torch.tensor([0.1, 1.0]), state=ops.new_decide_state((2,)),
        partials_b=torch.rand(B, 2), state_b=ops.new_decide_state((B, 2)),
        coeffs=[1.0, 0.0], out=torch.randn(B, N, C), residual=torch.zeros(B, N, C),
        hidden=torch.randn(B, N, C), mask=torch.tensor([True, False]),
        # the settings and the adapter (a model of two Linear blocks)
        TeaCacheConfig=TeaCacheConfig, Adapter=Adapter,
        model=nn.Sequential(nn.Linear(C, C), nn.Linear(C, C)), blocks=list,
        indicator=lambda call: call["input"], passthrough=lambda call: call["input"],
        enc=torch.randn(B, 5, C),
    )


CASES = [
    # ---- modulate
    ("ops.modulate([1.0, 2.0], scale, shift)", TypeError, "x"),
    ("ops.modulate(x.int(), scale, shift)", TypeError, "x"),
    ("ops.modulate(x.double(), scale, shift)", TypeError, "x"),
    ("ops.modulate(x[0, 0], None, None)", ValueError, "x"),
    ("ops.modulate(x[:, :0], scale, shift)", ValueError, "x"),
    ("ops.modulate(x_grad, scale, shift)", RuntimeError, "x"),
    ("ops.modulate(x, scale[:, :3], shift)", ValueError, "scale"),
    ("ops.modulate(x, scale, torch.zeros(3, 4))", ValueError, "shift"),
    ("ops.modulate(x, scale.double(), shift)", TypeError, "scale"),
    ("ops.modulate(x, scale.to('meta'), shift)", ValueError, "scale"),
    ("ops.modulate(x, scale, shift, norm='batch')", ValueError, "norm"),
    ("ops.modulate(x, scale, shift, eps=0.0)", ValueError, "eps"),
    ("ops.modulate(x, scale, shift, eps=float('nan'))", ValueError, "eps"),
    # ---- rel_l1_partials
    ("ops.rel_l1_partials(x, prev[:, :2])", ValueError, "prev"),
    ("ops.rel_l1_partials(x, prev.half())", TypeError, "prev"),
    ("ops.rel_l1_partials(x, prev.to('meta'))", ValueError, "prev"),
    ("ops.rel_l1_partials(x[:0], prev[:0])", ValueError, "cur"),
    ("ops.rel_l1_partials(x.long(), prev)", TypeError, "cur"),
    ("ops.rel_l1_partials(x, prev, per_sample=1)", TypeError, "per_sample"),
    ("ops.rel_l1_partials(x[0, 0], prev[0, 0], per_sample=True)", ValueError, "per_sample"),
    # ---- modulated_rel_l1_
    ("ops.modulated_rel_l1_(x, scale, shift, prev[:, :2])", ValueError, "prev"),
    ("ops.modulated_rel_l1_(x, scale, shift, prev.bfloat16())", TypeError, "prev"),
    ("ops.modulated_rel_l1_(x, scale, shift, prev.to('meta'))", ValueError, "prev"),
    ("ops.modulated_rel_l1_(x, scale, shift, None)", TypeError, "prev"),
    ("ops.modulated_rel_l1_(x_grad, scale, shift, prev)", RuntimeError, "x"),
    ("ops.modulated_rel_l1_(x, scale[:1, :2], shift, prev)", ValueError, "scale"),
    ("ops.modulated_rel_l1_(x, scale, shift, prev, norm='LayerNorm')", ValueError, "norm"),
    ("ops.modulated_rel_l1_(x, scale, shift, prev, eps=-1e-6)", ValueError, "eps"),
    ("ops.modulated_rel_l1_(x, scale, shift, prev, per_sample='yes')", TypeError, "per_sample"),
    ("ops.modulated_rel_l1_(x, scale, shift, prev[:1].expand(2, 3, 4))", ValueError, "prev"),
    # ---- teacache_decide_
    ("ops.teacache_decide_(partials.half(), state, coeffs, 0.1)", TypeError, "partials"),
    ("ops.teacache_decide_(torch.zeros(3), state, coeffs, 0.1)", ValueError, "partials"),
    ("ops.teacache_decide_(partials, state_b, coeffs, 0.1)", ValueError, "state"),
    ("ops.teacache_decide_(partials, state.double(), coeffs, 0.1)", TypeError, "state"),
    ("ops.teacache_decide_(partials, state.to('meta'), coeffs, 0.1)", ValueError, "state"),
    ("ops.teacache_decide_(partials, state, [], 0.1)", ValueError, "coefficients"),
    ("ops.teacache_decide_(partials, state, [1.0] * 10, 0.1)", ValueError, "coefficients"),
    ("ops.teacache_decide_(partials, state, [1.0, float('inf')], 0.1)", ValueError, "coefficients[1]"),
    ("ops.teacache_decide_(partials, state, [1e300, 0.0], 0.1)", ValueError, "coefficients[0]"),  # inf in fp32
    ("ops.teacache_decide_(partials, state, '1 0', 0.1)", TypeError, "coefficients"),
    ("ops.teacache_decide_(partials, state, torch.ones(2, 2), 0.1)", ValueError, "coefficients"),
    ("ops.teacache_decide_(partials, state, coeffs, -0.1)", ValueError, "threshold"),
    ("ops.teacache_decide_(partials, state, coeffs, float('nan'))", ValueError, "threshold"),
    ("ops.teacache_decide_(partials, state, coeffs, 0.1, force=1)", TypeError, "force"),
    ("ops.teacache_decide_(partials_b, state_b, coeffs, 0.1, force=torch.ones(2))", TypeError, "force"),
    ("ops.teacache_decide_(partials_b, state_b, coeffs, 0.1, force=mask[:1])", ValueError, "force"),
    ("ops.teacache_decide_(partials, state, coeffs, 0.1, max_consecutive_skips=-1)", ValueError,
     "max_consecutive_skips"),
    ("ops.teacache_decide_(partials, state, coeffs, 0.1, max_consecutive_skips=2.5)", ValueError,
     "max_consecutive_skips"),
    ("ops.teacache_decide_(partials_b, state_b[:1].expand(2, 2), coeffs, 0.1)", ValueError, "state"),
    # ---- residual_capture_
    ("ops.residual_capture_(out, x[:, :2], residual)", ValueError, "inp"),
    ("ops.residual_capture_(out, x.half(), residual)", TypeError, "inp"),
    ("ops.residual_capture_(out, x.to('meta'), residual)", ValueError, "inp"),
    ("ops.residual_capture_(out[:0], x[:0], residual)", ValueError, "out"),
    ("ops.residual_capture_(out, x, residual[:1])", ValueError, "residual"),
    ("ops.residual_capture_(out, x, residual.int())", TypeError, "residual"),
    ("ops.residual_capture_(out, x, residual[:1].expand(2, 3, 4))", ValueError, "residual"),
    # ---- residual_apply_
    ("ops.residual_apply_(hidden, residual[:, :1])", ValueError, "residual"),
    ("ops.residual_apply_(hidden.double(), residual)", TypeError, "hidden"),
    ("ops.residual_apply_(x_grad, residual)", RuntimeError, "hidden"),
    ("ops.residual_apply_(hidden, residual, mask.int())", TypeError, "mask"),
    ("ops.residual_apply_(hidden, residual, mask[:1])", ValueError, "mask"),
    ("ops.residual_apply_(hidden, residual, mask.to('meta'))", ValueError, "mask"),
    ("ops.residual_apply_(hidden[:1].expand(2, 3, 4), residual)", ValueError, "hidden"),
    ("ops.residual_apply_(torch.zeros(2, 1, 4).expand(2, 3, 4), residual)", ValueError, "hidden"),
    ("ops.residual_apply_(hidden, residual, out=out.half())", TypeError, "out"),
    ("ops.residual_apply_(hidden, residual, out=out[:, :1])", ValueError, "out"),
    ("ops.residual_apply_(hidden, residual, out=out.to('meta'))", ValueError, "out"),
    ("ops.residual_apply_(hidden, residual, out=out[:1].expand(2, 3, 4))", ValueError, "out"),
    ("ops.residual_apply_(hidden, residual, out=residual)", ValueError, "out"),
    ("ops.residual_apply_(hidden, residual, out=hidden)", ValueError, "out"),
    # ---- TeaCacheConfig (apply_teacache's settings)
    ("TeaCacheConfig(coefficients=coeffs, cache_device='meta').validate()", ValueError, "cache_device"),
    ("TeaCacheConfig(coefficients=coeffs, cache_device='gpu').validate()", ValueError, "cache_device"),
    # ---- Adapter (a model without a preset)
    ("Adapter(name='toy', blocks=[model[0]], indicator=indicator)", TypeError, "blocks"),
    ("Adapter(name='toy', blocks=blocks, indicator=None)", TypeError, "indicator"),
    ("Adapter(name='toy', blocks=lambda m: torch.zeros(2), indicator=indicator).blocks(model)",
     TypeError, "blocks"),
    ("Adapter(name='toy', blocks=lambda m: [m[0], 3], indicator=indicator).blocks(model)",
     TypeError, "blocks"),
    ("Adapter(name='toy', blocks=lambda m: m[0], indicator=indicator).blocks(model)", TypeError, "blocks"),
    ("Adapter(name='toy', blocks=blocks, indicator=indicator, stream=0)", TypeError, "stream"),
    ("Adapter(name='toy', blocks=blocks, indicator=indicator, output_index='1', "
     "passthrough=passthrough)", TypeError, "output_index"),
    ("Adapter(name='toy', blocks=blocks, indicator=indicator, unbatched='image_rotary_emb')",
     TypeError, "unbatched"),
    ("Adapter(name='toy', blocks=blocks, indicator=indicator, output_index=0, "
     "passthrough=passthrough).check_output((enc, hidden), hidden)", ValueError, "output_index"),
    ("Adapter(name='toy', blocks=blocks, indicator=indicator, output_index=2, "
     "passthrough=passthrough).check_output((enc, hidden), hidden)", ValueError, "output_index"),
    ("Adapter(name='toy', blocks=blocks, indicator=indicator).check_output((enc, hidden), hidden)",
     TypeError, "output_index"),
]


def op_name(call: str) -> str:
    """The op (or class) a row calls: the table's section."""
    return re.match(r"(?:ops\.)?(\w+)\(", call).group(1)


def run_case(call: str) -> BaseException:
    """Evaluate the call under grad mode; return the exception it raised."""
    with torch.enable_grad():
        try:
            eval(call, namespace())  # noqa: S307 - table rows are trusted test source
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return exc
    raise AssertionError(f"{call} raised nothing")


@pytest.mark.parametrize("call, exc_type, arg", CASES, ids=[c[0] for c in CASES])
def test_bad_call(call, exc_type, arg):
    exc = run_case(call)
    assert type(exc) is exc_type, f"{call}: expected {exc_type.__name__}, got {type(exc).__name__}: {exc}"
    # The message names the op's parameter as a word ('x' must not match inside 'max').
    assert re.search(rf"(?<![\w.]){re.escape(arg)}(?!\w)", str(exc)), f"{call}: {exc}"


def test_every_public_op_has_rows():
    tested = {op_name(c[0]) for c in CASES}
    public = set(ops.OP_NAMES)
    assert public <= tested, public - tested


def test_valid_namespace_calls_succeed():
    """The baseline arguments are valid, so each row fails for the one thing it breaks."""
    ns = namespace()
    with torch.no_grad():
        ops.modulate(ns["x"], ns["scale"], ns["shift"])
        ops.rel_l1_partials(ns["x"], ns["prev"], per_sample=True)
        ops.modulated_rel_l1_(ns["x"], ns["scale"], ns["shift"], ns["prev"])
        ops.teacache_decide_(ns["partials_b"], ns["state_b"], ns["coeffs"], 0.1, force=ns["mask"],
                             max_consecutive_skips=2)
        ops.residual_capture_(ns["out"], ns["x"], ns["residual"])
        ops.residual_apply_(ns["hidden"], ns["residual"], ns["mask"])


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_bad_input_table",
                                                  ROOT / "tools" / "gen_bad_input_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_table_is_current():
    expected = _load_generator().render()
    assert DOC.exists(), "docs/bad_input.md missing: run python tools/gen_bad_input_table.py"
    assert DOC.read_text() == expected, \
        "docs/bad_input.md is stale: run python tools/gen_bad_input_table.py"
