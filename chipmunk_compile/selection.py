"""Choosing columns: top fraction by score plus a random fraction, as fixed-size index lists.

Everything stays on the device (no host sync): counts are device tensors and the index tensors have a
fixed capacity, so the sparse kernels can run with sizes known at launch.
"""

from __future__ import annotations

import torch

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
