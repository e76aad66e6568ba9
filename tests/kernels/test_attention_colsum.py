"""Dense attention with per-group column sums: the reference against a dense softmax, the Triton kernels
against the reference (CPU: TRITON_INTERPRET=1 in fp32/fp16; GPU: fp32/fp16/bf16).

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

from chipmunk_compile.kernels import attention_colsum as ac  # noqa: E402
from kernel_testing import DEVICE, DTYPES, EPS, interpreted  # noqa: E402  (tests/ is on sys.path)

ac = interpreted(ac, "_attention_colsum_kernel")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
    bias: str | None = None  # None | "shared" (B, 1, Sk) | "per_head" (B, Hq, Sk)
    bshd: bool = True


CASES = [
    Case("s77_g64"),
    Case("s200_g128_gqa_bias", Hq=4, Hkv=2, S=200, group_size=128, bias="shared"),
    Case("s200_g192_bias_per_head", S=200, group_size=192, bias="per_head"),
    Case("s130_d128_contig", S=130, D=128, group_size=128, bshd=False),
    Case("b2_cross_sk45", B=2, S=70, Sk=45, group_size=64, bias="shared"),
]


def _t(B, H, S, D, dtype, bshd):
    if bshd:  # (B, H, S, D) permuted view of a contiguous (B, S, H, D) tensor, as a DiT passes q/k/v
        return torch.randn((B, S, H, D), dtype=dtype, device=DEVICE).permute(0, 2, 1, 3)
    return torch.randn((B, H, S, D), dtype=dtype, device=DEVICE)


def _inputs(c: Case, dtype):
    Sk = c.Sk or c.S
    q = _t(c.B, c.Hq, c.S, c.D, dtype, c.bshd)
    k = _t(c.B, c.Hkv, Sk, c.D, dtype, c.bshd)
    v = _t(c.B, c.Hkv, Sk, c.D, dtype, c.bshd)
    key_bias = None
    if c.bias is not None:
        key_bias = torch.randn((c.B, 1 if c.bias == "shared" else c.Hq, Sk), device=DEVICE) * 0.5
        key_bias[..., 2:9] = float("-inf")
    return q, k, v, key_bias


def _dense(q, k, v, scale, group_size, key_bias=None):
    """Independent formula in fp64: full softmax, then sums over each group's rows."""
    B, Hq, S, D = q.shape
    rep = Hq // k.shape[1]
    k = k.double().repeat_interleave(rep, dim=1)
    v = v.double().repeat_interleave(rep, dim=1)
    logits = q.double() @ k.transpose(-1, -2) * scale
    if key_bias is not None:
        logits = logits + key_bias.double()[:, :, None, :]
    p = torch.softmax(logits, dim=-1)
    G = -(-S // group_size)
    colsum = torch.stack([p[:, :, g * group_size : (g + 1) * group_size].sum(2) for g in range(G)], dim=2)
    return p @ v, torch.logsumexp(logits, dim=-1), colsum


def _check(out, ref64, lowp, eps, what):
    assert out.shape == ref64.shape, what
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.double() - ref64.double()).abs().max().item()
    err_lowp = (lowp.double() - ref64.double()).abs().max().item()
    assert err <= 2 * err_lowp + eps, f"{what}: err {err:.3e} > 2 * lowp err {err_lowp:.3e} + {eps:.0e}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ref_matches_dense_softmax(case):
    q, k, v, key_bias = _inputs(case, torch.float64)
    scale = case.D**-0.5
    # a tiny chunk budget forces one query group per chunk
    o, lse, colsum = ac.attention_with_colsum_ref(
        q, k, v, scale=scale, group_size=case.group_size, key_bias=key_bias, max_chunk_elems=1
    )
    do, dlse, dcolsum = _dense(q, k, v, scale, case.group_size, key_bias)
    torch.testing.assert_close(o, do, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse.double(), dlse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(colsum.double(), dcolsum, rtol=1e-6, atol=1e-6)
    assert o.permute(0, 2, 1, 3).is_contiguous() and lse.dtype == colsum.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_ref(case, dtype):
    q, k, v, key_bias = _inputs(case, dtype)
    kw = dict(scale=case.D**-0.5, group_size=case.group_size, key_bias=key_bias)
    o, lse, colsum = ac.attention_with_colsum(q, k, v, **kw)
    r_o, r_lse, r_cs = ac.attention_with_colsum_ref(q.double(), k.double(), v.double(), **kw)
    l_o, l_lse, l_cs = ac.attention_with_colsum_ref(q, k, v, **kw, upcast=False)
    S, Sk, G = case.S, case.Sk or case.S, -(-case.S // case.group_size)
    assert o.dtype == dtype and o.permute(0, 2, 1, 3).is_contiguous()
    assert lse.shape == (case.B, case.Hq, S) and colsum.shape == (case.B, case.Hq, G, Sk)
    _check(o, r_o, l_o, EPS[dtype], f"{case.name} o")
    _check(lse, r_lse, l_lse, EPS[dtype] * 10, f"{case.name} lse")
    _check(colsum, r_cs, l_cs, EPS[dtype], f"{case.name} colsum")
    # each query's probabilities sum to 1, so a group's column sums add up to its row count
    rows = torch.tensor([min(case.group_size, S - g * case.group_size) for g in range(G)], dtype=torch.float64)
    torch.testing.assert_close(colsum.double().sum(-1).cpu(), rows.expand_as(colsum[..., 0]), rtol=1e-3, atol=1e-3)
    if key_bias is not None:  # masked keys get exactly zero probability
        assert (colsum[..., 2:9] == 0).all()


@pytest.mark.parametrize(
    "config",
    [ac.ColsumConfig(fwd_block_m=64, fwd_block_n=32, fwd_warps=4, colsum_block_n=64, colsum_warps=4),
     ac.ColsumConfig(fwd_block_n=128, colsum_block_m=128)],
    ids=["small", "m128"],
)  # fmt: skip
def test_launch_configs(config):
    case = Case("cfg", S=200, group_size=128, bias="shared")
    q, k, v, key_bias = _inputs(case, torch.float16)
    kw = dict(scale=0.125, group_size=128, key_bias=key_bias)
    got = ac.attention_with_colsum(q, k, v, config=config, **kw)
    ref = ac.attention_with_colsum_ref(q.double(), k.double(), v.double(), **kw)
    low = ac.attention_with_colsum_ref(q, k, v, **kw, upcast=False)
    for name, a, r, lp in zip(("o", "lse", "colsum"), got, ref, low):
        _check(a, r, lp, 1e-2 if name == "lse" else 1e-3, f"{config} {name}")


def test_fully_masked_batch_row():
    """A sample whose keys are all masked: o = 0, lse = -inf, zero column sums (no NaN)."""
    q, k, v, _ = _inputs(Case("m", B=2), torch.float32)
    key_bias = torch.zeros((2, 1, 77), device=DEVICE)
    key_bias[1] = float("-inf")
    o, lse, colsum = ac.attention_with_colsum(q, k, v, scale=0.125, group_size=64, key_bias=key_bias)
    assert (o[1] == 0).all() and torch.isneginf(lse[1]).all() and (colsum[1] == 0).all()
    r_o, r_lse, r_cs = ac.attention_with_colsum_ref(q, k, v, scale=0.125, group_size=64, key_bias=key_bias)
    torch.testing.assert_close(o[0], r_o[0], rtol=1e-4, atol=1e-5)
    assert (r_o[1] == 0).all() and torch.isneginf(r_lse[1]).all() and (r_cs[1] == 0).all()


def test_int64_offsets_path(monkeypatch):
    q, k, v, key_bias = _inputs(Case("off64", S=130, bias="shared"), torch.float32)
    kw = dict(scale=0.125, group_size=64, key_bias=key_bias)
    expected = ac.attention_with_colsum(q, k, v, **kw)
    monkeypatch.setattr(ac, "_INT32_MAX", 1000)
    for got, exp in zip(ac.attention_with_colsum(q, k, v, **kw), expected):
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6)


def test_validation():
    q = torch.randn(1, 64, 2, 64, dtype=torch.float16, device=DEVICE).permute(0, 2, 1, 3)
    assert ac.supports(q, q, q) is None
    with pytest.raises(ValueError, match="group_size"):
        ac.attention_with_colsum(q, q, q, scale=0.1, group_size=96)
    with pytest.raises(ValueError, match="key_bias"):
        ac.attention_with_colsum(q, q, q, scale=0.1, group_size=64, key_bias=torch.zeros(1, 1, 63, device=DEVICE))
    with pytest.raises(ValueError, match="multiple"):
        k3 = torch.randn(1, 3, 64, 64, dtype=torch.float16, device=DEVICE)
        ac.attention_with_colsum(q, k3, k3, scale=0.1, group_size=64)
    with pytest.raises(ValueError, match="head dim"):
        odd = torch.randn(1, 2, 64, 96, dtype=torch.float16, device=DEVICE)
        ac.attention_with_colsum(odd, odd, odd, scale=0.1, group_size=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dense_pass", ["triton", "cudnn"])
def test_dense_pass_backends_agree(dense_pass):
    """Pass 1 through cuDNN (its logsumexp) or Triton gives the same o, lse and colsum."""
    q, k, v, _ = _inputs(Case("bf16", Hq=4, Hkv=4, S=1000, D=128, group_size=128), torch.bfloat16)
    kw = dict(scale=128**-0.5, group_size=128)
    o, lse, colsum = ac.attention_with_colsum(q, k, v, config=ac.ColsumConfig(dense_pass=dense_pass), **kw)
    r_o, r_lse, r_cs = ac.attention_with_colsum_ref(q.double(), k.double(), v.double(), **kw)
    l_o, l_lse, l_cs = ac.attention_with_colsum_ref(q, k, v, **kw, upcast=False)
    _check(o, r_o, l_o, 1e-2, "o")
    _check(lse, r_lse, l_lse, 1e-3, "lse")
    _check(colsum, r_cs, l_cs, 1e-2, "colsum")
