"""Every Triton kernel compiles for an H100 (sm_90), on a machine without a GPU.

The CPU suite runs the kernels under ``TRITON_INTERPRET=1``, which accepts code the CUDA compiler rejects
(a ``tl.constexpr`` assigned twice inside ``tl.static_range`` ran fine in the interpreter and failed to
compile on the H100). Here each public kernel entry point runs on CPU tensors with its launches recorded
instead of executed; each recorded launch (its argument dtypes, constexprs, warps and stages, as the GPU
would get them) is then compiled by Triton's CUDA backend for sm_90 down to a cubin with the ``ptxas`` the
Triton wheel ships, with the specializations Triton's launcher gives such arguments on a GPU (without the
alignment hints nothing is software-pipelined), and ``ptxas -v`` must not report serialized wgmma instructions
(warning C7515: a second, pipelined loop over the partial last chunk of the attention kernels made ptxas
serialize the main loop's wgmmas, 4-13% of their time on an H100). Nothing runs, so the outputs are not checked
here (the other kernel tests do that).

The kernels must be real ``JITFunction``s, which they are only when imported without the interpreter, so
each kind of kernel is compiled in a fresh process (``python test_compile_hopper.py attention|mlp|selection``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

if __name__ == "__main__":  # the child: import the kernels compiled, then let their wrappers accept CPU tensors
    os.environ.pop("TRITON_INTERPRET", None)

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from chipmunk_compile.kernels import _launch  # noqa: E402
from chipmunk_compile.kernels import attention_colsum as colsum  # noqa: E402
from chipmunk_compile.kernels import column_sparse_attention as csa  # noqa: E402
from chipmunk_compile.kernels import column_sparse_mlp as csm  # noqa: E402
from chipmunk_compile.kernels import mlp_dense_cache as dense  # noqa: E402
from chipmunk_compile.kernels import select_columns as sc  # noqa: E402
from chipmunk_compile.kernels import select_units as su  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
_PTXAS = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
_TRITON_DTYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1",
}  # fmt: skip


_CALLS: list[tuple] = []


def _record(self, grid, args, constexprs, *, signature=None, num_warps=None, num_stages=None):
    """Stands in for CachedLauncher.__call__ in the child: record (kernel, args, constexprs, options)."""
    options = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
    _CALLS.append((self.kernel, tuple(args), dict(constexprs), options))


def _compile(kernel, args, constexprs, options) -> None:
    """Compile one recorded launch for sm_90 (raises what the CUDA compiler raises), with the specializations
    Triton's launcher would give these arguments on a GPU (16-byte aligned pointers and multiples of 16 as
    such, integers equal to 1 as constants: without them no load is software-pipelined); then fail if
    ``ptxas`` reports serialized wgmma instructions (warning C7515, a silent 5-15% loss)."""
    jit = kernel
    assert isinstance(jit, triton.runtime.jit.JITFunction), f"{kernel!r} was imported under the interpreter"
    params = [p for p in jit.params if not p.is_constexpr]
    runtime = [p.name for p in params]
    assert len(runtime) == len(args), f"{jit.__name__}: {len(args)} arguments for {runtime}"
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, (param, name, value) in enumerate(zip(params, runtime, args)):
        if param.do_not_specialize and isinstance(value, int) and not isinstance(value, bool):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int) and value == 1:
            signature[name] = "constexpr"
            consts[name] = 1
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    if "UPCAST" in consts:
        consts["UPCAST"] = False  # the interpreter's bf16 work-around; CUDA compiles the bf16 tl.dot
    for p in jit.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            assert p.name in consts, f"{jit.__name__}: constexpr {p.name} not given"
    src = triton.compiler.ASTSource(fn=jit, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=HOPPER, options=options)
    assert compiled.asm.get("cubin"), f"{jit.__name__}: no cubin"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        run = subprocess.run([_PTXAS, "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "C7515" not in run.stderr, f"{jit.__name__} {constexprs} {options}: serialized wgmma:\n{run.stderr[-1500:]}"


def _compile_all() -> int:
    assert _CALLS, "nothing was launched"
    seen = set()
    for kernel, args, constexprs, options in _CALLS:
        key = (id(kernel), tuple(sorted(constexprs.items())), tuple(sorted(options.items())),
               tuple(a.dtype if isinstance(a, torch.Tensor) else type(a) for a in args))  # fmt: skip
        if key not in seen:
            seen.add(key)
            _compile(kernel, args, constexprs, options)
    return len(seen)


def _attention(dtype, head_dim):
    q, k, v = (torch.zeros(1, 300, 2, head_dim, dtype=dtype).transpose(1, 2) for _ in range(3))
    groups = -(-300 // 128)
    idx = torch.zeros(1, 2, groups, 64, dtype=torch.int32)
    counts = torch.full((1, 2, groups), 64, dtype=torch.int32)
    bias = torch.zeros(1, 1, 300)
    csa.column_sparse_attention(q, k, v, idx, counts, scale=0.1, group_size=128, key_bias=bias, base=q, sign=-1.0)
    csa.column_sparse_attention(q, k, v, idx[:, :, :2].contiguous(), counts[:, :, :2].contiguous(), scale=0.1,
                                group_size=192)
    colsum.attention_with_colsum(q, k, v, scale=0.1, group_size=128, key_bias=bias)
    # 2048 or more index slots per group: the default configuration for long sequences (64-key chunks)
    long_idx = torch.zeros(1, 2, groups, 2048, dtype=torch.int32)
    csa.column_sparse_attention(q, k, v, long_idx, counts, scale=0.1, group_size=128, base=q)


def _mlp(dtype, gated):
    s, din, f, dout = 200, 64, 256, 96
    x = torch.zeros(1, s, din, dtype=dtype)
    w1 = torch.zeros(2 * f if gated else f, din, dtype=dtype)
    b1 = torch.zeros(w1.shape[0], dtype=dtype)
    w2t = torch.zeros(f, dout, dtype=dtype)
    idx = torch.zeros(1, 2, 128, dtype=torch.int32)
    act = torch.zeros(1, f, s, dtype=dtype)
    out = torch.zeros(1, s, dout, dtype=dtype)
    csm.column_sparse_mlp_delta(x, w1, b1, w2t.t(), idx, act, out, activation="gelu_tanh", gated=gated,
                                block_size=128, out=torch.empty_like(out))
    dense.dense_activation_cache(torch.zeros(1, s, w1.shape[0], dtype=dtype), activation="silu", gated=gated,
                                 block=128)


def _selection(bm_dtype):
    sc.select_topk_random(torch.zeros(34, 12288), 3686, 430, seed=1)
    sc.select_topk_random(torch.zeros(3, 100), 10, 0, seed=1)
    for gated in (False, True):
        width = 2 * 12288 if gated else 12288
        su.select_units_drift(torch.zeros(1, 34, width, dtype=bm_dtype), torch.zeros(1, 34, width), 3686, 666, 3,
                              gated=gated)


_DT = (torch.bfloat16, torch.float16, torch.float32)
# one child process per kind (importing torch costs seconds): every dtype and variant the wrappers launch
CASES = {
    "attention": lambda: [_attention(d, hd) for d in _DT for hd in (64, 128)],
    "mlp": lambda: [_mlp(d, gated) for d in _DT for gated in (False, True)],
    "selection": lambda: [_selection(d) for d in (torch.float32, torch.bfloat16)],
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite compiles and runs the kernels for real")
@pytest.mark.parametrize("case", CASES)
def test_kernels_compile_for_sm90(case):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, f"{case}:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    assert "compiled" in run.stdout


if __name__ == "__main__":
    # wrappers check for CUDA tensors unless the interpreter is on: on now, after the kernels were imported
    os.environ["TRITON_INTERPRET"] = "1"
    triton.knobs.runtime.interpret = True
    _launch.CachedLauncher.__call__ = _record
    CASES[sys.argv[1]]()
    print(f"{sys.argv[1]}: compiled {_compile_all()} kernel variants for sm_90")
