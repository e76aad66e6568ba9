"""Cached-delta column-sparse MLP (Chipmunk, arXiv 2506.03275, section "sparse MLP").

Per token block ``m`` (rows ``[m*block_size, min((m+1)*block_size, S))`` of one sample) and its list
``S_m`` of selected hidden units, one sparse step computes, in place::

    a_new[r, j] = act(x[r]·W1[j] + b1[j])                     (plain)
                = (x[r]·W1[j] + b1[j]) * act(x[r]·W1[F+j] + b1[F+j])   (gated: GEGLU / SwiGLU)
    P[r, p]     = round(a_new[r, S_m[p]]) − act_cache[S_m[p], r]       (the packed delta)
    out_cache[r, :] += Σ_p P[r, p] · W2[:, S_m[p]]
    act_cache[S_m[p], r] = round(a_new[r, S_m[p]])

Two Triton kernels do this:

- ``_column_sparse_mlp_up_kernel`` (mm1), one program per (row tile, tile of selected units): gathered rows
  of W1 (and of the gate half), bias, activation, cache subtraction and the activation-cache write-back
  fused; it writes the packed delta ``P`` (B, S, k_pad), zero in the padding columns ``k <= p < k_pad``.
- ``_column_sparse_mlp_down_kernel`` (mm2), one program per (row tile, tile of output features):
  ``P[rows] @ W2[:, S_m]ᵀ`` on gathered columns of W2, added to ``out_cache`` in fp32, rounded once.

Why it is fast (see docs/DESIGN.md, roofline notes): the sparse MLP is bound by weight traffic when every
block streams its own gathered weight rows. Both grids therefore run *all row tiles of one weight tile
next to each other* (row tile is the fastest grid axis). With sorted indices, tile ``n`` of every block
covers about the same range of unit ids, so the gathered rows come from DRAM once and are reused from L2
by all blocks. Several blocks may also share one selection (``block_size`` 256 or 512 with 128-row
tiles): the tiles of one selection then read identical rows.

W2 layout: the kernel takes any strides. The row-major ``(Dout, F)`` weight (or a column slice of a
wider one) works without a copy, but its gathered columns are strided 2-byte loads: on H200 (FLUX shape,
30% kept) the whole step then takes 1.23 ms, slower than the dense MLP (1.01 ms). A transposed view
``w2t.t()`` of a contiguous ``(F, Dout)`` copy (``stride(0) == 1``; for a column slice
``w2t_wide.narrow(0, offset, F).t()``) turns them into contiguous row gathers: 0.48 ms (2.1×). Keep such
a copy per site (the original Chipmunk keeps one too); the launcher warns once when it gets the slow layout.

Measured (H200, bf16, FLUX MLP 4352×3072→12288→3072, dense torch.compile 1.01 ms, random sorted
selections, bench/results/mlp_h200_2026-11-27.csv): 2.9× / 2.1× / 1.9× / 1.4× at 20% / 30% / 35% / 50%
of units kept, 4.9× at 10%; mm1 0.22 ms + mm2 0.26 ms at 30%. Sharing one selection among 256 or 512
tokens changes nothing measurable: with the row-tile-fastest grid, gathered weights already come
from DRAM about once, so the kernels are bound by tile efficiency (~410-450 TFLOP/s), not by DRAM.
H100 (bench/results/mlp_NVIDIA-H100_2026-11-27.csv, same shape, dense 1.01 ms): 2.7× / 2.0× / 1.8× / 1.35×
at 20% / 30% / 35% / 50%, 4.6-4.8× at 10%.

Rounding points (the reference defines them): matmuls accumulate in fp32; bias and activation in fp32;
the new activation is rounded once to the cache dtype; the delta is computed in fp32 from the rounded
value and rounded to the input dtype (it is a tensor-core operand); the output update is added in fp32
and rounded once.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from chipmunk_compile.kernels._launch import CachedLauncher, PlanCache, tensor_signature

__all__ = [
    "ACTIVATIONS",
    "ColumnSparseMlpConfig",
    "column_sparse_mlp_delta",
    "column_sparse_mlp_delta_ref",
    "default_config",
    "pipeline_smem_bytes",
    "supports",
    "unit_multiple",
]

ACTIVATIONS = ("gelu_tanh", "gelu", "silu")
_ACT_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class ColumnSparseMlpConfig:
    """Tile shapes of the two kernels (kernel constants, not user configuration).

    ``up_*``: mm1 (rows × selected units × Din step); ``down_*``: mm2 (rows × Dout × selected-unit step).
    ``rows_fastest``: launch all row tiles of one weight tile together (L2 reuse of gathered weights).
    """

    up_bm: int = 128
    up_bn: int = 128
    up_bk: int = 64
    up_warps: int = 8
    up_stages: int = 3
    down_bm: int = 128
    down_bn: int = 128
    down_bk: int = 64
    down_warps: int = 8
    down_stages: int = 3
    rows_fastest: bool = True


# Measured on H200 (bench/results/mlp_h200_2026-11-27.csv, FLUX shape, 30% kept, bf16): 128×256 mm1 tiles
# with 4 stages and 128×128 mm2 tiles were fastest (128×256 mm2 tiles leave a 3.1-wave grid). Gated mm1
# keeps two accumulators, so its unit tile stays 128 wide (registers), and 3 stages beat 4 there. mm2 on an
# H100 (FLUX shape, 4352 of 12288 units; bench/results/flux_kernels_NVIDIA-H100_session4*.csv): 8 warps with
# 5 stages 253 µs, 4 warps with 5-6 stages 262-264 µs, 8 warps with 4 stages (the earlier default)
# 316 µs. 4-byte dtypes halve the K step so the pipeline buffers still fit shared memory.
_PLAIN_CONFIG = ColumnSparseMlpConfig(up_bn=256, up_stages=4, down_stages=5)
_GATED_CONFIG = ColumnSparseMlpConfig(up_bn=128, up_stages=3, down_stages=5)
_SMEM_LIMIT = 227 * 1024  # Hopper's per-block maximum; Ampere (A100) allows 163 KB


def default_config(gated: bool, dtype: torch.dtype = torch.bfloat16) -> ColumnSparseMlpConfig:
    """The tile shapes the launcher uses when none are given."""
    cfg = _GATED_CONFIG if gated else _PLAIN_CONFIG
    if dtype.itemsize >= 4:
        cfg = replace(cfg, up_bk=32, down_bk=32)
    return cfg


@functools.lru_cache(maxsize=16)
def unit_multiple(gated: bool, dtype: torch.dtype = torch.bfloat16) -> int:
    """The default tiles' multiple of selected units: a selection of k units costs as much as one of k rounded
    up to it (the padding columns compute zeros). Cached: the MLP op asks on every sparse call."""
    cfg = default_config(gated, dtype)
    return max(cfg.up_bn, cfg.down_bk)


def pipeline_smem_bytes(cfg: ColumnSparseMlpConfig, gated: bool, dtype: torch.dtype) -> tuple[int, int]:
    """Shared memory of the (mm1, mm2) load pipelines: Triton keeps ``num_stages - 1`` buffers."""
    up = (cfg.up_bm + cfg.up_bn * (2 if gated else 1)) * cfg.up_bk * (cfg.up_stages - 1)
    down = (cfg.down_bm + cfg.down_bn) * cfg.down_bk * (cfg.down_stages - 1)
    return up * dtype.itemsize, down * dtype.itemsize


@triton.jit
def _activate(h, ACT: tl.constexpr):
    # fp32 in, fp32 out. tanh-GELU as x·sigmoid(2z): 0.5·(1 + tanh(z)) == sigmoid(2z), no tanh needed.
    if ACT == 0:
        y = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
    elif ACT == 1:
        y = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    else:
        y = h * tl.sigmoid(h)
    return y


@triton.jit
def _column_sparse_mlp_up_kernel(
    x_ptr, w1_ptr, b1_ptr, idx_ptr, act_ptr, p_ptr,
    S, DIN, F, K, N_ROW_TILES,
    stride_xb, stride_xs, stride_xd,
    stride_w1f, stride_w1d,
    stride_ib, stride_im,
    stride_ab, stride_af,
    stride_pb, stride_ps,
    BLOCK_SIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROWS_FASTEST: tl.constexpr,
):
    if ROWS_FASTEST:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    else:
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(0)
    b = (pid_m // N_ROW_TILES).to(tl.int64)
    mt = pid_m % N_ROW_TILES
    sel = (mt * BM) // BLOCK_SIZE
    rows = mt * BM + tl.arange(0, BM)
    row_ok = rows < S
    p = pid_n * BN + tl.arange(0, BN)
    p_ok = p < K
    # Padding columns gather unit 0 (a valid row); their delta is forced to 0 below.
    units = tl.load(idx_ptr + b * stride_ib + sel * stride_im + p, mask=p_ok, other=0)
    ks = tl.arange(0, BK)
    x_ptrs = x_ptr + b * stride_xb + rows[:, None] * stride_xs + ks[None, :] * stride_xd
    w_ptrs = w1_ptr + units[:, None] * stride_w1f + ks[None, :] * stride_w1d
    g_off = F * stride_w1f
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, DIN, BK):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            wt = tl.load(w_ptrs)
            if GATED:
                wg = tl.load(w_ptrs + g_off)
        else:
            k_ok = (k0 + ks) < DIN
            xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            if GATED:
                wg = tl.load(w_ptrs + g_off, mask=k_ok[None, :], other=0.0)
        if UPCAST:
            # The interpreter multiplies bf16 bit patterns in tl.dot; fp32 operands are exact there.
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
            if GATED:
                wg = wg.to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
        if GATED:
            acc_g = tl.dot(xt, tl.trans(wg), acc_g, input_precision=PRECISION)
        x_ptrs += BK * stride_xd
        w_ptrs += BK * stride_w1d

    if HAS_BIAS:
        acc += tl.load(b1_ptr + units, mask=p_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_g += tl.load(b1_ptr + F + units, mask=p_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        a = acc * _activate(acc_g, ACT)
    else:
        a = _activate(acc, ACT)
    mask = row_ok[:, None] & p_ok[None, :]
    act_ptrs = act_ptr + b * stride_ab + units[None, :] * stride_af + rows[:, None]
    a_q = a.to(act_ptr.dtype.element_ty)
    old = tl.load(act_ptrs, mask=mask, other=0.0)
    delta = tl.where(mask, a_q.to(tl.float32) - old.to(tl.float32), 0.0)
    tl.store(act_ptrs, a_q, mask=mask)
    p_ptrs = p_ptr + b * stride_pb + rows[:, None] * stride_ps + p[None, :]
    tl.store(p_ptrs, delta.to(p_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _column_sparse_mlp_down_kernel(
    p_ptr, w2_ptr, idx_ptr, out_ptr, copy_ptr,
    S, DOUT, K, K_PAD, N_ROW_TILES,
    stride_pb, stride_ps,
    stride_w2d, stride_w2f,
    stride_ib, stride_im,
    stride_ob, stride_os,
    BLOCK_SIZE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    EVEN_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROWS_FASTEST: tl.constexpr,
    HAS_COPY: tl.constexpr,
):
    if ROWS_FASTEST:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    else:
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(0)
    b = (pid_m // N_ROW_TILES).to(tl.int64)
    mt = pid_m % N_ROW_TILES
    sel = (mt * BM) // BLOCK_SIZE
    rows = mt * BM + tl.arange(0, BM)
    row_ok = rows < S
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < DOUT
    ps = tl.arange(0, BK)
    p_ptrs = p_ptr + b * stride_pb + rows[:, None] * stride_ps + ps[None, :]
    idx_ptrs = idx_ptr + b * stride_ib + sel * stride_im + ps
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # P is zero in its padding columns, so only the gathered W2 rows need the k mask.
    for k0 in range(0, K_PAD, BK):
        k_ok = (k0 + ps) < K
        units = tl.load(idx_ptrs, mask=k_ok, other=0)
        pt = tl.load(p_ptrs, mask=row_ok[:, None], other=0.0)
        w_ptrs = w2_ptr + units[:, None] * stride_w2f + cols[None, :] * stride_w2d
        if EVEN_N:
            wt = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            wt = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            pt = pt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(pt, wt, acc, input_precision=PRECISION)
        p_ptrs += BK
        idx_ptrs += BK

    mask = row_ok[:, None] & col_ok[None, :]
    offs = b * stride_ob + rows[:, None] * stride_os + cols[None, :]
    old = tl.load(out_ptr + offs, mask=mask, other=0.0)
    new = (old.to(tl.float32) + acc).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, new, mask=mask)
    if HAS_COPY:  # the op's result: a second buffer (same shape and strides), so no separate clone pass
        tl.store(copy_ptr + offs, new, mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> str | None:
    """None if the Triton kernels can run on these tensors, else a short reason.

    x: (B, S, Din); w1: (F or 2F, Din); w2: (Dout, F). Needs CUDA tensors (or CPU tensors under
    ``TRITON_INTERPRET=1``), one dtype among fp16/bf16/fp32, and Din, Dout multiples of 16.
    """
    devices = {x.device, w1.device, w2.device}
    if len(devices) != 1:
        return f"tensors on different devices {sorted(str(d) for d in devices)}"
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpreting()):
        return f"device {x.device.type} (needs CUDA, or CPU under TRITON_INTERPRET=1)"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} (needs fp16, bf16 or fp32)"
    if w1.dtype != x.dtype or w2.dtype != x.dtype:
        return f"mixed dtypes x={x.dtype} w1={w1.dtype} w2={w2.dtype}"
    if x.dim() != 3 or w1.dim() != 2 or w2.dim() != 2:
        return "needs x (B, S, Din), w1 (F|2F, Din), w2 (Dout, F)"
    if x.shape[-1] % 16 or w2.shape[0] % 16:
        return f"Din={x.shape[-1]} and Dout={w2.shape[0]} must be multiples of 16"
    return None


def _row_tile(bm: int, block_size: int) -> int:
    """The largest of (bm, 128, 64) dividing block_size: a row tile never straddles two selections."""
    return next(t for t in (bm, 128, 64) if t <= bm and block_size % t == 0)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"column_sparse_mlp_delta: {msg}")


def _validate(x, w1, b1, w2, indices, act_cache, out_cache, activation, gated, block_size):
    _check(activation in _ACT_CODE, f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _check(
        isinstance(block_size, int) and block_size > 0,
        f"block_size must be a positive int, got {block_size!r}",
    )
    _check(x.dim() == 3, f"x must be (B, S, Din), got shape {tuple(x.shape)}")
    bsz, seq, din = x.shape
    _check(w2.dim() == 2, f"w2 must be (Dout, F), got shape {tuple(w2.shape)}")
    dout, units = w2.shape
    rows_w1 = 2 * units if gated else units
    _check(
        w1.dim() == 2 and tuple(w1.shape) == (rows_w1, din),
        f"w1 must be ({'2F' if gated else 'F'}, Din) = ({rows_w1}, {din}), got {tuple(w1.shape)}",
    )
    _check(
        b1 is None or tuple(b1.shape) == (rows_w1,),
        f"b1 must be ({rows_w1},), got {None if b1 is None else tuple(b1.shape)}",
    )
    nb = -(-seq // block_size)
    _check(
        indices.dtype == torch.int32 and indices.dim() == 3 and indices.shape[:2] == (bsz, nb),
        f"indices must be int32 (B, nb, k) = ({bsz}, {nb}, k), got {indices.dtype} {tuple(indices.shape)}",
    )
    k = indices.shape[2]
    _check(1 <= k <= units, f"k={k} must be in [1, F={units}]")
    _check(
        tuple(act_cache.shape) == (bsz, units, seq) and act_cache.is_contiguous(),
        f"act_cache must be contiguous (B, F, S) = ({bsz}, {units}, {seq}), got {tuple(act_cache.shape)} "
        f"strides {act_cache.stride()}",
    )
    _check(
        tuple(out_cache.shape) == (bsz, seq, dout) and out_cache.is_contiguous(),
        f"out_cache must be contiguous (B, S, Dout) = ({bsz}, {seq}, {dout}), got {tuple(out_cache.shape)} "
        f"strides {out_cache.stride()}",
    )
    for name, t in (("w1", w1), ("w2", w2), ("act_cache", act_cache), ("out_cache", out_cache), ("b1", b1)):
        if t is not None:
            _check(t.dtype == x.dtype, f"{name} dtype {t.dtype} != x dtype {x.dtype}")
            _check(t.device == x.device, f"{name} on {t.device}, x on {x.device}")
    _check(indices.device == x.device, f"indices on {indices.device}, x on {x.device}")


def column_sparse_mlp_delta(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    indices: torch.Tensor,
    act_cache: torch.Tensor,
    out_cache: torch.Tensor,
    *,
    activation: str,
    gated: bool,
    block_size: int,
    config: ColumnSparseMlpConfig | None = None,
    validate: bool = True,
    out: torch.Tensor | None = None,
) -> None:
    """One cached-delta sparse MLP step, in place on ``act_cache`` and ``out_cache`` (Triton).

    Args:
        x: (B, S, Din) fp16/bf16/fp32, any strides; the new input.
        w1: (F, Din) plain or (2F, Din) gated (rows [0, F) value, [F, 2F) gate), dtype of x, any strides
            (rows contiguous is fastest).
        b1: (F,) / (2F,) or None.
        w2: (Dout, F), any strides: a column slice of a wider weight works without a copy; a transposed
            view of a contiguous (F, Dout) copy (``stride(0) == 1``) is faster.
        indices: (B, nb, k) int32, nb = ceil(S / block_size): the selected units of each token block,
            distinct, in [0, F). Sorted rows give the best L2 reuse.
        act_cache: (B, F, S) contiguous, dtype of x: cached post-activation, unit-major. Updated in place.
        out_cache: (B, S, Dout) contiguous, dtype of x: cached MLP output (b2 included). Updated in place.
        activation: "gelu_tanh", "gelu" (erf) or "silu".
        gated: ``a = (x·W1[j] + b1[j]) · act(x·W1[F+j] + b1[F+j])`` instead of ``act(x·W1[j] + b1[j])``.
        block_size: tokens per selection block, a multiple of 64 (128 default; 256/512 share one
            selection between several 128-row tiles).
        config: tile shapes (benchmarks and tests only).
        validate: check every argument. The checks, the config and the launch arguments depend only on
            shapes, strides, dtypes, devices and options, so they run once per such signature and are
            cached (``validate=False`` skips the checks for a new signature too).
        out: optional (B, S, Dout) contiguous tensor like ``out_cache`` that also receives the updated
            output (written by the same kernel: cheaper than cloning the cache afterwards).
    """
    sig = (
        tensor_signature(x), tensor_signature(w1), None if b1 is None else tensor_signature(b1),
        tensor_signature(w2), tensor_signature(indices), tensor_signature(act_cache), tensor_signature(out_cache),
        activation, gated, block_size, config, None if out is None else tensor_signature(out),
    )  # fmt: skip
    plan = _DELTA_PLANS.get(sig)
    if plan is None:
        if validate and out is not None:
            _check(
                out.shape == out_cache.shape and out.dtype == out_cache.dtype and out.device == out_cache.device
                and out.is_contiguous(),
                f"out must be a contiguous {tuple(out_cache.shape)} {out_cache.dtype} tensor on {out_cache.device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}",
            )
        plan = _DELTA_PLANS.put(sig, _delta_plan(x, w1, b1, w2, indices, act_cache, out_cache, activation, gated,
                                                 block_size, config, validate))
    cfg, k_pad, contiguous_indices = plan
    if out is not None and out.data_ptr() == out_cache.data_ptr():  # not a signature property: every call
        raise ValueError("column_sparse_mlp_delta: out must be a tensor other than out_cache")
    if contiguous_indices:
        indices = indices.contiguous()
    packed = torch.empty((x.shape[0], x.shape[1], k_pad), dtype=x.dtype, device=x.device)
    _launch_up(x, w1, b1, indices, act_cache, packed, activation, gated, block_size, cfg, signature=sig)
    _launch_down(packed, w2, indices, out_cache, block_size, cfg, signature=sig, copy=out)


# Host-side work that depends only on shapes, strides, dtypes and options, done once per signature: the
# checks, the tile config, the launch grids and integer arguments (Python work redone every step otherwise).
_DELTA_PLANS = PlanCache()
_LaunchPlan = tuple[tuple[int, ...], tuple[int, ...], dict[str, Any]]  # grid, integer arguments, constexprs
_UP_PLANS = PlanCache()
_DOWN_PLANS = PlanCache()
_launch_up_kernel = CachedLauncher(_column_sparse_mlp_up_kernel)
_launch_down_kernel = CachedLauncher(_column_sparse_mlp_down_kernel)


def _delta_plan(
    x, w1, b1, w2, indices, act_cache, out_cache, activation, gated, block_size, config, validate
) -> tuple[ColumnSparseMlpConfig, int, bool]:
    """(config, k_pad, whether indices need a contiguous copy) of a column_sparse_mlp_delta signature."""
    if validate:
        _check(
            isinstance(block_size, int) and block_size > 0 and block_size % 64 == 0,
            f"block_size must be a positive multiple of 64 for the Triton path, got {block_size!r}",
        )
        _validate(x, w1, b1, w2, indices, act_cache, out_cache, activation, gated, block_size)
        reason = supports(x, w1, w2)
        if reason is not None:
            raise ValueError(f"column_sparse_mlp_delta: Triton path unsupported: {reason}")
    cfg = config or default_config(gated, x.dtype)
    if validate and x.is_cuda and w2.stride(0) != 1:
        warnings.warn(
            "column_sparse_mlp_delta: w2 has stride(0) != 1, so its gathered columns are strided loads "
            "(~2.5x slower on the FLUX shape); pass a transposed view of a contiguous (F, Dout) copy",
            stacklevel=3,
        )
    k_pad = _packed_width(x.shape[1], x.shape[2], w2, indices.shape[2], cfg)
    return cfg, k_pad, indices.stride(2) != 1


def _alloc_packed(x: torch.Tensor, w2: torch.Tensor, k: int, cfg: ColumnSparseMlpConfig) -> torch.Tensor:
    """The packed delta P: (B, S, k_pad) in x's dtype, k_pad a multiple of both unit tiles."""
    k_pad = _packed_width(x.shape[1], x.shape[2], w2, k, cfg)
    return torch.empty((x.shape[0], x.shape[1], k_pad), dtype=x.dtype, device=x.device)


