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
