"""Procedural, seed-deterministic training data: coloured shapes on textured backgrounds.

Nothing is downloaded; batches are rendered on the fly with torch on the training device.

Class ``y`` in [0, 12) is ``shape * 3 + colour_family``: shape in (circle, square, triangle, striped
square), colour family in (red, green, blue). Every object in a sample has the class's shape and a
hue from its colour family (jittered), with random size, position and rotation; later objects occlude
earlier ones. Backgrounds are low-saturation gradients with a faint sinusoidal texture, so the
attention a model learns is local (edges, shapes) and content-dependent (which objects match).
Video samples move and rotate the objects linearly over the frames while the texture drifts.

All values lie in [-1, 1]. Images are (B, 3, H, W); video is (B, 3, T, H, W).
"""

from __future__ import annotations

import math

import torch

SHAPES = ("circle", "square", "triangle", "stripes")
COLOR_FAMILIES = ("red", "green", "blue")
NUM_CLASSES = len(SHAPES) * len(COLOR_FAMILIES)
_FAMILY_HUE = torch.tensor([0.0, 1.0 / 3.0, 2.0 / 3.0])


def class_name(y: int) -> str:
    return f"{COLOR_FAMILIES[y % 3]} {SHAPES[y // 3]}"


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """h, s, v (...,) in [0, 1] -> rgb (..., 3) in [0, 1]."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    f = (torch.minimum(k, 4 - k)).clamp(0, 1)
    return v.unsqueeze(-1) * (1 - s.unsqueeze(-1) * f)


def _uniform(shape: tuple[int, ...], lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=device)


def _render(
    y: torch.Tensor,
    center: torch.Tensor,
    angle: torch.Tensor,
    radius: torch.Tensor,
    color: torch.Tensor,
    active: torch.Tensor,
    bg: torch.Tensor,
    stripe_freq: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Paint K objects per canvas over a background, in slot order (later slots on top).

    y (N,) class; center (N, K, 2) in [0, 1] (x, y); angle (N, K); radius (N, K) in canvas units;
    color (N, K, 3) in [0, 1]; active (N, K) bool; bg (N, 3, size, size); stripe_freq (N, K).
    Returns (N, 3, size, size) in [0, 1].
    """
    device = bg.device
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    py, px = torch.meshgrid(coords, coords, indexing="ij")  # (size, size)
    dx = px - center[..., 0, None, None]  # (N, K, size, size)
    dy = py - center[..., 1, None, None]
    ca, sa = angle.cos()[..., None, None], angle.sin()[..., None, None]
    u = ca * dx + sa * dy
    v = -sa * dx + ca * dy
    r = radius[..., None, None]

    # Signed distances (negative inside) for each shape type, in canvas units.
    d_circle = torch.sqrt(u * u + v * v) - r
    d_square = torch.maximum(u.abs(), v.abs()) - 0.8 * r
    tri = [math.cos(a) * u + math.sin(a) * v for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    d_tri = torch.maximum(torch.maximum(tri[0], tri[1]), tri[2]) - 0.6 * r
    shape = (y // 3).view(-1, 1, 1, 1)
    d = torch.where(shape == 0, d_circle, torch.where(shape == 2, d_tri, d_square))

    # Anti-aliased coverage: about one pixel of soft edge.
    alpha = torch.sigmoid(-d * size * 2.0) * active[..., None, None].float()
    rgb = color[..., None, None]  # (N, K, 3, 1, 1)
    stripes = torch.sin(u * stripe_freq[..., None, None] * 2 * math.pi) > 0
    dark = (shape == 3) & stripes  # (N, K, size, size)
    out = bg
    for k in range(center.shape[1]):
        col = rgb[:, k] * torch.where(dark[:, k, None], 0.35, 1.0)  # (N, 3, size, size)
        a = alpha[:, k, None]
        out = out * (1 - a) + col * a
    return out


def _background(
    base: torch.Tensor, direction: torch.Tensor, tex: torch.Tensor, size: int, phase: torch.Tensor
) -> torch.Tensor:
    """Gradient between two colours plus a drifting sinusoidal texture.

    base (N, 2, 3) end colours; direction (N,) gradient angle; tex (N, 3) texture (angle, freq, amp);
    phase (N,) texture phase. Returns (N, 3, size, size) in [0, 1].
    """
    device = base.device
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size - 0.5
    py, px = torch.meshgrid(coords, coords, indexing="ij")
    ramp = direction.cos()[:, None, None] * px + direction.sin()[:, None, None] * py + 0.5  # (N, s, s)
    ramp = ramp.clamp(0, 1)[:, None]
    grad = base[:, 0, :, None, None] * (1 - ramp) + base[:, 1, :, None, None] * ramp
    ta, tf, tamp = tex.unbind(-1)
    w = ta.cos()[:, None, None] * px + ta.sin()[:, None, None] * py
    texture = torch.sin(2 * math.pi * tf[:, None, None] * w + phase[:, None, None])
    return (grad + tamp[:, None, None, None] * texture[:, None]).clamp(0, 1)


def _draw_scene(n: int, num_objects: int, g: torch.Generator, device) -> dict[str, torch.Tensor]:
    """Random per-sample scene parameters (class, objects, background) for n samples."""
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g, device=device)
    k = num_objects
    hue = _FAMILY_HUE.to(device)[y % 3][:, None] + _uniform((n, k), -0.07, 0.07, g, device)
    color = hsv_to_rgb(hue % 1.0, _uniform((n, k), 0.65, 1.0, g, device), _uniform((n, k), 0.6, 1.0, g, device))
    count = torch.randint(1, k + 1, (n, 1), generator=g, device=device)
    active = torch.arange(k, device=device)[None] < count
    bg_hsv = _uniform((n, 2, 3), 0.0, 1.0, g, device)
    base = hsv_to_rgb(bg_hsv[..., 0], 0.25 * bg_hsv[..., 1], 0.25 + 0.55 * bg_hsv[..., 2])
    tex = torch.stack(
        [
            _uniform((n,), 0, math.pi, g, device),
            _uniform((n,), 3.0, 10.0, g, device),
            _uniform((n,), 0.02, 0.08, g, device),
        ],
        dim=-1,
    )
    return {
        "y": y,
        "color": color,
        "active": active,
        "base": base,
        "direction": _uniform((n,), 0, 2 * math.pi, g, device),
        "tex": tex,
        "center": _uniform((n, k, 2), 0.2, 0.8, g, device),
        "angle": _uniform((n, k), 0, 2 * math.pi, g, device),
        "radius": _uniform((n, k), 0.09, 0.2, g, device),
        "stripe_freq": _uniform((n, k), 8.0, 14.0, g, device),
    }


def make_images(
    batch_size: int, generator: torch.Generator, size: int = 64, num_objects: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a batch of images on ``generator.device``.

    Returns (x, y): x (B, 3, size, size) float32 in [-1, 1]; y (B,) int64 class in [0, 12).
    """
    device = generator.device
    s = _draw_scene(batch_size, num_objects, generator, device)
    phase = _uniform((batch_size,), 0, 2 * math.pi, generator, device)
    bg = _background(s["base"], s["direction"], s["tex"], size, phase)
    img = _render(s["y"], s["center"], s["angle"], s["radius"], s["color"], s["active"], bg, s["stripe_freq"], size)
    return img * 2 - 1, s["y"]


def make_videos(
    batch_size: int, generator: torch.Generator, frames: int = 8, size: int = 32, num_objects: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a batch of clips on ``generator.device``: objects translate and rotate linearly.

    Returns (x, y): x (B, 3, frames, size, size) float32 in [-1, 1]; y (B,) int64 class in [0, 12).
    """
    device = generator.device
    n, k = batch_size, num_objects
    s = _draw_scene(n, k, generator, device)
    s["radius"] = s["radius"] * 1.3  # fewer pixels per object at 32x32: draw them a bit larger
    velocity = _uniform((n, k, 2), -0.04, 0.04, generator, device)  # canvas units per frame
    spin = _uniform((n, k), -0.25, 0.25, generator, device)  # radians per frame
    phase0 = _uniform((n,), 0, 2 * math.pi, generator, device)
    drift = _uniform((n,), -0.4, 0.4, generator, device)
    t = torch.arange(frames, device=device, dtype=torch.float32) - (frames - 1) / 2
    center = s["center"][:, None] + velocity[:, None] * t[None, :, None, None]  # (N, T, K, 2)
    angle = s["angle"][:, None] + spin[:, None] * t[None, :, None]  # (N, T, K)

    def per_frame(v: torch.Tensor) -> torch.Tensor:
        return v.unsqueeze(1).expand(n, frames, *v.shape[1:]).reshape(n * frames, *v.shape[1:])

    phase = (phase0[:, None] + drift[:, None] * t[None]).reshape(-1)
    bg = _background(per_frame(s["base"]), per_frame(s["direction"]), per_frame(s["tex"]), size, phase)
    clip = _render(
        per_frame(s["y"]),
        center.reshape(n * frames, k, 2),
        angle.reshape(n * frames, k),
        per_frame(s["radius"]),
        per_frame(s["color"]),
        per_frame(s["active"]),
        bg,
        per_frame(s["stripe_freq"]),
        size,
    )
    clip = clip.reshape(n, frames, 3, size, size).transpose(1, 2)
    return clip * 2 - 1, s["y"]


def make_batch(variant: str, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch for a DiT preset ("image" or "video"), rendered on ``generator.device``."""
    if variant == "image":
        return make_images(batch_size, generator)
    if variant == "video":
        return make_videos(batch_size, generator)
    raise ValueError(f"unknown variant {variant!r}")


def to_grid(x: torch.Tensor, nrow: int) -> torch.Tensor:
    """Tile samples into one uint8 image for viewing.

    x: (B, 3, H, W) images, or (B, 3, T, H, W) clips (each clip becomes one row of T frames).
    Returns (rows * H, cols * W, 3) uint8 with a 1-pixel dark border between tiles.
    """
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.dim() == 5:
        b, c, t, h, w = x.shape
        x = x.transpose(1, 2).reshape(b * t, c, h, w)
        nrow = t
    b, c, h, w = x.shape
    rows = math.ceil(b / nrow)
    grid = torch.full((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), 20, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = x[i]
    return grid.permute(1, 2, 0).contiguous()
