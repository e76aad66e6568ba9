"""Column-sparse attention: the reference against a dense masked softmax, the Triton kernel against the
reference (CPU: TRITON_INTERPRET=1 in fp32/fp16; GPU: fp32/fp16/bf16).

Tolerance (FlashAttention's rule): ``max|kernel - ref64| <= 2 * max|lowp - ref64| + eps``, where ``ref64``
is the reference in fp64 and ``lowp`` the same reference computed in the input dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    # Read when @triton.jit decorates, so before the kernel module is imported (compile-notes 6.2).
    os.environ["TRITON_INTERPRET"] = "1"

from chipmunk_compile.kernels import column_sparse_attention as csa  # noqa: E402
from kernel_testing import DEVICE, DTYPES, EPS, interpreted  # noqa: E402  (tests/ is on sys.path)

csa = interpreted(csa, "_column_sparse_attention_kernel")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _bshd(B, S, H, D, dtype, device=DEVICE):
    """(B, H, S, D) permuted view of a contiguous (B, S, H, D) tensor, as a DiT passes q/k/v."""
    return torch.randn((B, S, H, D), dtype=dtype, device=device).permute(0, 2, 1, 3)


def _random_lists(B, H, G, Sk, kcap, *, allowed=None, device=DEVICE):
    """int32 (B, H, G, kcap): distinct sorted random keys per group, then garbage the kernel must not read."""
    pool = torch.arange(Sk) if allowed is None else allowed
    rows = []
    for _ in range(B * H * G):
        sel = pool[torch.randperm(pool.numel())[: min(kcap, pool.numel())]].sort().values
        rows.append(torch.cat([sel, torch.full((kcap - sel.numel(),), 123456789)]))  # padding: never read
    return torch.stack(rows).view(B, H, G, kcap).to(torch.int32).to(device)


def _dense_masked(q, k, v, indices, counts, scale, group_size, key_bias=None, base=None, sign=1.0):
    """Independent formula: dense softmax over a boolean (B, H, S, Sk) column mask, in fp64."""
    B, Hq, S, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    G = indices.shape[2]
    mask = torch.zeros((B, Hq, G, Sk), dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            for g in range(G):
                n = int(counts[b, h, g])
                mask[b, h, g, indices[b, h, g, :n].long().cpu()] = True
    mask = mask.repeat_interleave(group_size, dim=2)[:, :, :S].to(q.device)
    logits = q @ k.transpose(-1, -2) * scale
    if key_bias is not None:
        logits = logits + key_bias.double()[:, :, None, :]
    logits = logits.masked_fill(~mask, float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with no visible key: A_S = 0
    a_s = p @ v
    return a_s if base is None else base.double() + sign * a_s


@dataclass(frozen=True)
class Case:
    name: str
    B: int = 1
    Hq: int = 2
    Hkv: int = 2
    S: int = 77
    Sk: int | None = None
    D: int = 64
    group_size: int = 64
    kcap: int | None = None  # default: Sk
    bias: bool = False
    base_sign: float | None = None
    counts: str = "random"  # random | zero_and_full | full
    bshd: bool = True


CASES = [
    Case("s77_g64_mixed_counts", counts="zero_and_full"),
    Case("s200_g128_gqa_base_minus", Hq=4, Hkv=2, S=200, group_size=128, base_sign=-1.0),
    Case("s200_g192_bias_base_plus", S=200, group_size=192, bias=True, base_sign=1.0),
    Case("s130_d128_contig_full", S=130, D=128, group_size=128, counts="full", bshd=False),
    Case("b2_cross_sk50_kcap_small", B=2, S=70, Sk=50, kcap=24, group_size=64, bias=True),
]


def _inputs(c: Case, dtype):
    Sk = c.Sk or c.S
    kcap = c.kcap or Sk
    G = -(-c.S // c.group_size)
    if c.bshd:
        q, k, v = (
            _bshd(c.B, c.S, c.Hq, c.D, dtype),
            _bshd(c.B, Sk, c.Hkv, c.D, dtype),
            _bshd(c.B, Sk, c.Hkv, c.D, dtype),
        )
    else:
        q = torch.randn((c.B, c.Hq, c.S, c.D), dtype=dtype, device=DEVICE)
        k = torch.randn((c.B, c.Hkv, Sk, c.D), dtype=dtype, device=DEVICE)
        v = torch.randn((c.B, c.Hkv, Sk, c.D), dtype=dtype, device=DEVICE)
    key_bias, allowed = None, None
    if c.bias:
        key_bias = torch.randn((c.B, 1, Sk), device=DEVICE) * 0.5
        key_bias[..., 3:7] = float("-inf")  # masked keys: never selected
        allowed = torch.cat([torch.arange(3), torch.arange(7, Sk)])
    indices = _random_lists(c.B, c.Hq, G, Sk, kcap, allowed=allowed)
    n_allowed = Sk if allowed is None else allowed.numel()
    counts = torch.randint(1, min(kcap, n_allowed) + 1, (c.B, c.Hq, G), dtype=torch.int32)
    if c.counts == "zero_and_full":
        counts[0, 0, 0] = 0
        counts[0, -1, -1] = min(kcap, n_allowed)
    elif c.counts == "full":
        counts.fill_(min(kcap, n_allowed))
    counts = counts.to(DEVICE)
    base = _bshd(c.B, c.S, c.Hq, c.D, dtype) if c.base_sign is not None else None
    return q, k, v, indices, counts, key_bias, base


def _check(out, ref64, lowp, eps, what):
    assert out.shape == ref64.shape
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.double() - ref64).abs().max().item()
    err_lowp = (lowp.double() - ref64).abs().max().item()
    assert err <= 2 * err_lowp + eps, f"{what}: err {err:.3e} > 2 * lowp err {err_lowp:.3e} + {eps:.0e}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ref_matches_dense_masked_softmax(case):
    q, k, v, indices, counts, key_bias, base = _inputs(case, torch.float64)
    kw = dict(
        scale=case.D**-0.5,
        group_size=case.group_size,
        key_bias=key_bias,
        base=base,
        sign=case.base_sign or 1.0,
    )
    ref = csa.column_sparse_attention_ref(q, k, v, indices, counts, **kw, max_chunk_elems=1 << 12)
    dense = _dense_masked(q, k, v, indices, counts, **kw)
    torch.testing.assert_close(ref, dense, rtol=1e-10, atol=1e-10)
    assert ref.permute(0, 2, 1, 3).is_contiguous()  # (B, S, H, D) memory layout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_ref(case, dtype):
    q, k, v, indices, counts, key_bias, base = _inputs(case, dtype)
    sign = case.base_sign or 1.0
    kw = dict(scale=case.D**-0.5, group_size=case.group_size, key_bias=key_bias, sign=sign)
    out = csa.column_sparse_attention(q, k, v, indices, counts, base=base, **kw)
    ref64 = csa.column_sparse_attention_ref(
        q.double(),
        k.double(),
        v.double(),
        indices,
        counts,
        base=None if base is None else base.double(),
        **kw,
    )
    lowp = csa.column_sparse_attention_ref(q, k, v, indices, counts, base=base, **kw, upcast=False)
    assert out.dtype == dtype and out.permute(0, 2, 1, 3).is_contiguous()
    _check(out, ref64, lowp, EPS[dtype], case.name)
    if case.counts == "zero_and_full":  # count 0: A_S = 0 exactly
        assert (out[0, 0, : case.group_size] == 0).all()


@pytest.mark.parametrize(
    "config",
    [csa.KernelConfig(128, 64, 8, 3), csa.KernelConfig(64, 32, 4, 2), csa.KernelConfig(64, 128, 4, 3)],
    ids=["m128n64", "m64n32", "m64n128"],
)
def test_launch_configs(config):
    case = Case("cfg", S=200, group_size=128, bias=True, base_sign=-1.0, counts="zero_and_full")
    q, k, v, indices, counts, key_bias, base = _inputs(case, torch.float16)
    kw = dict(scale=0.125, group_size=128, key_bias=key_bias, sign=-1.0)
    out = csa.column_sparse_attention(q, k, v, indices, counts, base=base, config=config, **kw)
    ref64 = csa.column_sparse_attention_ref(
        q.double(), k.double(), v.double(), indices, counts, base=base.double(), **kw
    )
    lowp = csa.column_sparse_attention_ref(q, k, v, indices, counts, base=base, **kw, upcast=False)
    _check(out, ref64, lowp, EPS[torch.float16], f"config {config}")


def test_int64_offsets_path(monkeypatch):
    """The 64-bit row-offset variant (S * H * D > 2**31 at S = 119k) computes the same thing."""
    case = Case("off64", S=130, group_size=64, bias=True, base_sign=1.0)
    q, k, v, indices, counts, key_bias, base = _inputs(case, torch.float32)
    kw = dict(scale=0.125, group_size=64, key_bias=key_bias, base=base, sign=1.0)
    expected = csa.column_sparse_attention(q, k, v, indices, counts, **kw)
    monkeypatch.setattr(csa, "_INT32_MAX", 1000)
    got = csa.column_sparse_attention(q, k, v, indices, counts, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_supports_and_validation():
    q = _bshd(1, 64, 2, 64, torch.float16)
    assert csa.supports(q, q, q) is None
    odd = torch.randn(1, 2, 64, 80, dtype=torch.float16, device=DEVICE)
    assert "head dim" in csa.supports(odd, odd, odd)
    assert "dtype" in csa.supports(q, q.float(), q)
    idx = torch.zeros((1, 2, 1, 8), dtype=torch.int32, device=DEVICE)
    cnt = torch.zeros((1, 2, 1), dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="group_size"):
        csa.column_sparse_attention(q, q, q, idx, cnt, scale=0.1, group_size=100)
    with pytest.raises(ValueError, match="indices"):
        csa.column_sparse_attention(q, q, q, idx.long(), cnt, scale=0.1, group_size=64)
    with pytest.raises(ValueError, match="counts"):
        csa.column_sparse_attention(q, q, q, idx, cnt[:, :1], scale=0.1, group_size=64)
    with pytest.raises(ValueError, match="key_bias"):
        csa.column_sparse_attention(
            q, q, q, idx, cnt, scale=0.1, group_size=64, key_bias=torch.zeros(1, 3, 64, device=DEVICE)
        )
    with pytest.raises(ValueError, match="base"):
        csa.column_sparse_attention(q, q, q, idx, cnt, scale=0.1, group_size=64, base=q.float())
    with pytest.raises(ValueError, match="head dim"):
        csa.column_sparse_attention(odd, odd, odd, idx, cnt, scale=0.1, group_size=64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_supports_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(csa, "_interpreting", lambda: False)
    q = torch.randn(1, 2, 64, 64)
    assert "CUDA" in csa.supports(q, q, q)


def test_default_config_by_key_count():
    """64-key chunks in 5 stages from 2048 index slots per group (long video sequences) without a key bias,
    32-key chunks in 6 stages below (FLUX's 672) or with a bias, 4 stages for 4-byte inputs (shared memory)."""
    assert csa._pick_config(128, 128, torch.bfloat16, 672) == csa.KernelConfig(64, 32, 4, 6)
    assert csa._pick_config(128, 128, torch.bfloat16, 6016) == csa.KernelConfig(64, 64, 4, 5)
    assert csa._pick_config(128, 128, torch.bfloat16, 6016, has_bias=True) == csa.KernelConfig(64, 32, 4, 6)
    assert csa._pick_config(128, 128, torch.bfloat16, 6016, smem_per_sm=228 * 1024) == csa.KernelConfig(64, 64, 4, 5)
    assert csa._pick_config(128, 128, torch.bfloat16, 6016, smem_per_sm=100 * 1024) == csa.KernelConfig(64, 32, 4, 6)
    assert csa._pick_config(128, 128, torch.float32, 6016) == csa.KernelConfig(64, 32, 4, 4)
