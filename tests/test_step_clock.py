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


def test_within_a_loop_other_shapes_are_another_stream():
    # Keys from a loop index (-i): SD3's skip-layer guidance adds a batch-1 call to the batch-2 call of some
    # steps. Within the loop that is stream 1 of the step, and the next step goes on; a key that rises (i back
    # to 0) is a new loop. Keys from timestep values keep treating a shape change as a new generation.
    clock = StepClock(ChipmunkConfig())
    calls = [(0, "b2"), (-1, "b2"), (-1, "b1"), (-2, "b2"), (-2, "b1"), (-3, "b2"), (0, "b2")]
    got = [(i.generation, i.step, i.stream) for i in (clock.advance_timestep(t, (s,), True) for t, s in calls)]
    assert got == [(0, 0, 0), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (0, 3, 0), (1, 0, 0)]
    clock = StepClock(ChipmunkConfig())
    assert [(i.generation, i.stream) for i in (clock.advance_timestep(t, (s,)) for t, s in calls[:3])] == [
        (0, 0), (0, 0), (1, 0)]


def test_last_step_releases_stopped_streams_but_not_a_stream_still_to_come():
    from chipmunk_compile.state import SiteState, StepInfo

    class Entry:
        def __init__(self, generation):
            self.generation = generation

    site = SiteState("attention", 0, 0, None)
    site.caches = {0: Entry(1), 1: Entry(1), 2: Entry(1), 3: Entry(0)}
    # stream 1: CFG as two calls (used at the previous step, its last call still to come); stream 2: stopped
    # after step 3 (skip-layer guidance); stream 3: an earlier generation's
    site.used = {0: (1, 7), 1: (1, 6), 2: (1, 3), 3: (0, 7)}
    site.release(StepInfo(generation=1, step=7, stream=0, last=True))
    assert sorted(site.caches) == [1]
    site.used[1] = (1, 7)
    site.release(StepInfo(generation=1, step=7, stream=1, last=True))
    assert not site.caches


def test_counting_mode_for_graphs_without_timestep():
    clock = StepClock(ChipmunkConfig(streams_per_step=2, num_steps=2))
    got = [(i.generation, i.step, i.stream) for i in (clock.advance_count(("x",)) for _ in range(6))]
    assert got == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1)]
    # num_steps known: the calls of each generation's last step are flagged (they free their caches)
    clock = StepClock(ChipmunkConfig(streams_per_step=2, num_steps=2))
    assert [clock.advance_count(("x",)).last for _ in range(6)] == [False, False, True, True, False, False]
    assert not any(clock.advance_timestep(t, ("x",)).last for t in (1000, 900))  # values alone: unknown


def test_repeated_same_timestep_is_bounded():
    clock = StepClock(ChipmunkConfig())
    streams = [s for _, _, s in _run(clock, [500] * 10)]
    assert max(streams) < 4


def _loop_steps(compiled, state_of, timesteps_list, cfg_calls=1, view=True):
    """Runs diffusers-style loops ``for i, t in enumerate(timesteps)`` and returns the clock after each call."""
    import torch

    seen = []
    x = torch.randn(1, 16, 8)
    with torch.no_grad():
        for timesteps in timesteps_list:
            for i, t in enumerate(timesteps):  # noqa: B007 - `i` is what the runner reads, from this frame
                if not view:
                    t = t.clone()  # noqa: PLW2901 - not an element of `timesteps` any more
                for _ in range(cfg_calls):
                    compiled(x, timestep=t.expand(1) * 1.0)
                    clock = state_of().clock
                    seen.append((clock.generation, clock.step, clock.stream))
    return seen