def _packed_width(seq: int, din: int, w2: torch.Tensor, k: int, cfg: ColumnSparseMlpConfig) -> int:
    """k_pad, the width of P: k rounded up to a multiple of both unit tiles; checks the int32 offsets."""
    dout, units = w2.shape
    step = max(cfg.up_bn, cfg.down_bk)
    k_pad = triton.cdiv(k, step) * step
    _check(k_pad % cfg.up_bn == 0 and k_pad % cfg.down_bk == 0, "up_bn and down_bk must divide each other")
    sizes = {"x": seq * din, "act_cache": units * seq, "out_cache": seq * dout, "P": seq * k_pad}
    for name, numel in sizes.items():
        _check(numel <= _INT32_MAX, f"per-sample {name} has {numel} elements; int32 offsets need < 2**31")
    return k_pad


def _precision(x: torch.Tensor) -> tuple[bool, str]:
    upcast = x.device.type != "cuda" and x.dtype == torch.bfloat16
    return upcast, "ieee" if x.dtype == torch.float32 or upcast else "tf32"


def _launch_up(x, w1, b1, indices, act_cache, packed, activation, gated, block_size, cfg, signature=None) -> None:
    """mm1: fills ``packed`` (B, S, k_pad) with deltas and refreshes ``act_cache`` at the selection.

    ``signature``: a hashable that determines every argument's shape, strides, dtype and device and the
    options (column_sparse_mlp_delta's); None builds one from the arguments.
    """
    if signature is None:
        signature = (
            tensor_signature(x), tensor_signature(w1), None if b1 is None else tensor_signature(b1),
            tensor_signature(indices), tensor_signature(act_cache), tensor_signature(packed),
            activation, gated, block_size, cfg,
        )  # fmt: skip
    plan = _UP_PLANS.get(signature)
    if plan is None:
        plan = _UP_PLANS.put(signature, _up_plan(x, w1, b1, indices, act_cache, packed, activation, gated,
                                                 block_size, cfg))
    grid, ints, constexprs = plan
    _launch_up_kernel(
        grid, (x, w1, b1 if b1 is not None else w1, indices, act_cache, packed, *ints),  # b1 unread without HAS_BIAS
        constexprs, signature=signature, num_warps=cfg.up_warps, num_stages=cfg.up_stages,
    )  # fmt: skip


