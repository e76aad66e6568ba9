"""Output quality of chipmunk on the trained reference DiT: dense vs chipmunk samples from the same noise.

    python bench/quality.py --variant image --classes 2              # CPU: the cpu grid, ~6 min on 2 cores
    python bench/quality.py --variant video --classes 1              # CPU: ~6 min
    python bench/quality.py --variant both --classes 12 --seeds 2    # CUDA: full grid, ~4 min a variant (H200)
    python bench/quality.py --variant image --quick --steps 10       # smoke run: 3 settings
    python bench/quality.py --variant video --grid full --settings wan,wan@tiled --out /tmp/q
    python bench/quality.py --variant image --settings 'flux,flux[mlp.keep=0.15;attention.keep=0.1]'

For each variant (``image``: 1024 tokens, ``video``: 2048 tokens; bench/reference_dit) it samples
``classes × seeds`` images or clips with 50 Euler steps and classifier-free guidance (one batched
[cond; uncond] call per step, as ``sample.py`` does), once with the eager model (the reference) and once per
setting with ``torch.compile(model, backend="chipmunk", options=...)``, from identical noise. Per setting:

- PSNR (dB, peak 1) and SSIM (11-tap Gaussian window, σ = 1.5) of the decoded samples in [0, 1] against
  the reference, averaged over samples (a clip's SSIM is the mean over its frames);
- relative L2 of the raw final samples (model space, [-1, 1]) against the reference;
- attention + MLP FLOPs of the chipmunk loop as a fraction of the dense model's (FlopTally counts what our
  ops computed on each call; a kind whose sites are not rewritten counts as dense), and per kind;
- seconds per sample on CUDA (one warm-up generation compiles and counts FLOPs, a second is timed);
  blank on CPU, where the ops run their PyTorch references and time says nothing about the method.

Each setting compiles a freshly loaded model after ``torch._dynamo.reset()``. On CUDA an extra ``inductor``
row (plain ``torch.compile``) gives the dense speed and the numerical floor (bf16 by default there).
Writes ``bench/results/quality_<variant>_<date>.csv`` (rows appended), ``quality_<variant>.png`` (PSNR
against FLOP fraction, and against time on CUDA) and ``quality_<variant>_grid.png`` (dense, then a few
settings; for video a few frames of the first clips).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import io
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import chipmunk_compile  # noqa: E402
from bench._harness import git_sha, parse_overrides, split_top_level, triton_version  # noqa: E402
from bench.reference_dit.model import DiT, DiTConfig  # noqa: E402
from bench.reference_dit.sample import load, sample  # noqa: E402
from chipmunk_compile.config import ChipmunkConfig, ConfigError  # noqa: E402
from chipmunk_compile.runner import FLOP_COUNTER, FlopTally  # noqa: E402
from chipmunk_compile.sparse_attention import attention_flops  # noqa: E402
from chipmunk_compile.sparse_mlp import mlp_flops  # noqa: E402
from chipmunk_compile.testing import relative_l2  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# Class y = shape * 3 + colour: this order covers every shape and colour family within its first 4 entries.
CLASS_ORDER = tuple((i % 4) * 3 + i % 3 for i in range(12))
KINDS = ("attention", "mlp")


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One chipmunk configuration: ``options`` are passed to ``torch.compile(..., options=...)``."""

    name: str
    family: str  # attention | mlp | both | schedule | preset | tiled (| dense, inductor: reference rows)
    options: tuple[tuple[str, Any], ...]
    token_order: str = "raster"  # raster (the model's own) | tiled (see TiledTokens)

    def config(self) -> ChipmunkConfig:
        return ChipmunkConfig.from_options(dict(self.options))[0]

    def tiled(self) -> Setting:
        return Setting(f"{self.name}@tiled", "tiled", self.options, "tiled")


# The sweep's own schedule (presets bring theirs): dense at steps 0, 1 and every 10th, first 2 of 6 layers dense.
BASE_SCHEDULE = {
    f"{kind}.{k}": v
    for kind in KINDS
    for k, v in (("first_dense_steps", 2), ("dense_every", 10), ("first_dense_layers", 2))
}