def test_denoising_loop_index_drives_the_clock_without_reading_the_timestep(monkeypatch):
    """Called from ``for i, t in enumerate(timesteps)`` the runner takes the step from ``i`` (``t`` must be
    element ``i`` of ``timesteps`` by address): the timestep's value is never read (on a GPU a sync)."""
    import torch

    import chipmunk_compile
    from chipmunk_compile import runner
    from chipmunk_compile.testing import TinyDiT

    model = TinyDiT(seq=16, depth=2)
    compiled = torch.compile(model, backend="chipmunk")

    def state_of():
        (state,) = chipmunk_compile.states_of(model)
        return state

    def no_read(t):
        raise AssertionError("the timestep value was read")

    with torch.no_grad():  # a first call outside any loop: reads t
        compiled(torch.randn(1, 16, 8), timestep=torch.tensor([999.0]))
    assert state_of().clock.generation == 0
    monkeypatch.setattr(runner, "_first", no_read)
    ts = [torch.linspace(1000, 250, 4), torch.linspace(900, 100, 3)]
    got = _loop_steps(compiled, state_of, ts, cfg_calls=2)
    # the warm-up call (timestep value) was generation 0: the loop (index keys) starts generation 1
    assert got == [(1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1), (1, 2, 0), (1, 2, 1), (1, 3, 0), (1, 3, 1),
                   (2, 0, 0), (2, 0, 1), (2, 1, 0), (2, 1, 1), (2, 2, 0), (2, 2, 1)]


def test_loop_variables_read_by_a_generator_expression_are_found():
    """``t`` read inside a generator expression in the loop body (two CFG calls summed) is a cell variable of
    the loop's frame, not a plain local: the loop index must still be found (else each step reads the value,
    a device sync on a GPU, and the last step is unknown)."""
    import torch

    from chipmunk_compile import runner

    found = []

    def loop(timesteps):
        for i, t in enumerate(timesteps):  # noqa: B007 - read from this frame
            sum(found.append(runner._loop_index(__import__("sys")._getframe())) or t for _ in range(1))

    ts = torch.linspace(1000, 100, 3)
    loop(ts)
    assert [(i, len(t)) for i, t in found] == [(0, 3), (1, 3), (2, 3)] and all(t is ts for _, t in found)


def test_loop_without_timestep_elements_falls_back_to_the_value():
    """``t`` that is not a view of ``timesteps[i]`` (here a copy): the runner reads the timestep value."""
    import torch

    import chipmunk_compile
    from chipmunk_compile import runner
    from chipmunk_compile.testing import TinyDiT

    model = TinyDiT(seq=16, depth=2)
    compiled = torch.compile(model, backend="chipmunk")

    def state_of():
        (state,) = chipmunk_compile.states_of(model)
        return state

    ts = torch.linspace(1000, 250, 4)
    got = _loop_steps(compiled, state_of, [ts], view=False)
    assert got == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 0)]
    i = 2
    t = ts[i]
    timesteps = ts  # noqa: F841 - the frame local the runner looks for
    i_found, ts_found = runner._loop_index(__import__("sys")._getframe())
    assert i_found == 2 and ts_found is ts  # the index, and the loop's timesteps (its length and identity)
    t = ts[1]  # noqa: F841
    assert runner._loop_index(__import__("sys")._getframe()) is None  # t is element 1, i says 2


def _flux_like_loop(compiled, model, timesteps, cfg_calls=1, check=None):
    """``for i, t in enumerate(timesteps)`` over a TinyDiT; ``check(i, sites)`` after each step."""
    import torch

    import chipmunk_compile

    x = torch.randn(1, 32, 8)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            for _ in range(cfg_calls):
                compiled(x, timestep=t.expand(1) * 1.0)
            if check is not None:
                (state,) = chipmunk_compile.states_of(model)
                check(i, state.sites)


