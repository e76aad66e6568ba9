"""The low-overhead launch helper (kernels/_launch.py) and the per-signature plan caches of the launchers.

CPU: the key logic against Triton's own specialization, the argument ordering, and the whole fast-path
flow with a stub kernel whose "compiled kernel" records its launches (the real fast path needs CUDA);
plan reuse gives bit-identical results under the interpreter. GPU (``gpu`` marker): the fast path gives
bit-identical outputs to the normal path for every launcher, with Triton's specialization re-checked on
every fast launch (``_launch.CHECK``).
"""

from __future__ import annotations

import itertools
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    # Read when @triton.jit decorates, so before the kernel modules are imported (compile-notes 6.2).
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from chipmunk_compile.kernels import _launch  # noqa: E402
from chipmunk_compile.kernels import attention_colsum as ac  # noqa: E402
from chipmunk_compile.kernels import column_sparse_attention as csa  # noqa: E402
from chipmunk_compile.kernels import column_sparse_mlp as csm  # noqa: E402
from chipmunk_compile.kernels import select_columns as sc  # noqa: E402
from kernel_testing import DEVICE, interpreted  # noqa: E402  (tests/ is on sys.path)
from triton.runtime.jit import JITFunction  # noqa: E402

csa = interpreted(csa, "_column_sparse_attention_kernel")
ac = interpreted(ac, "_attention_colsum_kernel")
csm = interpreted(csm, "_column_sparse_mlp_up_kernel")
sc = interpreted(sc, "_select_topk_random_kernel")

# Triton 3.6's interpreter converts 1-element arrays to scalars (numpy warns; harmless with numpy < 2.4).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _scale(x_ptr, out_ptr, n, stride, BLOCK: tl.constexpr, SCALE: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs * stride, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, x * SCALE, mask=offs < n)


def _interleaved(x_ptr, BLOCK: tl.constexpr, n):
    tl.store(x_ptr + tl.arange(0, BLOCK), 0.0, mask=tl.arange(0, BLOCK) < n)


_scale_kernel = triton.jit(_scale)  # interpreted on CPU


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------------
# Parameter layout and argument order


def test_param_layout_of_jit_and_interpreted_kernels(monkeypatch):
    for kernel in (JITFunction(_scale), _scale_kernel):
        layout = _launch.param_layout(kernel)
        assert layout == _launch.ParamLayout(
            ("x_ptr", "out_ptr", "n", "stride", "BLOCK", "SCALE"), 4, ("BLOCK", "SCALE")
        ), type(kernel)
    assert _launch.param_layout(JITFunction(_interleaved)) is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _launch.fast_path_reason(JITFunction(_scale)) is None
    assert "constexpr parameter precedes" in _launch.fast_path_reason(JITFunction(_interleaved))


def test_ordered_args_puts_constexprs_last_in_declaration_order():
    layout = _launch.param_layout(JITFunction(_scale))
    x, out = torch.zeros(4), torch.zeros(4)
    # keyword order does not matter: the values follow the declaration (BLOCK, then SCALE)
    assert _launch.ordered_args(layout, (x, out, 4, 1), {"SCALE": 2.0, "BLOCK": 16}) == (x, out, 4, 1, 16, 2.0)
    with pytest.raises(ValueError, match="expected 4 positional"):
        _launch.ordered_args(layout, (x, out, 4), {"SCALE": 2.0, "BLOCK": 16})
    with pytest.raises(ValueError, match=r"missing \['SCALE'\], unknown \['SCAL'\]"):
        _launch.ordered_args(layout, (x, out, 4, 1), {"SCAL": 2.0, "BLOCK": 16})


def test_every_launcher_kernel_allows_the_fast_path():
    # The real kernels (JITFunction on GPU, interpreted here): constexprs after all runtime parameters.
    kernels = [
        csm._column_sparse_mlp_up_kernel, csm._column_sparse_mlp_down_kernel,
        csa._column_sparse_attention_kernel, ac._attention_fwd_kernel, ac._attention_colsum_kernel,
        sc._select_topk_random_kernel,
    ]  # fmt: skip
    for kernel in kernels:
        assert _launch.param_layout(kernel) is not None, kernel


# ---------------------------------------------------------------------------------------------------------
# The key


