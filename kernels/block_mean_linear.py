"""The MLP re-selection's first linear on block means: ``bm = means · W1ᵀ + b1`` in fp32, in one launch.

On a selection step the sparse MLP needs, per token block, the block mean of its pre-activation. ``W1``
is affine, so that is the block mean of the input times ``W1ᵀ`` plus ``b1``: a matmul with few rows
(FLUX: 34 blocks × 3072 → 12288, at each of 55 sites every other step) that only streams ``W1``::

    bm[r, f] = Σ_d round(means[r, d]) · W1[f, d] + b1[f]         (fp32 accumulation, fp32 result)

``round`` is the cast of the fp32 means to W1's dtype (the tensor-core operand). Done with ATen this was
a cast of the means, ``F.linear`` and a cast of its bf16 result back to fp32: three launches, and cuBLAS
took 41 µs for the 75 MB weight at FLUX's shape on an H100 (1.8 TB/s,
bench/results/flux_kernels_NVIDIA-H100_session4.csv). Here one program owns ``BLOCK_F`` output units
for ``BLOCK_R`` rows and streams their weight rows once; narrow unit tiles give enough programs to keep
every SM's loads in flight (the row count is tiny, so the means tile is re-read from L2 by each program).
The result is not rounded to W1's dtype (``F.linear`` rounded it): the selection compares it with the
fp32 block means the dense step cached.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from chipmunk_compile.kernels._launch import CachedLauncher, PlanCache, tensor_signature

__all__ = ["block_mean_linear", "block_mean_linear_ref", "supports"]

_WEIGHT_DTYPES = (torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1
# Launch parameters: (BLOCK_F, BLOCK_K, num_warps, num_stages); bench/tune_flux_kernels.py sweeps them.
DEFAULT_TILES = (32, 128, 4, 4)


@triton.jit
def _block_mean_linear_kernel(
    m_ptr, w_ptr, b_ptr, out_ptr,
    R, F, K,
    stride_mr, stride_wf, stride_or,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_f = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    units = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    row_ok = rows < R
    unit_ok = units < F
    ks = tl.arange(0, BLOCK_K)
    m_ptrs = m_ptr + rows[:, None].to(tl.int64) * stride_mr + ks[None, :]
    w_ptrs = w_ptr + units[:, None].to(tl.int64) * stride_wf + ks[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_F), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            m = tl.load(m_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=unit_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + ks) < K
            m = tl.load(m_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=unit_ok[:, None] & k_ok[None, :], other=0.0)
        a = m.to(w.dtype)  # the operand rounding F.linear(means.to(W1.dtype), ...) does
        if UPCAST:
            # The interpreter multiplies bf16 bit patterns in tl.dot; fp32 operands are exact there.
            acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
        m_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + units, mask=unit_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_or + units[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & unit_ok[None, :])


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def supports(means: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> str | None:
    """None if the kernel can run on these tensors, else a short reason.

    Needs fp32 means (R, K) and a fp16/bf16 weight (F, K) with unit stride along K (bias (F,) of its
    dtype or None), all on one CUDA device (or on CPU under ``TRITON_INTERPRET=1``).
    """
    dev = means.device
    if dev.type != "cuda" and not (dev.type == "cpu" and _interpreting()):
        return f"device {dev.type} (needs CUDA, or CPU under TRITON_INTERPRET=1)"
    if w.device != dev or (b is not None and b.device != dev):
        return "means, weight and bias must be on one device"
    if means.dtype != torch.float32:
        return f"means dtype {means.dtype} (needs float32)"
    if w.dtype not in _WEIGHT_DTYPES:
        return f"weight dtype {w.dtype} (needs fp16 or bf16; fp32 weights keep F.linear)"
    if b is not None and (b.dtype != w.dtype or b.dim() != 1 or b.shape[0] != w.shape[0] or b.stride(0) != 1):
        return "bias must be a contiguous (F,) tensor of the weight's dtype"
    if means.dim() != 2 or w.dim() != 2 or means.shape[1] != w.shape[1]:
        return f"needs means (R, K) and weight (F, K), got {tuple(means.shape)} and {tuple(w.shape)}"
    if means.stride(1) != 1 or w.stride(1) != 1:
        return "means and weight need unit stride along K"
    if max(means.numel(), w.numel(), means.shape[0] * w.shape[0]) > _INT32_MAX:
        return "more than 2**31 elements"
    return None


def block_mean_linear(
    means: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    *,
    tiles: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """``means.to(w.dtype) · wᵀ + b``, accumulated and returned in fp32 (Triton, one launch).

    Args:
        means: (R, K) fp32, unit stride along K: block means of the MLP input (R = B · blocks).
        w: (F, K) fp16/bf16, unit stride along K: the first linear's weight (F = 2·units when gated).
        b: (F,) contiguous, w's dtype, or None.
        tiles: (BLOCK_F, BLOCK_K, num_warps, num_stages), benchmarks only (default ``DEFAULT_TILES``).

    Returns:
        (R, F) fp32 contiguous.
    """
    sig = (tensor_signature(means), tensor_signature(w), None if b is None else tensor_signature(b), tiles)
    plan = _PLANS.get(sig)
    if plan is None:
        reason = supports(means, w, b)
        if reason is not None:
            raise ValueError(f"block_mean_linear: {reason}")
        plan = _PLANS.put(sig, _plan(means, w, b, tiles or DEFAULT_TILES))
    grid, ints, constexprs, warps, stages = plan
    out = torch.empty((means.shape[0], w.shape[0]), dtype=torch.float32, device=means.device)
    if grid[0] * grid[1] == 0:
        return out
    _launch_kernel(grid, (means, w, b if b is not None else w, out, *ints), constexprs,  # b unread without bias
                   signature=sig, num_warps=warps, num_stages=stages)
    return out


def _plan(means, w, b, tiles):
    block_f, block_k, warps, stages = tiles
    r, k = means.shape
    f = w.shape[0]
    # Rows are few (one per token block): one row tile of at least 16 (tl.dot's minimum), at most 64.
    block_r = min(64, max(16, triton.next_power_of_2(r)))
    grid = (triton.cdiv(f, block_f), triton.cdiv(r, block_r))
    ints = (r, f, k, means.stride(0), w.stride(0), f)
    upcast = means.device.type != "cuda"
    constexprs = dict(BLOCK_R=block_r, BLOCK_F=block_f, BLOCK_K=block_k, HAS_BIAS=b is not None,
                      EVEN_K=k % block_k == 0, UPCAST=upcast)
    return grid, ints, constexprs, warps, stages


_PLANS = PlanCache()
_launch_kernel = CachedLauncher(_block_mean_linear_kernel)


def block_mean_linear_ref(means: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """PyTorch :func:`block_mean_linear`: the same rounded operands, fp32 products and sums, any device."""
    out = means.to(w.dtype).float() @ w.float().t()
    if b is not None:
        out += b.float()
    return out
