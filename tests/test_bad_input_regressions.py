"""Bad input that used to crash, hang or answer silently wrong (issues 14 and 15).

Each test fails on the code before its fix: a value no check can see without a
host sync must make the cache compute; a wrong argument gets an error that
names it. Backends: every one that runs here (torch; triton under
TRITON_INTERPRET=1, set by conftest; cuda where a GPU and teacache_fast._C are).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import teacache_fast as tf
from teacache_fast import TeaCacheConfig, ops
from teacache_fast.models import Adapter
from op_oracles import runnable_backends
from toy_models import ToyDiT, toy_adapter
from toy_models import sample as toy_sample

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = runnable_backends(DEV)
STEPS = 6
# the interpreter's numpy says so when x * x overflows: that is the case under test
overflow_ok = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


# --------------------------------------------------------------------------- a toy DiT

def sample(model, x):
    return toy_sample(model, x, STEPS)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return ToyDiT(dim=8, depth=(2, 0)).eval()


def untouched(model: nn.Module) -> bool:
    """No override left behind by a failed apply_teacache."""
    return not tf.is_cached(model) and not any("forward" in m.__dict__ for m in model.modules())


# --------------------------------------------------------------------------- item 8: cache_device

def test_cache_device_meta_is_refused_before_anything_is_attached(toy):
    with pytest.raises(ValueError, match=r"cache_device .*'meta'"):
        tf.apply_teacache(toy, adapter=toy_adapter(), coefficients=[1.0, 0.0], num_steps=STEPS,
                          threshold=0.5, cache_device="meta")
    assert untouched(toy)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)], ids=str)
def test_cache_device_cuda_without_cuda_is_refused_by_validate(toy, device):
    cfg = TeaCacheConfig(coefficients=[1.0, 0.0], cache_device=device)
    with pytest.raises(ValueError, match=r"cache_device='cuda(:\d)?' needs a CUDA device"):
        cfg.validate()
    with pytest.raises(ValueError, match="cache_device"):
        tf.apply_teacache(toy, adapter=toy_adapter(), coefficients=[1.0, 0.0], num_steps=STEPS,
                          cache_device=device)
    assert untouched(toy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cache_device_cuda_index_out_of_range_is_refused():
    cfg = TeaCacheConfig(coefficients=[1.0, 0.0], cache_device=f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(ValueError, match="cache_device=.* CUDA device"):
        cfg.validate()


def test_cache_device_cpu_still_validates():
    cfg = TeaCacheConfig(coefficients=[1.0, 0.0], cache_device="cpu").validate()
    assert cfg.cache_device == torch.device("cpu")


# --------------------------------------------------------------------------- item 9: overflowing statistics

def _huge_rows(norm):
    """Row 0 of each sample overflows fp32 in sum(x^2) (|x| ~ 1e20, finite); row 1 is normal."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 7, generator=g)
    x[:, 0] = x[:, 0].sign() * 1e20 + torch.arange(7) * 1e18
    return x


@overflow_ok
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_overflowing_norm_statistics_make_the_step_compute(backend, norm):
    x = _huge_rows(norm).to(DEV)
    assert torch.isfinite(x).all()
    scale = torch.randn(2, 7).to(DEV)
    shift = torch.randn(2, 7).to(DEV)
    with ops.use_backend(backend):
        m = ops.modulate(x, scale, shift, norm=norm)
        # the overflowed rows are NaN (not shift, which would read "no change"); the rest is finite
        assert torch.isnan(m[:, 0]).all() and torch.isfinite(m[:, 1]).all()
        prev = m.clone()
        for per_sample in (False, True):
            partials = ops.modulated_rel_l1_(x, scale, shift, prev.clone(), norm=norm,
                                             per_sample=per_sample)
            assert not torch.isfinite(partials).all(), partials
            state = ops.new_decide_state(partials.shape, device=DEV)
            flags = ops.teacache_decide_(partials, state, [1.0, 0.0], 1e6)
            assert flags.all(), (partials, flags)


@overflow_ok
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_normal_rows_keep_their_bits_next_to_an_overflowing_one(backend, norm):
    """The fix only touches rows whose statistics overflow: the others are what they were."""
    x = torch.randn(2, 3, 7).to(DEV)
    scale, shift = torch.randn(2, 7).to(DEV), torch.randn(2, 7).to(DEV)
    with ops.use_backend(backend):
        alone = ops.modulate(x, scale, shift, norm=norm)
        x2 = x.clone()
        x2[:, 1] = torch.linspace(-3e20, 3e20, 7)
        together = ops.modulate(x2, scale, shift, norm=norm)
    assert torch.isnan(together[:, 1]).all()
    assert torch.equal(alone[:, 0], together[:, 0]) and torch.equal(alone[:, 2], together[:, 2])


