"""User scenarios around the compiled transformer of real diffusers pipelines (tiny random components, CPU, no text
encoders: the prompt embeddings are given): regional compilation as diffusers recommends it
(``pipe.transformer.compile_repeated_blocks(backend="chipmunk", options=...)``) on FLUX, Wan (CFG as two calls) and
HunyuanVideo; a LoRA fused into the FLUX transformer's weights in place and unfused again; FluxImg2ImgPipeline built
with ``from_pipe`` on the same compiled transformer (its loop starts mid-schedule); ``chipmunk_compile.reset`` and
``chipmunk_compile.report`` at odd moments. Each output is compared with the dense pipeline's from the same generator;
the report says which sites went sparse and how often; the caches must be gone after each loop."""

import logging
import re

import torch
from test_pipeline import _rel, _tiny_flux_pipeline, _tiny_hunyuan_pipeline, _tiny_wan_pipeline
from test_pipeline_more import (
    FLUX_OPTIONS,
    FLUX_SPARSE_MLP,
    _counts,
    _delta,
    _flux_kwargs,
    _flux_schedule,
    _seed,
    _stop_at,
)
from torch._dynamo.utils import counters

import chipmunk_compile


def _graphs_at_each_step(seen):
    """A callback that notes, at the end of each step, how many graphs Dynamo has compiled so far."""

    def look(pipeline, i, t, callback_kwargs):
        seen.append(counters["stats"]["unique_graphs"])
        return {}

    return look


def _state_with_sites(model):
    """The one ModelState of ``model`` that holds rewritten sites (a region with nothing rewritten, e.g.
    HunyuanVideo's patch embedding, has none; a region with its own timestep input has its own state)."""
    states = [s for s in chipmunk_compile.states_of(model) if s.sites]
    assert len(states) == 1, [(s.id, len(s.sites)) for s in chipmunk_compile.states_of(model)]
    return states[0]


def _no_caches(model):
    return not any(site.caches for state in chipmunk_compile.states_of(model) for site in state.sites)


# ---------------------------------------------------------------------------------------------------------------
# 1. Regional compilation


def test_flux_regional_compilation_has_the_whole_model_schedule():
    """compile_repeated_blocks compiles each FluxTransformerBlock / FluxSingleTransformerBlock (no timestep input:
    the step comes from the enclosing FluxTransformer2DModel.forward). Same sites, same names and the same per-site
    schedule as the whole-model compile (_flux_schedule, asserted against torch.compile(pipe.transformer) in
    test_pipeline_more); one state on the transformer, one generation per pipeline call, no graph compiled after
    the first call's step 0, caches freed after each loop."""
    pipe = _tiny_flux_pipeline()
    kwargs = _flux_kwargs()
    dense = pipe(**kwargs, generator=_seed()).images
    model = pipe.transformer
    pipe.transformer.compile_repeated_blocks(backend="chipmunk", options=FLUX_OPTIONS)
    assert pipe.transformer is model  # regional: the model stays an eager module, only its blocks are compiled
    report = chipmunk_compile.report(model)  # before any call
    assert report.sites == [] and "no compiled chipmunk graph has run" in str(report)
    before, graphs = {}, []
    for n in range(2):
        seen = []
        out = pipe(**kwargs, generator=_seed(), callback_on_step_end=_graphs_at_each_step(seen)).images
        graphs.append(seen)
        assert out.shape == dense.shape == (1, 3, 64, 64)
        assert 0 < _rel(out, dense) < 0.01, _rel(out, dense)
        state = _state_with_sites(model)
        assert state.clock.generation == n
        assert _no_caches(model)
        counts = _counts(pipe.transformer)
        assert _delta(counts, before) == _flux_schedule(), str(chipmunk_compile.report(pipe.transformer))
        before = counts
    # every block graph is compiled during the first call's step 0; nothing after that, nothing in the second call
    assert len(set(graphs[0] + graphs[1])) == 1 and graphs[0][0] >= 2, graphs
    assert counters["chipmunk"]["graphs"] == graphs[0][0], dict(counters["chipmunk"])
    report = chipmunk_compile.report(pipe.transformer)
    attn, mlp = report.by_kind("attention", "rewritten"), report.by_kind("mlp", "rewritten")
    assert [s.name for s in attn] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn",
                                      "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert sorted(s.name for s in mlp) == sorted(
        ["transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.0.proj"] + FLUX_SPARSE_MLP)
    assert all("text[0:8]" in s.variant for s in attn[:2]), str(report)
    assert all(0 < s.kept_fraction < 0.2 for s in attn[2:]), str(report)


