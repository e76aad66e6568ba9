"""Column-sparse attention: each query group attends only to its own list of keys.

Math, per (batch b, query head h, query group g, query i in g):

    A_S[i] = sum_{j in S} softmax_S(q_i . k_j * scale + bias_j) v_j,   S = indices[b, h, g, :counts[b, h, g]]

(the softmax is renormalised over the selected keys only), and the op returns ``base + sign * A_S``
when ``base`` is given, else ``A_S``. This is the sparse step of the Chipmunk method
(arXiv 2506.03275, chipmunk-method.md section 1.7): ``cache + A_S`` on sparse steps (sign +1) and
``o - A_S`` to form the cache on dense steps (sign -1).

Kernel design (why, not what):
- one program per (query sub-tile of BLOCK_M rows, head, batch); a group of 192 queries is three
  64-row sub-tiles sharing one index list. Grid axis 0 (the fastest-launched) runs over the groups of
  one head, so all programs gathering from one head's K/V run together and hit L2 (one head's K and V
  at S=32k is ~17 MB, well inside the 50 MB L2).
- the key loop is bounded by the count loaded on the device (no host sync); full BLOCK_N chunks run
  without masks, the one partial chunk at the end with masks, garbage index entries are never read.
- batch/head base offsets are always 64-bit; per-row offsets switch to 64-bit (constexpr ``OFF64``)
  only when one head's extent could overflow 32 bits, because 64-bit address math in the gather loop
  costs registers.
- accumulation is fp32; the softmax runs in base 2 with the scale folded in (one FMA per logit).

Measured (H200, bf16, B=1, H=24, D=128, group 128, random sorted keys, 2026-11-27; CSV in bench/results/):
at 7% kept, S=32768: 2.6-2.7 ms, 8.0-8.3x cuDNN dense (~350 TFLOP/s effective), FlexAttention with
128x128 blocks at the same fraction 9.0-9.2x; S=119056: 33.7 ms, 9.2x; S=4352: 0.09 ms, 4.5x. The loop
is bound by the gather (L2 latency/bandwidth: every 64-row tile re-reads its keys), not by the MMAs (the
exponentials in f16x2, two per MUFU op, gained nothing: bench/results/attention_variants_NVIDIA-H100_session8.csv).
H100 (same run conditions, bench/results/attention_NVIDIA-H100_2026-11-27.csv): S=32768 at 7% kept 2.67 ms,
7.7x cuDNN (FlexAttention 8.8x); at 5% 2.12 ms, 9.7x (FlexAttention 11.1x). Session 8, after the masked tail
loop stopped serializing the main loop's wgmmas and with 64-key chunks for long key lists (_pick_config):
2.37 ms at 7% (8.8x; FlexAttention 9.1x), 1.89 ms at 5% (11.1x; 11.9x); FLUX's 672 keys 120 µs (140 before).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from chipmunk_compile.kernels._launch import CachedLauncher, PlanCache, tensor_signature

__all__ = [
    "KernelConfig",
    "column_sparse_attention",
    "column_sparse_attention_ref",
    "supports",
]

_LOG2E = 1.4426950408889634
_INT32_MAX = 2**31 - 1
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUPPORTED_GROUPS = (64, 128, 192)
_SUPPORTED_HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters (tests, benchmarks); ``block_m`` must divide the group size."""

    block_m: int = 64
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 4