def test_torch_backend_bits_on_normal_input_are_the_published_formula():
    """LayerNorm: two-pass statistics, rsqrt(var + eps); RMSNorm: F.rms_norm, bit for bit."""
    torch.manual_seed(1)
    x = torch.randn(3, 5, 33) * 4 + 2
    with ops.use_backend("torch"):
        layer = ops.modulate(x, None, None, norm="layer")
        rms = ops.modulate(x, None, None, norm="rms")
    centred = x - x.mean(dim=-1, keepdim=True)
    assert torch.equal(layer, centred * (centred.square().mean(dim=-1, keepdim=True) + 1e-6).rsqrt())
    assert torch.equal(rms, nn.functional.rms_norm(x, (33,), eps=1e-6))


@overflow_ok
@torch.no_grad()
def test_huge_activations_through_the_wrapper_compute_every_step(toy):
    """End to end: with |hidden| ~ 1e20 every step computes (it used to skip: rel_l1 read 0)."""
    x0 = torch.randn(1, 6, 4) * 1e20
    with tf.teacache(toy, adapter=toy_adapter(), coefficients=[1.0, 0.0], threshold=1e6,
                     num_steps=STEPS):
        sample(toy, x0)
        st = tf.stats(toy)
    assert st["computed"] == STEPS and st["skipped"] == 0, st