def _native_spec():
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:  # another Triton: nothing to compare with
        pytest.skip("triton._C.libtriton.native_specialize_impl not available")
    return lambda a: native_specialize_impl(BaseBackend, a, False, True, True)


def _probe_args():
    buf = torch.zeros(64, dtype=torch.float32)
    assert buf.data_ptr() % 16 == 0
    return [
        0, 1, 2, 15, 16, 17, 32, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**40, -1, -16, 2**63,
        0.5, 1.0, True, False, None,
        buf, buf[1:], buf[4:], buf.half(), buf.half()[8:], buf.bfloat16(), buf.int(),
    ]  # fmt: skip


def test_arg_spec_separates_everything_triton_specializes_on():
    native = _native_spec()
    args = _probe_args()
    for a, b in itertools.combinations(args, 2):
        if native(a) != native(b):
            assert _launch.arg_spec(a) != _launch.arg_spec(b), (a, b, native(a), native(b))


def test_launch_key_without_signature_follows_every_argument():
    native = _native_spec()
    x, out = torch.zeros(64), torch.zeros(64)
    base = (x, out, 32, 16)
    keys, specs = {}, {}
    for n, stride in itertools.product((1, 2, 16, 17, 2**31), (1, 16, 48)):
        for xt in (x, x[1:], x.half(), x[4:]):
            args = (xt, out, n, stride)
            spec = tuple(native(a) for a in args)
            key = _launch.launch_key(None, args, {"BLOCK": 16}, 4, 3)
            assert keys.setdefault(spec, key) == key, "one specialization, one key"
            assert specs.setdefault(key, spec) == spec, f"two specializations share key {key}"
    # constexpr values, num_warps and num_stages are part of the key; the signature replaces the scalars
    k = _launch.launch_key(None, base, {"BLOCK": 16}, 4, 3)
    assert k == _launch.launch_key(None, (x, out, 64, 32), {"BLOCK": 16}, 4, 3)  # same classes of ints
    for other in (
        _launch.launch_key(None, base, {"BLOCK": 32}, 4, 3),
        _launch.launch_key(None, base, {"BLOCK": 16}, 8, 3),
        _launch.launch_key(None, base, {"BLOCK": 16}, 4, 2),
        _launch.launch_key(None, base, {"BLOCK": 16}, None, 3),
    ):
        assert other != k
    assert _launch.launch_key(("sig",), base, {"BLOCK": 16}, 4, 3) == _launch.launch_key(
        ("sig",), (x, out, 17, 1), {"BLOCK": 16}, 4, 3
    ), "with a signature the caller vouches for the scalars"


def test_tensor_key_follows_dtype_alignment_and_device():
    x = torch.zeros(64)
    y = torch.ones(64)
    args = (x, 3, y)
    assert _launch.tensor_key(args, (0, 2), 0) == _launch.tensor_key((y, 5, x), (0, 2), 0)  # data does not matter
    assert _launch.tensor_key(args, (0, 2), 0) != _launch.tensor_key((x[1:], 3, y), (0, 2), 0)  # 4-byte offset
    assert _launch.tensor_key(args, (0, 2), 0) == _launch.tensor_key((x[4:], 3, y), (0, 2), 0)  # 16-byte offset
    assert _launch.tensor_key(args, (0, 2), 0) != _launch.tensor_key((x.half(), 3, y), (0, 2), 0)
    assert _launch.tensor_key(args, (0, 2), 0) != _launch.tensor_key(args, (0, 2), 1)


# ---------------------------------------------------------------------------------------------------------
# The launch flow, with a stub kernel (no GPU needed)


class _StubKernel(JITFunction):
    """A JITFunction whose normal path records its calls and returns a fake CompiledKernel."""

    def __init__(self, fn):
        super().__init__(fn)
        self.normal_calls: list = []
        self.fast_calls: list = []
        self.fail = False

    def run(self, *args, grid, warmup, **kwargs):
        self.normal_calls.append((grid, args, kwargs))
        return SimpleNamespace(run=self._launch, function="function", packed_metadata="metadata")

    def _launch(self, *launch_args):
        if self.fail:
            raise TypeError("launcher: wrong argument types")
        self.fast_calls.append(launch_args)


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read at the launcher's first launch
    kernel = _StubKernel(_scale)
    launcher = _launch.CachedLauncher(kernel)
    launcher._device_fn = lambda: 0  # the CUDA driver's, where there is one
    launcher._stream_fn = lambda device: 1234
    return kernel, launcher


