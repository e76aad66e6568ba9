"""A compact class-conditioned DiT (adaLN-Zero, rotary positions, SDPA attention, tanh-GELU MLP).

It is the quality yardstick for chipmunk_compile: small enough to train on one GPU in minutes, yet
built from the layer patterns the backend rewrites (``scaled_dot_product_attention`` on (B, H, S, D)
with no mask, and ``Linear -> GELU(tanh) -> Linear``). The forward has no data-dependent Python
control flow, so ``torch.compile(model, fullgraph=True)`` traces it in one graph.

Tokens are patches in row-major order over the patch grid: (h, w) for images, (t, h, w) for video.
Inputs follow diffusers: images are (B, C, H, W), video is (B, C, T, H, W).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a reference DiT.

    ``input_size`` and ``patch_size`` have one entry per grid axis: (H, W) for images, (T, H, W) for
    video. ``rope_axes_dim`` splits the head dimension among the grid axes for rotary positions.
    """

    name: str
    in_channels: int
    input_size: tuple[int, ...]
    patch_size: tuple[int, ...]
    num_classes: int
    dim: int = 256
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: int = 4
    qk_norm: bool = True
    rope_axes_dim: tuple[int, ...] = (32, 32)
    rope_theta: float = 100.0
    freq_embed_dim: int = 256

    def __post_init__(self) -> None:
        if len(self.input_size) != len(self.patch_size) or len(self.input_size) != len(self.rope_axes_dim):
            raise ValueError("input_size, patch_size and rope_axes_dim need one entry per grid axis")
        if any(s % p for s, p in zip(self.input_size, self.patch_size)):
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if sum(self.rope_axes_dim) != self.head_dim or any(d % 2 for d in self.rope_axes_dim):
            raise ValueError(f"rope_axes_dim {self.rope_axes_dim} must be even and sum to {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def grid_size(self) -> tuple[int, ...]:
        """Patch-grid size per axis, e.g. (32, 32) or (8, 16, 16)."""
        return tuple(s // p for s, p in zip(self.input_size, self.patch_size))

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid_size)

    @property
    def null_class(self) -> int:
        """Class index meaning "no class" (used for classifier-free guidance)."""
        return self.num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample without the batch dimension: (C, H, W) or (C, T, H, W)."""
        return (self.in_channels, *self.input_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
        return cls(**kw)

    @classmethod
    def from_name(cls, name: str, **overrides) -> DiTConfig:
        """A preset ("image" or "video"), optionally with fields overridden (e.g. a tiny debug size)."""
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, DiTConfig] = {
    # 64x64 RGB, patch 2 -> 32x32 = 1024 tokens; 12 classes = 4 shape types x 3 colour families.
    "image": DiTConfig(
        name="image",
        in_channels=3,
        input_size=(64, 64),
        patch_size=(2, 2),
        num_classes=12,
        rope_axes_dim=(32, 32),
    ),
    # 8 frames of 32x32 RGB, patch (1, 2, 2) -> 8x16x16 = 2048 tokens; same 12 classes.
    "video": DiTConfig(
        name="video",
        in_channels=3,
        input_size=(8, 32, 32),
        patch_size=(1, 2, 2),
        num_classes=12,
        rope_axes_dim=(16, 24, 24),
    ),
}


def rope_angles(grid_size: tuple[int, ...], axes_dim: tuple[int, ...], theta: float) -> torch.Tensor:
    """Rotary angles for each token of a row-major patch grid.

    Returns (S, sum(axes_dim) // 2) float32: axis ``a`` contributes ``axes_dim[a] // 2`` frequencies
    ``theta ** (-2j / axes_dim[a])`` times the token's integer coordinate along that axis.
    """
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in grid_size], indexing="ij")
    parts = []
    for c, d in zip(coords, axes_dim):
        freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
        parts.append(c.reshape(-1, 1) * freqs)
    return torch.cat(parts, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dim of ``x`` (B, H, S, D) by angles with cos/sin (S, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, S, D) * (1 + scale) + shift, with shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Timestep (B,) in [0, 1000] -> (B, dim): sinusoidal features then a 2-layer SiLU MLP."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float().unsqueeze(1) * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head self-attention: one qkv Linear, optional QK RMSNorm, RoPE, then SDPA on (B, H, S, D)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, S, dim), cos/sin (S, head_dim/2) -> (B, S, dim)."""
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, S, D)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, s, -1))


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear, hidden = ratio * dim."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: the conditioning sets shift/scale/gate of attention and MLP."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg.dim, cfg.num_heads, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(cfg.dim, cfg.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, S, dim), c (B, dim), cos/sin (S, head_dim/2) -> (B, S, dim)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a Linear to patch_volume * out_channels per token."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Class-conditioned diffusion transformer predicting the rectified-flow velocity (noise - x0).

    ``forward(x, timestep, class_labels)``:
      x: (B, C, H, W) for images or (B, C, T, H, W) for video;
      timestep: (B,) float in [0, 1000] (= sigma * 1000);
      class_labels: (B,) int64 in [0, num_classes]; ``num_classes`` is the null (unconditional) class.
    Returns the velocity, same shape as ``x``.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.config = cfg
        n_axes = len(cfg.input_size)
        patch_volume = math.prod(cfg.patch_size)
        self.x_embedder = nn.Linear(patch_volume * cfg.in_channels, cfg.dim)
        self.t_embedder = TimestepEmbedder(cfg.dim, cfg.freq_embed_dim)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, cfg.dim)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg.dim, patch_volume * cfg.in_channels)

        angles = rope_angles(cfg.grid_size, cfg.rope_axes_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

        # (B, C, n0, p0, n1, p1, ...) -> (B, n0, n1, ..., p0, p1, ..., C): static permutations.
        self._patchify_perm = (0, *[2 + 2 * a for a in range(n_axes)], *[3 + 2 * a for a in range(n_axes)], 1)
        inv = [0] * len(self._patchify_perm)
        for i, p in enumerate(self._patchify_perm):
            inv[p] = i
        self._unpatchify_perm = tuple(inv)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start at zero.
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *input_size) -> (B, S, patch_volume * C)."""
        cfg = self.config
        split = [d for n, p in zip(cfg.grid_size, cfg.patch_size) for d in (n, p)]
        x = x.reshape(x.shape[0], cfg.in_channels, *split).permute(self._patchify_perm)
        return x.reshape(x.shape[0], cfg.num_tokens, -1)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, patch_volume * C) -> (B, C, *input_size)."""
        cfg = self.config
        x = x.reshape(x.shape[0], *cfg.grid_size, *cfg.patch_size, cfg.in_channels)
        x = x.permute(self._unpatchify_perm)
        return x.reshape(x.shape[0], cfg.in_channels, *cfg.input_size)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(self.patchify(x))
        c = self.t_embedder(timestep) + self.y_embedder(class_labels)
        for blk in self.blocks:
            h = blk(h, c, self.rope_cos, self.rope_sin)
        return self.unpatchify(self.final_layer(h, c))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
