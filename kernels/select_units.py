"""MLP unit re-selection in one launch: drift score, top-k + random choice, and reference refresh.

On a selection step the sparse MLP compares the block means of its pre-activation, ``bm`` (the first
linear's output on the token-block means: fp32, bf16 or fp16), with the fp32 reference it keeps, ``ref``
(both (B, nb, F) plain or (B, nb, 2F) gated as ``[u | g]``). Per row
``r`` of the R = B·nb rows::

    score[r, j] = |bm[r, j] - ref[r, j]|                                   (plain, j < F)
    score[r, j] = |bm[r, j] - ref[r, j]| + |bm[r, F+j] - ref[r, F+j]|      (gated, j < F)
    idx[r]      = select_topk_random(score[r], k_top, n_rand, seed)        (k_top + n_rand,) int32, ascending
    ref[r, j]   = bm[r, j] for j in idx[r]           (gated: also ref[r, F+j] = bm[r, F+j])

Why one kernel: unfused this is sub, abs, a slice-add when gated, the selection launch, cat, two casts,
gather and scatter: about eight launches per MLP site and selection step, each tens of µs of host time,
for microseconds of GPU work (FLUX: 57 MLP sites every other denoising step). Here one program handles one
row: the score lives only in registers, the choice is exactly ``select_topk_random``'s (the same
``_choose_columns``: bit-by-bit top-k threshold with ties to the lower column, then the counter-based hash
for the random part), and the chosen units' reference is refreshed in place. No host sync, no atomics,
deterministic.

``select_units_drift_ref`` computes the same in PyTorch on top of ``select_columns_ref``: equal indices
and an equal refreshed reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from chipmunk_compile.kernels._launch import CachedLauncher, PlanCache
from chipmunk_compile.kernels.select_columns import (
    _SEED_MASK,
    MAX_COLUMNS,
    _choose_columns,
    _interpreting,
    _row_block,
    default_num_warps,
    select_columns_ref,
)

__all__ = ["select_units_drift", "select_units_drift_ref", "supports"]


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _select_units_drift_kernel(
    bm_ptr, ref_ptr, out_ptr,
    F, K_TOP, N_RAND, seed_lo, seed_hi,
    BLOCK: tl.constexpr, GATED: tl.constexpr, HAS_RAND: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    in_row = cols < F
    if GATED:
        base = row.to(tl.int64) * (2 * F) + cols
    else:
        base = row.to(tl.int64) * F + cols
    # bm may be 16-bit (the linear's own output dtype: no cast kernel before this one); exact in fp32
    score = tl.abs(tl.load(bm_ptr + base, mask=in_row, other=0.0).to(tl.float32)
                   - tl.load(ref_ptr + base, mask=in_row, other=0.0))
    if GATED:
        score += tl.abs(tl.load(bm_ptr + base + F, mask=in_row, other=0.0).to(tl.float32)
                        - tl.load(ref_ptr + base + F, mask=in_row, other=0.0))
    # The score is >= +0.0 (abs, then a sum of two), where select_topk_random's order-preserving uint32 image
    # of fp32 is the bits with the sign bit set. Padding gets 0, below every real key.
    key = tl.where(in_row, score.to(tl.uint32, bitcast=True) | 0x80000000, 0)
    chosen = _choose_columns(key, row, cols, F, K_TOP, N_RAND, seed_lo, seed_hi, HAS_RAND)
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + row.to(tl.int64) * (K_TOP + N_RAND) + slot, cols, mask=chosen)
    # Refresh the chosen units' reference. bm is read again (masked, from L2) rather than kept live in
    # registers through the two 32-step threshold searches.
    tl.store(ref_ptr + base, tl.load(bm_ptr + base, mask=chosen).to(tl.float32), mask=chosen)
    if GATED:
        tl.store(ref_ptr + base + F, tl.load(bm_ptr + base + F, mask=chosen).to(tl.float32), mask=chosen)


def _fail(msg: str) -> None:
    raise ValueError(f"select_units_drift: {msg}")


def _units(bm: torch.Tensor, gated: bool) -> int:
    """F, the number of units (columns of the score), from bm's last dimension."""
    width = bm.shape[-1]
    if gated and width % 2:
        _fail(f"gated needs an even last dimension [u | g] (2F), got {width}")
    return width // 2 if gated else width


def _check_shapes(bm: torch.Tensor, ref: torch.Tensor) -> None:
    if not (isinstance(bm, torch.Tensor) and isinstance(ref, torch.Tensor)):
        _fail(f"bm and ref must be tensors, got {type(bm).__name__} and {type(ref).__name__}")
    if bm.dim() < 2 or bm.shape[-1] == 0:
        _fail(f"bm must be (B, nb, F or 2F) (at least 2-D, last dimension > 0), got {tuple(bm.shape)}")
    if ref.shape != bm.shape:
        _fail(f"ref must have bm's shape {tuple(bm.shape)}, got {tuple(ref.shape)}")


def _check_budget(f: int, k_top: int, n_rand: int) -> None:
    if not (isinstance(k_top, int) and 1 <= k_top <= f):
        _fail(f"k_top must be an int in [1, F={f}], got {k_top!r}")
    if not (isinstance(n_rand, int) and 0 <= n_rand <= f - k_top):
        _fail(f"n_rand must be an int in [0, F - k_top = {f - k_top}], got {n_rand!r}")


