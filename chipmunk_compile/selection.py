"""Choosing columns: top fraction by score plus a random fraction, as fixed-size index lists.

Everything stays on the device (no host sync): counts are device tensors and the index tensors have a
fixed capacity, so the sparse kernels can run with sizes known at launch.
"""

from __future__ import annotations

import torch

from chipmunk_compile.kernels import select_columns as select_kernels

_CHUNK_ELEMENTS = 1 << 27


def column_budget(keep: float, random_keep: float, n: int) -> tuple[int, int]:
    """Number of top-scored and of random columns to keep out of ``n``."""
    k_top = min(n, max(1, round(keep * n)))
    n_rand = min(n - k_top, round(random_keep * (n - k_top)))
    return k_top, n_rand


def select_columns(
    scores: torch.Tensor, k_top: int, n_rand: int, generator: torch.Generator | None, *, all_valid: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``scores``, the ``k_top`` best columns plus ``n_rand`` random other columns.

    Args:
        scores: (..., N) float. ``-inf`` marks a column that must never be chosen (a masked key);
            ``+inf`` marks a column that is always chosen (it counts towards ``k_top``).
        k_top, n_rand: how many columns to take by score and at random (``k_top + n_rand <= N``).
        generator: random source for the random columns (on the scores' device).
        all_valid: the caller guarantees no ``-inf`` score (a shorter path: fewer kernels and less host
            time per call; the MLP's scores are finite).

    Returns:
        indices: (..., k_top + n_rand) int32, the chosen valid columns first, ascending; entries
            past ``counts`` are unused.
        counts: (...) int32, how many entries of ``indices`` are valid (fewer than the capacity only
            where a row has fewer valid columns).
    """
    n = scores.shape[-1]
    lead = scores.shape[:-1]
    if all_valid and scores.numel() <= _CHUNK_ELEMENTS:
        idx = torch.topk(scores, k_top, dim=-1, sorted=False).indices
        if n_rand > 0:
            noise = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=torch.float32)
            noise.scatter_(-1, idx, -1.0)
            idx = torch.cat([idx, torch.topk(noise, n_rand, dim=-1, sorted=False).indices], dim=-1)
        indices = torch.sort(idx, dim=-1).values.int()
        return indices, torch.full(lead, k_top + n_rand, dtype=torch.int32, device=scores.device)
    flat = scores.reshape(-1, n)
    rows = flat.shape[0]
    cap = k_top + n_rand
    indices = torch.empty(rows, cap, dtype=torch.int32, device=scores.device)
    counts = torch.empty(rows, dtype=torch.int32, device=scores.device)
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, rows, step):
        chunk = flat[start : start + step]
        idx = torch.topk(chunk, k_top, dim=-1, sorted=False).indices
        if n_rand > 0:
            noise = torch.rand(chunk.shape, generator=generator, device=chunk.device, dtype=torch.float32)
            noise.masked_fill_(chunk == float("-inf"), -2.0)
            noise.scatter_(-1, idx, -1.0)
            rnd = torch.topk(noise, n_rand, dim=-1, sorted=False).indices
            idx = torch.cat([idx, rnd], dim=-1)
        valid = torch.gather(chunk, -1, idx) > float("-inf")
        key = torch.where(valid, idx, idx + n)
        key = torch.sort(key, dim=-1).values
        indices[start : start + step] = torch.where(key >= n, key - n, key).to(torch.int32)
        counts[start : start + step] = valid.sum(-1, dtype=torch.int32)
    return indices.reshape(*lead, cap), counts.reshape(lead)


def select_columns_fast(
    scores: torch.Tensor, k_top: int, n_rand: int, seed: int, *, use_kernel: bool = True
) -> torch.Tensor:
    """:func:`select_columns` for finite scores, with the randomness fixed by ``seed`` (no generator state).

    On CUDA one Triton launch (:func:`chipmunk_compile.kernels.select_columns.select_topk_random`: top part
    ties go to the lower column, random part from a counter-based hash of (seed, row, column)); elsewhere,
    or where the kernel does not apply, the PyTorch path of :func:`select_columns` with a generator seeded
    from ``seed``. The two paths choose the same top part (up to ties) but different random columns.

    Args:
        scores: (..., N) float, finite (no masked columns).
        k_top, n_rand: as in :func:`select_columns` (``1 <= k_top``, ``k_top + n_rand <= N``).
        seed: an int; the same seed gives the same selection.
        use_kernel: allow the Triton path (callers turn it off after it failed once).

    Returns:
        indices: (..., k_top + n_rand) int32, ascending per row (all valid: no counts tensor is made, as it
        would cost a launch on every selection step and say nothing).
    """
    if use_kernel and scores.is_cuda:
        n = scores.shape[-1]
        flat = scores.reshape(-1, n)
        if flat.dtype != torch.float32:
            flat = flat.float()
        if not flat.is_contiguous():
            flat = flat.contiguous()
        if select_kernels.supports(flat) is None:
            idx = select_kernels.select_topk_random(flat, k_top, n_rand, seed)
            return idx.view(*scores.shape[:-1], k_top + n_rand)
    generator = torch.Generator(device=scores.device)
    generator.manual_seed(seed)
    return select_columns(scores, k_top, n_rand, generator, all_valid=True)[0]
