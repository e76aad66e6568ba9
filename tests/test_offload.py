"""Attention caches in pinned CPU memory (CUDA only): same outputs as on-GPU caches."""

import pytest
import torch

import chipmunk_compile
from chipmunk_compile.offload import pack_indices_, unpack_indices
from chipmunk_compile.testing import TinyDiT, denoise

OPTS = {"attention.keep": 0.2, "attention.first_dense_layers": 1, "mlp.first_dense_layers": 1,
        "attention.query_group": 128, "mlp.block": 128}


def _compiled_on_gpu(offload: str):
    """A fresh TinyDiT (512 tokens, head dim 64) on CUDA and its chipmunk compile with ``offload``."""
    torch._dynamo.reset()
    model = TinyDiT(channels=16, dim=256, heads=4, depth=4, seq=512).cuda().eval()
    return model, torch.compile(model, backend="chipmunk", options=dict(OPTS, offload=offload))


@pytest.mark.gpu
def test_offloaded_caches_give_the_same_outputs():
    outs = {}
    for mode in ("never", "always"):
        model, compiled = _compiled_on_gpu(mode)
        noise = torch.randn(2, 512, 16, generator=torch.Generator().manual_seed(0)).cuda()
        outs[mode] = denoise(compiled, noise, steps=12)
        rows = chipmunk_compile.report(compiled).by_kind("attention", "rewritten")
        locations = {r.cache_location for r in rows if r.sparse_calls}
        assert locations == ({"cpu (pinned)"} if mode == "always" else {"cuda:0"}), locations
        assert all(r.sparse_calls > 0 for r in rows[1:])
        pinned_note = [n for n in chipmunk_compile.report(compiled).notes if "pinned CPU memory" in n]
        assert len(pinned_note) == (mode == "always"), pinned_note
    torch.testing.assert_close(outs["always"], outs["never"], atol=0, rtol=0)


def _loop(compiled, noise, steps, cfg_calls):
    """A diffusers-style ``for i, t in enumerate(timesteps)`` Euler loop (the runner knows its last step)."""
    timesteps = torch.linspace(1000.0, 1000.0 / steps, steps, device=noise.device)
    x = noise
    with torch.no_grad():
        for i, t in enumerate(timesteps):  # noqa: B007 - the runner reads `i` from this frame
            v = sum(compiled(x, timestep=t.expand(x.shape[0]) * 1.0) for _ in range(cfg_calls)) / cfg_calls
            x = x - v / steps
    return x


