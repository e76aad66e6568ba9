from chipmunk_compile import ChipmunkConfig
from chipmunk_compile.state import StepClock


def _run(clock, ts, sig=("x",)):
    return [(i.generation, i.step, i.stream) for i in (clock.advance_timestep(t, sig) for t in ts)]


def test_one_call_per_step_then_new_generation():
    clock = StepClock(ChipmunkConfig())
    assert _run(clock, [1000, 800, 600, 1000, 800]) == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0), (1, 1, 0)]


def test_two_cfg_streams_per_step():
    clock = StepClock(ChipmunkConfig())
    got = _run(clock, [1000, 1000, 900, 900, 800, 800])
    assert got == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1)]


def test_shape_change_and_reset_start_a_new_generation():
    clock = StepClock(ChipmunkConfig())
    assert _run(clock, [1000, 900], sig=("a",)) == [(0, 0, 0), (0, 1, 0)]
    assert _run(clock, [800], sig=("b",)) == [(1, 0, 0)]
    clock.reset()
    assert _run(clock, [700], sig=("b",)) == [(2, 0, 0)]


def test_counting_mode_for_graphs_without_timestep():
    clock = StepClock(ChipmunkConfig(streams_per_step=2, num_steps=2))
    got = [(i.generation, i.step, i.stream) for i in (clock.advance_count(("x",)) for _ in range(6))]
    assert got == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1)]


def test_repeated_same_timestep_is_bounded():
    clock = StepClock(ChipmunkConfig())
    streams = [s for _, _, s in _run(clock, [500] * 10)]
    assert max(streams) < 4