def test_fast_path_launches_with_the_arguments_in_declaration_order(stub):
    kernel, launcher = stub
    x, out = torch.zeros(64), torch.zeros(64)
    consts = {"SCALE": 2.0, "BLOCK": 64}
    launcher((1, 2), (x, out, 64, 1), consts, signature=("s",), num_warps=4, num_stages=2)
    assert len(kernel.normal_calls) == 1 and not kernel.fast_calls
    grid, args, kwargs = kernel.normal_calls[0]
    assert grid == (1, 2) and args == (x, out, 64, 1)
    assert kwargs == {"SCALE": 2.0, "BLOCK": 64, "num_warps": 4, "num_stages": 2}

    y = torch.ones(64)
    launcher((3, 2), (y, out, 64, 1), consts, signature=("s",), num_warps=4, num_stages=2)
    assert len(kernel.normal_calls) == 1
    assert kernel.fast_calls == [(3, 2, 1, 1234, "function", "metadata", None, None, None, y, out, 64, 1, 64, 2.0)]
    assert (launcher.fast_launches, launcher.normal_launches) == (1, 1)


@pytest.mark.parametrize(
    "change",
    ["misaligned pointer", "dtype", "signature", "constexpr", "num_warps", "num_stages"],
)
def test_a_new_key_takes_the_normal_path_once(stub, change):
    kernel, launcher = stub
    x, out = torch.zeros(64), torch.zeros(64)
    base = dict(args=(x, out, 64, 1), consts={"SCALE": 2.0, "BLOCK": 64}, sig=("s",), warps=4, stages=2)
    changed = dict(base)
    if change == "misaligned pointer":
        changed["args"] = (x[1:], out, 64, 1)
    elif change == "dtype":
        changed["args"] = (x.half(), out, 64, 1)
    elif change == "signature":
        changed["sig"] = ("t",)
    elif change == "constexpr":
        changed["consts"] = {"SCALE": 3.0, "BLOCK": 64}
    elif change == "num_warps":
        changed["warps"] = 8
    else:
        changed["stages"] = 3

    def call(c):
        launcher((1,), c["args"], c["consts"], signature=c["sig"], num_warps=c["warps"], num_stages=c["stages"])

    call(base)
    call(base)
    assert (len(kernel.normal_calls), len(kernel.fast_calls)) == (1, 1)
    call(changed)
    assert (len(kernel.normal_calls), len(kernel.fast_calls)) == (2, 1), "a new key compiles/launches normally"
    call(changed)
    call(base)
    assert (len(kernel.normal_calls), len(kernel.fast_calls)) == (2, 3), "both keys are cached"


def test_hooks_dynamo_disabled_launcher_and_failures_take_the_normal_path(stub):
    kernel, launcher = stub
    x, out = torch.zeros(64), torch.zeros(64)

    def call():
        launcher((1,), (x, out, 64, 1), {"SCALE": 2.0, "BLOCK": 64}, signature=("s",))

    call()
    call()
    assert (len(kernel.normal_calls), len(kernel.fast_calls)) == (1, 1)

    hook = lambda metadata: None  # noqa: E731
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert _launch.hooks_active()
        call()
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert not _launch.hooks_active()
    assert (len(kernel.normal_calls), len(kernel.fast_calls)) == (2, 1), "a launch hook must see the launch"

    launcher.enabled = False
    call()
    launcher.enabled = True
    assert (len(kernel.normal_calls), len(kernel.fast_calls)) == (3, 1)

    with pytest.MonkeyPatch.context() as mp:  # Dynamo traces the normal path
        mp.setattr(torch.compiler, "is_compiling", lambda: True)
        call()
    assert (len(kernel.normal_calls), len(kernel.fast_calls)) == (4, 1)
    call()
    assert (len(kernel.normal_calls), len(kernel.fast_calls)) == (4, 2)

    kernel.fail = True  # e.g. another Triton's launcher: the fast path gives up on this key
    call()
    kernel.fail = False
    call()
    assert (len(kernel.normal_calls), len(kernel.fast_calls)) == (6, 2)

    launcher((1,), (x, out, 64, 1), {"SCALE": 2.0, "BLOCK": 64}, signature=["unhashable"])
    assert len(kernel.normal_calls) == 7
    launcher(lambda meta: (1,), (x, out, 64, 1), {"SCALE": 2.0, "BLOCK": 64}, signature=("s2",))
    launcher(lambda meta: (1,), (x, out, 64, 1), {"SCALE": 2.0, "BLOCK": 64}, signature=("s2",))
    assert len(kernel.normal_calls) == 9, "callable grids always take the normal path"