@pytest.mark.gpu
def test_offloaded_caches_across_generations_of_a_diffusers_style_loop():
    """Two generations of a loop whose last step is known (caches dropped after it, no prefetch past it),
    with two CFG calls per step: offloaded caches give exactly the on-GPU results, and after each generation
    no site holds a cache."""
    outs = {}
    for mode in ("never", "always"):
        model, compiled = _compiled_on_gpu(mode)
        noise = torch.randn(1, 512, 16, generator=torch.Generator().manual_seed(0)).cuda()
        outs[mode] = [_loop(compiled, noise, steps=12, cfg_calls=2) for _ in range(2)]
        (state,) = chipmunk_compile.states_of(model)
        assert not any(site.caches for site in state.sites)
        assert state.offloader is None or not state.offloader._inflight
    for a, b in zip(outs["always"], outs["never"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_offload_option_is_validated():
    with pytest.raises(chipmunk_compile.ConfigError, match="offload"):
        chipmunk_compile.ChipmunkConfig().with_overrides({"offload": "sometimes"})


def test_offload_is_a_no_op_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    model = TinyDiT(depth=3, seq=64).eval()
    compiled = torch.compile(model, backend="chipmunk", options=dict(OPTS, offload="always"))
    denoise(compiled, torch.randn(1, 64, 8), steps=4)
    report = chipmunk_compile.report(compiled)
    rows = [r for r in report.by_kind("attention", "rewritten") if r.sparse_calls]
    assert rows and all(r.cache_location == "cpu" for r in rows)
    assert "pinned" not in str(report)


def test_auto_offload_counts_caches_the_allocator_carves_from_memory_it_holds(monkeypatch, caplog):
    """offload "auto": the driver's free memory does not move while the caching allocator serves caches
    from blocks it already holds (a dense step's activations), so caches are counted against what was free
    at the generation's first cache. With a per-cache driver check alone, all 20 caches of 1 GB stayed on
    the GPU here (Wan at 81 frames then ran out of memory mid-forward)."""
    from chipmunk_compile.state import ModelState

    gb = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gb, 80 * gb))  # never moves
    state = ModelState(chipmunk_compile.ChipmunkConfig().with_overrides({"offload_reserve_gb": 4.0}))
    dev = torch.device("cuda", 0)
    with caplog.at_level("WARNING", logger="chipmunk_compile"):
        kept = [state.should_offload(gb, dev, key=("site", i), generation=1) for i in range(20)]
    assert kept == [False] * 6 + [True] * 14  # 10 GB free - 4 GB reserve: six 1 GB caches, then pinned memory
    assert "GPU memory is short" in caplog.text

    # a cache remade for the same site and stream replaces its own bytes; a new generation budgets afresh
    state = ModelState(chipmunk_compile.ChipmunkConfig().with_overrides({"offload_reserve_gb": 4.0}))
    assert not any(state.should_offload(gb, dev, key=("site", i % 3), generation=1) for i in range(30))
    assert not any(state.should_offload(2 * gb, dev, key=("site", i), generation=2) for i in range(3))
    assert state.should_offload(gb, dev, key=("site", 3), generation=2)  # 6 GB held + 1 > 6 GB budget
    # the driver's own number still counts (memory taken by others since the generation's first cache)
    state = ModelState(chipmunk_compile.ChipmunkConfig().with_overrides({"offload_reserve_gb": 4.0}))
    assert not state.should_offload(gb, dev, key="a", generation=1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(4.5 * gb), 80 * gb))
    assert state.should_offload(gb, dev, key="b", generation=1)


def test_host_memory_check_raises_a_clear_error():
    """Offloading more than the host can spare raises OutOfMemoryError with advice (pinned pages would
    otherwise run the host out of memory and get the process killed)."""
    from chipmunk_compile.offload import HOST_RESERVE_BYTES, check_host_memory, host_available_bytes

    check_host_memory(1 << 30, None, 0)  # unknown host memory: no check
    check_host_memory(1 << 30, HOST_RESERVE_BYTES + (2 << 30), 0)
    with pytest.raises(torch.OutOfMemoryError, match="attention caches do not fit.*attention.keep"):
        check_host_memory(4 << 30, HOST_RESERVE_BYTES + (2 << 30), 50 << 30)
    available = host_available_bytes()
    assert available is None or available > 0


def test_pinned_empty_registers_exact_size_and_unregisters_after_a_sync(monkeypatch):
    """Host buffers are page-locked in place at their exact size (the caching host allocator would round
    each up to a power of two); freeing one synchronises the device, then unregisters the range."""
    import gc

    from chipmunk_compile import offload

    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append(("register", ptr, nbytes))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(("sync",)))
    t = offload.pinned_empty((3, 1000), torch.bfloat16)
    ptr = t.data_ptr()
    assert t.shape == (3, 1000) and t.dtype == torch.bfloat16
    assert calls == [("register", ptr, 6000)]
    del t
    gc.collect()
    assert calls[1:] == [("sync",), ("unregister", ptr)]


