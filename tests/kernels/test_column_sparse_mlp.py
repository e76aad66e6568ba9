"""Cached-delta column-sparse MLP: the reference against dense/loop formulas, the Triton kernels against
the reference (CPU: TRITON_INTERPRET=1, fp32/fp16/bf16-upcast; GPU: bf16 and fp32).

Tolerance (flash-attention's rule): ``max|kernel − ref64| ≤ 2·max|lowp − ref64| + eps·max|ref64|``, where
``ref64`` is the reference in fp64 and ``lowp`` the same reference computed in the input dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Read when @triton.jit decorates, so before the kernel module is imported (compile-notes §6.2).
    os.environ["TRITON_INTERPRET"] = "1"

import triton.language as tl  # noqa: E402
from chipmunk_compile.kernels import column_sparse_mlp as csm  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

# triton.language decorates its own helpers (tl.zeros, ...) at import: if it was imported before
# TRITON_INTERPRET=1 was set (e.g. through `import torch._dynamo` in a conftest), interpreted kernels
# cannot call them. Kernel tests then fail with this message instead of an obscure InterpreterError.
_INTERPRETER_BROKEN = not torch.cuda.is_available() and not isinstance(tl.zeros, InterpretedFunction)
_INTERPRETER_MSG = (
    "triton.language was imported before TRITON_INTERPRET=1 was set: set the variable in the root "
    "conftest.py before importing torch._dynamo / torch._inductor / triton"
)

# Triton 3.6's interpreter converts 1-element arrays to scalars (numpy warns; harmless with numpy < 2.4).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _act(name: str, h: torch.Tensor) -> torch.Tensor:
    return {"gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu, "silu": F.silu}[name](h)


def _dense_activation(x, w1, b1, units, activation, gated):
    """(B, S, F) post-activation of the whole MLP, the independent dense formula."""
    h = F.linear(x, w1, b1)
    if gated:
        return h[..., :units] * _act(activation, h[..., units:])
    return _act(activation, h)


def _random_indices(bsz, nb, units, k, *, device="cpu", sort=True):
    rows = []
    for _ in range(bsz * nb):
        sel = torch.randperm(units)[:k]
        rows.append(sel.sort().values if sort else sel)
    return torch.stack(rows).view(bsz, nb, k).to(torch.int32).to(device)


@dataclass(frozen=True)
class Case:
    bsz: int = 2
    seq: int = 150
    din: int = 48
    units: int = 40
    dout: int = 32
    block: int = 64
    k: int = 17
    gated: bool = False
    bias: bool = True
    activation: str = "gelu_tanh"
    w2_layout: str = "slice"  # "slice": column slice of a wider (Dout, F+8); "t": view of an (F, Dout) copy
    config: csm.ColumnSparseMlpConfig | None = None


def _make(case: Case, dtype, device):
    rows_w1 = 2 * case.units if case.gated else case.units
    x = torch.randn(case.bsz, case.seq, case.din, dtype=torch.float64)
    w1 = torch.randn(rows_w1, case.din, dtype=torch.float64) / case.din**0.5
    b1 = 0.5 * torch.randn(rows_w1, dtype=torch.float64) if case.bias else None
    w2 = torch.randn(case.dout, case.units, dtype=torch.float64) / case.units**0.5
    act = torch.randn(case.bsz, case.units, case.seq, dtype=torch.float64)
    out = torch.randn(case.bsz, case.seq, case.dout, dtype=torch.float64)
    nb = -(-case.seq // case.block)
    idx = _random_indices(case.bsz, nb, case.units, case.k, device=device)

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    def w2_view(t):
        if case.w2_layout == "t":
            return t.t().contiguous().t()
        wide = torch.zeros(t.shape[0], t.shape[1] + 8, dtype=t.dtype, device=t.device)
        wide[:, 8:] = t
        return wide[:, 8:]

    # Round the data to the test dtype once, so every variant sees the same values.
    x, w1, b1, w2, act, out = (cast(t) for t in (x, w1, b1, w2, act, out))
    return x, w1, b1, w2_view(w2), idx, act, out


def _assert_fa_rule(name, kernel, lowp, ref64, dtype):
    err = (kernel.double() - ref64).abs().max().item()
    err_lowp = (lowp.double() - ref64).abs().max().item()
    eps = torch.finfo(dtype).eps * max(1.0, ref64.abs().max().item())
    assert err <= 2 * err_lowp + eps, f"{name}: kernel err {err:.3g} > 2 * lowp {err_lowp:.3g} + {eps:.3g}"


def _run_and_check(case: Case, dtype, device=DEVICE):
    if _INTERPRETER_BROKEN:
        pytest.fail(_INTERPRETER_MSG)
    x, w1, b1, w2, idx, act, out = _make(case, dtype, device)
    kw = dict(activation=case.activation, gated=case.gated, block_size=case.block)
    a_k, o_k = act.clone(), out.clone()
    csm.column_sparse_mlp_delta(x, w1, b1, w2, idx, a_k, o_k, **kw, config=case.config)
    a_l, o_l = act.clone(), out.clone()
    csm.column_sparse_mlp_delta_ref(x, w1, b1, w2, idx, a_l, o_l, **kw, upcast=False)
    d = lambda t: None if t is None else t.double()
    a_r, o_r = act.double(), out.double()
    csm.column_sparse_mlp_delta_ref(d(x), d(w1), d(b1), d(w2), idx, a_r, o_r, **kw)

    assert torch.isfinite(o_k).all() and torch.isfinite(a_k).all()
    _assert_fa_rule("out_cache", o_k, o_l, o_r, dtype)
    _assert_fa_rule("act_cache", a_k, a_l, a_r, dtype)
    # Units a block did not select keep their cached activation bit for bit.
    touched = torch.zeros_like(act, dtype=torch.bool)
    for b in range(case.bsz):
        for m in range(idx.shape[1]):
            touched[b, idx[b, m].long(), m * case.block : (m + 1) * case.block] = True
    assert torch.equal(a_k[~touched], act[~touched])


# ---------------------------------------------------------------------------------------------------------
# The reference against independent formulas (fp64, CPU).


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("activation", csm.ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_ref_all_units_is_dense_mlp(gated, activation, bias):
    """k = F: the cached output becomes the dense MLP of the new input, the cache its activation."""
    bsz, seq, din, units, dout, block = 2, 11, 6, 5, 4, 4
    f64 = dict(dtype=torch.float64)
    w1 = torch.randn(2 * units if gated else units, din, **f64)
    b1 = torch.randn(w1.shape[0], **f64) if bias else None
    w2, b2 = torch.randn(dout, units, **f64), torch.randn(dout, **f64)
    x_old, x_new = torch.randn(bsz, seq, din, **f64), torch.randn(bsz, seq, din, **f64)
    a_old = _dense_activation(x_old, w1, b1, units, activation, gated)
    act = a_old.transpose(1, 2).contiguous()
    out = F.linear(a_old, w2, b2)
    idx = _random_indices(bsz, -(-seq // block), units, units, sort=False)
    csm.column_sparse_mlp_delta_ref(
        x_new, w1, b1, w2, idx, act, out, activation=activation, gated=gated, block_size=block
    )
    a_new = _dense_activation(x_new, w1, b1, units, activation, gated)
    torch.testing.assert_close(act, a_new.transpose(1, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, F.linear(a_new, w2, b2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gated", [False, True])
def test_ref_matches_loop_formula(gated):
    """A given selection: element-by-element loops over rows, selected units and outputs."""
    bsz, seq, din, units, dout, block, k = 2, 7, 3, 5, 4, 3, 2
    f64 = dict(dtype=torch.float64)
    w1 = torch.randn(2 * units if gated else units, din, **f64)
    b1 = torch.randn(w1.shape[0], **f64)
    w2 = torch.randn(dout, units, **f64)
    x = torch.randn(bsz, seq, din, **f64)
    act, out = torch.randn(bsz, units, seq, **f64), torch.randn(bsz, seq, dout, **f64)
    idx = _random_indices(bsz, -(-seq // block), units, k, sort=False)
    want_act, want_out = act.clone(), out.clone()
    for b in range(bsz):
        for r in range(seq):
            for j in idx[b, r // block].tolist():
                pre = sum(x[b, r, i] * w1[j, i] for i in range(din)) + b1[j]
                if gated:
                    gate = sum(x[b, r, i] * w1[units + j, i] for i in range(din)) + b1[units + j]
                    a = pre * F.silu(gate)
                else:
                    a = F.silu(pre)
                for d in range(dout):
                    want_out[b, r, d] += (a - act[b, j, r]) * w2[d, j]
                want_act[b, j, r] = a
    csm.column_sparse_mlp_delta_ref(
        x, w1, b1, w2, idx, act, out, activation="silu", gated=gated, block_size=block
    )
    torch.testing.assert_close(act, want_act, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# The Triton kernels against the reference.

_SMALL = csm.ColumnSparseMlpConfig(up_bm=64, up_bn=32, up_bk=16, down_bm=64, down_bn=32, down_bk=32)
KERNEL_CASES = {
    "base": Case(),
    "k1": Case(k=1),
    "kF": Case(k=40, w2_layout="t"),
    "gated_silu_nobias": Case(gated=True, bias=False, activation="silu"),
    "gated_gelu_t": Case(gated=True, activation="gelu", w2_layout="t", bsz=1),
    "erf_nobias": Case(activation="gelu", bias=False),
    "block128_ragged": Case(block=128, seq=130, bsz=1, units=24, k=9),
    "shared_block256": Case(block=256, seq=300, bsz=1, din=32, units=24, k=10),
    "small_tiles_uneven": Case(din=48, dout=48, config=_SMALL, k=33, gated=True, bsz=1),
    "cols_fastest": Case(config=csm.ColumnSparseMlpConfig(rows_fastest=False), bsz=1, seq=70),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_matches_ref(name, dtype):
    _run_and_check(KERNEL_CASES[name], dtype)


@pytest.mark.parametrize("name", ["base", "small_tiles_uneven"])
def test_kernel_out_copy_equals_updated_cache(name):
    """``out=``: the same kernel also writes the updated output there; the caches are as without it."""
    if _INTERPRETER_BROKEN:
        pytest.fail(_INTERPRETER_MSG)
    case = KERNEL_CASES[name]
    x, w1, b1, w2, idx, act, out = _make(case, torch.float32, DEVICE)
    kw = dict(activation=case.activation, gated=case.gated, block_size=case.block, config=case.config)
    a1, o1, a2, o2 = act.clone(), out.clone(), act.clone(), out.clone()
    copy = torch.full_like(out, float("nan"))
    csm.column_sparse_mlp_delta(x, w1, b1, w2, idx, a1, o1, **kw)
    csm.column_sparse_mlp_delta(x, w1, b1, w2, idx, a2, o2, **kw, out=copy)
    assert torch.equal(o1, o2) and torch.equal(a1, a2)
    assert torch.equal(copy, o2)
    with pytest.raises(ValueError, match="other than out_cache"):
        csm.column_sparse_mlp_delta(x, w1, b1, w2, idx, a2, o2, **kw, out=o2)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        csm.column_sparse_mlp_delta(x, w1, b1, w2, idx, a2, o2, **kw, out=copy[:, :-1])


def test_kernel_bf16_upcast_on_cpu():
    """Off CUDA the kernel upcasts bf16 dot operands (the interpreter's bf16 tl.dot is wrong)."""
    if DEVICE == "cuda":
        pytest.skip("CPU interpreter path")
    _run_and_check(Case(gated=True, bsz=1), torch.bfloat16)


def test_kernel_validates_inputs():
    x, w1, b1, w2, idx, act, out = _make(Case(), torch.float32, DEVICE)
    kw = dict(activation="gelu_tanh", gated=False, block_size=64)
    bad = [
        (dict(indices=idx.long()), "indices must be int32"),
        (dict(act_cache=act[:, :, :-1]), "act_cache must be contiguous"),
        (dict(out_cache=out.transpose(0, 1).contiguous().transpose(0, 1)), "out_cache must be contiguous"),
        (dict(w1=w1[:-1]), "w1 must be"),
        (dict(b1=b1[:-1]), "b1 must be"),
        (dict(activation="relu"), "activation must be one of"),
        (dict(block_size=32), "multiple of 64"),
        (dict(block_size=128), "indices must be int32"),
    ]
    args = dict(x=x, w1=w1, b1=b1, w2=w2, indices=idx, act_cache=act, out_cache=out)
    for override, match in bad:
        call = {**args, **kw, **override}
        with pytest.raises(ValueError, match=match):
            csm.column_sparse_mlp_delta(
                call["x"], call["w1"], call["b1"], call["w2"], call["indices"], call["act_cache"],
                call["out_cache"], activation=call["activation"], gated=call["gated"],
                block_size=call["block_size"],
            )


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_default_tiles_fit_shared_memory(gated, dtype):
    """The interpreter has no shared-memory limit: check the default tiles' pipeline buffers here."""
    cfg = csm.default_config(gated, dtype)
    up, down = csm.pipeline_smem_bytes(cfg, gated, dtype)
    assert max(up, down) <= 200 * 1024, (cfg, up, down)


def test_supports_reasons():
    x = torch.randn(1, 8, 32, device=DEVICE)
    assert csm.supports(x, torch.randn(8, 32, device=DEVICE), torch.randn(16, 8, device=DEVICE)) is None
    assert "multiples of 16" in csm.supports(x[..., :24], torch.randn(8, 24, device=DEVICE),
                                             torch.randn(16, 8, device=DEVICE))
    assert "mixed dtypes" in csm.supports(x, torch.randn(8, 32, device=DEVICE).half(),
                                          torch.randn(16, 8, device=DEVICE))
    assert "dtype" in csm.supports(x.double(), torch.randn(8, 32, device=DEVICE).double(),
                                   torch.randn(16, 8, device=DEVICE).double())


# ---------------------------------------------------------------------------------------------------------
# GPU: bf16 (tensor cores) on larger shapes, both W2 layouts, default tiles.

GPU_CASES = {
    "plain_slice": Case(bsz=2, seq=1000, din=256, units=1024, dout=384, block=128, k=320),
    "plain_t": Case(bsz=1, seq=700, din=256, units=1024, dout=256, block=128, k=300, w2_layout="t"),
    "gated_silu": Case(bsz=2, seq=513, din=128, units=512, dout=128, block=128, k=160, gated=True,
                       activation="silu"),
    "block64_erf": Case(bsz=1, seq=333, din=128, units=256, dout=128, block=64, k=256, activation="gelu"),
    "shared_512": Case(bsz=1, seq=1100, din=128, units=512, dout=128, block=512, k=128,
                       config=csm.ColumnSparseMlpConfig(up_bm=256, down_bm=256)),
}
# Every case in bf16 (the production dtype); fp16 and fp32 once each (each combination compiles anew).
GPU_RUNS = [(name, torch.bfloat16) for name in GPU_CASES] + [
    ("plain_t", torch.float16),
    ("gated_silu", torch.float32),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("name", "dtype"), GPU_RUNS, ids=[f"{n}-{str(d)[6:]}" for n, d in GPU_RUNS])
def test_kernel_matches_ref_gpu(name, dtype):
    _run_and_check(GPU_CASES[name], dtype, "cuda")