def test_last_loop_step_frees_the_caches():
    """In a loop whose length is known (``enumerate(timesteps)``), the calls of the last step drop their caches
    once used, so they do not hold memory after the generation (e.g. through the VAE decode); every stream's
    last call still runs sparse on its own caches, and the next generation starts from nothing."""
    import torch

    from chipmunk_compile.testing import TinyDiT

    opts = {"attention.keep": 0.25, "attention.first_dense_layers": 0, "mlp.first_dense_layers": 0,
            "attention.query_group": 64, "mlp.block": 64, "mlp.keep": 0.3}
    model = TinyDiT(seq=32, depth=2).eval()
    compiled = torch.compile(model, backend="chipmunk", options=opts)
    ts = torch.linspace(1000, 100, 5)

    def check(i, sites):
        held = [s for s in sites if s.caches]
        if i == 0:  # step 0 is plain dense for attention (step 1 is dense too): only the MLPs cache
            assert {s.kind for s in held} == {"mlp"} and len(held) == 2
        elif i < 4:
            assert len(held) == len(sites) == 4  # 2 attention + 2 MLP sites hold caches through the loop
        else:
            assert not held and all(s.stats.last_phase == "sparse" for s in sites)

    _flux_like_loop(compiled, model, ts, cfg_calls=2, check=check)
    _flux_like_loop(compiled, model, ts, cfg_calls=2, check=check)  # a second generation: the same


def test_dense_last_step_makes_no_caches():
    """A last step that is a dense step (here step 4 of 5, dense_every 4) returns exact outputs and caches
    nothing: nothing follows it."""
    import torch

    from chipmunk_compile.testing import TinyDiT

    opts = {"attention.first_dense_layers": 0, "mlp.first_dense_layers": 0, "attention.query_group": 64,
            "mlp.block": 64, "attention.dense_every": 4, "mlp.dense_every": 4}
    model = TinyDiT(seq=32, depth=2).eval()
    compiled = torch.compile(model, backend="chipmunk", options=opts)

    def check(i, sites):
        if i == 4:
            assert not any(s.caches for s in sites)
            assert all(s.stats.last_phase == "dense (no cache)" for s in sites)

    _flux_like_loop(compiled, model, torch.linspace(1000, 100, 5), check=check)


def test_last_step_unknown_keeps_the_caches():
    """Outside such a loop (timestep values only) the last step is unknown: caches stay until the next
    generation or ``chipmunk_compile.reset``."""
    import torch

    import chipmunk_compile
    from chipmunk_compile.testing import TinyDiT

    model = TinyDiT(seq=32, depth=2).eval()
    compiled = torch.compile(model, backend="chipmunk", options={"attention.first_dense_layers": 0})
    with torch.no_grad():
        for t in (1000.0, 800.0, 600.0):
            compiled(torch.randn(1, 32, 8), timestep=torch.tensor([t]))
    (state,) = chipmunk_compile.states_of(model)
    assert any(s.caches for s in state.sites)
    chipmunk_compile.reset(compiled)
    assert not any(s.caches for s in state.sites)


def test_weight_samples_are_read_once_per_generation(monkeypatch):
    """The per-generation check of in-place weight changes (``SiteState.watch``) notes its samples at step 0 and
    reads them all at once at step 1: one device sync per generation, not one per site (a bug had every site's
    call at step 0 read the samples at once, 114 syncs per FLUX generation). A generation that ends at step 0
    leaves its samples to the next generation's first call."""
    import torch

    from chipmunk_compile.state import ModelState
    from chipmunk_compile.testing import TinyDiT

    resolved: list[int] = []
    original = ModelState.resolve_deferred

    def counting(self):
        resolved.append(len(self.deferred))
        original(self)

    monkeypatch.setattr(ModelState, "resolve_deferred", counting)
    opts = {"attention.first_dense_layers": 0, "mlp.first_dense_layers": 0, "attention.query_group": 64,
            "mlp.block": 64}
    model = TinyDiT(seq=32, depth=2).eval()
    compiled = torch.compile(model, backend="chipmunk", options=opts)
    ts = torch.linspace(1000, 100, 5)
    _flux_like_loop(compiled, model, ts)  # first generation: new weights are compared at once (no samples noted)
    assert resolved == []
    sites = 4  # 2 attention + 2 MLP sites; each MLP site watches W1 (its key) and W2, each attention site its key
    for _ in range(2):
        _flux_like_loop(compiled, model, ts, cfg_calls=2)
        assert resolved == [sites + 2], resolved
        resolved.clear()
    _flux_like_loop(compiled, model, ts[:1])  # a generation of step 0 only: its samples wait
    assert resolved == []
    _flux_like_loop(compiled, model, ts)  # read at the next generation's first call, then its own at step 1
    assert resolved == [sites + 2 + 1, sites + 1], resolved