def _wan_kwargs():
    gen = torch.Generator().manual_seed(1)
    return dict(prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                negative_prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                height=32, width=32, num_frames=5, num_inference_steps=8, guidance_scale=5.0, output_type="pt")


def test_wan_regional_compilation_with_cfg_as_two_calls_matches_the_whole_model_compile():
    """WanPipeline calls the transformer twice per step (conditional, unconditional). Regionally compiled, each
    WanTransformerBlock's call belongs to the forward around it: the second forward of a step is stream 1. The
    schedule per site equals the whole-model compile's (run here first), the output is the whole-model output up to
    Inductor's rounding, one graph serves all three blocks, and a second call compiles nothing."""
    pipe = _tiny_wan_pipeline()
    kwargs = _wan_kwargs()
    dense = pipe(**kwargs, generator=_seed()).frames
    model = pipe.transformer
    pipe.transformer = torch.compile(model, backend="chipmunk", options={"preset": "wan"})
    whole = pipe(**kwargs, generator=_seed()).frames
    whole_counts = _counts(pipe.transformer)
    assert whole_counts["blocks.2.attn1"] == (4, 12, 2), whole_counts  # dense at steps 0, 1 of 8, two streams

    torch._dynamo.reset()
    counters.clear()
    pipe = _tiny_wan_pipeline()  # the same weights (seeded), no state from the whole-model run
    model = pipe.transformer
    model.compile_repeated_blocks(backend="chipmunk", options={"preset": "wan"})
    before, graphs = {}, []
    for n in range(2):
        seen = []
        out = pipe(**kwargs, generator=_seed(), callback_on_step_end=_graphs_at_each_step(seen)).frames
        graphs.append(seen)
        assert out.shape == dense.shape  # (1, 2, 3, 8, 8): this tiny VAE decodes 2 frames of 8x8
        assert 0 < _rel(out, dense) < 0.02, _rel(out, dense)
        if n == 0:
            assert _rel(out, whole) < 1e-4, _rel(out, whole)  # the same selections as the whole-model compile
        counts = _counts(model)
        assert _delta(counts, before) == whole_counts, (whole_counts, str(chipmunk_compile.report(model)))
        before = counts
        assert _state_with_sites(model).clock.generation == n
        assert _no_caches(model)
    assert set(graphs[0] + graphs[1]) == {1}, graphs  # one block graph, compiled at step 0 of the first call
    report = chipmunk_compile.report(model)
    assert [s.name for s in report.by_kind("attention", "rewritten")] == [f"blocks.{i}.attn1" for i in range(3)]
    cross = report.by_kind("attention", "dense")
    assert cross and all("encoder_hidden_states only" in s.reason for s in cross), str(report)


def test_wan_regional_report_names_every_dense_site():
    """The report of a whole-model compile lists each dense site under its full name (blocks.0.attn2, blocks.1.attn2,
    blocks.2.attn2: cross-attention). Under regional compilation the dense rows come from the block graph's plan
    records, whose names are relative to the compiled block ("attn2", "ffn.net.2"), and the three blocks' identical
    records were listed once: the user could not tell which layers stayed dense. The rewritten sites' weights give
    each block graph's prefixes (blocks.0., ...), and its dense records are now listed once per block."""
    pipe = _tiny_wan_pipeline()
    kwargs = _wan_kwargs()
    pipe.transformer.compile_repeated_blocks(backend="chipmunk", options={"preset": "wan"})
    pipe(**dict(kwargs, num_inference_steps=2), generator=_seed())
    report = chipmunk_compile.report(pipe.transformer)
    cross = report.by_kind("attention", "dense")
    assert [s.name for s in cross] == [f"blocks.{i}.attn2" for i in range(3)], str(report)