def _sweep_point(attn: float | None, mlp: float | None, family: str, suffix: str = "", **schedule: Any) -> Setting:
    opts: dict[str, Any] = dict(BASE_SCHEDULE)
    opts.update(schedule)
    names = []
    if attn is None:
        opts["attention.enabled"] = False
    else:
        opts["attention.keep"] = attn
        names.append(f"attn{attn:.2f}")
    if mlp is None:
        opts["mlp.enabled"] = False
    else:
        opts["mlp.keep"] = mlp
        names.append(f"mlp{mlp:.2f}")
    return Setting("+".join(names) + suffix, family, tuple(sorted(opts.items())))


def _preset(name: str) -> Setting:
    # mlp.min_tokens 0: the reference DiT's sequences are below the flux preset's 1024-token floor for MLPs
    return Setting(name, "preset", (("preset", name), ("mlp.min_tokens", 0)))


def preset_variant(name: str) -> Setting:
    """A preset with overrides, named ``PRESET[KEY=JSON;KEY=JSON...]``, e.g. ``flux[mlp.keep=0.15]``.

    Built as :func:`_preset` builds the preset (family ``preset``, ``mlp.min_tokens`` 0, which an override
    may replace), then the overrides in the order given. Values are JSON (``0.15``, ``true``, ``[0, 1]``,
    ``null``); one that is not JSON is taken as a string (``offload=never``). Keys are the dotted
    ``torch.compile`` options of the backend (``mlp.keep``, ``attention.dense_every``, ``num_steps``...).
    Raises ValueError on a malformed name, ConfigError (a ValueError) on an unknown preset, an unknown
    key or a bad value.
    """
    name = name.strip()
    head, bracket, rest = name.partition("[")
    preset = head.strip()
    if not bracket or not rest.endswith("]") or not preset:
        raise ValueError(f"{name!r} is not of the form PRESET[KEY=JSON;KEY=JSON...]")
    ChipmunkConfig.from_name(preset)  # an unknown preset: ConfigError naming the known ones
    try:
        overrides = parse_overrides(rest[:-1])
    except ValueError as err:
        raise ValueError(f"{name!r}: {err}") from None
    for key, _ in overrides:
        if key in ("preset", "config"):
            raise ValueError(f"{name!r}: {key!r} cannot be overridden (the preset is named before the bracket)")
    if not overrides:
        raise ValueError(f"{name!r} has no overrides; name the preset alone ({preset!r}) for the preset itself")
    opts: dict[str, Any] = {"preset": preset, "mlp.min_tokens": 0, **dict(overrides)}
    setting = Setting(name, "preset", tuple(opts.items()))
    _, rest_options = ChipmunkConfig.from_options(opts)  # bad keys or values: ConfigError
    if rest_options:
        raise ConfigError(f"{name!r}: not chipmunk options: {sorted(rest_options)}")
    return setting


def select_settings(spec: str, grid: str) -> list[Setting]:
    """The settings ``--settings`` names, in its order: a comma-separated list of names from ``grid``
    (:func:`sweep`) and preset variants ``PRESET[KEY=JSON;...]`` (:func:`preset_variant`, built, not looked
    up). An empty ``spec`` keeps the whole grid. Raises ValueError (ConfigError included) naming what is
    wrong: a name not in the grid, a malformed variant, an unknown preset, key or value."""
    settings = sweep(grid)
    if not spec.strip():
        return settings
    by_name = {s.name: s for s in settings}
    chosen: dict[str, Setting] = {}
    unknown, errors = [], []
    for name in split_top_level(spec, ","):
        if "[" in name:
            try:
                setting = preset_variant(name)
            except ValueError as err:
                errors.append(str(err))
                continue
            chosen.setdefault(setting.name, setting)
        elif name in by_name:
            chosen.setdefault(name, by_name[name])
        else:
            unknown.append(name)
    if unknown:
        errors.insert(
            0,
            f"settings not in the {grid} grid: {unknown}; it has {list(by_name)}, or name a preset "
            "variant PRESET[KEY=JSON;KEY=JSON]",
        )
    if errors:
        raise ValueError("; ".join(errors))
    return list(chosen.values())


