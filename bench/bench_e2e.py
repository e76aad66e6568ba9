"""End-to-end: a real diffusers model class at its real size, random bf16 weights, a 50-step scheduler loop,
``torch.compile`` default (Inductor) vs ``backend="chipmunk"`` with the matching preset, in one run.

    python bench/bench_e2e.py --model flux                 # FLUX.1-dev architecture, 1280x768, on CUDA
    python bench/bench_e2e.py --model flux --size tiny     # a CPU smoke run of the same code
    python bench/bench_e2e.py --model flux --count-flops   # + each step's FLOPs: how far FLOPs alone could go

Per backend: one warm-up generation (compiles), then timed generations. Reports seconds per generation,
the speedup, compile time (first generation minus a warm one), peak GPU memory, per-step times (so dense,
selection and sparse steps can be told apart), recompiles after warm-up, and the final-latent relative L2
between the two (random weights: a sanity check, not a quality measure). Appends rows to
``bench/results/e2e_<card>_<date>.csv``. With ``--count-flops``, one more untimed generation per backend counts
each step's FLOPs; beside Inductor that gives each chipmunk backend's FLOP ratio (its speedup at Inductor's FLOP
rate) and the fraction of Inductor's rate it reached, by step kind (``flops_<model>_<card>_<date>.csv``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from _harness import RUN_COLUMNS, append_csv, parse_overrides, run_fields, split_top_level  # noqa: E402  (bench/ is the script's directory)
from chipmunk_compile.kernels._launch import normal_path_stats

RESULTS = Path(__file__).resolve().parent / "results"

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
HUNYUAN = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
               num_single_layers=40, num_refiner_layers=2, patch_size=2, patch_size_t=1, text_embed_dim=4096,
               pooled_projection_dim=768, rope_axes_dim=(16, 56, 56), guidance_embeds=True)
HUNYUAN_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                    num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=32,
                    pooled_projection_dim=32, rope_axes_dim=(4, 6, 6))
WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))


@dataclass(frozen=True)
class E2EConfig:
    model: str = "flux"
    size: str = "real"
    steps: int = 50
    height: int = 768
    width: int = 1280
    text_tokens: int = 512
    regional: bool = True
    repeats: int = 1
    preset: str = "flux"
    overrides: tuple[tuple[str, object], ...] = ()
    profile_dir: str = ""
    frames: int = 9
    mode: str = ""
    timed_steps: int = 0  # > 0: time only the first steps of the schedule and predict the whole loop
    profile_steps: tuple[int, ...] = (2, 3)
    backends: tuple[str, ...] = ("inductor", "chipmunk")
    count_flops: bool = False  # one more generation per backend, counting each step's FLOPs


def step_kinds(config, steps: int) -> list[tuple]:
    """The kind of each step under a chipmunk config: (attention phase, MLP phase).

    Attention phase: "off", "dense" (plain: the next step is dense too), "select, no cache" (the same, but
    making the generation's one-time selection), "select" (dense + selection + cache), "refresh" (dense +
    cache, selection kept) or "sparse". MLP phase: "off", "dense" (plain),
    "cache" (dense + caches), "select" (a sparse step that re-selects units) or "reuse". Steps of one kind
    cost the same, so timing each kind once predicts a whole loop (used for runs too long to time whole).
    """
    att, mlp = config.attention, config.mlp
    kinds, selected_at, att_selected = [], None, False
    for step in range(steps):
        if not att.enabled:
            att_phase = "off"
        elif att.is_plain_dense_step(step, last=step == steps - 1):
            # a one-time selection is still made at the first dense step (unless it is the last)
            once = not (att.recompute_selection or att_selected or step == steps - 1)
            att_phase = "select, no cache" if once else "dense"
            att_selected = True
        elif att.is_dense_step(step):
            att_phase = "select" if att.recompute_selection or not att_selected else "refresh"
            att_selected = True
        else:
            att_phase = "sparse"
        if not mlp.enabled:
            phase = "off"
        elif mlp.is_plain_dense_step(step, last=step == steps - 1):
            phase, selected_at = "dense", None
        elif mlp.is_dense_step(step):
            phase, selected_at = "cache", None
        elif selected_at is None or step - selected_at >= mlp.selection_every:
            phase, selected_at = "select", step
        else:
            phase = "reuse"
        kinds.append((att_phase, phase))
    return kinds


def predict_total_ms(step_ms: list[float], kinds: list[tuple]) -> float:
    """Sum over the schedule of the time of each step kind's first occurrence in ``step_ms``."""
    first: dict[tuple, float] = {}
    for ms, kind in zip(step_ms, kinds):
        first.setdefault(kind, ms)
    missing = {k for k in kinds if k not in first}
    if missing:
        raise ValueError(f"step kinds {sorted(missing)} were not timed; time more steps")
    return sum(first[k] for k in kinds)