def test_first_generation_reads_no_weight_samples_and_later_ones_read_once(monkeypatch):
    """A new site keeps its weights' baseline sample on the device: the model's first generation reads none
    (a read is a device sync; one per new site at step 0 left the device idle through the Triton compiles of
    steps 1 and 2), and the next generation reads the baselines together with its own samples, in one read.
    A weight changed through ``.data`` between the generations is still caught against the device baseline."""
    import torch

    import chipmunk_compile
    import chipmunk_compile.state as state_mod
    from chipmunk_compile.testing import TinyDiT

    reads: list[int] = []
    original = state_mod._read_samples

    def counting(samples):
        if any(isinstance(s, torch.Tensor) for s in samples):  # only device samples cost a read
            reads.append(sum(isinstance(s, torch.Tensor) for s in samples))
        return original(samples)

    monkeypatch.setattr(state_mod, "_read_samples", counting)
    opts = {"attention.first_dense_layers": 0, "mlp.first_dense_layers": 0, "attention.query_group": 64,
            "mlp.block": 64}
    model = TinyDiT(seq=32, depth=2).eval()
    compiled = torch.compile(model, backend="chipmunk", options=opts)
    ts = torch.linspace(1000, 100, 5)
    _flux_like_loop(compiled, model, ts)
    assert reads == [], reads
    watched = 6  # 2 attention keys, 2 MLP W1 (their keys) and 2 MLP W2
    _flux_like_loop(compiled, model, ts)
    assert reads == [2 * watched], reads  # this generation's samples and the device baselines, one read
    reads.clear()
    (state,) = chipmunk_compile.states_of(model)
    mlp = [site for site in state.sites if site.kind == "mlp"][0]
    on_device = [(site.kind, site.ordinal, name) for site in state.sites
                 for name, value in site._watched.items() if isinstance(value[2], torch.Tensor)]
    assert not on_device, on_device  # the baselines were read with the samples
    mlp.weight_copies["probe"] = torch.zeros(1)
    w2 = model.blocks[0].fc2.weight if mlp.ordinal == 0 else model.blocks[1].fc2.weight
    w2.data.mul_(1.5)  # a fused LoRA: in place through .data, no new version
    _flux_like_loop(compiled, model, ts)
    assert reads == [watched], reads
    assert "probe" not in mlp.weight_copies


def test_whole_model_compile_called_from_an_eager_wrapper_keeps_its_own_state():
    """A whole compiled model called from an eager module whose forward also takes a ``timestep`` (a user's
    wrapper) keeps its state on its own parameters: ``report``/``reset``/``states_of`` of the model find it. Only
    a graph of a model compiled by regions joins the enclosing model's state (HunyuanVideo's token refiner)."""
    import torch

    import chipmunk_compile
    from chipmunk_compile.testing import TinyDiT

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, timestep):
            return self.inner(x, timestep=timestep)

    model = TinyDiT(seq=32, depth=2).eval()
    wrapper = Wrapper(torch.compile(model, backend="chipmunk",
                                    options={"attention.first_dense_layers": 0, "attention.query_group": 64}))
    x = torch.randn(1, 32, 8)
    with torch.no_grad():
        for t in (900.0, 800.0, 700.0):
            wrapper(x, timestep=torch.tensor([t]))
    (state,) = chipmunk_compile.states_of(model)
    assert state.sites and state.clock.generation == 0
    assert not wrapper.__dict__.get("_chipmunk_model_states")
