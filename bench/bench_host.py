"""Host time of one sparse-step op call, split into its layers, on CUDA.

    python bench/bench_host.py

A denoising step whose host time exceeds its GPU time runs at the host's pace: on the FLUX.1-dev
architecture a chipmunk step enqueues 133 op calls, so every 100 µs per call is 13 ms per step. Each row is
the host time per call (``time.perf_counter`` around 200 calls without a sync, after a warm-up and a sync),
from the whole ``torch.ops.chipmunk.*`` call down to the bare kernel launches, so the differences say
where the time goes. Prints a table; no CSV (these are diagnostics, not results).

Default shapes are small (S=512) so that no row waits for the GPU: at FLUX shapes (``--flux``) a loop of
kernels that take longer on the GPU than to enqueue reads the GPU time, not the host time (the first H100
run, bench/results/host_NVIDIA-H100_2026-11-27.txt, was made that way).
"""

from __future__ import annotations

import torch
from _harness import host_us  # noqa: E402  (bench/ is the script's directory)
from chipmunk_compile.kernels import column_sparse_attention as csa
from chipmunk_compile.kernels import column_sparse_mlp as csm

import chipmunk_compile  # noqa: F401  (registers the ops)
from chipmunk_compile import ChipmunkConfig, sparse_attention, sparse_mlp
from chipmunk_compile.state import CallContext, ModelState, StepInfo, activate, deactivate

CFG = ChipmunkConfig().with_overrides({
    "attention.first_dense_layers": 0, "attention.first_dense_steps": 1, "attention.dense_every": 0,
    "mlp.first_dense_layers": 0, "mlp.first_dense_steps": 1, "mlp.dense_every": 0, "mlp.selection_every": 1000,
})


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flux", action="store_true", help="FLUX shapes (rows may read GPU time, see above)")
    args = p.parse_args(argv)
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    s, din, f, h, d = (4608, 3072, 12288, 24, 128) if args.flux else (512, 256, 1024, 2, 128)
    x = torch.randn(1, s, din, device=dev, dtype=dt)
    w1 = torch.randn(f, din, device=dev, dtype=dt) / din**0.5
    b1 = torch.zeros(f, device=dev, dtype=dt)
    w2 = torch.randn(din, f, device=dev, dtype=dt) / f**0.5
    b2 = torch.zeros(din, device=dev, dtype=dt)
    qkv = torch.randn(3, 1, s, h, d, device=dev, dtype=dt)
    q, k, v = (t.permute(0, 2, 1, 3) for t in qkv)
    wq = torch.randn(16, 16, device=dev, dtype=dt)
    state = ModelState(CFG)
    mlp_op, att_op = torch.ops.chipmunk.mlp.default, torch.ops.chipmunk.attention.default
    mlp_args = (x, w1, b1, w2, b2, 0, "gelu_tanh", False, 0, f)
    att_args = (q, k, v, None, wq, 1, None, False, 0, 0)

    def in_step(step, fn):
        token = activate(CallContext(state, StepInfo(0, step, 0)))
        try:
            return fn()
        finally:
            deactivate(token)

    for step in (0, 1):  # dense (caches), then the first sparse step (selections)
        in_step(step, lambda: mlp_op(*mlp_args))
        in_step(step, lambda: att_op(*att_args))
    msite, asite = sorted(state.sites, key=lambda st: st.kind, reverse=True)  # mlp, attention
    ctx = CallContext(state, StepInfo(0, 2, 0))
    mentry, aentry = msite.cache(0, 0), asite.cache(0, 0)
    w2t = msite.weight_copies["w2t"].t()
    cfg = csm.default_config(False, dt)
    packed = csm._alloc_packed(x, w2t, mentry.indices.shape[2], cfg)

    @torch.library.custom_op("chipmunk_bench::noop", mutates_args=())
    def noop(t: torch.Tensor) -> torch.Tensor:
        return t.new_empty(1)

    lib = torch.library.Library("chipmunk_bench2", "DEF")  # the low-level registration, for comparison
    lib.define("noop(Tensor t) -> Tensor")
    lib.impl("noop", lambda t: t.new_empty(1), "CompositeExplicitAutograd")

    rows = [
        ("mlp: torch.ops.chipmunk.mlp (reuse step)", lambda: in_step(2, lambda: mlp_op(*mlp_args))),
        ("mlp: run_mlp (no dispatcher)", lambda: sparse_mlp.run_mlp(ctx, msite, x, w1, b1, w2, b2, "gelu_tanh",
                                                                    False, 0, f)),
        ("mlp: column_sparse_mlp_delta", lambda: csm.column_sparse_mlp_delta(
            x, w1, b1, w2t, mentry.indices, mentry.act, mentry.out, activation="gelu_tanh", gated=False,
            block_size=128, validate=False)),
        ("mlp: up-kernel launch", lambda: csm._launch_up(x, w1, b1, mentry.indices, mentry.act, packed,
                                                        "gelu_tanh", False, 128, cfg)),
        ("mlp: down-kernel launch", lambda: csm._launch_down(packed, w2t, mentry.indices, mentry.out, 128, cfg)),
        ("mlp: out.clone()", lambda: mentry.out.clone()),
        ("attention: torch.ops.chipmunk.attention (sparse)", lambda: in_step(2, lambda: att_op(*att_args))),
        ("attention: run_attention (no dispatcher)", lambda: sparse_attention.run_attention(
            ctx, asite, q, k, v, None, None, False, 0, 0)),
        ("attention: column_sparse_attention", lambda: csa.column_sparse_attention(
            q, k, v, aentry.indices, aentry.counts, scale=d**-0.5, group_size=128, base=aentry.cache,
            validate=False)),
        ("custom_op no-op dispatch", lambda: torch.ops.chipmunk_bench.noop.default(x)),
        ("torch.library.Library no-op dispatch", lambda: torch.ops.chipmunk_bench2.noop.default(x)),
        (f"torch.empty ({s}, {din})", lambda: torch.empty_like(x)),
        ("activate + deactivate context", lambda: in_step(2, lambda: None)),
    ]
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    for name, fn in rows:
        print(f"{name:52s} {host_us(fn, 200):8.1f} us")


if __name__ == "__main__":
    main()
