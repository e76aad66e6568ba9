"""Helpers for testing chipmunk-compiled models, in our suite and in users' CI.

- :class:`TinyDiT`: a plain-PyTorch DiT (adaLN blocks, SDPA attention, GELU MLP) for fast CPU tests.
- :func:`denoise`: a minimal rectified-flow Euler loop (timesteps 1000 → 0) around any model callable.
- :func:`flops_per_call`: FLOPs of each model call, counted by ``FlopCounterMode`` (our ops report
  what they really computed: dense, selection or sparse).
- :func:`relative_l2`, :func:`psnr`: output fidelity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from chipmunk_compile.runner import FLOP_COUNTER, FlopTally


class TinyBlock(nn.Module):
    """adaLN-modulated transformer block: x (B, S, D), c (B, D) -> (B, S, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.mod = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.mod(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + g1 * self.proj(a.transpose(1, 2).reshape(b, s, d))
        h = self.norm2(x) * (1 + sc2) + sh2
        return x + g2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class TinyDiT(nn.Module):
    """A small DiT on token sequences: forward(x (B, S, C), timestep (B,)) -> (B, S, C)."""

    def __init__(self, channels: int = 8, dim: int = 64, heads: int = 4, depth: int = 4, seq: int = 64,
                 seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(channels, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim, generator=gen) * 0.5)
        self.t_embed = nn.Sequential(nn.Linear(64, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(TinyBlock(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, channels)
        with torch.no_grad():  # deterministic by seed, whatever the global RNG state
            for p in self.parameters():
                if p is self.pos:
                    continue
                fan_in = p.shape[1] if p.dim() >= 2 else 16
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        half = 32
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device) / half)
        args = timestep.float()[:, None] * freqs[None]
        c = self.t_embed(torch.cat([args.sin(), args.cos()], dim=-1).to(x.dtype))
        h = self.inp(x) + self.pos[:, : x.shape[1]]
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)


def denoise(model: Callable, noise: torch.Tensor, steps: int = 50, **kwargs) -> torch.Tensor:
    """Euler rectified-flow loop: t from 1 to 0; ``model(x, timestep=1000·t, **kwargs)`` predicts velocity."""
    x = noise
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = ts[i].expand(x.shape[0]).to(x.device)
            v = model(x, timestep=t * 1000.0, **kwargs)
            x = x + (ts[i + 1] - ts[i]) * v
    return x


def flops_per_call(model: Callable, calls: list[tuple[tuple, dict]]) -> list[dict[str, int]]:
    """FLOPs that ``FlopCounterMode`` records for each call of a chipmunk-compiled ``model``.

    Returns one dict per call: ``{"total": ..., "attention": ..., "mlp": ..., "other": ...}``, where
    attention/MLP are our ops (counted by their registered formulas: what they really computed on this
    step) and "other" the remaining matmuls of the compiled graph.
    """
    out = []
    with torch.no_grad():
        for args, kwargs in calls:
            tally = FlopTally()
            token = FLOP_COUNTER.set(tally)
            try:
                model(*args, **kwargs)
            finally:
                FLOP_COUNTER.reset(token)
            attention, mlp = tally.total("chipmunk.attention"), tally.total("chipmunk.mlp")
            out.append({"total": tally.total(), "attention": attention, "mlp": mlp,
                        "other": tally.total() - attention - mlp})
    return out


def relative_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB with the reference's peak-to-peak range as the signal range."""
    mse = float(((a.double() - ref.double()) ** 2).mean())
    rng = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * math.log10(rng * rng / mse)


# ---------------------------------------------------------------------------------------------- checks
# pytest-friendly perf-regression checks: each raises AssertionError with the evidence in the message.


def check_sites(model: torch.nn.Module, *, attention: int | None = None, mlp: int | None = None) -> None:
    """Assert how many attention / MLP sites of a compiled ``model`` were rewritten (after one call)."""
    from chipmunk_compile.report import report

    rep = report(model)
    for kind, want in (("attention", attention), ("mlp", mlp)):
        got = len(rep.by_kind(kind, "rewritten"))
        if want is not None and got != want:
            raise AssertionError(f"expected {want} rewritten {kind} sites, found {got}\n{rep}")


def check_flops(compiled: Callable, calls: list[tuple[tuple, dict]], *, kind: str = "total",
                max_fraction: float, step: int = -1) -> list[dict[str, int]]:
    """Assert that call ``step`` costs at most ``max_fraction`` of call 0's FLOPs of ``kind``
    ("total", "attention" or "mlp"), counted by FlopCounterMode. Returns the per-call counts."""
    flops = flops_per_call(compiled, calls)
    first, last = flops[0][kind], flops[step][kind]
    if first == 0 or last > max_fraction * first:
        raise AssertionError(f"{kind} FLOPs of call {step}: {last} vs {first} at call 0 "
                             f"(fraction {last / max(first, 1):.3f} > {max_fraction}); all calls: {flops}")
    return flops


def check_fidelity(out: torch.Tensor, ref: torch.Tensor, *, min_psnr: float | None = None,
                   max_rel_l2: float | None = None) -> tuple[float, float]:
    """Assert output fidelity against the dense reference. Returns (psnr, relative L2)."""
    p, r = psnr(out, ref), relative_l2(out, ref)
    if min_psnr is not None and p < min_psnr:
        raise AssertionError(f"PSNR {p:.2f} dB below {min_psnr} dB (relative L2 {r:.4g})")
    if max_rel_l2 is not None and r > max_rel_l2:
        raise AssertionError(f"relative L2 {r:.4g} above {max_rel_l2} (PSNR {p:.2f} dB)")
    return p, r


def median_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of ``fn()`` in ms on CUDA (events around each call, after warm-up calls)."""
    if not torch.cuda.is_available():
        raise RuntimeError("median_ms needs CUDA: timing on the CPU references says nothing about GPU speed")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def check_speedup(baseline: Callable[[], object], candidate: Callable[[], object], *, min_speedup: float,
                  warmup: int = 3, reps: int = 10) -> float:
    """Assert ``median(baseline) / median(candidate) >= min_speedup`` (CUDA; same process, same card).

    Each callable should run a whole unit of work (e.g. one generation) so that the step schedule is
    the same in every repetition. Returns the measured speedup.
    """
    base = median_ms(baseline, warmup=warmup, reps=reps)
    cand = median_ms(candidate, warmup=warmup, reps=reps)
    speedup = base / cand
    card = torch.cuda.get_device_name()
    if speedup < min_speedup:
        raise AssertionError(f"speedup {speedup:.3f}x < {min_speedup}x on {card} "
                             f"(baseline {base:.2f} ms, candidate {cand:.2f} ms, medians of {reps})")
    return speedup