@dataclass
class E2EResult:
    backend: str
    seconds_per_generation: float
    first_generation_s: float
    compile_s: float
    peak_gb: float
    recompiles_after_warmup: int
    step_ms: list[float] = field(default_factory=list)
    gc_ms: float = 0.0  # Python garbage collection during the timed generations (host time)
    resident_gb_at_start: float = 0.0  # GPU memory already allocated when this backend started (in peak_gb)
    # chipmunk's own kernels: host seconds of their normal-path launches in this backend's run (Triton compiles
    # or loads them from its disk cache on the first launch of each variant; part of compile_s)
    triton_first_launch_s: float = 0.0
    # the warm-up generation's steps (compiles and first-call work included): compile_s by step
    warmup_step_ms: list[float] = field(default_factory=list)
    # with --count-flops: FLOPs of each step ({"total", "attention", "mlp"}; Inductor's: its first step,
    # the dense model's, counted once since all its steps are alike)
    step_flops: list[dict[str, int]] = field(default_factory=list)


def count_call_flops(fn, ours: bool) -> tuple[torch.Tensor, dict[str, int]]:
    """Run one model call ``fn()`` and count its FLOPs by kind.

    ``ours``: a chipmunk-compiled model, counted through :data:`FLOP_COUNTER` (what our ops computed on this
    call, by their registered formulas, plus the other matmuls of the compiled graphs); else ``FlopCounterMode``
    around the call (the dense model's FLOPs, whether its frames run compiled or eagerly under the mode;
    attention by SDPA's formula). Returns (the call's output, {"total", "attention", "mlp"}); "attention" and "mlp" are
    only split for ours (0 for the dense model, whose MLPs are plain matmuls).
    """
    if ours:
        from chipmunk_compile.runner import FLOP_COUNTER, FlopTally

        tally = FlopTally()
        token = FLOP_COUNTER.set(tally)
        try:
            out = fn()
        finally:
            FLOP_COUNTER.reset(token)
        return out, {"total": tally.total(), "attention": tally.total("chipmunk.attention"),
                     "mlp": tally.total("chipmunk.mlp")}
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    # SDPA's CPU kernel has no registered formula (the CUDA ones do): count it as they are counted
    cpu = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    with FlopCounterMode(display=False, custom_mapping=cpu) as mode:
        out = fn()
    return out, {"total": mode.get_total_flops(), "attention": 0, "mlp": 0}