def _pick_config(
    head_dim: int, group_size: int, dtype: torch.dtype = torch.bfloat16, keys: int = 0, has_bias: bool = False,
    smem_per_sm: int | None = None,
) -> KernelConfig:
    """Launch configuration for ``keys`` index slots per query group (``Kcap``: known on the host, no sync),
    whether a key bias is added, and the card's shared memory per SM (None: unknown, e.g. the interpreter).

    The loop is bound by the gather (L2 bandwidth/latency), so the pipeline depth matters most. H100, bf16,
    D=128, strided q/k/v with a base (bench/results/flux_kernels_NVIDIA-H100_session8.csv,
    attention_long_NVIDIA-H100_session8.csv), after the masked tail loop stopped serializing the wgmmas:
    with 672 keys (FLUX) 32-key chunks in 6 stages take 120 µs, 64-key chunks in 5 stages 130 µs (the half-used
    last chunk weighs more); with 2294 keys (S=32768, 7%) 2.46 vs 2.38 ms, 6016 keys (HunyuanVideo 129 frames,
    5%) 23.4 vs 21.1 ms, 7552 keys (Wan 81 frames, 10%) 30.2 vs 27.2 ms; but with a key bias (HunyuanVideo's
    text padding mask) 64-key chunks were slower at 6016 keys (30.9 vs 27.6 ms;
    attention_long2_NVIDIA-H100_session8.csv). 128-row tiles (8 warps) were slower at every length. 4-byte
    inputs keep 32-key chunks in 4 stages (shared memory: 6 would need ~192 KB at D=128, more than an A100 has).
    The 64-key pipeline takes ~115 KB of shared memory: cards with less than 160 KB per SM (Ada: 100 KB) keep
    the 32-key one (~66 KB).
    """
    del head_dim, group_size
    if dtype.itemsize > 2:
        return KernelConfig(num_stages=4)
    if keys >= 2048 and not has_bias and (smem_per_sm is None or smem_per_sm >= 160 * 1024):
        return KernelConfig(block_n=64, num_stages=5)
    return KernelConfig(num_stages=6)


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def _csa_inner(
    acc, l_i, m_i, q,
    idx_row, k_head, v_head, bias_head,
    start, end, count,
    stride_ik, stride_ks, stride_kd, stride_vs, stride_vd, stride_bs,
    qk_scale,
    offs_n, offs_d,
    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, MASKED: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr,
):  # fmt: skip
    # The masked loop runs once (the partial last chunk): not software-pipelined, since pipelining it as well
    # made ptxas serialize the wgmma instructions of the main loop (warning C7515; 4-13% slower, H100).
    for n0 in tl.range(start, end, BLOCK_N, num_stages=1 if MASKED else None):
        if MASKED:
            valid = (n0 + offs_n) < count
            idx = tl.load(idx_row + (n0 + offs_n) * stride_ik, mask=valid, other=0)
        else:
            idx = tl.load(idx_row + (n0 + offs_n) * stride_ik)
        if OFF64:
            idx = idx.to(tl.int64)
        k = tl.load(k_head + idx[:, None] * stride_ks + offs_d[None, :] * stride_kd)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            qk += tl.load(bias_head + idx * stride_bs)[None, :] * 1.4426950408889634
        if MASKED:
            qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if HAS_BIAS or MASKED:
            # a row whose selected keys so far are all masked has m_new = -inf; exp2(-inf - -inf) is NaN
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_head + idx[:, None] * stride_vs + offs_d[None, :] * stride_vd)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _column_sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, cnt_ptr, bias_ptr, base_ptr, out_ptr,
    S, Kcap, sign, qk_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ib, stride_ih, stride_ig, stride_ik,
    stride_cb, stride_ch, stride_cg,
    stride_bb, stride_bh, stride_bs,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_ob, stride_oh, stride_os,
    GQA_RATIO: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, OFF64: tl.constexpr,
):  # fmt: skip
    SUB: tl.constexpr = GROUP_SIZE // BLOCK_M
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    g = pid // SUB
    row0 = g * GROUP_SIZE + (pid % SUB) * BLOCK_M
    if row0 >= S:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    kvh64 = (h // GQA_RATIO).to(tl.int64)
    g64 = g.to(tl.int64)

    offs_m = row0 + tl.arange(0, BLOCK_M)
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

    count = tl.load(cnt_ptr + b64 * stride_cb + h64 * stride_ch + g64 * stride_cg)
    count = tl.minimum(tl.maximum(count, 0), Kcap)
    n_full = (count // BLOCK_N) * BLOCK_N

    idx_row = idx_ptr + b64 * stride_ib + h64 * stride_ih + g64 * stride_ig
    k_head = k_ptr + b64 * stride_kb + kvh64 * stride_kh
    v_head = v_ptr + b64 * stride_vb + kvh64 * stride_vh
    bias_head = bias_ptr + b64 * stride_bb + h64 * stride_bh  # stride_bh is 0 for one shared bias row

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _csa_inner(
        acc, l_i, m_i, q, idx_row, k_head, v_head, bias_head, 0, n_full, count,
        stride_ik, stride_ks, stride_kd, stride_vs, stride_vd, stride_bs, qk_scale, offs_n, offs_d,
        BLOCK_N, HAS_BIAS, False, UPCAST, PRECISION, OFF64,
    )  # fmt: skip
    acc, l_i, m_i = _csa_inner(
        acc, l_i, m_i, q, idx_row, k_head, v_head, bias_head, n_full, count, count,
        stride_ik, stride_ks, stride_kd, stride_vs, stride_vd, stride_bs, qk_scale, offs_n, offs_d,
        BLOCK_N, HAS_BIAS, True, UPCAST, PRECISION, OFF64,
    )  # fmt: skip

    # count == 0 (or every selected key masked): l_i == 0 and acc == 0, so A_S = 0
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    result = acc / l_safe[:, None]
    if HAS_BASE:
        base = tl.load(
            base_ptr + b64 * stride_xb + h64 * stride_xh + offs_m[:, None] * stride_xs + offs_d[None, :] * stride_xd,
            mask=row_ok[:, None],
            other=0.0,
        )
        result = base.to(tl.float32) + sign * result
    tl.store(
        out_ptr + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
        result.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def _max_offset(t: torch.Tensor, dims: tuple[int, ...]) -> int:
    """Largest element offset reachable inside one (batch, head) slice of ``t`` over ``dims``."""
    return sum((t.shape[d] - 1) * abs(t.stride(d)) for d in dims)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if the Triton kernels can run on these inputs, else a short reason."""
    if not (q.is_cuda or (q.device.type == "cpu" and _interpreting())):
        return f"Triton needs a CUDA device (or TRITON_INTERPRET=1 on CPU), got {q.device}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D (B, H, S, D)"
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share one dtype of fp16/bf16/fp32, got {q.dtype}/{k.dtype}/{v.dtype}"
    if q.shape[-1] not in _SUPPORTED_HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        dims = f"{q.shape[-1]}/{k.shape[-1]}/{v.shape[-1]}"
        return f"head dim must be 64 or 128 and equal for q, k, v, got {dims}"
    if k.shape != v.shape or k.shape[0] != q.shape[0]:
        return f"k and v must be (B, Hkv, Sk, D) with q's batch, got {tuple(k.shape)}/{tuple(v.shape)}"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        return f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
    if q.device != k.device or q.device != v.device:
        return "q, k, v must be on one device"
    return None


def _check_inputs(q, k, v, indices, counts, group_size, key_bias, base) -> None:
    reason = supports(q, k, v)
    if reason is not None:
        raise ValueError(f"column_sparse_attention: {reason}")
    B, Hq, S, D = q.shape
    if group_size not in _SUPPORTED_GROUPS:
        raise ValueError(f"column_sparse_attention: group_size must be 64, 128 or 192, got {group_size}")
    G = triton.cdiv(S, group_size)
    if indices.dtype != torch.int32 or indices.dim() != 4 or tuple(indices.shape[:3]) != (B, Hq, G):
        raise ValueError(
            f"column_sparse_attention: indices must be int32 (B, Hq, G, Kcap) = ({B}, {Hq}, {G}, *), "
            f"got {indices.dtype} {tuple(indices.shape)}"
        )
    if counts.dtype != torch.int32 or tuple(counts.shape) != (B, Hq, G):
        raise ValueError(
            f"column_sparse_attention: counts must be int32 ({B}, {Hq}, {G}), got {counts.dtype} {tuple(counts.shape)}"
        )
    if indices.device != q.device or counts.device != q.device:
        raise ValueError("column_sparse_attention: indices and counts must be on q's device")
    if key_bias is not None:
        _check_key_bias(key_bias, B, Hq, k.shape[2], q.device, "column_sparse_attention")
    if base is not None and (tuple(base.shape) != (B, Hq, S, D) or base.dtype != q.dtype or base.device != q.device):
        raise ValueError(
            f"column_sparse_attention: base must be {q.dtype} {(B, Hq, S, D)} on {q.device}, "
            f"got {base.dtype} {tuple(base.shape)} on {base.device}"
        )


def _check_key_bias(key_bias, B, Hq, Sk, device, op) -> None:
    if (
        key_bias.dtype != torch.float32
        or key_bias.dim() != 3
        or key_bias.shape[0] != B
        or key_bias.shape[1] not in (1, Hq)
        or key_bias.shape[2] != Sk
        or key_bias.device != device
    ):
        raise ValueError(
            f"{op}: key_bias must be fp32 (B, 1 or Hq, Sk) = ({B}, 1|{Hq}, {Sk}) on {device}, "
            f"got {key_bias.dtype} {tuple(key_bias.shape)} on {key_bias.device}"
        )


def column_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    *,
    scale: float,
    group_size: int,
    key_bias: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    sign: float = 1.0,
    config: KernelConfig | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """``base + sign * A_S`` (or ``A_S`` without base); Triton, no host sync.

    Args:
        q: (B, Hq, S, D) fp16/bf16/fp32, any strides (typically a permuted (B, S, Hq, D) view);
            D in {64, 128}.
        k, v: (B, Hkv, Sk, D), q's dtype, any strides; Hq % Hkv == 0 (q head h reads kv head
            h // (Hq // Hkv)).
        indices: int32 (B, Hq, G, Kcap), G = ceil(S / group_size); group g of head h attends to keys
            ``indices[b, h, g, :counts[b, h, g]]`` (each in [0, Sk); later entries are never read).
        counts: int32 (B, Hq, G), values in [0, Kcap]; 0 gives A_S = 0 for that group.
        scale: logit scale (usually D ** -0.5).
        group_size: queries per group, 64, 128 or 192.
        key_bias: optional fp32 (B, 1 or Hq, Sk) additive logit bias per key (-inf masks a key).
        base: optional (B, Hq, S, D), q's dtype, any strides: the result is ``base + sign * A_S``.
        sign: +1 or -1 (any float works).
        config: launch parameters (tests and benchmarks); None picks a tuned default.
        validate: check the inputs. The checks depend only on the signature (shapes, strides, dtypes, devices,
            options), so they run on its first call only; ``False`` skips them for a new signature too.

    Returns:
        (B, Hq, S, D) in q's dtype: a permuted view of a contiguous (B, S, Hq, D) tensor.
    """
    sig = (
        tensor_signature(q), tensor_signature(k), tensor_signature(v), tensor_signature(indices),
        tensor_signature(counts), None if key_bias is None else tensor_signature(key_bias),
        None if base is None else tensor_signature(base), group_size, config,
    )  # fmt: skip
    plan = _PLANS.get(sig)
    if plan is None:
        plan = _PLANS.put(sig, _plan(q, k, v, indices, counts, group_size, key_bias, base, config, validate))
    out = torch.empty(plan.out_shape, dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
    if plan.grid is None:
        return out
    _launch_kernel(
        plan.grid,
        (
            q, k, v, indices, counts, key_bias if key_bias is not None else q,  # bias unread without HAS_BIAS
            base if base is not None else out, out, plan.seq, plan.kcap, float(sign), float(scale) * _LOG2E,
            *plan.strides,
        ),
        plan.constexprs, signature=sig, num_warps=plan.num_warps, num_stages=plan.num_stages,
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class _Plan:
    """What a column_sparse_attention call computes from shapes, strides, dtypes and options alone."""

    out_shape: tuple[int, int, int, int]  # (B, S, Hq, D): out is its (0, 2, 1, 3) permutation
    grid: tuple[int, int, int] | None  # None: nothing to launch (an empty dimension)
    seq: int
    kcap: int
    strides: tuple[int, ...]  # q, k, v, indices, counts, bias (head stride 0 if shared), base, out
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int


# Plans by signature: the checks, the config, the 64-bit offset decision and the strides are Python work
# (tens of µs per call, not measured alone) that a denoising loop would otherwise redo with the same few
# signatures every step.
_PLANS = PlanCache()


def _plan(q, k, v, indices, counts, group_size, key_bias, base, config, validate) -> _Plan:
    if validate:
        _check_inputs(q, k, v, indices, counts, group_size, key_bias, base)
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    G = triton.cdiv(S, group_size)
    smem = torch.cuda.get_device_properties(q.device).shared_memory_per_multiprocessor if q.is_cuda else None
    cfg = config or _pick_config(D, group_size, q.dtype, indices.shape[3], key_bias is not None, smem)
    if group_size % cfg.block_m != 0:
        raise ValueError(f"column_sparse_attention: block_m={cfg.block_m} must divide group_size={group_size}")
    out_shape = (B, S, Hq, D)
    out = torch.empty(out_shape, dtype=q.dtype, device="meta").permute(0, 2, 1, 3)  # out's strides
    empty = S == 0 or B == 0 or Hq == 0
    if key_bias is not None:
        bias_strides = (key_bias.stride(0), key_bias.stride(1) if key_bias.shape[1] > 1 else 0, key_bias.stride(2))
    else:
        bias_strides = (0, 0, 0)  # unread: q stands in for the bias pointer
    base_t = base if base is not None else out
    off64 = (
        max(
            _max_offset(q, (2, 3)),
            _max_offset(k, (2, 3)),
            _max_offset(v, (2, 3)),
            _max_offset(base_t, (2, 3)),
            _max_offset(out, (2, 3)),
        )
        + max(cfg.block_m, cfg.block_n) * max(abs(q.stride(2)), abs(k.stride(2)), abs(v.stride(2)), 1)
        > _INT32_MAX
    )
    upcast = _interpreting() and q.dtype == torch.bfloat16  # bf16 tl.dot is wrong in the interpreter
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    strides = (
        *q.stride(), *k.stride(), *v.stride(), *indices.stride(), *counts.stride(),
        *bias_strides, *base_t.stride(), out.stride(0), out.stride(1), out.stride(2),
    )  # fmt: skip
    constexprs = dict(
        GQA_RATIO=Hq // Hkv, GROUP_SIZE=group_size, HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_BIAS=key_bias is not None, HAS_BASE=base is not None, UPCAST=upcast, PRECISION=precision,
        OFF64=off64,
    )  # fmt: skip
    grid = None if empty else (G * (group_size // cfg.block_m), Hq, B)
    return _Plan(out_shape, grid, S, indices.shape[3], strides, constexprs, cfg.num_warps, cfg.num_stages)


_launch_kernel = CachedLauncher(_column_sparse_attention_kernel)


def column_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    *,
    scale: float,
    group_size: int,
    key_bias: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    sign: float = 1.0,
    upcast: bool = True,
    max_chunk_elems: int = 1 << 25,
) -> torch.Tensor:
    """Pure-PyTorch column-sparse attention with the same contract as :func:`column_sparse_attention`.

    Any head dim and device. Computes in fp32 (fp64 for fp64 inputs) when ``upcast``, else in the
    input dtype (the low-precision baseline of the tolerance rule). Groups are processed in chunks so
    the gathered K/V stay under ``max_chunk_elems`` elements.
    """
    B, Hq, S, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = -(-S // group_size)
    Kcap = indices.shape[3]
    cdt = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    head_map = torch.arange(Hq, device=q.device) // (Hq // Hkv)
    kk = k[:, head_map].to(cdt)
    vv = v[:, head_map].to(cdt)
    pad = G * group_size - S
    qq = torch.nn.functional.pad(q.to(cdt), (0, 0, 0, pad)).view(B, Hq, G, group_size, D)
    cnt = counts.clamp(0, Kcap).long()
    out = torch.empty((B, G, group_size, Hq, D), dtype=cdt, device=q.device)
    chunk = max(1, max_chunk_elems // max(1, B * Hq * max(Kcap, 1) * max(D, group_size)))
    batch_ix = torch.arange(B, device=q.device)[:, None, None, None]
    head_ix = torch.arange(Hq, device=q.device)[None, :, None, None]
    for g0 in range(0, G, chunk):
        g1 = min(G, g0 + chunk)
        valid = torch.arange(Kcap, device=q.device) < cnt[:, :, g0:g1, None]  # (B, Hq, c, Kcap)
        idx = torch.where(valid, indices[:, :, g0:g1].long(), 0).clamp(0, max(Sk - 1, 0))
        ks = kk[batch_ix, head_ix, idx]  # (B, Hq, c, Kcap, D)
        vs = vv[batch_ix, head_ix, idx]
        logits = torch.einsum("bhcqd,bhckd->bhcqk", qq[:, :, g0:g1], ks) * scale
        if key_bias is not None:
            kb = key_bias.expand(B, Hq, Sk).to(cdt)
            logits = logits + kb[batch_ix, head_ix, idx][:, :, :, None, :]
        logits = logits.masked_fill(~valid[:, :, :, None, :], float("-inf"))
        m = logits.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(logits - m)
        denom = p.sum(-1, keepdim=True)
        p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
        a_s = torch.einsum("bhcqk,bhckd->bhcqd", p, vs)  # (B, Hq, c, GS, D)
        out[:, g0:g1] = a_s.permute(0, 2, 3, 1, 4)
    res = out.view(B, G * group_size, Hq, D)[:, :S].permute(0, 2, 1, 3)
    if base is not None:
        res = base.to(cdt) + sign * res
    final = torch.empty((B, S, Hq, D), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
    final.copy_(res)
    return final