def test_constexpr_mismatch_never_takes_the_fast_path(stub):
    kernel, launcher = stub
    x, out = torch.zeros(64), torch.zeros(64)
    for _ in range(3):  # SCALE missing: ordered_args cannot place the values, so the key is never cached
        launcher((1,), (x, out, 64, 1), {"BLOCK": 64}, signature=("s",))
    assert (len(kernel.normal_calls), len(kernel.fast_calls)) == (3, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's path")
def test_interpreter_always_takes_the_normal_path():
    launcher = _launch.CachedLauncher(_scale_kernel)
    x = torch.arange(10, dtype=torch.float32)
    for scale in (2.0, 3.0, 3.0):
        out = torch.zeros(10)
        launcher((1,), (x, out, 10, 1), {"BLOCK": 16, "SCALE": scale}, signature=("s",))
        assert torch.equal(out, x * scale)
    assert (launcher.normal_launches, launcher.fast_launches) == (3, 0)
    assert _launch.fast_path_reason(_scale_kernel) == "TRITON_INTERPRET=1"


# ---------------------------------------------------------------------------------------------------------
# Plan caches: a reused plan gives the same bits as a fresh one (per-call scalars are not cached)


def _mlp_inputs(dtype=torch.float32, device=DEVICE, bsz=1, seq=128, din=32, units=64, dout=32, k=16, block=64):
    x = torch.randn(bsz, seq, din, dtype=dtype, device=device)
    w1 = torch.randn(units, din, dtype=dtype, device=device) / din**0.5
    b1 = torch.randn(units, dtype=dtype, device=device)
    w2 = (torch.randn(units, dout, dtype=dtype, device=device) / units**0.5).t()  # the fast layout
    nb = -(-seq // block)
    idx = torch.stack([torch.randperm(units)[:k].sort().values for _ in range(bsz * nb)])
    idx = idx.view(bsz, nb, k).to(torch.int32).to(device)
    act = torch.randn(bsz, units, seq, dtype=dtype, device=device)
    out = torch.randn(bsz, seq, dout, dtype=dtype, device=device)
    return x, w1, b1, w2, idx, act, out


def _run_mlp(inputs, gated=False):
    x, w1, b1, w2, idx, act, out = inputs
    a, o = act.clone(), out.clone()
    csm.column_sparse_mlp_delta(x, w1, b1, w2, idx, a, o, activation="gelu_tanh", gated=gated, block_size=64)
    return a, o


def _attention_inputs(dtype=torch.float32, device=DEVICE, B=1, H=2, S=100, D=64, group=64, kcap=24, bias=False):
    q, k, v, base = (torch.randn(B, S, H, D, dtype=dtype, device=device).permute(0, 2, 1, 3) for _ in range(4))
    G = -(-S // group)
    idx = torch.stack([torch.randperm(S)[:kcap].sort().values for _ in range(B * H * G)])
    idx = idx.view(B, H, G, kcap).to(torch.int32).to(device)
    cnt = torch.randint(0, kcap + 1, (B, H, G), dtype=torch.int32, device=device)
    key_bias = torch.randn(B, 1, S, device=device) if bias else None
    return q, k, v, idx, cnt, base, key_bias


def _run_attention(inputs, scale, sign):
    q, k, v, idx, cnt, base, key_bias = inputs
    return csa.column_sparse_attention(q, k, v, idx, cnt, scale=scale, group_size=64, base=base, sign=sign,
                                       key_bias=key_bias)


def _counting(monkeypatch, module, name):
    calls = []
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or fn(*a, **kw))
    return calls


def test_mlp_plan_reuse_is_bit_identical(monkeypatch):
    for cache in (csm._DELTA_PLANS, csm._UP_PLANS, csm._DOWN_PLANS):
        cache.clear()
    plans = _counting(monkeypatch, csm, "_delta_plan")
    first, second = _mlp_inputs(), _mlp_inputs()
    _run_mlp(first)
    reused = _run_mlp(second)
    assert len(plans) == 1, "the second call with the same signature reuses the plan"
    csm._DELTA_PLANS.clear()
    csm._UP_PLANS.clear()
    csm._DOWN_PLANS.clear()
    fresh = _run_mlp(second)
    assert len(plans) == 2
    assert all(torch.equal(r, f) for r, f in zip(reused, fresh))


def test_attention_plan_reuse_is_bit_identical(monkeypatch):
    csa._PLANS.clear()
    plans = _counting(monkeypatch, csa, "_plan")
    first, second = _attention_inputs(bias=True), _attention_inputs(bias=True)
    _run_attention(first, 0.125, 1.0)
    reused = _run_attention(second, 0.2, -1.0)  # scale and sign are per call, not part of the plan
    assert len(plans) == 1
    csa._PLANS.clear()
    fresh = _run_attention(second, 0.2, -1.0)
    assert torch.equal(reused, fresh)
    # and the plan still gives the right answer for the new scalars
    q, k, v, idx, cnt, base, key_bias = second
    ref = csa.column_sparse_attention_ref(q, k, v, idx, cnt, scale=0.2, group_size=64, base=base, sign=-1.0,
                                          key_bias=key_bias)
    torch.testing.assert_close(reused, ref, atol=1e-4, rtol=1e-4)


def test_colsum_and_selection_plan_reuse_is_bit_identical(monkeypatch):
    ac._PLANS.clear()
    plans = _counting(monkeypatch, ac, "_plan")
    qs = [_attention_inputs(S=70, bias=True) for _ in range(2)]

    def colsum(inputs, scale):
        q, k, v, _, _, _, key_bias = inputs
        return ac.attention_with_colsum(q, k, v, scale=scale, group_size=64, key_bias=key_bias)

    colsum(qs[0], 0.1)
    reused = colsum(qs[1], 0.15)
    assert len(plans) == 1
    ac._PLANS.clear()
    assert all(torch.equal(r, f) for r, f in zip(reused, colsum(qs[1], 0.15)))

    scores = torch.randn(3, 300, device=DEVICE)
    a = sc.select_topk_random(scores, 20, 10, seed=1)
    b = sc.select_topk_random(scores, 20, 10, seed=2)  # the seed is per call
    sc._PLANS.clear()
    assert torch.equal(b, sc.select_topk_random(scores, 20, 10, seed=2))
    assert torch.equal(a, sc.select_columns_ref(scores, 20, 10, seed=1).to(a.device))
    assert torch.equal(b, sc.select_columns_ref(scores, 20, 10, seed=2).to(b.device))


def test_validation_still_runs_for_a_new_signature():
    x, w1, b1, w2, idx, act, out = _mlp_inputs()
    _run_mlp((x, w1, b1, w2, idx, act, out))
    with pytest.raises(ValueError, match="block_size"):
        csm.column_sparse_mlp_delta(x, w1, b1, w2, idx, act, out, activation="gelu_tanh", gated=False,
                                    block_size=96)
    q, k, v, idx, cnt, base, _ = _attention_inputs()
    with pytest.raises(ValueError, match="group_size"):
        csa.column_sparse_attention(q, k, v, idx, cnt, scale=0.1, group_size=32)


# ---------------------------------------------------------------------------------------------------------
# GPU: the fast path against the normal path, bit for bit


def _launchers():
    return [
        csm._launch_up_kernel, csm._launch_down_kernel, csa._launch_kernel, ac._launch_fwd, ac._launch_colsum,
        sc._launch_kernel,
    ]


def _both_paths(fn, launchers):
    """(normal-path result, fast-path result) of ``fn``; the fast path must really be taken."""
    for launcher in launchers:
        launcher.enabled = False
    try:
        normal = fn()
    finally:
        for launcher in launchers:
            launcher.enabled = True
    fn()  # compiles (or finds) the kernel through the normal path and caches it
    before = [launcher.fast_launches for launcher in launchers]
    fast = fn()
    torch.cuda.synchronize()
    assert all(launcher.fast_launches > b for launcher, b in zip(launchers, before)), "fast path not taken"
    return normal, fast


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (so NaNs and signed zeros compare too)."""
    return t.contiguous().view(torch.uint8)


def _assert_bit_identical(normal, fast):
    normal = normal if isinstance(normal, tuple) else (normal,)
    fast = fast if isinstance(fast, tuple) else (fast,)
    for n, f in zip(normal, fast, strict=True):
        assert n.dtype == f.dtype and n.shape == f.shape
        assert torch.equal(_bits(n), _bits(f)), "fast path differs from the normal path"


@pytest.fixture
def check_mode(monkeypatch):
    monkeypatch.setattr(_launch, "CHECK", True)  # re-derive Triton's specialization on every fast launch


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gated", [False, True])
def test_gpu_mlp_fast_path_is_bit_identical(check_mode, dtype, gated):
    units = 256
    inputs = _mlp_inputs(dtype, "cuda", bsz=2, seq=300, din=128, units=units, dout=192, k=70)
    if gated:
        x, w1, b1, w2, idx, act, out = inputs
        w1 = torch.cat([w1, torch.randn_like(w1)])
        b1 = torch.cat([b1, torch.randn_like(b1)])
        inputs = (x, w1, b1, w2, idx, act, out)
    normal, fast = _both_paths(lambda: _run_mlp(inputs, gated), [csm._launch_up_kernel, csm._launch_down_kernel])
    _assert_bit_identical(normal, fast)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_gpu_attention_fast_path_is_bit_identical(check_mode, dtype, bias):
    inputs = _attention_inputs(dtype, "cuda", B=2, H=4, S=1000, D=128, kcap=200, bias=bias)
    normal, fast = _both_paths(lambda: _run_attention(inputs, 0.088, -1.0), [csa._launch_kernel])
    _assert_bit_identical(normal, fast)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("bias", [False, True])
def test_gpu_colsum_and_selection_fast_path_is_bit_identical(check_mode, bias):
    q, k, v, _, _, _, key_bias = _attention_inputs(torch.bfloat16, "cuda", B=1, H=4, S=700, D=128, bias=bias)
    cfg = ac.ColsumConfig(dense_pass="triton")  # the Triton forward too, not only cuDNN
    launchers = [ac._launch_fwd, ac._launch_colsum]
    normal, fast = _both_paths(
        lambda: ac.attention_with_colsum(q, k, v, scale=0.088, group_size=128, key_bias=key_bias, config=cfg),
        launchers,
    )
    _assert_bit_identical(normal, fast)
    scores = torch.randn(24, 4352, device="cuda")
    normal, fast = _both_paths(lambda: sc.select_topk_random(scores, 400, 50, seed=5), [sc._launch_kernel])
    _assert_bit_identical(normal, fast)


@pytest.mark.gpu
@requires_cuda
def test_gpu_fast_path_honours_the_current_stream_and_alignment(check_mode):
    inputs = _attention_inputs(torch.bfloat16, "cuda", B=1, H=2, S=512, D=64, kcap=64)
    normal, _ = _both_paths(lambda: _run_attention(inputs, 0.125, 1.0), [csa._launch_kernel])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = _run_attention(inputs, 0.125, 1.0)
    torch.cuda.current_stream().wait_stream(side)
    _assert_bit_identical(normal, on_side)
    # a q whose storage starts 2 elements in: another pointer alignment, so another compiled kernel
    q, k, v, idx, cnt, base, key_bias = inputs
    q_off = torch.empty(q.numel() + 2, dtype=q.dtype, device="cuda")[2:].view(1, 512, 2, 64).permute(0, 2, 1, 3)
    q_off.copy_(q)
    shifted = (q_off, k, v, idx, cnt, base, key_bias)
    normal_s, fast_s = _both_paths(lambda: _run_attention(shifted, 0.125, 1.0), [csa._launch_kernel])
    _assert_bit_identical(normal_s, fast_s)