HUNYUAN_ATTN = ["transformer_blocks.0.attn", "transformer_blocks.1.attn",
                "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]


def _hunyuan_kwargs(**extra):
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(prompt_embeds=torch.randn(1, 8, 32, generator=gen),
                  pooled_prompt_embeds=torch.randn(1, 32, generator=gen),
                  prompt_attention_mask=torch.tensor([[1] * 6 + [0] * 2]),
                  height=32, width=32, num_frames=5, num_inference_steps=8, output_type="pt")
    kwargs.update(extra)
    return kwargs


def test_hunyuan_video_regional_compilation_with_the_hunyuan_preset():
    """HunyuanVideo's _repeated_blocks are its double- and single-stream blocks, the patch embedding and the token
    refiner (which has a timestep argument of its own). With the hunyuan preset (attention only, text keys kept) the
    schedule per site is the whole-model compile's (test_pipeline's HunyuanVideo test: the first two sites always
    dense, the others dense at steps 0 and 1, one selection), the text span is found in every joint attention, and
    the padding text keys are masked."""
    pipe = _tiny_hunyuan_pipeline()
    kwargs = _hunyuan_kwargs()
    dense = pipe(**kwargs, generator=_seed()).frames
    model = pipe.transformer
    model.compile_repeated_blocks(backend="chipmunk", options={"preset": "hunyuan"})
    expected = {name: (8, 0, 0) if i < 2 else (2, 6, 1) for i, name in enumerate(HUNYUAN_ATTN)}
    before, graphs = {}, []
    for n in range(2):
        seen = []
        out = pipe(**kwargs, generator=_seed(), callback_on_step_end=_graphs_at_each_step(seen)).frames
        graphs.append(seen)
        assert out.shape == dense.shape == (1, 5, 3, 32, 32)
        assert 0 < _rel(out, dense) < 0.02, _rel(out, dense)
        counts = _counts(model)
        assert _delta(counts, before) == expected, str(chipmunk_compile.report(model))
        before = counts
        assert _state_with_sites(model).clock.generation == n
        assert _no_caches(model)
    assert len(set(graphs[0] + graphs[1])) == 1, graphs
    report = chipmunk_compile.report(model)
    attn = report.by_kind("attention", "rewritten")
    assert [s.name for s in attn] == HUNYUAN_ATTN, str(report)
    assert all("masked" in s.variant and "text[128:136]" in s.variant for s in attn), str(report)
    assert all(0 < s.kept_fraction < 0.2 for s in attn[2:]), str(report)
    assert not report.by_kind("mlp", "rewritten"), str(report)


def test_hunyuan_video_regional_compilation_with_mlp_sparsity_matches_the_whole_model_compile():
    """With MLP sparsity on (default preset), the whole-model compile numbers the MLP sites in order of execution
    over the whole model: the token refiner's MLP runs first (ordinal 0), transformer_blocks.0.ff is ordinal 1, and
    mlp.first_dense_layers=2 keeps those two dense; transformer_blocks.0.ff_context goes sparse. Regionally compiled,
    HunyuanVideoTokenRefiner (in _repeated_blocks) is a graph with a `timestep` input of its own; it runs inside the
    transformer's eager forward, so it joins the transformer's state and step clock, and the counts match (before
    the fix it got a state of its own: transformer_blocks.0.ff_context ran dense at every step, (8, 0, 0))."""
    pipe = _tiny_hunyuan_pipeline()
    kwargs = _hunyuan_kwargs()
    model = pipe.transformer
    pipe.transformer = torch.compile(model, backend="chipmunk", options={"preset": "default"})
    pipe(**kwargs, generator=_seed())
    whole = _counts(pipe.transformer)
    assert whole["transformer_blocks.0.ff_context.net.0.proj"] == (1, 7, 4), whole

    torch._dynamo.reset()
    pipe = _tiny_hunyuan_pipeline()
    pipe.transformer.compile_repeated_blocks(backend="chipmunk", options={"preset": "default"})
    pipe(**kwargs, generator=_seed())
    regional = _counts(pipe.transformer)
    assert regional == whole, str(chipmunk_compile.report(pipe.transformer))
    assert len(chipmunk_compile.states_of(pipe.transformer)) == 1  # one step clock for the whole model


# ---------------------------------------------------------------------------------------------------------------
# 2. LoRA fused into the weights


def _peft_available():
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


# A tiny random LoRA (rank 2) on the last single-stream block (q/k/v projections, both MLP linears) and on the
# second linear of transformer_blocks.1's image MLP alone (a change of W2 only: the MLP site is keyed by W1).
LORA_TARGETS = ["single_transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.attn.to_k",
                "single_transformer_blocks.1.attn.to_v", "single_transformer_blocks.1.proj_mlp",
                "single_transformer_blocks.1.proj_out", "transformer_blocks.1.ff.net.2"]
# the sites whose weights the LoRA changes: (kind, name in the report, which watched weight)
LORA_SITES = {("attention", "single_transformer_blocks.1.attn", "key"),
              ("mlp", "single_transformer_blocks.1.proj_mlp", "key"),
              ("mlp", "single_transformer_blocks.1.proj_mlp", "w2"),
              ("mlp", "transformer_blocks.1.ff.net.0.proj", "w2")}


def _lora_deltas(model, scale=1.0, rank=2, seed=3):
    """{module name: scale * B @ A}, as peft's LoRA delta (lora_alpha / r folded into ``scale``)."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name in LORA_TARGETS:
        w = model.get_submodule(name).weight
        a = torch.randn(rank, w.shape[1], generator=gen) / w.shape[1] ** 0.5
        b = torch.randn(w.shape[0], rank, generator=gen)
        deltas[name] = scale * b @ a
    return deltas


def _fuse(model, deltas, sign=1.0):
    """fuse_lora (sign 1) / unfuse_lora (sign -1) as an in-place change of the base weights."""
    with torch.no_grad():
        for name, delta in deltas.items():
            model.get_submodule(name).weight.add_(delta, alpha=sign)


def _dense_with(pipe, model, kwargs, **extra):
    """The dense pipeline's output with ``model``'s current weights (the eager module, which the compiled one
    shares its parameters with)."""
    compiled, pipe.transformer = pipe.transformer, model
    try:
        return pipe(**kwargs, **extra, generator=_seed()).images
    finally:
        pipe.transformer = compiled


def _dropped(records, state, model):
    """{(kind, site name, weight)} of the "caches dropped" log records, sites named by their key weight."""
    names = {id(p): n for n, p in model.named_parameters()}
    by_ordinal = {(s.kind, s.ordinal): names[id(s.key)].rsplit(".", 1)[0] for s in state.sites}
    out = set()
    for rec in records:
        m = re.match(r"chipmunk: weights \((\w+)\) of (\w+) site (\d+) changed", rec.getMessage())
        if m:
            name = by_ordinal[(m.group(2), int(m.group(3)))]
            if m.group(2) == "attention":
                name = name.rsplit(".", 1)[0]  # to_q -> the attention module
            out.add((m.group(2), name, m.group(1)))
    return out


def test_flux_lora_fused_and_unfused_between_generations(caplog):
    """A LoRA fused into the weights in place after a first generation (as fuse_lora does; peft is not installed
    here, so the delta is added with weight.add_ under no_grad), then unfused after the second: each generation
    matches the dense pipeline with the same weights, with the full schedule; the sites whose weights changed (and
    only they) notice the change and drop their caches and derived copies; nothing recompiles."""
    pipe = _tiny_flux_pipeline()
    kwargs = _flux_kwargs()
    model = pipe.transformer
    deltas = _lora_deltas(model)
    dense = pipe(**kwargs, generator=_seed()).images
    _fuse(model, deltas)
    dense_lora = pipe(**kwargs, generator=_seed()).images
    _fuse(model, deltas, -1.0)
    effect = _rel(dense_lora, dense)
    assert effect > 0.03  # the LoRA changes the image, well beyond the sparse steps' error
    pipe.transformer = torch.compile(model, backend="chipmunk", options=FLUX_OPTIONS)
    before = {}
    for n, (fuse, reference) in enumerate([(0.0, dense), (1.0, dense_lora), (-1.0, dense)]):
        if fuse:
            _fuse(model, deltas, fuse)
        with caplog.at_level(logging.INFO, logger="chipmunk_compile"):
            caplog.clear()
            out = pipe(**kwargs, generator=_seed()).images
        assert 0 < _rel(out, reference) < min(0.01, 0.3 * effect), (n, _rel(out, reference))
        (state,) = chipmunk_compile.states_of(model)
        assert state.clock.generation == n and not any(site.caches for site in state.sites)
        assert _dropped(caplog.records, state, model) == (LORA_SITES if fuse else set()), caplog.text
        counts = _counts(pipe.transformer)
        assert _delta(counts, before) == _flux_schedule(), (n, str(chipmunk_compile.report(pipe.transformer)))
        before = counts
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # weights are inputs: no recompile


def _fuse_at(step, model, deltas, fuse=_fuse):
    def callback(pipeline, i, t, callback_kwargs):
        if i == step:
            fuse(model, deltas)
        return {}

    return callback


def _lora_mid_loop_schedule():
    """The FLUX schedule when the LoRA is fused after step 3 (a sparse step): the sites whose weights changed drop
    their caches, so their step 4 is dense again (attention: dense + a new selection; MLP: dense + cache, then new
    selections at steps 5 and 7); the other sites keep the usual schedule."""
    expected = _flux_schedule()
    expected["single_transformer_blocks.1.attn"] = (3, 5, 2)
    expected["single_transformer_blocks.1.proj_mlp"] = (2, 6, 4)
    expected["transformer_blocks.1.ff.net.0.proj"] = (2, 6, 4)
    return expected


def test_flux_lora_fused_mid_loop_drops_the_changed_sites_caches():
    """The weights change in place mid-generation (a callback fuses the LoRA after step 3, a sparse step): README says
    a weight changed in place drops that site's caches. The changed sites recompute densely at the next step and
    select anew; the others go on with their caches; the output matches the dense pipeline with the same callback."""
    pipe = _tiny_flux_pipeline()
    kwargs = _flux_kwargs()
    model = pipe.transformer
    deltas = _lora_deltas(model)
    dense = pipe(**kwargs, generator=_seed()).images
    reference = pipe(**kwargs, generator=_seed(), callback_on_step_end=_fuse_at(3, model, deltas)).images
    _fuse(model, deltas, -1.0)
    effect = _rel(reference, dense)
    assert effect > 0.015
    pipe.transformer = torch.compile(model, backend="chipmunk", options=FLUX_OPTIONS)
    out = pipe(**kwargs, generator=_seed(), callback_on_step_end=_fuse_at(3, model, deltas)).images
    # the LoRA's effect reproduced to within the sparse steps' usual error (0.0024 here, against 0.018 with the
    # old caches kept: see the next test)
    assert 0 < _rel(out, reference) < 0.3 * effect, (_rel(out, reference), effect)
    assert _counts(pipe.transformer) == _lora_mid_loop_schedule(), str(chipmunk_compile.report(pipe.transformer))
    (state,) = chipmunk_compile.states_of(model)
    assert state.clock.generation == 0 and not any(site.caches for site in state.sites)


def _fuse_like_peft(model, deltas, sign=1.0):
    """What peft's LoRA layers do in merge(safe_merge=False) (diffusers' fuse_lora default) and unmerge():
    ``base_layer.weight.data += delta_weight`` / ``weight.data -= delta_weight``. Through ``.data`` the in-place
    add leaves the parameter's version counter (and address) unchanged."""
    for name, delta in deltas.items():
        model.get_submodule(name).weight.data.add_(delta, alpha=sign)