def supports(bm: torch.Tensor, ref: torch.Tensor, *, gated: bool) -> str | None:
    """None if the Triton kernel can run on ``bm`` / ``ref``, else a short reason.

    Needs contiguous tensors of one shape (..., F or 2F) on one CUDA device (or on CPU under
    ``TRITON_INTERPRET=1``), ``bm`` fp32/bf16/fp16 and ``ref`` fp32, with F <= ``MAX_COLUMNS`` (a row of
    scores lives in registers).
    """
    dev = bm.device
    if dev.type != "cuda" and not (dev.type == "cpu" and _interpreting()):
        return f"device {dev.type} (needs CUDA, or CPU under TRITON_INTERPRET=1)"
    if ref.device != dev:
        return f"bm on {dev}, ref on {ref.device}"
    if bm.dtype not in (torch.float32, torch.bfloat16, torch.float16) or ref.dtype != torch.float32:
        return f"dtypes {bm.dtype}, {ref.dtype} (needs bm float32/bfloat16/float16, ref float32)"
    if bm.shape != ref.shape:
        return f"shapes {tuple(bm.shape)} and {tuple(ref.shape)} differ"
    if not (bm.is_contiguous() and ref.is_contiguous()):
        return "bm and ref must be contiguous"
    f = bm.shape[-1] // 2 if gated else bm.shape[-1]
    if f > MAX_COLUMNS:
        return f"F={f} units > {MAX_COLUMNS} (a row must fit in registers)"
    return None


def select_units_drift(
    bm: torch.Tensor,
    ref: torch.Tensor,
    k_top: int,
    n_rand: int,
    seed: int,
    *,
    gated: bool,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Per row: choose units by drift ``|bm - ref|`` (top ``k_top`` + ``n_rand`` random) and refresh ``ref``.

    Args:
        bm: (B, nb, F) plain or (B, nb, 2F) gated ``[u | g]`` fp32/bf16/fp16 contiguous, finite: the current
            block means of the pre-activation (any leading shape: R = B·nb rows).
        ref: ``bm``'s shape, fp32: the reference block means; the chosen units' entries are set to ``bm``'s
            (widened to fp32), in place.
        k_top: units taken by score, 1 <= k_top <= F; ties at the threshold go to the lower unit.
        n_rand: units taken at random among the other F - k_top, 0 <= n_rand <= F - k_top.
        seed: any int (taken modulo 2**62); the random part is ``select_topk_random``'s for this seed.
        gated: score a unit by its ``u`` and ``g`` halves together.
        out: optional (B, nb, k_top + n_rand) int32 contiguous output on bm's device.
        num_warps: warps per row program (benchmarks only; default ``default_num_warps(F)``).

    Returns:
        (B, nb, k_top + n_rand) int32: per row the chosen units, distinct and ascending; equal to
        ``select_topk_random`` on the score.
    """
    # Cheap checks only: this runs on every selection step, where host time is the cost.
    _check_shapes(bm, ref)
    f = _units(bm, gated)
    _check_budget(f, k_top, n_rand)
    reason = supports(bm, ref, gated=gated)
    if reason is not None:
        _fail(f"unsupported inputs: {reason}")
    k = k_top + n_rand
    shape = (*bm.shape[:-1], k)
    if out is None:
        out = torch.empty(shape, dtype=torch.int32, device=bm.device)
    elif out.dtype != torch.int32 or out.shape != shape or not out.is_contiguous() or out.device != bm.device:
        _fail(f"out must be a contiguous int32 {shape} tensor on {bm.device}, got {out.dtype} "
              f"{tuple(out.shape)} on {out.device}")  # fmt: skip
    rows = out.numel() // k
    if rows == 0:
        return out
    seed &= _SEED_MASK
    sig = (f, k_top, n_rand, gated, num_warps)
    plan = _PLANS.get(sig)
    if plan is None:
        constexprs = dict(BLOCK=_row_block(f), GATED=gated, HAS_RAND=n_rand > 0)
        plan = _PLANS.put(sig, (constexprs, num_warps or default_num_warps(f)))
    # F, K_TOP and N_RAND are in the signature; the seed halves are 31-bit and not specialized on.
    _launch_kernel(
        (rows,), (bm, ref, out, f, k_top, n_rand, seed & 0x7FFFFFFF, seed >> 31), plan[0],
        signature=sig, num_warps=plan[1],
    )  # fmt: skip
    return out


_PLANS = PlanCache()  # (F, k_top, n_rand, gated, num_warps) -> (constexprs, num_warps)
_launch_kernel = CachedLauncher(_select_units_drift_kernel)


def select_units_drift_ref(
    bm: torch.Tensor, ref: torch.Tensor, k_top: int, n_rand: int, seed: int, *, gated: bool
) -> torch.Tensor:
    """Pure-PyTorch :func:`select_units_drift` (same indices, same refreshed ``ref``), any device and F.

    Score, then :func:`select_columns_ref`, then a scatter of ``bm`` into ``ref`` at the chosen units.
    """
    _check_shapes(bm, ref)
    f = _units(bm, gated)
    _check_budget(f, k_top, n_rand)
    lead = bm.shape[:-1]
    diff = (bm.float() - ref.float()).abs().reshape(-1, bm.shape[-1])
    score = diff[:, :f] + diff[:, f:] if gated else diff
    idx = select_columns_ref(score, k_top, n_rand, seed).reshape(*lead, k_top + n_rand)
    cols = torch.cat([idx, idx + f], dim=-1).long() if gated else idx.long()
    ref.scatter_(-1, cols, bm.gather(-1, cols).to(ref.dtype))
    return idx
