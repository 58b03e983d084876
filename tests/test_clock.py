"""The call clock alone (teacache_fast/cache/clock.py): its rules table, with
hand-made timesteps, inputs and CallContexts."""
import pytest
import torch

from teacache_fast.cache.clock import CallClock, CallContext


def _place(clock, calls):
    """calls: (timestep, latents object, other input) -> [(branch, step, restarted)]."""
    out = []
    for t, x, c in calls:
        tick = clock.next_call(t, ("sig",), inputs=[x, c])
        out.append((tick.branch, tick.step, tick.restarted))
    return out


def test_context_names_give_stable_branches_and_steps():
    clock = CallClock(None, None)
    ticks = []
    for gen in range(2):
        for i in range(3):
            for name in ("cond", "uncond"):
                tk = clock.next_call(None, ("s",), CallContext(name, i, 3))
                ticks.append((tk.branch, tk.step, tk.num_steps, tk.restarted))
    assert ticks[:6] == [(0, 0, 3, None), (1, 0, 3, None), (0, 1, 3, None), (1, 1, 3, None),
                         (0, 2, 3, None), (1, 2, 3, None)]
    # the second generation: step_index went back to 0
    assert ticks[6] == (0, 0, 3, "step index went back") and ticks[7:] == ticks[1:6]
    assert clock.restarts == {"step index went back": 1}


def test_context_without_step_index_counts_per_name_and_truncation_keeps_branches():
    clock = CallClock(None, 5)
    seq = [("cond", 0), ("uncond", 1)] * 2 + [("cond", 0)] * 3
    got = [(clock.next_call(None, ("s",), CallContext(n)).branch) for n, _ in seq]
    assert got == [b for _, b in seq]
    assert clock.ctx_last == {0: 4, 1: 1}
    # a new num_inference_steps starts a generation
    tk = clock.next_call(None, ("s",), CallContext("cond", 0, 7))
    assert tk.restarted == "num_inference_steps changed" and tk.num_steps == 7


def test_warm_up_then_generation_is_a_new_generation():
    clock = CallClock(None, 4)
    warm, x0, x1 = torch.zeros(1), torch.ones(1), torch.ones(1) * 2
    c, u = torch.zeros(1), torch.zeros(1)
    got = _place(clock, [(1.0, warm, c), (1.0, x0, c), (0.75, x1, c), (0.5, torch.ones(1), c)])
    assert got == [(0, 0, None), (0, 0, "first step repeated"), (0, 1, None), (0, 2, None)]
    # CFG: the step's branches share the latents tensor
    clock = CallClock(None, 4)
    got = _place(clock, [(1.0, warm, c), (1.0, x0, c), (1.0, x0, u), (0.75, x1, c), (0.75, x1, u)])
    assert got == [(0, 0, None), (0, 0, "first step repeated"), (1, 0, None), (0, 1, None),
                   (1, 1, None)]
    assert clock.restarts == {"first step repeated": 1}


def test_a_call_repeated_at_the_first_step_is_a_new_generation():
    clock = CallClock(None, 4)
    x, c = torch.ones(1), torch.zeros(1)
    assert _place(clock, [(1.0, x, c), (1.0, x, c)]) == [(0, 0, None), (0, 0, "first step repeated")]


def test_one_step_img2img_then_a_generation():
    clock = CallClock(None, 4)
    xs = [torch.ones(1) for _ in range(4)]
    got = _place(clock, [(0.5, xs[0], 0), (1.0, xs[1], 0), (0.75, xs[2], 0), (0.5, xs[3], 0)])
    assert got == [(0, 0, None), (0, 0, "timestep rose"), (0, 1, None), (0, 2, None)]
    assert clock.generations == 1


def test_rising_schedule_is_adopted_at_its_second_rise():
    clock = CallClock(None, 4)
    xs = [torch.ones(1) for _ in range(4)]
    got = _place(clock, [(0.0, xs[0], 0), (0.25, xs[1], 0), (0.5, xs[2], 0), (0.75, xs[3], 0)])
    assert [s for _, s, _ in got] == [0, 0, 2, 3] and clock.direction == 1
    assert clock.generations == 0 and clock.restarts == {}


def test_cfg_truncation_makes_the_later_calls_branch_0():
    clock = CallClock(None, 5)
    calls = []
    for i, t in enumerate([1.0, 0.8, 0.6, 0.4, 0.2]):
        x = torch.ones(1)
        calls += [(t, x, "c")] + ([(t, x, "u")] if i < 2 else [])
    got = _place(clock, calls)
    assert got == [(0, 0, None), (1, 0, None), (0, 1, None), (1, 1, None), (0, 2, None),
                   (0, 3, None), (0, 4, None)]


def test_interrupted_run_then_new_run_and_the_finished_rule():
    clock = CallClock(None, 3)
    seq = [1.0, 0.66, 1.0, 0.66, 0.33, 1.0]
    got = _place(clock, [(t, torch.ones(1), 0) for t in seq])
    assert got == [(0, 0, None), (0, 1, None), (0, 0, "timestep went back"), (0, 1, None),
                   (0, 2, None), (0, 0, "finished")]


def test_timestep_rising_mid_run_keeps_the_old_last_step_forced():
    clock = CallClock(None, 6)
    ticks = [clock.next_call(t, ("s",), inputs=[torch.ones(1)])
             for t in [1.0, 0.8, 0.6, 0.7, 0.4, 0.2]]
    assert ticks[3].restarted == "timestep rose"
    assert [(tk.step, tk.shadow) for tk in ticks[3:]] == [(0, 3), (1, 4), (2, 5)]


def test_shape_change_with_a_timestep_keeps_the_count():
    clock = CallClock(None, 4)
    ticks = [clock.next_call(t, (b,), inputs=[torch.ones(1)])
             for t, b in [(1.0, 2), (0.75, 2), (0.5, 1), (0.25, 1)]]
    assert [(tk.step, tk.fresh, tk.restarted) for tk in ticks] == \
        [(0, False, None), (1, False, None), (2, True, None), (3, False, None)]
    # without a timestep the position is unknown: a new generation
    clock = CallClock(None, 4)
    ticks = [clock.next_call(None, (b,)) for b in (2, 2, 1)]
    assert ticks[2].restarted == "shapes changed" and ticks[2].step == 0


def test_abandon_and_reset():
    clock = CallClock(None, 4)
    _place(clock, [(1.0, torch.ones(1), 0)])
    clock.abandon("call raised")
    assert _place(clock, [(0.75, torch.ones(1), 0)]) == [(0, 0, "call raised")]
    clock.restart("reset")
    assert clock.restarts == {"call raised": 1, "reset": 1}


def test_scheduler_not_set_up_is_an_error():
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler()
    clock = CallClock(None, None, sched)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        clock.next_call(torch.ones(1), ("s",))
    sched.set_timesteps(6)
    clock.set_timesteps_done()
    assert clock.next_call(torch.ones(1), ("s",)).num_steps == 6