def sweep(grid: str = "full") -> list[Setting]:
    """The settings of a grid: ``full`` (20 points), ``cpu`` (10, sized for 2 CPU cores), ``quick`` (3).

    Sweep points share :data:`BASE_SCHEDULE`; ``/every5`` refreshes every 5 steps, ``/first4`` runs the first
    4 steps densely. Presets keep their own settings. ``@tiled`` points run the model with its tokens in tile
    order (:class:`TiledTokens`), as the paper's code reorders them; the others keep the model's raster order.
    The ``wan`` preset and the ``attn0.10`` point are the same configuration (a check: identical rows).
    """
    every5 = {"attention.dense_every": 5, "mlp.dense_every": 5}
    first4 = {"attention.first_dense_steps": 4, "mlp.first_dense_steps": 4}
    if grid == "quick":
        return [_sweep_point(0.5, 0.6, "both"), _sweep_point(0.2, 0.3, "both"), _sweep_point(0.05, 0.1, "both")]
    if grid == "cpu":  # attention-only at 0.1 and 0.05 are the wan and (nearly) the hunyuan points
        return [
            _sweep_point(0.2, None, "attention"),
            _sweep_point(None, 0.5, "mlp"),
            _sweep_point(None, 0.2, "mlp"),
            _sweep_point(0.1, 0.3, "both"),
            _sweep_point(0.05, 0.2, "both"),
            _sweep_point(0.1, 0.3, "schedule", "/every5", **every5),
            _sweep_point(0.1, 0.3, "schedule", "/first4", **first4),
            _preset("flux"),
            _preset("hunyuan"),
            _preset("wan"),
        ]
    if grid == "full":
        return [
            *(_sweep_point(k, None, "attention") for k in (0.3, 0.2, 0.1, 0.05)),
            *(_sweep_point(None, k, "mlp") for k in (0.5, 0.3, 0.2)),
            *(_sweep_point(a, m, "both") for a, m in ((0.3, 0.5), (0.2, 0.3), (0.1, 0.3), (0.05, 0.2))),
            _sweep_point(0.1, 0.3, "schedule", "/every5", **every5),
            _sweep_point(0.1, 0.3, "schedule", "/first4", **first4),
            _preset("flux"),
            _preset("hunyuan"),
            _preset("wan"),
            *(s.tiled() for s in (_sweep_point(None, 0.2, "mlp"), _preset("wan"))),
            *(_sweep_point(a, m, "both").tiled() for a, m in ((0.1, 0.3), (0.05, 0.2))),
        ]
    raise ValueError(f"unknown grid {grid!r}; expected full, cpu or quick")


# Token tiles of 128 tokens (one attention query group, one MLP block): 8 x 16 patches, or 2 frames x 8 x 8.
TILES = {"image": (8, 16), "video": (2, 8, 8)}