def test_pinned_empty_falls_back_when_registration_fails(monkeypatch):
    from chipmunk_compile import offload

    class FailingCudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            return 2  # cudaErrorMemoryAllocation

    fallback = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        if kwargs.pop("pin_memory", False):
            fallback.append(args)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FailingCudart())
    monkeypatch.setattr(torch, "empty", empty)
    t = offload.pinned_empty((4,), torch.float32)
    assert fallback == [((4,),)] and t.shape == (4,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_empty_is_pinned_and_copies_asynchronously():
    from chipmunk_compile import offload

    h = offload.pinned_empty((1000, 333), torch.bfloat16)  # an odd size: no rounding to hide behind
    assert h.is_pinned()
    src = torch.randn(1000, 333, device="cuda", dtype=torch.bfloat16)
    h.copy_(src, non_blocking=True)
    back = h.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back, src)


PACK_CASES = [(300, {"lo"}, 2), (70000, {"lo", "hi"}, 2.125), (1 << 17, {"lo", "hi"}, 2.125),
              ((1 << 17) + 1, {"indices"}, 4)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize(("n_keys", "parts", "nbytes"), PACK_CASES)
def test_packed_indices_round_trip(n_keys, parts, nbytes, device):
    """Host copies of the key indices: int16 low bits (+ bit 16 packed 8 per byte) where the key count allows,
    exact for every index in range, including the extremes (the packing overwrites its input: the test keeps a
    copy)."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, n_keys, (2, 3, 5, 24), generator=gen, dtype=torch.int32).to(device)
    idx[0, 0, 0, :2] = torch.tensor([0, n_keys - 1])
    want = idx.clone()
    packed = pack_indices_(idx, n_keys)
    assert set(packed) == parts
    assert sum(t.numel() * t.element_size() for t in packed.values()) == nbytes * want.numel()
    assert torch.equal(unpack_indices(packed), want)
    # K not a multiple of 8: the bit plane is padded
    odd = torch.randint(0, n_keys, (4, 13), generator=gen, dtype=torch.int32).to(device)
    assert torch.equal(unpack_indices(pack_indices_(odd.clone(), n_keys)), odd)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offloader_helper_thread_stores_fetches_and_reshapes():
    """First stores pin on the helper thread (at most max_pending waiting); fetches, prefetches, a store of new
    shapes and one of unchanged shapes all give back exactly what was stored, with the packed-index decode."""
    from chipmunk_compile.offload import CacheOffloader

    dev = torch.device("cuda")
    off = CacheOffloader(dev, max_pending=1)
    want = {}
    for i in range(5):
        cache = torch.randn(3, 1000 + i, device=dev)
        idx = torch.randint(0, 70000, (2, 64), device=dev, dtype=torch.int32)
        want[i] = (cache.clone(), idx.clone())
        off.note_use(i)
        off.store(i, {"cache": cache, **pack_indices_(idx, 70000)},
                  decode=lambda t: {"cache": t.pop("cache"), "indices": unpack_indices(t)})
        del cache, idx  # the offloader must not need the caller's references
        assert len(off._pinning) <= 1
    for i in range(5):
        off.prefetch_after(i)
        got = off.fetch((i + 1) % 5)
        c, x = want[(i + 1) % 5]
        assert torch.equal(got["cache"], c) and torch.equal(got["indices"], x)
    new = torch.randn(7, 7, device=dev)  # new shapes for key 0: new buffers
    off.store(0, {"cache": new, "lo": torch.zeros(4, dtype=torch.int16, device=dev)},
              decode=lambda t: {"cache": t.pop("cache"), "indices": unpack_indices(t)})
    same = torch.randn(7, 7, device=dev)  # same shapes: reuses them, copies on the caller's thread
    off.store(0, {"cache": same, "lo": torch.zeros(4, dtype=torch.int16, device=dev)},
              decode=lambda t: {"cache": t.pop("cache"), "indices": unpack_indices(t)})
    got = off.fetch(0)
    assert torch.equal(got["cache"], same) and torch.equal(got["indices"], torch.full((4,), 1 << 15, device=dev,
                                                                                     dtype=torch.int32))
    assert "pinned CPU memory" in off.summary() and not off._pinning