def flop_summary(dense_step: int, step_flops: list[dict[str, int]], step_ms: list[float], kinds: list[tuple],
                 inductor_step_ms: float, measured_speedup: float) -> dict:
    """How far FLOPs alone could take a chipmunk loop beside Inductor's.

    ``dense_step``: FLOPs of one dense step (Inductor's, all alike); ``step_flops`` / ``step_ms`` / ``kinds``:
    chipmunk's per step (from one generation each; the times may come from another generation of the same
    schedule); ``inductor_step_ms``: Inductor's median step time. ``flop_ratio`` is the speedup chipmunk would
    get if every step ran at Inductor's FLOP rate; ``rate_vs_inductor`` = measured speedup / flop_ratio, the
    fraction of Inductor's FLOP rate chipmunk's loop reaches on average. Per step kind: median time, FLOPs and
    rate (TFLOP/s).
    """
    if len(step_flops) != len(kinds) or len(step_ms) != len(kinds):
        raise ValueError(f"{len(step_flops)} step counts and {len(step_ms)} step times for {len(kinds)} steps")
    total = sum(f["total"] for f in step_flops)
    ratio = dense_step * len(kinds) / total
    by_kind: dict[str, dict] = {}
    for kind in dict.fromkeys(kinds):
        steps = [i for i, k in enumerate(kinds) if k == kind]
        ms = statistics.median(step_ms[i] for i in steps)
        flops = statistics.median(step_flops[i]["total"] for i in steps)
        by_kind[" / ".join(kind)] = {"steps": len(steps), "median_ms": ms, "tflop": flops / 1e12,
                                     "tflop_per_s": flops / ms / 1e9, "flops_vs_dense": flops / dense_step}
    return {"dense_tflop_per_step": dense_step / 1e12, "chipmunk_tflop_per_generation": total / 1e12,
            "flop_ratio": ratio, "measured_speedup": measured_speedup,
            "rate_vs_inductor": measured_speedup / ratio,
            "inductor_tflop_per_s": dense_step / inductor_step_ms / 1e9, "by_kind": by_kind}


def build_flux(cfg: E2EConfig, device: torch.device, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    params = FLUX_DEV if cfg.size == "real" else FLUX_TINY
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**params).eval()
    finally:
        torch.set_default_dtype(old)
    if cfg.size == "real":
        h, w, txt = cfg.height // 16, cfg.width // 16, cfg.text_tokens  # 8x VAE, then 2x2 packing
    else:
        h, w, txt = 8, 8, 16
    n = h * w
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(n, 2).float()
    inputs = dict(
        encoder_hidden_states=torch.randn(1, txt, params["joint_attention_dim"], generator=g).to(device, dtype),
        pooled_projections=torch.randn(1, params["pooled_projection_dim"], generator=g).to(device, dtype),
        img_ids=torch.cat([torch.zeros(n, 1), ids], 1).to(device, dtype),
        txt_ids=torch.zeros(txt, 3, device=device, dtype=dtype),
        guidance=torch.full((1,), 3.5, device=device, dtype=torch.float32),
        return_dict=False,
    )
    latent_shape = (1, n, params["in_channels"])

    def call(m, latents, t):
        return m(hidden_states=latents, timestep=(t / 1000).expand(1).to(dtype), **inputs)[0]

    return model, latent_shape, call