def tile_permutation(grid: tuple[int, ...], tile: tuple[int, ...]) -> torch.Tensor:
    """Raster token indices listed in tile order: tiles in raster order over the grid, tokens in raster order
    within a tile. grid, tile: sizes per axis (each tile size divides its grid size). Returns (S,) int64."""
    if any(n % t for n, t in zip(grid, tile)):
        raise ValueError(f"tile {tile} does not divide the token grid {grid}")
    k = len(grid)
    split = [d for n, t in zip(grid, tile) for d in (n // t, t)]
    order = [2 * a for a in range(k)] + [2 * a + 1 for a in range(k)]
    return torch.arange(math.prod(grid)).reshape(split).permute(order).reshape(-1)


class TiledTokens(nn.Module):
    """A reference DiT whose tokens run in tile order, so each 128-token group is a compact tile.

    Same function as the wrapped model (rotary positions are permuted with the tokens; everything else is
    per token or permutation-equivariant): outputs agree up to float rounding. chipmunk_compile does not
    reorder tokens itself; the paper's code does (8x8-patch tiles for images, voxels for video).
    forward(x (B, C, *input_size), timestep (B,), class_labels (B,)) -> (B, C, *input_size).
    """

    def __init__(self, dit: DiT, tile: tuple[int, ...]) -> None:
        super().__init__()
        self.dit = dit
        self.config = dit.config
        perm = tile_permutation(dit.config.grid_size, tile).to(dit.rope_cos.device)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inverse", torch.argsort(perm), persistent=False)
        self.register_buffer("rope_cos", dit.rope_cos[perm], persistent=False)
        self.register_buffer("rope_sin", dit.rope_sin[perm], persistent=False)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        d = self.dit
        h = d.x_embedder(d.patchify(x)[:, self.perm])  # (B, S, dim), tile order
        c = d.t_embedder(timestep) + d.y_embedder(class_labels)
        for blk in d.blocks:
            h = blk(h, c, self.rope_cos, self.rope_sin)
        return d.unpatchify(d.final_layer(h, c)[:, self.inverse])


# ----------------------------------------------------------------------------------------------- metrics
def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model-space samples in [-1, 1] (any shape) -> decoded images in [0, 1] (clamped), float64."""
    return (x.double().clamp(-1, 1) + 1) / 2


def as_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> itself; clips (B, C, T, H, W) -> frames (B * T, C, H, W)."""
    if x.dim() == 5:
        b, c, t, h, w = x.shape
        return x.transpose(1, 2).reshape(b * t, c, h, w)
    return x


def psnr_per_sample(a: torch.Tensor, ref: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """PSNR in dB of each sample (B, ...) against ``ref`` (same shape), both in [0, peak]. Returns (B,)."""
    mse = ((a.double() - ref.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(peak * peak / mse.clamp_min(1e-20))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(size,) float64 normalised 1-D Gaussian."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def ssim(a: torch.Tensor, ref: torch.Tensor, *, size: int = 11, sigma: float = 1.5, peak: float = 1.0) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of images a, ref: (N, C, H, W) in [0, peak].

    Local means, variances and covariance use a ``size``-tap Gaussian (σ = ``sigma``) over the valid region
    (no padding), per channel; K1 = 0.01, K2 = 0.03. Returns (N,) float64: the mean SSIM map per image.
    """
    n, c, h, w = a.shape
    if min(h, w) < size:
        raise ValueError(f"images {h}x{w} are smaller than the {size}-tap SSIM window")
    g = gaussian_window(size, sigma).to(a.device)
    x = torch.cat([a.double(), ref.double()]).reshape(2 * n * c, 1, h, w)

    def blur(t: torch.Tensor) -> torch.Tensor:  # (M, 1, H, W) -> (M, 1, H - size + 1, W - size + 1)
        return F.conv2d(F.conv2d(t, g.view(1, 1, 1, size)), g.view(1, 1, size, 1))

    mu = blur(x)
    mu_a, mu_r = mu[: n * c], mu[n * c :]
    var = blur(x * x) - mu * mu
    var_a, var_r = var[: n * c], var[n * c :]
    cov = blur(x[: n * c] * x[n * c :]) - mu_a * mu_r
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    smap = ((2 * mu_a * mu_r + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_r**2 + c1) * (var_a + var_r + c2))
    return smap.reshape(n, -1).mean(1)


def sample_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """PSNR / SSIM on decoded samples, relative L2 on raw ones. out, ref: (B, C, H, W) or (B, C, T, H, W)."""
    a, r = to_unit(out), to_unit(ref)
    frames_per_sample = a.shape[2] if a.dim() == 5 else 1
    s = ssim(as_frames(a), as_frames(r)).reshape(a.shape[0], frames_per_sample).mean(1)
    return {"psnr": float(psnr_per_sample(a, r).mean()), "ssim": float(s.mean()), "rel_l2": relative_l2(out, ref)}


def dense_flops_per_call(cfg: DiTConfig, batch: int) -> dict[str, int]:
    """Attention (SDPA) and MLP FLOPs of one dense forward of a reference DiT on ``batch`` inputs,
    by the formulas our ops count with."""
    s, hd = cfg.num_tokens, cfg.head_dim
    return {
        "attention": cfg.depth * attention_flops(batch, cfg.num_heads, s, s, hd, hd),
        "mlp": cfg.depth * mlp_flops(batch * s, cfg.dim, cfg.mlp_ratio * cfg.dim, cfg.dim, False),
    }


# ------------------------------------------------------------------------------------------------ running
@dataclass(frozen=True)
class QualityRun:
    """What to sample: ``classes`` classes (CLASS_ORDER) × ``seeds`` noise seeds, ``steps`` Euler steps."""

    variant: str = "image"
    classes: int = 4
    seeds: int = 1
    steps: int = 50
    guidance: float = 3.0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    @property
    def timed(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([CLASS_ORDER[i % len(CLASS_ORDER)] for i in range(self.classes)])


@dataclass
class SettingResult:
    """Metrics of one setting against the dense reference; ``samples`` (B, *sample_shape) for the grid."""

    setting: Setting
    config: ChipmunkConfig | None
    psnr: float
    ssim: float
    rel_l2: float
    flops_frac: float
    kind_flops_frac: dict[str, float]
    kept: dict[str, float | None]
    seconds_per_sample: float | None
    wall_s: float
    samples: torch.Tensor = field(repr=False)
    op_backends: str = ""


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def generate(
    model: Callable, run: QualityRun, cfg: DiTConfig, tally: FlopTally | None = None
) -> tuple[torch.Tensor, float]:
    """All samples of ``run`` (one batch of classes per seed) and the seconds it took.

    Returns ((seeds * classes, *cfg.sample_shape) float32 on the CPU, seconds)."""
    token = FLOP_COUNTER.set(tally) if tally is not None else None
    try:
        _sync(run.device)
        t0 = time.perf_counter()
        outs = [
            sample(
                model,
                cfg,
                run.labels,
                num_steps=run.steps,
                guidance_scale=run.guidance,
                seed=seed,
                device=run.device,
                dtype=run.dtype,
            )
            for seed in range(run.seeds)
        ]
        _sync(run.device)
        seconds = time.perf_counter() - t0
    finally:
        if token is not None:
            FLOP_COUNTER.reset(token)
    return torch.cat(outs).cpu(), seconds


def evaluate(run: QualityRun, setting: Setting, ref: torch.Tensor) -> SettingResult:
    """Compile a freshly loaded model with ``setting``, sample, and compare with ``ref`` (the eager samples).

    A fresh model per setting: chipmunk keeps one state per config on the model's parameters, and
    ``chipmunk_compile.report`` lists the sites of every config the model was compiled with.
    """
    model: nn.Module = load(run.variant, run.device, run.dtype)
    if setting.token_order == "tiled":
        model = TiledTokens(model, TILES[run.variant])
    cfg = model.config
    n_samples = run.classes * run.seeds
    torch._dynamo.reset()
    t_start = time.perf_counter()
    tally = FlopTally()
    if setting.family == "inductor":
        compiled, config = torch.compile(model), None
    else:
        compiled = torch.compile(model, backend="chipmunk", options=dict(setting.options))
        config = setting.config()
    out, seconds = generate(compiled, run, cfg, tally)
    per_sample = None
    if run.timed:  # the first generation compiled and counted FLOPs; time a second one
        out, seconds = generate(compiled, run, cfg)
        per_sample = seconds / n_samples
    wall = time.perf_counter() - t_start

    cfg_batch = run.classes * (1 if run.guidance == 1.0 else 2)
    dense = {k: v * run.steps * run.seeds for k, v in dense_flops_per_call(cfg, cfg_batch).items()}
    report = chipmunk_compile.report(compiled) if config is not None else None
    got, kept = {}, {}
    backends = sorted({s.backend for s in report.sites if s.backend}) if report else []
    for kind in KINDS:
        rows = [s for s in report.by_kind(kind, "rewritten") if s.calls] if report else []
        got[kind] = tally.total(f"chipmunk.{kind}") if rows else dense[kind]
        fractions = [s.kept_fraction for s in rows if s.sparse_calls and s.kept_fraction is not None]
        kept[kind] = sum(fractions) / len(fractions) if fractions else None
    return SettingResult(
        setting=setting,
        config=config,
        **sample_metrics(out, ref),
        flops_frac=sum(got.values()) / sum(dense.values()),
        kind_flops_frac={k: got[k] / dense[k] for k in KINDS},
        kept=kept,
        seconds_per_sample=per_sample,
        wall_s=wall,
        op_backends="; ".join(backends),
        samples=out,
    )


def run_variant(
    run: QualityRun,
    settings: list[Setting],
    log: Callable[[str], None] = print,
    on_result: Callable[[SettingResult], None] | None = None,
) -> tuple[torch.Tensor, SettingResult, list[SettingResult]]:
    """The eager reference, then every setting (plus ``inductor`` on CUDA).

    ``on_result`` sees each row as soon as it exists (the reference's first), so a long sweep that stops
    early keeps what it measured. Returns (reference samples (B, *sample_shape), the reference's row, one
    result per setting)."""
    model = load(run.variant, run.device, run.dtype)
    t0 = time.perf_counter()
    ref, seconds = generate(model, run, model.config)
    if run.timed:  # warm (cuBLAS handles, allocator), then time
        ref, seconds = generate(model, run, model.config)
    n = run.classes * run.seeds
    dense_row = SettingResult(
        setting=Setting("dense", "dense", ()),
        config=None,
        psnr=math.inf,
        ssim=1.0,
        rel_l2=0.0,
        flops_frac=1.0,
        kind_flops_frac=dict.fromkeys(KINDS, 1.0),
        kept=dict.fromkeys(KINDS),
        wall_s=time.perf_counter() - t0,
        seconds_per_sample=seconds / n if run.timed else None,
        samples=ref,
    )
    log(f"[{run.variant}] dense (eager): {dense_row.wall_s:.1f} s for {n} samples")
    if on_result is not None:
        on_result(dense_row)
    if run.timed:
        settings = [Setting("inductor", "inductor", ()), *settings]
    results = []
    for setting in settings:
        res = evaluate(run, setting, ref)
        results.append(res)
        if on_result is not None:
            on_result(res)
        sps = "" if res.seconds_per_sample is None else f"  {res.seconds_per_sample * 1e3:.1f} ms/sample"
        log(
            f"[{run.variant}] {setting.name:<28} PSNR {res.psnr:6.2f} dB  SSIM {res.ssim:.4f}  "
            f"relL2 {res.rel_l2:.4f}  FLOPs {res.flops_frac:.3f}{sps}  ({res.wall_s:.1f} s)"
        )
    torch._dynamo.reset()
    return ref, dense_row, results


# ------------------------------------------------------------------------------------------------ outputs
KNOBS = ("enabled", "keep", "random_keep", "dense_every", "first_dense_steps", "dense_steps", "first_dense_layers")
EXTRA_KNOBS = ("attention.recompute_selection", "mlp.selection_every")
CSV_COLUMNS = (
    "card",
    "torch",
    "triton",
    "git_sha",
    "date",
    "variant",
    "setting",
    "family",
    "classes",
    "seeds",
    "steps",
    "guidance",
    "dtype",
    "token_order",
    *(f"{kind}.{k}" for kind in KINDS for k in KNOBS),
    *EXTRA_KNOBS,
    "psnr",
    "ssim",
    "rel_l2",
    "flops_frac",
    "attention_flops_frac",
    "mlp_flops_frac",
    "attention_kept",
    "mlp_kept",
    "seconds_per_sample",
    "wall_s",
    "op_backends",
)


def card_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


@functools.cache
def provenance() -> dict[str, str]:
    """torch / triton versions and the checkout's commit, read once per process (at the first row written,
    so a sweep's rows name the code it started with even if the checkout moves on meanwhile)."""
    return {"torch": torch.__version__, "triton": triton_version(), "git_sha": git_sha()}


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.6g}"
    return str(value)


def csv_rows(run: QualityRun, results: list[SettingResult]) -> list[dict[str, str]]:
    common = {
        "card": card_name(run.device),
        **provenance(),
        "date": datetime.date.today().isoformat(),
        "variant": run.variant,
        "classes": run.classes,
        "seeds": run.seeds,
        "steps": run.steps,
        "guidance": run.guidance,
        "dtype": str(run.dtype).split(".")[-1],
    }
    rows = []
    for r in results:
        row: dict[str, Any] = dict(
            common,
            setting=r.setting.name,
            family=r.setting.family,
            psnr=r.psnr,
            ssim=r.ssim,
            rel_l2=r.rel_l2,
            flops_frac=r.flops_frac,
            seconds_per_sample=r.seconds_per_sample,
            wall_s=r.wall_s,
            token_order=r.setting.token_order,
            op_backends=r.op_backends,
        )
        for kind in KINDS:
            row[f"{kind}_flops_frac"] = r.kind_flops_frac[kind]
            row[f"{kind}_kept"] = r.kept[kind]
            if r.config is not None:
                sub = getattr(r.config, kind)
                row.update({f"{kind}.{k}": getattr(sub, k) for k in KNOBS})
        if r.config is not None:
            row.update({k: getattr(getattr(r.config, k.split(".")[0]), k.split(".")[1]) for k in EXTRA_KNOBS})
        rows.append({c: _fmt(row.get(c)) for c in CSV_COLUMNS})
    return rows


def append_result(path: Path, run: QualityRun, result: SettingResult) -> None:
    write_csv(path, csv_rows(run, [result]))


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    """Append rows to ``path`` (header written when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)


def shrink_png(src: Path | io.BytesIO, dst: Path, colors: int = 256) -> None:
    """Re-save a PNG with an adaptive palette of ``colors`` colours (about 3x smaller for sample grids)."""
    from PIL import Image

    with Image.open(src) as img:
        img.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """Save a matplotlib figure as a palette PNG and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    buf.seek(0)
    shrink_png(buf, path)


FAMILY_STYLE = {
    "attention": ("tab:blue", "o"),
    "mlp": ("tab:orange", "s"),
    "both": ("tab:green", "D"),
    "schedule": ("tab:purple", "v"),
    "preset": ("tab:red", "*"),
    "tiled": ("tab:cyan", "P"),
    "inductor": ("black", "x"),
}


def plot_speed_quality(path: Path, run: QualityRun, dense: SettingResult, results: list[SettingResult]) -> None:
    """PSNR against attention+MLP FLOP fraction (and against seconds per sample when timed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in results if math.isfinite(r.psnr)]
    timed = run.timed and all(r.seconds_per_sample is not None for r in results)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(11 if timed else 6.5, 4.4), squeeze=False)
    panels = [("flops_frac", "attention + MLP FLOPs / dense")]
    if timed:
        panels.append(("seconds_per_sample", f"seconds per sample ({card_name(run.device)})"))
    for ax, (attr, label) in zip(axes[0], panels):
        seen = set()
        for r in finite:
            color, marker = FAMILY_STYLE[r.setting.family]
            x = getattr(r, attr)
            ax.scatter(
                x,
                r.psnr,
                c=color,
                marker=marker,
                s=90 if r.setting.family == "preset" else 30,
                label=None if r.setting.family in seen else r.setting.family,
                zorder=3,
            )
            seen.add(r.setting.family)
            bold = r.setting.family == "preset"
            ax.annotate(
                r.setting.name,
                (x, r.psnr),
                textcoords="offset points",
                xytext=(5, -10) if bold else (4, 3),
                fontsize=7 if bold else 5.5,
                fontweight="bold" if bold else "normal",
            )
        if attr == "seconds_per_sample" and dense.seconds_per_sample is not None:
            ax.axvline(dense.seconds_per_sample, color="grey", ls="--", lw=0.8, label="eager dense")
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR vs dense (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"reference DiT {run.variant}: {run.classes} classes x {run.seeds} seeds, {run.steps} steps, "
        f"CFG {run.guidance:g}, {str(run.dtype).split('.')[-1]}",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def grid_rows(results: list[SettingResult], max_rows: int = 5) -> list[SettingResult]:
    """The settings shown in the sample grid: presets, then the best and worst of the others by PSNR."""
    presets = [r for r in results if r.setting.family == "preset"]
    others = sorted((r for r in results if r.setting.family not in ("preset", "inductor")), key=lambda r: -r.psnr)
    picked = presets + ([others[0], others[-1]] if len(others) > 1 else others)
    return list({id(r): r for r in picked}.values())[:max_rows]


def save_sample_grid(
    path: Path,
    run: QualityRun,
    dense: SettingResult,
    results: list[SettingResult],
    max_samples: int = 6,
    frames: tuple[int, ...] = (0, 3, 7),
    max_clips: int = 2,
) -> None:
    """Rows: dense, then a few settings (labelled with PSNR). Images: up to ``max_samples`` per row;
    clips: ``frames`` of the first ``max_clips`` clips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [dense, *grid_rows(results)]
    strips = []
    for r in rows:
        x = to_unit(r.samples).float()
        if x.dim() == 5:  # (B, C, T, H, W) -> chosen frames of the first clips, clip-major
            t = x.shape[2]
            x = x[:max_clips, :, [f for f in frames if f < t]].transpose(1, 2).flatten(0, 1)
        else:
            x = x[:max_samples]
        n, c, h, w = x.shape
        strip = torch.ones(c, h + 2, n * (w + 2))
        for i in range(n):
            strip[:, 1 : 1 + h, i * (w + 2) + 1 : i * (w + 2) + 1 + w] = x[i]
        strips.append(strip)
    grid = torch.cat(strips, dim=1).permute(1, 2, 0).numpy()
    scale = 2 if grid.shape[0] // len(rows) > 40 else 3
    height, width = grid.shape[0] * scale / 100, grid.shape[1] * scale / 100
    fig = plt.figure(figsize=(width + 2.0, height + 0.4), dpi=100)
    ax = fig.add_axes((2.0 / (width + 2.0), 0.0, width / (width + 2.0), height / (height + 0.4)))
    ax.imshow(grid, interpolation="nearest")
    row_h = grid.shape[0] / len(rows)
    ax.set_yticks([row_h * (i + 0.5) for i in range(len(rows))])
    ax.set_yticklabels(
        [r.setting.name if r is dense else f"{r.setting.name}\n{r.psnr:.1f} dB, SSIM {r.ssim:.3f}" for r in rows],
        fontsize=8,
    )
    ax.set_xticks([])
    what = f"frames {list(frames)} of {max_clips} clips" if run.variant == "video" else "samples"
    fig.text(0.01, 1 - 0.2 / (height + 0.4), f"{run.variant}: {what}", fontsize=8, va="center")
    save_figure(fig, path, dpi=100)


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["image", "video", "both"], default="both")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument(
        "--grid",
        choices=["full", "cpu", "quick"],
        default=None,
        help="settings grid (default: full on CUDA, cpu on CPU)",
    )
    p.add_argument("--quick", action="store_true", help="the quick grid (3 settings), for smoke tests")
    p.add_argument(
        "--settings",
        default="",
        help="comma-separated setting names to keep from the grid, in this order; a preset variant "
        "PRESET[KEY=JSON;KEY=JSON] (e.g. 'flux[mlp.keep=0.15]') is built instead: the preset with mlp.min_tokens 0 "
        "and the overrides",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    cuda = torch.device(args.device).type == "cuda"
    grid = "quick" if args.quick else args.grid or ("full" if cuda else "cpu")
    try:  # before any sampling: a bad name, preset, key or value stops here
        settings = select_settings(args.settings, grid)
    except ValueError as err:
        p.error(f"--settings: {err}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    variants = ["image", "video"] if args.variant == "both" else [args.variant]
    date = datetime.date.today().isoformat()
    for variant in variants:
        run = QualityRun(variant, args.classes, args.seeds, args.steps, args.guidance, args.device, dtype)
        csv_path = args.out / f"quality_{variant}_{date}.csv"
        _, dense, results = run_variant(run, settings, on_result=functools.partial(append_result, csv_path, run))
        plot_speed_quality(args.out / f"quality_{variant}.png", run, dense, results)
        save_sample_grid(args.out / f"quality_{variant}_grid.png", run, dense, results)
        print(f"wrote {csv_path}, {args.out / f'quality_{variant}.png'}, {args.out / f'quality_{variant}_grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