def test_flux_lora_fused_between_generations_the_way_peft_fuses_it(caplog):
    """pipe.fuse_lora() / unfuse_lora() go through peft's merge and unmerge: ``weight.data += delta``, which moves
    neither the parameter's version counter nor its address, so SiteState.watch saw no change (on CUDA the MLP's
    transposed W2 copy, which the sparse kernel reads, stayed the old one in every later generation). Now each
    watched weight's sampled values are taken on the device once per generation and compared in one batch before
    the first sparse step: the changed (site, weight) pairs are logged and their derived copies dropped, and the
    fused generation matches the dense pipeline with the fused weights. A change through .data in the middle of a
    loop is seen only at the next generation (README)."""
    pipe = _tiny_flux_pipeline()
    kwargs = _flux_kwargs()
    model = pipe.transformer
    deltas = _lora_deltas(model)
    pipe.transformer = torch.compile(model, backend="chipmunk", options=FLUX_OPTIONS)
    pipe(**kwargs, generator=_seed())  # generation 0, base weights
    for sign in (1.0, -1.0):  # fuse, then unfuse
        _fuse_like_peft(model, deltas, sign)
        want = _dense_with(pipe, model, kwargs)
        caplog.clear()
        with caplog.at_level("INFO", logger="chipmunk_compile"):
            out = pipe(**kwargs, generator=_seed()).images
        changed = [r.getMessage() for r in caplog.records if "without a new version" in r.getMessage()]
        assert len(changed) == len(LORA_SITES), changed  # one line per watched (site, weight) pair it changed
        assert 0 < _rel(out, want) < 0.02, _rel(out, want)
    (state,) = chipmunk_compile.states_of(model)
    assert not state.deferred and not any(site.caches for site in state.sites)


