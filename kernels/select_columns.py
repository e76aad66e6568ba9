"""Column selection in one launch: per row, the ``k_top`` best-scored columns plus ``n_rand`` random others.

For each row ``r`` of ``scores`` (R, N)::

    top[r]  = the k_top columns with the largest score (ties: lower column first)
    rand[r] = n_rand columns outside top[r], one per stratum (below)
    out[r]  = top[r] ∪ rand[r], ascending                                   (R, k_top + n_rand) int32

The random part is stratified: the M = N - k_top other columns, in column order, are cut into n_rand
strata of consecutive ranks, stratum i holding ranks [⌊i·M/n_rand⌋, ⌊(i+1)·M/n_rand⌋), and each stratum
gives the column at a rank drawn from a counter-based hash of (seed, row, i) (murmur3's finalizer over a
Weyl sequence): fixed by the seed, no generator state, no ``torch.rand`` tensor. Every other column is
drawn with probability 1/len(stratum) ≈ n_rand/M, as with a uniform subset, but the draws are spread over
the columns instead of clumping. It costs one prefix sum where a uniform subset (the n_rand largest
hashes) cost a second bit-by-bit threshold search: the MLP re-selection at FLUX's size (34 rows × 12288
units, 3686 + 666 kept) took 46 instead of 53 µs (H100, bench/results/flux_micro_NVIDIA-H100_session11.csv).

Why one kernel: the PyTorch version (topk, rand, scatter, topk, cat, sort, ...) is ~15 small launches,
about 0.6 ms of host time per MLP site on FLUX, while the GPU work is microseconds. Here one program
handles one row, kept in registers (N <= 32768): each k-largest search builds its threshold bit by bit from
the top, counting ``keys >= candidate`` over the row (at most 32 block reductions on an order-preserving
uint32 image of the key, fewer when exactly k keys reach a prefix early), then resolves ties at the
threshold with a prefix sum; a last prefix sum over the union gives each chosen column its output slot, so
the output is sorted with no sort. No host sync, no atomics, deterministic.

``select_columns_ref`` computes the same thing (same hash, same tie rule) with PyTorch sorts, so the
kernel must match it exactly.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from chipmunk_compile.kernels._launch import CachedLauncher, PlanCache

__all__ = ["MAX_COLUMNS", "default_num_warps", "select_columns_ref", "select_topk_random", "supports"]

MAX_COLUMNS = 32768  # the whole row lives in registers: 32 keys per thread at 32 warps
_SEED_MASK = (1 << 62) - 1  # the kernel takes the seed as two 31-bit halves
_M32 = 0xFFFFFFFF
# Hash constants: odd multipliers (golden ratio; murmur3's fmix32 and c2).
_ROW_MUL, _COL_MUL = 0x9E3779B9, 0x85EBCA77
_FMIX_1, _FMIX_2 = 0x85EBCA6B, 0xC2B2AE35


@triton.jit
def _fmix32(h):
    # murmur3's 32-bit finalizer: a bijection of uint32 in which every input bit flips each output bit
    # with probability ~1/2.
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _take_largest(keys, k):
    """Mask of the ``k`` largest of ``keys`` (uint32), ties to lower index. Key 0 is never taken: the
    caller gives at least ``k`` nonzero keys, so the threshold is >= 1."""
    # Build the k-th largest key bit by bit: keep a bit if at least k keys are >= the prefix with it set.
    # Stop early once exactly k keys are >= the threshold: they are then the k largest, whatever the
    # remaining bits (this happens as soon as the prefix separates the k-th largest key from the next one,
    # so never when they are equal). The MLP re-selection at FLUX's size went from 58 to 48 µs with it
    # (H100, bench/results/flux_kernels_NVIDIA-H100_session4_run3.csv). Fewer rounds did not help: a radix
    # select (four 256-bin tl.histogram rounds) took 240 µs, and two bits per round (three candidate counts
    # packed in one int64 sum) 60.5 µs against this loop's 54.1 (H100, session 7; flux_kernels_*_session7*.csv).
    thr = tl.zeros((), dtype=tl.uint32)
    bit = tl.full((), 0x80000000, dtype=tl.uint32)
    count = tl.zeros((), dtype=tl.int32)
    while (bit != 0) & (count != k):
        cand = thr | bit
        count = tl.sum((keys >= cand).to(tl.int32), axis=0)
        thr = tl.where(count >= k, cand, thr)
        bit = bit >> 1
    above = keys > thr
    need = k - tl.sum(above.to(tl.int32), axis=0)
    tied = keys == thr
    rank = tl.cumsum(tied.to(tl.int32), axis=0)
    return above | (tied & (rank <= need))


@triton.jit
def _choose_columns(key, row, cols, N, K_TOP, N_RAND, seed_lo, seed_hi, HAS_RAND: tl.constexpr):
    """Mask of one row's chosen columns: the K_TOP largest ``key`` (uint32, > 0 for the N real columns, 0 for
    padding; ties to the lower column) plus N_RAND of the other columns, one per stratum by hash(seed, row,
    stratum).
    Shared with kernels/select_units.py, which must choose exactly as this file does."""
    chosen = _take_largest(key, K_TOP)
    if HAS_RAND:
        rest = (cols < N) & ~chosen
        m = N - K_TOP  # rest's size (the top part is K_TOP real columns); m >= N_RAND >= 1
        rank = tl.cumsum(rest.to(tl.int32), axis=0) - 1
        # stratum of a rank: the largest i with floor(i·m / N_RAND) <= rank (products < 2**30: N <= 32768)
        stratum = tl.maximum((rank + 1) * N_RAND - 1, 0) // m
        lo = stratum * m // N_RAND
        size = (stratum + 1) * m // N_RAND - lo  # >= 1
        row_key = _fmix32(_fmix32(row.to(tl.uint32) * 0x9E3779B9 ^ seed_hi.to(tl.uint32)) ^ seed_lo.to(tl.uint32))
        h = _fmix32(_fmix32(stratum.to(tl.uint32) * 0x85EBCA77 + row_key))
        pick = lo + (h % size.to(tl.uint32)).to(tl.int32)
        chosen = chosen | (rest & (rank == pick))
    return chosen


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _select_topk_random_kernel(
    scores_ptr, out_ptr,
    N, K_TOP, N_RAND, seed_lo, seed_hi,
    BLOCK: tl.constexpr, HAS_RAND: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    in_row = cols < N
    x = tl.load(scores_ptr + row.to(tl.int64) * N + cols, mask=in_row, other=0.0)
    # Order-preserving uint32 image of fp32: negatives get all bits flipped, positives the sign bit set.
    # -0.0 is mapped onto +0.0 (torch.topk treats them as equal). Padding gets 0, below every real key.
    bits = x.to(tl.uint32, bitcast=True)
    key = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    key = tl.where(x == 0.0, 0x80000000, key)
    key = tl.where(in_row, key, 0)
    chosen = _choose_columns(key, row, cols, N, K_TOP, N_RAND, seed_lo, seed_hi, HAS_RAND)
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + row.to(tl.int64) * (K_TOP + N_RAND) + slot, cols, mask=chosen)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(scores: torch.Tensor) -> str | None:
    """None if the Triton kernel can run on ``scores``, else a short reason.

    Needs a 2-D contiguous fp32 tensor on CUDA (or on CPU under ``TRITON_INTERPRET=1``) with at most
    ``MAX_COLUMNS`` columns.
    """
    if scores.device.type != "cuda" and not (scores.device.type == "cpu" and _interpreting()):
        return f"device {scores.device.type} (needs CUDA, or CPU under TRITON_INTERPRET=1)"
    if scores.dtype != torch.float32:
        return f"dtype {scores.dtype} (needs float32)"
    if scores.dim() != 2:
        return f"needs scores (R, N), got {scores.dim()}-D"
    if not scores.is_contiguous():
        return "scores must be contiguous"
    if scores.shape[1] > MAX_COLUMNS:
        return f"N={scores.shape[1]} columns > {MAX_COLUMNS} (a row must fit in registers)"
    return None


def _row_block(n: int) -> int:
    # triton.next_power_of_2 costs ~1.5 us of host time per call; this runs every selection step.
    return 1 << max(n - 1, 0).bit_length()


def default_num_warps(n: int) -> int:
    """Warps per row program: about 32 keys per thread, 4 to 32 warps."""
    return min(32, max(4, _row_block(n) // 1024))


def _fail(msg: str) -> None:
    raise ValueError(f"select_topk_random: {msg}")


def _check_budget(n: int, k_top: int, n_rand: int) -> None:
    if not (isinstance(k_top, int) and 1 <= k_top <= n):
        _fail(f"k_top must be an int in [1, N={n}], got {k_top!r}")
    if not (isinstance(n_rand, int) and 0 <= n_rand <= n - k_top):
        _fail(f"n_rand must be an int in [0, N - k_top = {n - k_top}], got {n_rand!r}")


def select_topk_random(
    scores: torch.Tensor,
    k_top: int,
    n_rand: int,
    seed: int,
    *,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Per row: the ``k_top`` largest-score columns plus ``n_rand`` pseudo-random other columns (Triton).

    Args:
        scores: (R, N) fp32, contiguous, finite; N <= ``MAX_COLUMNS``.
        k_top: columns taken by score, 1 <= k_top <= N; ties at the threshold go to the lower column.
        n_rand: columns taken at random among the other N - k_top (one per stratum, see the module
            docstring), 0 <= n_rand <= N - k_top.
        seed: any int (taken modulo 2**62); the random part is a fixed function of the seed, the row and
            its top part.
        out: optional (R, k_top + n_rand) int32 contiguous output on the scores' device.
        num_warps: warps per row program (benchmarks only; default ``default_num_warps(N)``).

    Returns:
        (R, k_top + n_rand) int32: per row the chosen columns, distinct and ascending.
    """
    # Cheap checks only: this runs on every selection step, where host time is the cost.
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        _fail(f"scores must be a 2-D tensor (R, N), got {getattr(scores, 'shape', type(scores))}")
    rows, n = scores.shape
    _check_budget(n, k_top, n_rand)
    reason = supports(scores)
    if reason is not None:
        _fail(f"unsupported scores: {reason}")
    k = k_top + n_rand
    if out is None:
        out = torch.empty((rows, k), dtype=torch.int32, device=scores.device)
    elif (out.dtype != torch.int32 or tuple(out.shape) != (rows, k) or not out.is_contiguous()
          or out.device != scores.device):
        _fail(f"out must be a contiguous int32 ({rows}, {k}) tensor on {scores.device}, got {out.dtype} "
              f"{tuple(out.shape)} on {out.device}")
    if rows == 0:
        return out
    seed &= _SEED_MASK
    sig = (n, k_top, n_rand, num_warps)
    plan = _PLANS.get(sig)
    if plan is None:
        block = _row_block(n)
        plan = _PLANS.put(sig, (dict(BLOCK=block, HAS_RAND=n_rand > 0), num_warps or min(32, max(4, block // 1024))))
    # N, K_TOP and N_RAND are in the signature; the seed halves are 31-bit and not specialized on.
    _launch_kernel(
        (rows,), (scores, out, n, k_top, n_rand, seed & 0x7FFFFFFF, seed >> 31), plan[0],
        signature=sig, num_warps=plan[1],
    )  # fmt: skip
    return out


_PLANS = PlanCache()  # (N, k_top, n_rand, num_warps) -> (constexprs, num_warps)
_launch_kernel = CachedLauncher(_select_topk_random_kernel)


def _fmix32_ref(h: torch.Tensor) -> torch.Tensor:
    # int64 holding uint32 values; products wrap mod 2**64, so masking keeps the exact low 32 bits.
    h = h ^ (h >> 16)
    h = (h * _FMIX_1) & _M32
    h = h ^ (h >> 13)
    h = (h * _FMIX_2) & _M32
    return h ^ (h >> 16)


def _k_largest_ref(keys: torch.Tensor, k: int) -> torch.Tensor:
    """(R, k) columns of the k largest keys per row, ties to the lower column (stable sort)."""
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[:, :k]


def select_columns_ref(scores: torch.Tensor, k_top: int, n_rand: int, seed: int) -> torch.Tensor:
    """Pure-PyTorch :func:`select_topk_random` (same hash and tie rule: equal output), any device and N."""
    if scores.dim() != 2 or not scores.dtype.is_floating_point:
        _fail(f"scores must be a floating (R, N) tensor, got {scores.dtype} {tuple(scores.shape)}")
    rows, n = scores.shape
    _check_budget(n, k_top, n_rand)
    x = scores.float()
    x = torch.where(x == 0, torch.zeros_like(x), x)  # -0.0 ties with +0.0
    top = _k_largest_ref(x, k_top)
    if n_rand == 0:
        return top.sort(dim=-1).values.to(torch.int32)
    seed &= _SEED_MASK
    dev = scores.device
    row = torch.arange(rows, device=dev, dtype=torch.int64)[:, None]
    rest = torch.ones(rows, n, dtype=torch.bool, device=dev).scatter_(-1, top, False)
    m = n - k_top
    rank = torch.cumsum(rest, dim=-1) - 1  # int64
    stratum = ((rank + 1) * n_rand - 1).clamp_min(0) // m
    lo = stratum * m // n_rand
    size = (stratum + 1) * m // n_rand - lo
    row_key = _fmix32_ref(_fmix32_ref(((row * _ROW_MUL) & _M32) ^ (seed >> 31)) ^ (seed & 0x7FFFFFFF))
    h = _fmix32_ref(_fmix32_ref((stratum * _COL_MUL + row_key) & _M32))
    chosen = (rest & (rank == lo + h % size)).scatter_(-1, top, True)
    col = torch.arange(n, device=dev, dtype=torch.int64)
    # the chosen columns first, ascending (no nonzero(): no host sync)
    order = torch.where(chosen, col, col + n).sort(dim=-1).values[:, : k_top + n_rand]
    return order.to(torch.int32)
