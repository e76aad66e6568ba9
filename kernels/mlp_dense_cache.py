"""Dense-step MLP epilogue: activation, its unit-major cache and the block means, in one pass over ``h``.

On a dense step the sparse MLP site computes the exact output and fills its caches. From the
pre-activation ``h = x·W1ᵀ + b1`` (B, S, C) with C = F (plain) or 2F (gated, ``[u | g]``)::

    a[b, r, j]      = act(h[b, r, j])                       (plain)
                    = h[b, r, j] · act(h[b, r, F + j])      (gated: GEGLU / SwiGLU)
    act_t[b, j, r]  = a[b, r, j]                            the unit-major activation cache (B, F, S)
    means[b, m, c]  = mean over rows r of block m of h[b, r, c], in fp32       (B, nb, C)

Done with PyTorch ops this is an activation kernel, a transposing copy (``a.transpose(1, 2).contiguous()``)
and a reduction: on an H100 in a FLUX dense step (bench/results/profiles_flux_NVIDIA-H100_session3/) the
copy alone took 24 ms of 150 (74 sites, ~320 µs each for a 107 MB tensor: ATen's strided copy does not
tile the transpose). Here one program reads a (BLOCK_S × BLOCK_F) tile of ``h`` once, writes ``a``
row-major and, transposed through registers, ``act_t``, and reduces the tile's rows into the means of
its token block (BLOCK_S is the block size, so no atomics).

With ``row_major=False`` the kernel writes only ``act_t`` and returns ``a`` as its transposed view: for one
sample the caller's second linear reads that view as a column-major operand (cuBLAS takes either layout),
so the row-major copy, a third of the kernel's memory traffic, is never written (FLUX's single-block MLP
on an H100: 83 instead of 172 µs; bench/results/flux_micro_NVIDIA-H100_session11.csv).

Rounding: ``act`` in fp32 on the input value, one rounding to the dtype of ``h``, with the activation code
of the sparse kernels (``column_sparse_mlp._activate``; tanh-GELU as ``x·sigmoid(2z)``, equal to PyTorch's
``0.5·x·(1 + tanh(z))`` up to fp32 rounding). (``h`` here is cuBLAS's output rounded to its dtype, while the
sparse kernel activates its fp32 accumulator: a recomputed unchanged unit matches the cache to about one
rounding step, not bit for bit.) Gated: ``u · act(g)`` from the two fp32 values (PyTorch rounds ``act(g)`` to the
dtype before the product: up to one rounding step apart). Means: fp32 sums in another order than
``torch.mean`` (a few fp32 ulps apart).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from chipmunk_compile.kernels._launch import CachedLauncher, PlanCache, tensor_signature
from chipmunk_compile.kernels.column_sparse_mlp import _activate, _interpreting

__all__ = ["ACTIVATIONS", "dense_activation_cache", "dense_activation_cache_ref", "supports"]

ACTIVATIONS = ("gelu_tanh", "gelu", "silu")
_ACT_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_F = 64
_INT32_MAX = 2**31 - 1


@triton.jit
def _dense_cache_kernel(
    h_ptr, a_ptr, at_ptr, mean_ptr,
    S, F_UNITS, NB,
    stride_hb, stride_hs,
    BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, WRITE_A: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    fb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = m * BLOCK_S + tl.arange(0, BLOCK_S)
    units = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    row_ok = rows < S
    unit_ok = units < F_UNITS
    mask = row_ok[:, None] & unit_ok[None, :]
    h_tile = h_ptr + b * stride_hb + rows[:, None] * stride_hs + units[None, :]
    u = tl.load(h_tile, mask=mask, other=0.0).to(tl.float32)
    n_rows = tl.minimum(S - m * BLOCK_S, BLOCK_S).to(tl.float32)
    c_total = F_UNITS * 2 if GATED else F_UNITS
    mean_row = mean_ptr + (b * NB + m) * c_total
    tl.store(mean_row + units, tl.sum(u, axis=0) / n_rows, mask=unit_ok)
    if GATED:
        g = tl.load(h_tile + F_UNITS, mask=mask, other=0.0).to(tl.float32)
        tl.store(mean_row + F_UNITS + units, tl.sum(g, axis=0) / n_rows, mask=unit_ok)
        a = u * _activate(g, ACT)
    else:
        a = _activate(u, ACT)
    a = a.to(at_ptr.dtype.element_ty)
    if WRITE_A:
        tl.store(a_ptr + b * S * F_UNITS + rows[:, None] * F_UNITS + units[None, :], a, mask=mask)
    # act_t is (B, F, S): the transposed tile, contiguous along the rows.
    tl.store(at_ptr + b * F_UNITS * S + units[None, :] * S + rows[:, None], a, mask=mask)


def supports(h: torch.Tensor) -> str | None:
    """None if the Triton kernel can run on ``h`` (B, S, C), else a short reason."""
    if h.device.type != "cuda" and not (h.device.type == "cpu" and _interpreting()):
        return f"device {h.device.type} (needs CUDA, or CPU under TRITON_INTERPRET=1)"
    if h.dtype not in _DTYPES:
        return f"dtype {h.dtype} (needs fp16, bf16 or fp32)"
    if h.dim() != 3:
        return f"needs h (B, S, C), got {h.dim()}-D"
    if h.stride(2) != 1:
        return "h must be contiguous in its last dim"
    if h.shape[1] * h.shape[2] > _INT32_MAX:
        return f"S·C = {h.shape[1] * h.shape[2]} elements per sample; int32 offsets need < 2**31"
    return None


def _check(h: torch.Tensor, activation: str, gated: bool, block: int) -> None:
    if activation not in _ACT_CODE:
        raise ValueError(f"dense_activation_cache: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not (isinstance(block, int) and block > 0):
        raise ValueError(f"dense_activation_cache: block must be a positive int, got {block!r}")
    if h.dim() != 3:
        raise ValueError(f"dense_activation_cache: h must be (B, S, C), got shape {tuple(h.shape)}")
    if gated and h.shape[2] % 2:
        raise ValueError(f"dense_activation_cache: gated needs an even C = 2F, got {h.shape[2]}")


def _outputs(
    h: torch.Tensor, gated: bool, block: int, row_major: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bsz, seq, c = h.shape
    units = c // 2 if gated else c
    act_t = torch.empty((bsz, units, seq), dtype=h.dtype, device=h.device)
    a = torch.empty((bsz, seq, units), dtype=h.dtype, device=h.device) if row_major else act_t.transpose(1, 2)
    means = torch.empty((bsz, -(-seq // block), c), dtype=torch.float32, device=h.device)
    return a, act_t, means


def dense_activation_cache(
    h: torch.Tensor, *, activation: str, gated: bool, block: int, row_major: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation, its unit-major cache and the pre-activation's block means, in one launch (Triton).

    Args:
        h: (B, S, C) fp16/bf16/fp32, last dim contiguous: the pre-activation, C = F or 2F (gated, ``[u | g]``).
        activation: "gelu_tanh", "gelu" (erf) or "silu".
        gated: ``a = u · act(g)`` instead of ``act(h)``.
        block: tokens per block of the means (the MLP selection block; a power of two from 16 to 256).
        row_major: also write ``a`` row-major. Off, ``a`` is ``act_t.transpose(1, 2)`` (the same values, no
            write: a third of the kernel's memory traffic, for a caller whose matmul takes a transposed operand).

    Returns:
        a: (B, S, F), h's dtype: contiguous, or a view of act_t when not ``row_major``;
        act_t: (B, F, S) contiguous, h's dtype (``a`` transposed);
        means: (B, ceil(S / block), C) fp32 (the last block may be short: its own row count).
    """
    _check(h, activation, gated, block)
    reason = supports(h)
    if reason is not None:
        raise ValueError(f"dense_activation_cache: unsupported input: {reason}")
    sig = (tensor_signature(h), activation, gated, block, row_major)
    plan = _PLANS.get(sig)
    if plan is None:
        if block < 16 or block > 256 or block & (block - 1):
            raise ValueError(f"dense_activation_cache: block must be a power of two in [16, 256], got {block}")
        bsz, seq, c = h.shape
        units = c // 2 if gated else c
        nb = -(-seq // block)
        grid = (nb, triton.cdiv(units, _BLOCK_F), bsz)
        plan = _PLANS.put(sig, (grid, (seq, units, nb, h.stride(0), h.stride(1)),
                                dict(BLOCK_S=block, BLOCK_F=_BLOCK_F, ACT=_ACT_CODE[activation], GATED=gated,
                                     WRITE_A=row_major)))
    grid, ints, constexprs = plan
    a, act_t, means = _outputs(h, gated, block, row_major)
    if h.shape[0] and h.shape[1] and a.shape[2]:
        _launch(grid, (h, a, act_t, means, *ints), constexprs, signature=sig, num_warps=4)
    return a, act_t, means


_PLANS = PlanCache()
_launch = CachedLauncher(_dense_cache_kernel)


def _act_ref(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "gelu":
        return F.gelu(x)
    return F.silu(x)


def dense_activation_cache_ref(
    h: torch.Tensor, *, activation: str, gated: bool, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch :func:`dense_activation_cache` (same arguments and results, any device, any block)."""
    _check(h, activation, gated, block)
    bsz, seq, c = h.shape
    cd = torch.float64 if h.dtype == torch.float64 else torch.float32  # fp64 stays fp64 (tests' yardstick)
    if gated:
        u, g = h.to(cd).chunk(2, dim=-1)
        a = (u * _act_ref(g, activation)).to(h.dtype)
    else:
        a = _act_ref(h.to(cd), activation).to(h.dtype)
    nb = -(-seq // block)
    pad = nb * block - seq
    hp = F.pad(h.to(cd), (0, 0, 0, pad)).view(bsz, nb, block, c)
    counts = torch.full((nb,), float(block), dtype=cd, device=h.device)
    if pad:
        counts[-1] = block - pad
    means = (hp.sum(dim=2) / counts[None, :, None]).float()
    return a.contiguous(), a.transpose(1, 2).contiguous(), means