# ---------------------------------------------------------------------------------------------------------------
# 3. FluxImg2ImgPipeline.from_pipe on the same compiled transformer


def test_flux_img2img_from_pipe_shares_the_compiled_transformer():
    """FluxImg2ImgPipeline.from_pipe(pipe) shares the compiled transformer. With strength=0.6 its loop runs 5 of the
    8 timesteps (the last 5 of the schedule), as `for i, t in enumerate(timesteps)` over that slice: the schedule is
    the loop's own (dense at its steps 0 and 1, last step 4), not the full schedule's. Then text-to-image on the
    original pipeline, then img2img again: three generations, each with its own schedule, caches freed."""
    from diffusers import FluxImg2ImgPipeline

    pipe = _tiny_flux_pipeline()
    kwargs = _flux_kwargs()
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    i2i_kwargs = dict(kwargs, image=image, strength=0.6)
    dense_t2i = pipe(**kwargs, generator=_seed()).images
    dense_i2i = FluxImg2ImgPipeline.from_pipe(pipe)(**i2i_kwargs, generator=_seed()).images
    assert _rel(dense_i2i, dense_t2i) > 0.05
    model = pipe.transformer
    pipe.transformer = torch.compile(model, backend="chipmunk", options=FLUX_OPTIONS)
    img2img = FluxImg2ImgPipeline.from_pipe(pipe)
    assert img2img.transformer is pipe.transformer
    steps = []

    def count_steps(pipeline, i, t, callback_kwargs):
        steps.append(i)
        return {}

    runs = [(img2img, i2i_kwargs, dense_i2i, 5), (pipe, kwargs, dense_t2i, 8), (img2img, i2i_kwargs, dense_i2i, 5)]
    before = {}
    for n, (p, kw, reference, n_steps) in enumerate(runs):
        steps.clear()
        out = p(**kw, generator=_seed(), callback_on_step_end=count_steps).images
        assert steps == list(range(n_steps)), steps
        assert out.shape == reference.shape == (1, 3, 64, 64)
        assert 0 < _rel(out, reference) < 0.01, (n, _rel(out, reference))
        (state,) = chipmunk_compile.states_of(model)
        assert state.clock.generation == n
        assert not any(site.caches for site in state.sites), n
        counts = _counts(pipe.transformer)
        expected = _flux_schedule(n_steps)  # a whole 5-step loop: attention dense at 0, 1; MLP selects at 1 and 3
        assert _delta(counts, before) == expected, (n, str(chipmunk_compile.report(pipe.transformer)))
        before = counts