def _up_plan(x, w1, b1, indices, act_cache, packed, activation, gated, block_size, cfg) -> _LaunchPlan:
    """(grid, integer arguments, constexprs) of mm1."""
    bsz, seq, din = x.shape
    units, k, k_pad = act_cache.shape[1], indices.shape[2], packed.shape[2]
    bm = _row_tile(cfg.up_bm, block_size)
    upcast, precision = _precision(x)
    n_rows, n_tiles = triton.cdiv(seq, bm), k_pad // cfg.up_bn
    grid = (bsz * n_rows, n_tiles) if cfg.rows_fastest else (n_tiles, bsz * n_rows)
    ints = (
        seq, din, units, k, n_rows,
        x.stride(0), x.stride(1), x.stride(2),
        w1.stride(0), w1.stride(1),
        indices.stride(0), indices.stride(1),
        act_cache.stride(0), act_cache.stride(1),
        packed.stride(0), packed.stride(1),
    )  # fmt: skip
    constexprs = dict(
        BLOCK_SIZE=block_size, BM=bm, BN=cfg.up_bn, BK=cfg.up_bk,
        ACT=_ACT_CODE[activation], GATED=gated, HAS_BIAS=b1 is not None, EVEN_K=din % cfg.up_bk == 0,
        UPCAST=upcast, PRECISION=precision, ROWS_FASTEST=cfg.rows_fastest,
    )  # fmt: skip
    return grid, ints, constexprs