# ----------------------------------------------------------------- item 12: a corrupt decision state

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("skips", [float("nan"), float("inf"), float("-inf"), -3.0])
@pytest.mark.parametrize("max_skips", [2, None])
def test_a_corrupt_skip_counter_computes_and_is_reset(backend, skips, max_skips):
    # state 0 is corrupt, state 1 is valid and would skip: only state 0 must compute
    partials = torch.tensor([[0.0, 1.0], [0.0, 1.0]], device=DEV)
    state = torch.tensor([[0.0, skips], [0.0, 0.0]], device=DEV)
    with ops.use_backend(backend):
        flags = ops.teacache_decide_(partials, state, [1.0, 0.0], 0.5, max_consecutive_skips=max_skips)
    assert flags.tolist() == [True, False]
    assert state.tolist() == [[0.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_skip_cap_holds_after_a_nan_counter(backend):
    """The reported case: a NaN counter used to make max_consecutive_skips never fire."""
    partials = torch.tensor([0.0, 1.0], device=DEV)
    state = torch.tensor([0.0, float("nan")], device=DEV)
    flags = []
    with ops.use_backend(backend):
        for _ in range(6):
            flags.append(bool(ops.teacache_decide_(partials, state, [1.0, 0.0], 0.5,
                                                   max_consecutive_skips=2)))
    assert flags == [True, False, False, True, False, False]


# --------------------------------------------------------------------------- issue 14: bool bytes 2..255

def _bool_bytes(*values):
    return torch.tensor(values, dtype=torch.uint8).view(torch.bool)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_residual_apply_reads_any_nonzero_mask_byte_as_true(backend, dtype):
    L = 5
    for flags in ((2, 0), (0, 2), (255, 7)):
        # hidden is the front of a bigger buffer: a write past it shows in the spare row
        buf = torch.zeros(3, L, dtype=dtype, device=DEV)
        hidden = buf[:2]
        residual = torch.ones(2, L, dtype=dtype, device=DEV)
        mask = _bool_bytes(*flags).to(DEV)
        with ops.use_backend(backend):
            ops.residual_apply_(hidden, residual, mask)
        want = torch.tensor([[float(f != 0)] * L for f in flags] + [[0.0] * L], dtype=dtype)
        assert torch.equal(buf.cpu(), want), (flags, buf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decide_reads_any_nonzero_force_byte_as_true(backend):
    partials = torch.tensor([[0.0, 1.0], [0.0, 1.0]], device=DEV)
    state = ops.new_decide_state((2, 2), device=DEV)
    with ops.use_backend(backend):
        flags = ops.teacache_decide_(partials, state, [1.0, 0.0], 0.5, force=_bool_bytes(2, 0).to(DEV))
    assert flags.tolist() == [True, False]


# ----------------------------------------------------------------- item 11: errors that name nothing

@pytest.mark.parametrize("blocks, match", [
    (lambda m: torch.zeros(3), "blocks\\(model\\) must return a sequence of torch.nn.Module.*tensor"),
    (lambda m: 3, "blocks\\(model\\) must return a sequence of torch.nn.Module.*int"),
    (lambda m: [m.blocks[0], torch.zeros(1)], "item 1 is a tensor"),
    (torch.zeros(2), "blocks must be a callable"),
    (2, "blocks must be a callable"),
], ids=["tensor", "int", "tensor-item", "tensor-not-callable", "int-not-callable"])
def test_adapter_blocks_that_are_not_modules(toy, blocks, match):
    with pytest.raises(TypeError, match=match):
        tf.apply_teacache(toy, adapter=toy_adapter(blocks=blocks), coefficients=[1.0, 0.0],
                          num_steps=STEPS)
    assert untouched(toy)


def test_adapter_blocks_may_return_a_module_list(toy):
    adapter = toy_adapter(blocks=lambda m: m.blocks)
    assert adapter.blocks(toy) == list(toy.blocks)
    a = toy_adapter()
    assert a.blocks.__wrapped__(toy) == a.blocks(toy)  # the checked function is the given one
    b = dataclasses.replace(a, name="renamed", blocks=lambda m: [1])
    with pytest.raises(TypeError, match="Adapter 'renamed': blocks"):
        b.blocks(toy)
    assert dataclasses.replace(a, name="again").blocks.__wrapped__ is a.blocks.__wrapped__


def test_a_preset_name_given_as_adapter(toy):
    with pytest.raises(TypeError, match="adapter must be a teacache_fast.models.Adapter.*preset='flux'"):
        tf.apply_teacache(toy, adapter="flux", coefficients=[1.0, 0.0], num_steps=STEPS)


def test_check_adapter_names_the_argument():
    from teacache_fast.models.base import check_adapter
    with pytest.raises(TypeError, match="adapter must be a teacache_fast.models.Adapter.*preset='flux'"):
        check_adapter("flux")
    a = toy_adapter()
    assert check_adapter(a) is a


class TupleBlock(nn.Module):
    """Returns (encoder_states, hidden_states), as Flux's double blocks do."""

    def __init__(self, dim=8):
        super().__init__()
        self.f = nn.Linear(dim, dim)
        self.g = nn.Linear(dim, dim)

    def forward(self, x, enc):
        return enc + self.g(enc), x + self.f(x)


class TupleDiT(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(TupleBlock(dim) for _ in range(2))
        self.out = nn.Linear(dim, 4)

    def forward(self, x, timestep, enc):
        h = self.embed(x) * timestep[:, None, None]
        for blk in self.blocks:
            enc, h = blk(h, enc)
        return self.out(h)


def _tuple_adapter(output_index):
    return Adapter(name="tuple", blocks=lambda m: list(m.blocks), indicator=lambda call: call["x"],
                   stream="x", output_index=output_index,
                   passthrough=lambda call: (call["enc"], call["x"]))


def _run_tuple(model, output_index):
    enc = torch.randn(1, 5, 8)
    with torch.no_grad(), tf.teacache(model, adapter=_tuple_adapter(output_index),
                                      coefficients=[1.0, 0.0], threshold=0.3, num_steps=STEPS):
        x = torch.randn(1, 3, 4)
        for i in range(STEPS):
            x = x + 0.1 * model(x, torch.full((1,), 1.0 - i / STEPS), enc)
        return tf.stats(model)


def test_tuple_blocks_with_the_right_output_index_run():
    torch.manual_seed(0)
    st = _run_tuple(TupleDiT().eval(), output_index=1)
    assert st["computed"] >= 2


def test_a_wrong_output_index_is_named():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="output_index=0"):
        _run_tuple(TupleDiT().eval(), output_index=0)


def test_check_output_accepts_a_subset_batch_and_refuses_other_shapes():
    a = _tuple_adapter(1)
    stream_in = torch.zeros(4, 3, 8)
    sub = torch.zeros(2, 3, 8)                       # a per-sample run computed 2 of 4
    assert a.check_output((torch.zeros(2, 5, 8), sub), stream_in) is sub
    with pytest.raises(ValueError, match="output_index=1 .* shape \\(2, 5, 8\\)"):
        a.check_output((sub, torch.zeros(2, 5, 8)), stream_in)
    with pytest.raises(TypeError, match="output_index=1 must point at the 'x' tensor"):
        a.check_output((sub, None), stream_in)


@pytest.mark.parametrize("call", [
    lambda: ops.modulated_rel_l1_(torch.randn(2, 3, 4), None, None, torch.randn(1, 3, 4).expand(2, 3, 4)),
    lambda: ops.residual_apply_(torch.randn(1, 3, 4).expand(2, 3, 4), torch.randn(2, 3, 4)),
], ids=["prev", "hidden"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_stride0_in_place_arguments_are_named_on_every_backend(backend, call):
    with ops.use_backend(backend), pytest.raises(ValueError, match="(prev|hidden) is written in place"):
        call()


def test_teacache_context_keeps_the_body_exception_when_the_body_removed_it(toy):
    kw = dict(adapter=toy_adapter(), coefficients=[1.0, 0.0], num_steps=STEPS)
    with pytest.raises(KeyError, match="boom"):
        with tf.teacache(toy, **kw) as model:
            tf.remove_teacache(model)
            raise KeyError("boom")
    assert untouched(toy)
    with tf.teacache(toy, **kw) as model:   # removed in the body, no exception: a clean exit
        tf.remove_teacache(model)
    assert untouched(toy)
    with pytest.raises(KeyError, match="boom"):   # the usual case still removes it
        with tf.teacache(toy, **kw):
            raise KeyError("boom")
    assert untouched(toy)