# ---------------------------------------------------------------------------------------------------------------
# 4. reset() and report() at odd moments


def test_flux_report_before_any_call_and_reset_between_calls():
    """report() before any call (whole-model and regional) says nothing has run; reset() before any call does
    nothing harmful; reset() after an interrupted generation frees its caches at once; reset() between whole
    generations starts exactly one new generation per call, each with the full schedule, on the whole-model and on
    the regional compile."""
    pipe = _tiny_flux_pipeline()
    kwargs = _flux_kwargs()
    dense = pipe(**kwargs, generator=_seed()).images
    model = pipe.transformer
    compiled = torch.compile(model, backend="chipmunk", options=FLUX_OPTIONS)
    for m in (model, compiled):
        report = chipmunk_compile.report(m)
        assert report.sites == [] and "no compiled chipmunk graph has run" in str(report)
        chipmunk_compile.reset(m)  # nothing to reset yet
    pipe.transformer = compiled

    pipe(**kwargs, generator=_seed(), callback_on_step_end=_stop_at(3))  # generation 0, stopped after step 3
    (state,) = chipmunk_compile.states_of(model)
    assert any(site.caches for site in state.sites)  # an interrupted loop keeps its caches ...
    chipmunk_compile.reset(pipe.transformer)
    assert not any(site.caches for site in state.sites)  # ... until reset()
    before = _counts(pipe.transformer)
    assert before == _flux_schedule(4), str(chipmunk_compile.report(pipe.transformer))
    for n in (1, 2):
        out = pipe(**kwargs, generator=_seed()).images
        assert 0 < _rel(out, dense) < 0.01, _rel(out, dense)
        assert state.clock.generation == n
        counts = _counts(pipe.transformer)
        assert _delta(counts, before) == _flux_schedule(), str(chipmunk_compile.report(pipe.transformer))
        before = counts
        chipmunk_compile.reset(pipe.transformer)
        chipmunk_compile.reset(model)  # on the eager module too: same state, still one new generation
    assert not any(site.caches for site in state.sites)
    report = chipmunk_compile.report(pipe.transformer)
    assert len(report.by_kind("attention", "rewritten")) == 4 and len(report.by_kind("mlp", "rewritten")) == 6

    # the same on a regional compile of the same transformer (a new module state, driven by its forward)
    torch._dynamo.reset()
    pipe.transformer = model
    model.compile_repeated_blocks(backend="chipmunk", options=FLUX_OPTIONS)
    chipmunk_compile.reset(model)
    for n in range(2):
        out = pipe(**kwargs, generator=_seed()).images
        assert 0 < _rel(out, dense) < 0.01, _rel(out, dense)
        regional = [s for s in chipmunk_compile.states_of(model) if s is not state]
        assert len(regional) == 1 and regional[0].clock.generation == n
        assert _no_caches(model)
        chipmunk_compile.reset(model)


def test_flux_report_after_switching_from_whole_model_to_regional_compilation():
    """A user compiles the transformer whole, then switches to compile_repeated_blocks (after torch._dynamo.reset(),
    same options). The whole-model state stays attached to the transformer's first parameter and the regional one
    lives on the transformer module; both have the same config. report() picked states by config only and showed
    the rows of both ("23 sites, 20 rewritten" for a 10-site model, the stale whole-model counts beside the current
    ones); now each site shows once, from the state that ran it last."""
    pipe = _tiny_flux_pipeline()
    kwargs = _flux_kwargs(num_inference_steps=2)
    model = pipe.transformer
    pipe.transformer = torch.compile(model, backend="chipmunk", options=FLUX_OPTIONS)
    pipe(**kwargs, generator=_seed())
    torch._dynamo.reset()
    pipe.transformer = model
    model.compile_repeated_blocks(backend="chipmunk", options=FLUX_OPTIONS)
    pipe(**kwargs, generator=_seed())
    report = chipmunk_compile.report(model)
    rewritten = [s.name for s in report.sites if s.status == "rewritten"]
    assert len(rewritten) == len(set(rewritten)) == 10, str(report)