def _launch_down(packed, w2, indices, out_cache, block_size, cfg, signature=None, copy=None) -> None:
    """mm2: ``out_cache[rows] += P[rows] @ W2[:, S_m]ᵀ`` (and ``copy[rows] =`` the same when given: a
    contiguous tensor like ``out_cache``). ``signature`` as in :func:`_launch_up` (it must cover ``copy``)."""
    if signature is None:
        signature = (
            tensor_signature(packed), tensor_signature(w2), tensor_signature(indices), tensor_signature(out_cache),
            block_size, cfg, None if copy is None else tensor_signature(copy),
        )  # fmt: skip
    plan = _DOWN_PLANS.get(signature)
    if plan is None:
        plan = _DOWN_PLANS.put(signature, _down_plan(packed, w2, indices, out_cache, block_size, cfg, copy))
    grid, ints, constexprs = plan
    _launch_down_kernel(
        grid, (packed, w2, indices, out_cache, out_cache if copy is None else copy, *ints), constexprs,
        signature=signature, num_warps=cfg.down_warps, num_stages=cfg.down_stages,
    )


def _down_plan(packed, w2, indices, out_cache, block_size, cfg, copy) -> _LaunchPlan:
    """(grid, integer arguments, constexprs) of mm2."""
    bsz, seq, k_pad = packed.shape
    dout, k = w2.shape[0], indices.shape[2]
    bm = _row_tile(cfg.down_bm, block_size)
    upcast, precision = _precision(packed)
    n_rows, n_tiles = triton.cdiv(seq, bm), triton.cdiv(dout, cfg.down_bn)
    grid = (bsz * n_rows, n_tiles) if cfg.rows_fastest else (n_tiles, bsz * n_rows)
    ints = (
        seq, dout, k, k_pad, n_rows,
        packed.stride(0), packed.stride(1),
        w2.stride(0), w2.stride(1),
        indices.stride(0), indices.stride(1),
        out_cache.stride(0), out_cache.stride(1),
    )  # fmt: skip
    constexprs = dict(
        BLOCK_SIZE=block_size, BM=bm, BN=cfg.down_bn, BK=cfg.down_bk,
        EVEN_N=dout % cfg.down_bn == 0, UPCAST=upcast, PRECISION=precision, ROWS_FASTEST=cfg.rows_fastest,
        HAS_COPY=copy is not None,
    )  # fmt: skip
    return grid, ints, constexprs