def build_hunyuan(cfg: E2EConfig, device: torch.device, dtype: torch.dtype):
    """HunyuanVideo architecture (diffusers 0.42.1 class, 12.8B at real size), random weights."""
    from diffusers import HunyuanVideoTransformer3DModel

    params = HUNYUAN if cfg.size == "real" else HUNYUAN_TINY
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = HunyuanVideoTransformer3DModel(**params).eval()
    finally:
        torch.set_default_dtype(old)
    if cfg.size == "real":  # 720x1280, 8x spatial / 4x temporal VAE: (F-1)/4+1 latent frames
        shape = (1, 16, (cfg.frames - 1) // 4 + 1, cfg.height // 8, cfg.width // 8)
        txt, valid = 256, 200
    else:
        shape, txt, valid = (1, 4, 2, 8, 8), 16, 12
    g = torch.Generator(device="cpu").manual_seed(1)
    mask = torch.zeros(1, txt, dtype=torch.long)
    mask[:, :valid] = 1  # padded prompt: the joint attention gets a key-padding mask
    inputs = dict(
        encoder_hidden_states=torch.randn(1, txt, params["text_embed_dim"], generator=g).to(device, dtype),
        encoder_attention_mask=mask.to(device),
        pooled_projections=torch.randn(1, params["pooled_projection_dim"], generator=g).to(device, dtype),
        guidance=torch.full((1,), 6000.0, device=device, dtype=dtype), return_dict=False,
    )

    def call(m, latents, t):
        return m(hidden_states=latents, timestep=t.expand(1).to(dtype), **inputs)[0]

    return model, shape, call


def build_wan(cfg: E2EConfig, device: torch.device, dtype: torch.dtype):
    """Wan2.1-14B architecture (diffusers 0.42.1 class), random weights; CFG as two calls per step."""
    from diffusers import WanTransformer3DModel

    params = WAN_14B if cfg.size == "real" else WAN_TINY
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**params).eval()
    finally:
        torch.set_default_dtype(old)
    if cfg.size == "real":
        shape, txt = (1, 16, (cfg.frames - 1) // 4 + 1, cfg.height // 8, cfg.width // 8), 512
    else:
        shape, txt = (1, 4, 2, 8, 8), 8
    g = torch.Generator(device="cpu").manual_seed(1)
    prompts = [torch.randn(1, txt, params["text_dim"], generator=g).to(device, dtype) for _ in range(2)]

    def call(m, latents, t):
        ts = t.expand(1)
        cond = m(hidden_states=latents, timestep=ts, encoder_hidden_states=prompts[0], return_dict=False)[0]
        uncond = m(hidden_states=latents, timestep=ts, encoder_hidden_states=prompts[1], return_dict=False)[0]
        return uncond + 5.0 * (cond - uncond)

    return model, shape, call


BUILDERS = {"flux": build_flux, "hunyuan": build_hunyuan, "wan": build_wan}


def generate(model, call, latent_shape, steps, device, dtype, step_times: list[float] | None = None,
             profile: tuple[int, str, str] | None = None, max_steps: int | None = None, graphs: bool = False,
             flops: tuple[list[dict[str, int]], bool] | None = None):
    """One generation. ``profile=(step, path_prefix, how)`` profiles that step (see :func:`_profile_step`).

    ``graphs``: CUDA-graph mode; each model call starts a new cudagraph-trees step. ``flops=(list, ours)``
    appends each step's FLOP counts to the list (see :func:`count_call_flops`; not a timed generation).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(steps, device=device)
    latents = torch.randn(latent_shape, generator=torch.Generator(device="cpu").manual_seed(0)).to(device, dtype)
    cuda = device.type == "cuda"
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    timesteps = sched.timesteps  # the loop as diffusers pipelines write it (the runner reads `i`, not `t`)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            if max_steps is not None and i >= max_steps:
                break
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            if profile is not None and i == profile[0]:
                v = _profile_step(functools.partial(call, model, latents, t), *profile[1:])
                latents = sched.step(v, t, latents).prev_sample
                continue
            if step_times is not None and cuda:  # events only: no sync inside the loop
                events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                events[-1][0].record()
            t0 = time.perf_counter()
            if flops is not None:
                v, counted = count_call_flops(functools.partial(call, model, latents, t), flops[1])
                flops[0].append(counted)
            else:
                v = call(model, latents, t)
            latents = sched.step(v, t, latents).prev_sample
            if step_times is not None:
                if cuda:
                    events[-1][1].record()
                else:
                    step_times.append((time.perf_counter() - t0) * 1e3)
    if events:
        events[-1][1].synchronize()
        step_times.extend(start.elapsed_time(end) for start, end in events)
    return latents


def _profile_step(fn, prefix: str, how: str):
    """Profile one model call, started on an idle GPU, into ``{prefix}_{how}.txt``.

    how = "host": host time to enqueue the call (until it returns) vs. its wall time to GPU idle (close
    means host-bound); "python": cProfile by own time (where the host time goes); "torch": torch.profiler
    tables by CUDA time and by self CPU time. Each call must be its own generation's step: calling the model
    twice with one timestep would make the second call a new CFG stream.
    """
    torch.cuda.synchronize()
    if how == "host":
        t0 = time.perf_counter()
        out = fn()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        text = f"host enqueue {host * 1e3:.1f} ms, wall to GPU idle {wall * 1e3:.1f} ms (one call from an idle GPU)"
        print(f"{prefix}: {text}", flush=True)
    elif how == "python":
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        out = fn()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(45)
        text = buf.getvalue()
    else:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as tprof:
            out = fn()
            torch.cuda.synchronize()
        averages = tprof.key_averages()
        text = (averages.table(sort_by="cuda_time_total", row_limit=35) + "\n\n"
                + averages.table(sort_by="self_cpu_time_total", row_limit=35) + "\n\n"
                + averages.table(sort_by="self_cuda_time_total", row_limit=90, max_name_column_width=110))
        tprof.export_chrome_trace(f"{prefix}_trace.json")  # kernel timeline: gaps, overlap, order
    Path(f"{prefix}_{how}.txt").write_text(text + "\n")
    return out


@contextlib.contextmanager
def gc_timer(total: list[float]):
    """Adds the host time spent in Python's garbage collector to ``total[0]`` (ms) while open."""
    start: list[float] = []

    def callback(phase, info):
        if phase == "start":
            start[:] = [time.perf_counter()]
        elif start:
            total[0] += (time.perf_counter() - start[0]) * 1e3

    gc.callbacks.append(callback)
    try:
        yield
    finally:
        gc.callbacks.remove(callback)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_backend(entry: str) -> tuple[str, tuple[tuple[str, object], ...]]:
    """``inductor``, ``chipmunk`` or ``chipmunk[KEY=JSON;KEY=JSON]`` (a chipmunk variant: overrides on top of
    ``--set``) -> (backend, extra overrides). Variants let one process time A/B/A/B runs on one GPU."""
    m = re.fullmatch(r"(inductor|chipmunk)(?:\[(.+)\])?", entry)
    if m is None or (m.group(2) and m.group(1) != "chipmunk"):
        raise SystemExit(f"--backends: {entry!r} is not inductor, chipmunk or chipmunk[KEY=VALUE;...]")
    try:
        extra = parse_overrides(m.group(2) or "")
    except ValueError as err:
        raise SystemExit(f"--backends: {entry!r}: {err}") from None
    return m.group(1), extra


def labels(entries: tuple[str, ...]) -> list[str]:
    """Result names for ``--backends`` entries: each entry, with ``#2``, ``#3``... on repeats."""
    seen: dict[str, int] = {}
    out = []
    for e in entries:
        seen[e] = seen.get(e, 0) + 1
        out.append(e if seen[e] == 1 else f"{e}#{seen[e]}")
    return out


def run_backend(name: str, cfg: E2EConfig, device, dtype, label: str = "") -> tuple[E2EResult, torch.Tensor, str]:
    """One backend (a ``--backends`` entry) through warm-up, timed generations and profiles; ``label`` names
    its profile files (default: the backend)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    launch_s0 = normal_path_stats()[1]
    gc.collect()  # the previous backend's model may sit in reference cycles: its memory would count here
    resident = 0.0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated(device) / 2**30
        if resident > 0.5:
            print(f"warning: {resident:.1f} GB of GPU memory still allocated before {name} starts; its peak "
                  "includes it", flush=True)
    model, shape, call = BUILDERS[cfg.model](cfg, device, dtype)
    entry = name
    name, _ = parse_backend(name)
    tag = re.sub(r"[^\w.=-]+", "_", label or name).strip("_")
    backend: object = name
    kwargs: dict = {"mode": cfg.mode} if cfg.mode else {}
    if name == "chipmunk":
        import chipmunk_compile

        # torch.compile refuses mode= together with options=: bind both through the typed backend.
        config = backend_config(cfg, entry)
        backend, kwargs = chipmunk_compile.backend(config, mode=cfg.mode or None), {}
    if cfg.regional:
        model.compile_repeated_blocks(backend=backend, **kwargs)
        compiled = model
    else:
        compiled = torch.compile(model, backend=backend, **kwargs)
    limit = cfg.timed_steps or None
    graphs = device.type == "cuda" and "reduce-overhead" in cfg.mode
    # Warm-up (compiles): the whole loop, or with --timed-steps the timed steps (every step kind must have
    # run once); Inductor's steps are all alike, so one step warms it up.
    warm_steps = 1 if limit and name == "inductor" else limit
    _sync(device)
    t0 = time.perf_counter()
    warm_ms: list[float] = []
    generate(compiled, call, shape, cfg.steps, device, dtype, max_steps=warm_steps, graphs=graphs,
             step_times=warm_ms)
    _sync(device)
    first = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, steps_ms, out, gc_ms = [], [], None, [0.0]
    for r in range(cfg.repeats):
        _sync(device)
        t0 = time.perf_counter()
        # per-step device events on the last timed generation (recorded without syncs)
        with gc_timer(gc_ms):
            out = generate(compiled, call, shape, cfg.steps, device, dtype, graphs=graphs,
                           step_times=steps_ms if r == cfg.repeats - 1 else None, max_steps=limit)
        _sync(device)
        times.append(time.perf_counter() - t0)
    if cfg.profile_dir and device.type == "cuda":
        for step in cfg.profile_steps:  # FLUX: 2 reuses the MLP selection, 3 reselects
            for how in ("host", "python", "torch"):
                generate(compiled, call, shape, cfg.steps, device, dtype, max_steps=step + 1, graphs=graphs,
                         profile=(step, f"{cfg.profile_dir}/profile_{cfg.model}_{tag}_step{step}", how))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    step_flops: list[dict[str, int]] = []
    if cfg.count_flops:  # after the peak is read: counting holds no more memory, but it is not timed either
        generate(compiled, call, shape, cfg.steps, device, dtype, graphs=graphs, flops=(step_flops, name == "chipmunk"),
                 max_steps=1 if name == "inductor" else None)
    sec = statistics.median(times)
    if limit:  # only the first steps ran: predict the whole schedule from the time of each step kind
        kinds = step_kinds(config, cfg.steps) if name == "chipmunk" else [("dense",)] * cfg.steps
        sec = predict_total_ms(steps_ms, kinds) / 1e3
        first = first - sum(steps_ms[:warm_steps]) / 1e3 + sec  # compile time + a predicted warm loop
    report = ""
    if name == "chipmunk":
        import chipmunk_compile

        report = str(chipmunk_compile.report(model))
    res = E2EResult(name, sec, first, first - sec, peak, counters["stats"]["unique_graphs"] - graphs, steps_ms,
                    gc_ms[0] / cfg.repeats, resident, normal_path_stats()[1] - launch_s0, warm_ms, step_flops)
    del model, compiled
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res, out, report


def backend_config(cfg: E2EConfig, name: str):
    """The ChipmunkConfig of a chipmunk result name (``chipmunk``, ``chipmunk[K=V;...]``, ``...#2``); an unknown
    key or a bad value (``--set`` or the variant's) exits naming it."""
    import chipmunk_compile

    _, extra = parse_backend(name.split("#")[0])
    options = {"preset": cfg.preset, **dict(cfg.overrides), **dict(extra)}
    try:
        config, rest = chipmunk_compile.ChipmunkConfig.from_options(options)
    except ValueError as err:  # ConfigError
        raise SystemExit(f"{name!r}: {err}") from None
    if rest:  # the backend would hand these to Inductor; here they are typos
        raise SystemExit(f"{name!r}: not chipmunk options: {sorted(rest)}")
    return config


def flop_summaries(cfg: E2EConfig, results: dict[str, E2EResult]) -> dict[str, dict]:
    """:func:`flop_summary` of each chipmunk result, with FLOPs counted beside a counted Inductor run."""
    ind = results.get("inductor")
    if not (cfg.count_flops and ind is not None and ind.step_flops and ind.step_ms):
        return {}
    out = {}
    for name, r in results.items():
        if not name.startswith("chipmunk") or not r.step_flops:
            continue
        out[name] = flop_summary(ind.step_flops[0]["total"], r.step_flops, r.step_ms,
                                 step_kinds(backend_config(cfg, name), cfg.steps), statistics.median(ind.step_ms),
                                 ind.seconds_per_generation / r.seconds_per_generation)
        s = out[name]
        print(f"{name}: {s['chipmunk_tflop_per_generation']:.1f} TFLOP per generation against "
              f"{s['dense_tflop_per_step'] * cfg.steps:.1f} dense: FLOP ratio {s['flop_ratio']:.3f}, measured "
              f"{s['measured_speedup']:.3f}x = {s['rate_vs_inductor']:.3f} of Inductor's FLOP rate "
              f"({s['inductor_tflop_per_s']:.0f} TFLOP/s)", flush=True)
        for kind, k in s["by_kind"].items():
            print(f"  {kind}: {k['steps']} steps, {k['median_ms']:.1f} ms, {k['tflop']:.2f} TFLOP "
                  f"({k['flops_vs_dense']:.3f} of dense), {k['tflop_per_s']:.0f} TFLOP/s", flush=True)
    return out


def write_flop_rows(path: Path, cfg: E2EConfig, card: str, summaries: dict[str, dict]) -> None:
    """Append one row per chipmunk backend of :func:`flop_summaries` (its step kinds as JSON)."""
    header = [*RUN_COLUMNS, "model", "size", "height", "width", "frames", "steps", "regional", "mode", "backend",
              "dense_tflop_per_step", "chipmunk_tflop_per_generation", "flop_ratio", "measured_speedup",
              "rate_vs_inductor", "inductor_tflop_per_s", "by_kind"]
    run = run_fields(card)
    append_csv(path, header, (
        [*run, cfg.model, cfg.size, cfg.height, cfg.width, cfg.frames if cfg.model != "flux" else "", cfg.steps,
         cfg.regional, cfg.mode or "default", name, f"{s['dense_tflop_per_step']:.4f}",
         f"{s['chipmunk_tflop_per_generation']:.3f}", f"{s['flop_ratio']:.4f}", f"{s['measured_speedup']:.4f}",
         f"{s['rate_vs_inductor']:.4f}", f"{s['inductor_tflop_per_s']:.1f}", json.dumps(s["by_kind"])]
        for name, s in summaries.items()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(BUILDERS), default="flux")
    p.add_argument("--frames", type=int, default=9, help="video frames (hunyuan, wan)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: 768 for flux, 720 for video models)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--size", choices=["real", "tiny"], default="real")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--full-graph-compile", action="store_true", help="compile the whole model, not per block")
    p.add_argument("--preset", default=None, help="chipmunk preset (default: the model's)")
    p.add_argument("--set", action="append", default=[], help="chipmunk override KEY=VALUE (JSON value)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--timed-steps", type=int, default=0,
                   help="time only this many first steps and predict the whole loop from each step kind's time")
    p.add_argument("--mode", default="", help="torch.compile mode for both sides, e.g. reduce-overhead")
    p.add_argument("--profile", action="store_true", help="profile the --profile-steps (host, Python, CUDA) into --out")
    p.add_argument("--profile-steps", default="2,3", help="comma list of steps to profile")
    p.add_argument("--count-flops", action="store_true",
                   help="one more (untimed) generation per backend counting each step's FLOPs; with inductor in "
                        "the run, writes how far FLOPs alone could take each chipmunk backend (flops_<model>_*.csv)")
    p.add_argument("--backends", default="inductor,chipmunk",
                   help="comma list of inductor, chipmunk, chipmunk[KEY=JSON;...] (a variant; repeats allowed, "
                        "e.g. A/B/A/B in one process); speedups need inductor")
    args = p.parse_args(argv)
    if args.count_flops and (args.timed_steps or "reduce-overhead" in args.mode):
        p.error("--count-flops counts a whole loop outside CUDA graphs: not with --timed-steps or reduce-overhead")
    overrides = tuple((k, json.loads(v)) for k, v in (s.split("=", 1) for s in args.set))
    height = args.height or (768 if args.model == "flux" else 720)
    cfg = E2EConfig(model=args.model, size=args.size, height=height, width=args.width, steps=args.steps,
                    regional=not args.full_graph_compile,
                    repeats=args.repeats, preset=args.preset or args.model, overrides=overrides, frames=args.frames,
                    profile_dir=args.out if args.profile else "", mode=args.mode, timed_steps=args.timed_steps,
                    profile_steps=tuple(int(x) for x in args.profile_steps.split(",")),
                    backends=tuple(split_top_level(args.backends, ",")), count_flops=args.count_flops)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results, outs, report = {}, {}, ""
    for entry in cfg.backends:  # a bad entry, key or value fails here, before any model is built
        if parse_backend(entry)[0] == "chipmunk":
            backend_config(cfg, entry)
    for entry, name in zip(cfg.backends, labels(cfg.backends)):
        res, out, rep = run_backend(entry, cfg, device, dtype, label=name)
        res.backend = name
        results[name], outs[name] = res, out
        report = rep or report
        print(f"{name}: {res.seconds_per_generation:.3f} s/gen, first {res.first_generation_s:.1f} s, "
              f"compile {res.compile_s:.1f} s (chipmunk kernels' first launches {res.triton_first_launch_s:.1f} s), "
              f"peak {res.peak_gb:.1f} GB, recompiles {res.recompiles_after_warmup}, "
              f"gc {res.gc_ms:.0f} ms/gen",
              flush=True)
    both = "inductor" in outs and "chipmunk" in outs
    rel = float((outs["chipmunk"].float() - outs["inductor"].float()).norm() / outs["inductor"].float().norm()) \
        if both else float("nan")
    base = results["inductor"].seconds_per_generation if "inductor" in results else None
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    path = out_dir / f"e2e_{card.replace(' ', '_')}_{date}.csv"
    header = [*RUN_COLUMNS, "model", "size", "height", "width", "frames", "steps", "regional", "preset", "overrides",
              "mode", "backend", "seconds_per_generation", "speedup_vs_inductor", "compile_s", "first_generation_s",
              "peak_gb", "recompiles_after_warmup", "rel_l2_vs_inductor", "step_ms_median_dense_steps",
              "step_ms_median_all", "predicted_from_steps"]
    rows = []
    for name, r in results.items():
        kind, extra = parse_backend(name.split("#")[0])
        rows.append([*run_fields(card), cfg.model, cfg.size, cfg.height, cfg.width,
                     cfg.frames if cfg.model != "flux" else "", cfg.steps, cfg.regional,
                     cfg.preset if kind == "chipmunk" else "", dict(cfg.overrides + extra), cfg.mode or "default", name,
                     f"{r.seconds_per_generation:.4f}", f"{base / r.seconds_per_generation:.3f}" if base else "",
                     f"{r.compile_s:.1f}", f"{r.first_generation_s:.1f}", f"{r.peak_gb:.2f}",
                     r.recompiles_after_warmup, f"{rel:.4g}" if name == "chipmunk" and both else "",
                     f"{statistics.median(r.step_ms[:2]):.2f}" if r.step_ms else "",
                     f"{statistics.median(r.step_ms):.2f}" if r.step_ms else "", cfg.timed_steps or ""])
    append_csv(path, header, rows)
    summaries = flop_summaries(cfg, results)
    if summaries:
        write_flop_rows(out_dir / f"flops_{cfg.model}_{card.replace(' ', '_')}_{date}.csv", cfg, card, summaries)
    (out_dir / f"e2e_steps_{cfg.model}_{date}.json").write_text(
        json.dumps({"config": asdict(cfg), "card": card, "results": {k: asdict(v) for k, v in results.items()},
                    "flop_summaries": summaries}))
    print(report)
    if both:
        speedup = base / results["chipmunk"].seconds_per_generation
        print(f"speedup chipmunk vs inductor: {speedup:.3f}x on {card}; final latent rel L2 {rel:.3g}; wrote {path}")


if __name__ == "__main__":
    main()
