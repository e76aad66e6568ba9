"""Dense attention plus per-group column sums of its softmax probabilities (the selection step).

Math, per (batch b, query head h), with logits s_ij = q_i . k_j * scale + bias_j:

    o_i    = sum_j softmax_i(j) v_j,          lse_i = log sum_j exp(s_ij)   (natural log)
    colsum[g, j] = sum_{i in group g} exp(s_ij - lse_i)

Group g holds queries [g * group_size, min((g + 1) * group_size, S)). The column sums are exact
probabilities (the current lse, not a stale one as in chipmunk-method.md section 1.4), and no S x S
matrix is materialised. The top-k of ``colsum`` per group picks the keys the sparse steps recompute.

Two passes:
1. dense attention writing o and lse: cuDNN's fused attention (``_scaled_dot_product_cudnn_attention``
   with its logsumexp) where it applies (CUDA, fp16/bf16, no key bias, Hq == Hkv), since it is ~20%
   faster than a Triton forward on Hopper; otherwise ``_attention_fwd_kernel``, a flash-attention forward,
   one program per (query tile, head, batch), queries of one head launched together so K/V stay in L2;
2. ``_attention_colsum_kernel``: one program per (key tile, head, batch) walks every query group,
   recomputing the key-major logits ``k @ q^T`` so that the per-key sum over a group's queries is a
   row reduction of the MMA accumulator (within a thread and a quad of lanes), not a cross-warp one.
   Each (group, key tile) is written by exactly one program: no atomics, deterministic.
Pass 2 does half of pass 1's matmul work and the same number of exponentials.

Measured (H200, bf16, B=1, H=24, D=128, group 128, 2026-11-27; bench/results/attention_NVIDIA-H200_*.csv):
at S=32768 cuDNN dense 21.4 ms, pass 2 15.6 ms, torch.topk of 7% 2.5 ms: selection step 40.1 ms = 1.87x
dense; Triton pass 1 26.4 ms (used with a key bias). At S=4352: 0.82 ms = 2.1x dense (0.39 ms).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import triton
import triton.language as tl

# Input checks shared with the sparse kernel (same q/k/v contract).
from chipmunk_compile.kernels._launch import CachedLauncher, PlanCache, tensor_signature
from chipmunk_compile.kernels.column_sparse_attention import (
    _check_key_bias,
    _interpreting,
    _max_offset,
    supports,
)

__all__ = [
    "ColsumConfig",
    "attention_with_colsum",
    "attention_with_colsum_ref",
    "supports",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_INT32_MAX = 2**31 - 1
_SUPPORTED_GROUPS = (64, 128, 192)


@dataclass(frozen=True)
class ColsumConfig:
    """Launch parameters of both passes; ``colsum_block_m`` must divide the group size."""

    fwd_block_m: int = 128
    fwd_block_n: int = 128
    fwd_warps: int = 8
    fwd_stages: int = 3
    colsum_block_n: int = 128
    colsum_block_m: int = 128
    colsum_warps: int = 8
    colsum_stages: int = 2
    dense_pass: str = "auto"  # pass 1: "triton", "cudnn", or "auto" (cuDNN where it applies, else Triton)


def _pick_config(head_dim: int, group_size: int, dtype: torch.dtype = torch.bfloat16) -> ColsumConfig:
    # From the sweeps in bench/bench_attention.py (H200, S=4352 and 32k, bf16, D=128). Pass 2: 128 keys x
    # 128 queries per step with 2 stages (96 KB of shared memory, so two programs per SM overlap one's MMAs
    # with the other's exponentials) ran 15.6 ms at S=32k against 19.6 ms with 3 stages (one program per
    # SM); groups of 64 or 192 queries need 64-query steps, where 256 keys per program was fastest (18.2 ms).
    if group_size % 128 == 0:
        cfg = ColsumConfig()
    else:
        cfg = ColsumConfig(colsum_block_n=256, colsum_block_m=64, colsum_warps=8, colsum_stages=3)
    if head_dim == 64:
        cfg = replace(cfg, fwd_block_n=64, fwd_stages=4)
    if dtype == torch.float32:
        # fp32 tiles take twice the shared memory: the bf16 tiles at D=128 (a 128-query block plus 3 stages of
        # 128-key K/V blocks) do not fit a Hopper SM in fp32 (a GPU test failed there). Half-size tiles.
        cfg = replace(cfg, fwd_block_m=64, fwd_block_n=32, fwd_warps=4, fwd_stages=2,
                      colsum_block_n=64, colsum_block_m=64, colsum_warps=4, colsum_stages=2)
    return cfg


# cuDNN's fused attention is faster than our Triton forward on Hopper; its logsumexp output was checked
# against the Triton pass in bench/bench_attention.py --check (same natural-log lse).
_CUDNN_DENSE_PASS = True


def _dense_pass_cudnn(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Pass 1 through cuDNN SDPA: (o in (B, S, H, D) memory, lse fp32 (B, H, S)); None where it can't run."""
    B, Hq, S, D = q.shape
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.shape[1] == Hq):
        return None
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    except (RuntimeError, NotImplementedError):
        return None
    o, lse = res[0], res[1]
    if lse.numel() != B * Hq * S or tuple(o.shape) != (B, Hq, S, D):
        return None
    out = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
    if o.stride() == out.stride():
        out = o
    else:
        out.copy_(o)
    return out, lse.reshape(B, Hq, S).float().contiguous()


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
    k_head, v_head, bias_head,
    start, end, Sk,
    stride_ks, stride_kd, stride_vs, stride_vd, stride_bs,
    qk_scale, offs_n, offs_d,
    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, MASKED: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr,
):  # fmt: skip
    # The masked loop runs once (the partial last chunk): not software-pipelined, since pipelining it as well
    # made ptxas serialize the wgmma instructions of the main loop (warning C7515; 4-13% slower, H100).
    for n0 in tl.range(start, end, BLOCK_N, num_stages=1 if MASKED else None):
        cols = n0 + offs_n
        if OFF64:
            cols = cols.to(tl.int64)
        if MASKED:
            valid = cols < Sk
            k = tl.load(
                k_head + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=valid[:, None],
                other=0.0,
            )
        else:
            k = tl.load(k_head + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            if MASKED:
                bias = tl.load(bias_head + cols * stride_bs, mask=valid, other=0.0)
            else:
                bias = tl.load(bias_head + cols * stride_bs)
            qk += bias[None, :] * 1.4426950408889634
        if MASKED:
            qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if HAS_BIAS or MASKED:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(
                v_head + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=valid[:, None],
                other=0.0,
            )
        else:
            v = tl.load(v_head + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, lse_ptr,
    S, Sk, qk_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_bb, stride_bh, stride_bs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    GQA_RATIO: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kvh64 = (h // GQA_RATIO).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if OFF64:
        offs_m = offs_m.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S
    q = tl.load(
        q_ptr + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_head = k_ptr + b64 * stride_kb + kvh64 * stride_kh
    v_head = v_ptr + b64 * stride_vb + kvh64 * stride_vh
    bias_head = bias_ptr + b64 * stride_bb + h64 * stride_bh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    n_full = (Sk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_head, v_head, bias_head, 0, n_full, Sk,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_bs, qk_scale, offs_n, offs_d,
        BLOCK_N, HAS_BIAS, False, UPCAST, PRECISION, OFF64,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_head, v_head, bias_head, n_full, Sk, Sk,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_bs, qk_scale, offs_n, offs_d,
        BLOCK_N, HAS_BIAS, True, UPCAST, PRECISION, OFF64,
    )  # fmt: skip

    # every key masked: o = 0 and lse = -inf (pass 2 then gives the row zero probability everywhere)
    l_pos = l_i > 0.0
    o = acc / tl.where(l_pos, l_i, 1.0)[:, None]
    lse = tl.where(l_pos, (m_i + tl.math.log2(tl.where(l_pos, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(
        out_ptr + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(lse_ptr + b64 * stride_lb + h64 * stride_lh + offs_m, lse, mask=row_ok)


@triton.jit
def _attention_colsum_kernel(
    q_ptr, k_ptr, bias_ptr, lse_ptr, colsum_ptr,
    S, Sk, G, qk_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_bb, stride_bh, stride_bs,
    stride_lb, stride_lh,
    stride_cb, stride_ch, stride_cg,
    GQA_RATIO: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr,
):  # fmt: skip
    TILES: tl.constexpr = GROUP_SIZE // BLOCK_M
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kvh64 = (h // GQA_RATIO).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if OFF64:
        offs_n = offs_n.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < Sk
    k = tl.load(
        k_ptr + b64 * stride_kb + kvh64 * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
        mask=col_ok[:, None],
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
    # logits in base 2 are k.q * qk_scale + bias2 - lse2, with bias2 fixed for this program's keys
    if HAS_BIAS:
        bias2 = tl.load(bias_ptr + b64 * stride_bb + h64 * stride_bh + offs_n * stride_bs, mask=col_ok, other=0.0)
        bias2 = bias2 * 1.4426950408889634
    else:
        bias2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    q_head = q_ptr + b64 * stride_qb + h64 * stride_qh
    lse_head = lse_ptr + b64 * stride_lb + h64 * stride_lh
    cs_ptrs = colsum_ptr + b64 * stride_cb + h64 * stride_ch + offs_n

    for g in range(0, G):
        col = tl.zeros([BLOCK_N], dtype=tl.float32)
        for t in tl.static_range(TILES):
            rows = g * GROUP_SIZE + t * BLOCK_M + offs_m
            if OFF64:
                rows = rows.to(tl.int64)
            row_ok = rows < S
            q = tl.load(
                q_head + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None],
                other=0.0,
            )
            if UPCAST:
                q = q.to(tl.float32)
            lse = tl.load(lse_head + rows, mask=row_ok, other=float("inf"))
            # rows past S and rows whose keys were all masked (lse = -inf) contribute nothing
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N keys, BLOCK_M queries)
            p_t = tl.math.exp2(s_t * qk_scale + bias2[:, None] - lse2[None, :])
            col += tl.sum(p_t, 1)
        tl.store(cs_ptrs, col, mask=col_ok)
        cs_ptrs += stride_cg  # pointer arithmetic is 64-bit: G * Sk can exceed 2**31


def attention_with_colsum(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    group_size: int,
    key_bias: torch.Tensor | None = None,
    config: ColsumConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact attention output, its lse, and per-group column sums of the probabilities (Triton).

    Args:
        q: (B, Hq, S, D) fp16/bf16/fp32, any strides; D in {64, 128}.
        k, v: (B, Hkv, Sk, D), q's dtype, any strides; Hq % Hkv == 0.
        scale: logit scale.
        group_size: 64, 128 or 192 queries per group; G = ceil(S / group_size).
        key_bias: optional fp32 (B, 1 or Hq, Sk) additive per-key logit bias (-inf masks a key).
        config: launch parameters (tests and benchmarks); None picks a tuned default.

    Returns:
        o: (B, Hq, S, D) q's dtype, a permuted view of a contiguous (B, S, Hq, D) tensor;
        lse: fp32 (B, Hq, S) contiguous, natural-log log-sum-exp of the biased scaled logits
            (-inf, with o = 0, for a query whose keys are all masked);
        colsum: fp32 (B, Hq, G, Sk) contiguous, ``colsum[b, h, g, j] = sum_{i in g} softmax_i(j)``.
    """
    sig = (
        tensor_signature(q), tensor_signature(k), tensor_signature(v),
        None if key_bias is None else tensor_signature(key_bias), group_size, config,
    )  # fmt: skip
    plan = _PLANS.get(sig)
    if plan is None:
        plan = _PLANS.put(sig, _plan(q, k, v, group_size, key_bias, config))
    B, Hq, S, D = q.shape
    Sk = k.shape[2]
    out = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
    lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    colsum = torch.empty((B, Hq, plan.groups, Sk), dtype=torch.float32, device=q.device)
    if B == 0 or Hq == 0 or S == 0:
        return out, lse, colsum
    if Sk == 0:
        return out.zero_(), lse.fill_(float("-inf")), colsum

    bias = key_bias if key_bias is not None else q  # unread without HAS_BIAS
    qk_scale = float(scale) * _LOG2E
    cfg = plan.cfg
    dense = None
    if key_bias is None and (cfg.dense_pass == "cudnn" or (cfg.dense_pass == "auto" and _CUDNN_DENSE_PASS)):
        dense = _dense_pass_cudnn(q, k, v, float(scale))
    if dense is not None:
        out, lse = dense
    else:
        _launch_fwd(
            plan.fwd_grid, (q, k, v, bias, out, lse, S, Sk, qk_scale, *plan.fwd_strides), plan.fwd_constexprs,
            signature=sig, num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
        )  # fmt: skip
    # lse is (B, Hq, S) contiguous either way (cuDNN's is made contiguous), so its strides are in the plan
    _launch_colsum(
        plan.colsum_grid, (q, k, bias, lse, colsum, S, Sk, plan.groups, qk_scale, *plan.colsum_strides),
        plan.colsum_constexprs, signature=sig, num_warps=cfg.colsum_warps, num_stages=cfg.colsum_stages,
    )  # fmt: skip
    return out, lse, colsum


@dataclass(frozen=True)
class _Plan:
    """What an attention_with_colsum call computes from shapes, strides, dtypes and options alone."""

    cfg: ColsumConfig
    groups: int
    fwd_grid: tuple[int, int, int]
    fwd_strides: tuple[int, ...]
    fwd_constexprs: dict[str, Any]
    colsum_grid: tuple[int, int, int]
    colsum_strides: tuple[int, ...]
    colsum_constexprs: dict[str, Any]


# Plans by signature: the checks, the config, the 64-bit offset decision and the strides run once per
# signature instead of on every selection step.
_PLANS = PlanCache()
_launch_fwd = CachedLauncher(_attention_fwd_kernel)
_launch_colsum = CachedLauncher(_attention_colsum_kernel)


def _plan(q, k, v, group_size, key_bias, config) -> _Plan:
    reason = supports(q, k, v)
    if reason is not None:
        raise ValueError(f"attention_with_colsum: {reason}")
    if group_size not in _SUPPORTED_GROUPS:
        raise ValueError(f"attention_with_colsum: group_size must be 64, 128 or 192, got {group_size}")
    B, Hq, S, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if key_bias is not None:
        _check_key_bias(key_bias, B, Hq, Sk, q.device, "attention_with_colsum")
    cfg = config or _pick_config(D, group_size, q.dtype)
    if group_size % cfg.colsum_block_m != 0:
        raise ValueError(
            f"attention_with_colsum: colsum_block_m={cfg.colsum_block_m} must divide group_size={group_size}"
        )
    G = triton.cdiv(S, group_size)
    out = torch.empty((B, S, Hq, D), dtype=q.dtype, device="meta").permute(0, 2, 1, 3)  # strides only
    lse_strides = (Hq * S, S)
    colsum_strides = (Hq * G * Sk, G * Sk, Sk)
    if key_bias is not None:
        bias_strides = (key_bias.stride(0), key_bias.stride(1) if key_bias.shape[1] > 1 else 0, key_bias.stride(2))
    else:
        bias_strides = (0, 0, 0)  # unread: q stands in for the bias pointer
    block = max(cfg.fwd_block_m, cfg.fwd_block_n, cfg.colsum_block_m, cfg.colsum_block_n)
    off64 = (
        max(_max_offset(q, (2, 3)), _max_offset(k, (2, 3)), _max_offset(v, (2, 3)), _max_offset(out, (2, 3)))
        + block * max(abs(q.stride(2)), abs(k.stride(2)), abs(v.stride(2)), 1)
        > _INT32_MAX
    )
    upcast = _interpreting() and q.dtype == torch.bfloat16  # bf16 tl.dot is wrong in the interpreter
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    common = dict(GQA_RATIO=Hq // Hkv, HEAD_DIM=D, HAS_BIAS=key_bias is not None, UPCAST=upcast)
    common.update(PRECISION=precision, OFF64=off64)
    return _Plan(
        cfg=cfg,
        groups=G,
        fwd_grid=(triton.cdiv(S, cfg.fwd_block_m), Hq, B),
        fwd_strides=(
            *q.stride(), *k.stride(), *v.stride(), *bias_strides,
            out.stride(0), out.stride(1), out.stride(2), *lse_strides,
        ),  # fmt: skip
        fwd_constexprs=dict(BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.fwd_block_n, **common),
        colsum_grid=(triton.cdiv(Sk, cfg.colsum_block_n), Hq, B),
        colsum_strides=(*q.stride(), *k.stride(), *bias_strides, *lse_strides, *colsum_strides),
        colsum_constexprs=dict(GROUP_SIZE=group_size, BLOCK_N=cfg.colsum_block_n, BLOCK_M=cfg.colsum_block_m, **common),
    )


def attention_with_colsum_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    group_size: int,
    key_bias: torch.Tensor | None = None,
    upcast: bool = True,
    max_chunk_elems: int = 1 << 26,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch :func:`attention_with_colsum` (same contract, any head dim and device).

    Processes whole query groups in chunks whose logits stay under ``max_chunk_elems`` elements, so
    S = 32k runs in bounded memory. Computes in fp32 (fp64 for fp64 inputs) when ``upcast``, else in
    the input dtype (the low-precision baseline of the tolerance rule).
    """
    B, Hq, S, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = -(-S // group_size)
    cdt = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    head_map = torch.arange(Hq, device=q.device) // (Hq // Hkv)
    kk = k[:, head_map].to(cdt)
    vv = v[:, head_map].to(cdt)
    bias = key_bias.to(cdt)[:, :, None, :] if key_bias is not None else None
    out = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
    lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
    colsum = torch.zeros((B, Hq, G, Sk), dtype=torch.float32, device=q.device)
    groups_per_chunk = max(1, max_chunk_elems // max(1, B * Hq * group_size * max(Sk, 1)))
    for g0 in range(0, G, groups_per_chunk):
        g1 = min(G, g0 + groups_per_chunk)
        r0, r1 = g0 * group_size, min(S, g1 * group_size)
        logits = torch.matmul(q[:, :, r0:r1].to(cdt), kk.transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + bias
        row_lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        safe = torch.where(torch.isfinite(row_lse), row_lse, torch.full_like(row_lse, float("inf")))
        p = torch.exp(logits - safe)  # all-masked rows: exp(-inf - inf) = 0
        out[:, :, r0:r1] = torch.matmul(p, vv).to(q.dtype)
        lse[:, :, r0:r1] = row_lse.squeeze(-1).float()
        pad = (g1 - g0) * group_size - (r1 - r0)
        p = torch.nn.functional.pad(p, (0, 0, 0, pad)).view(B, Hq, g1 - g0, group_size, Sk)
        colsum[:, :, g0:g1] = p.sum(3).float()
    return out, lse, colsum