def _activation_fn(activation: str):
    if activation == "gelu_tanh":
        return lambda h: F.gelu(h, approximate="tanh")
    if activation == "gelu":
        return F.gelu
    if activation == "silu":
        return F.silu
    raise ValueError(f"column_sparse_mlp_delta_ref: activation must be in {ACTIVATIONS}, got {activation!r}")


def column_sparse_mlp_delta_ref(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    indices: torch.Tensor,
    act_cache: torch.Tensor,
    out_cache: torch.Tensor,
    *,
    activation: str,
    gated: bool,
    block_size: int,
    upcast: bool = True,
) -> None:
    """Pure-PyTorch reference of :func:`column_sparse_mlp_delta` (same arguments, any device, any block size).

    ``upcast=True`` (what the kernel does): accumulate in fp32, round the new activation once to the
    cache dtype, round the delta once to the input dtype, add to the output in fp32 and round once.
    ``upcast=False`` computes everything in the input dtype ("plain PyTorch in that dtype", the
    yardstick of the tests' tolerance rule). fp64 inputs are computed in fp64 either way.
    """
    _validate(x, w1, b1, w2, indices, act_cache, out_cache, activation, gated, block_size)
    act = _activation_fn(activation)
    dtype = x.dtype
    cd = torch.float32 if upcast and dtype != torch.float64 else dtype
    units = w2.shape[1]
    seq = x.shape[1]
    for b in range(x.shape[0]):
        for m in range(indices.shape[1]):
            r0, r1 = m * block_size, min((m + 1) * block_size, seq)
            idx = indices[b, m].long()
            xr = x[b, r0:r1].to(cd)
            h = F.linear(xr, w1[idx].to(cd), None if b1 is None else b1[idx].to(cd))
            if gated:
                g = F.linear(xr, w1[units + idx].to(cd), None if b1 is None else b1[units + idx].to(cd))
                a = h * act(g)
            else:
                a = act(h)
            a_q = a.to(dtype)
            old = act_cache[b, idx, r0:r1].to(cd).t()
            delta = (a_q.to(cd) - old).to(dtype)
            upd = out_cache[b, r0:r1].to(cd) + delta.to(cd) @ w2[:, idx].to(cd).t()
            out_cache[b, r0:r1] = upd.to(dtype)
            act_cache[b, idx, r0:r1] = a_q.t()
