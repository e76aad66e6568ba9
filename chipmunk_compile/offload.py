"""Attention caches in pinned CPU memory, fetched back one site ahead on a side stream.

On a dense step a site's cache (and selection) is computed on the GPU, copied to a pinned host buffer on
the side stream, and the GPU copy is released. On a sparse step the site reads it back; to hide the copy,
when a site runs, the cache of the site that ran after it in the previous forward is already being
copied in on the side stream. Cache tensors are read-only between dense steps, so nothing is written
back. Stream safety: copies wait on the compute stream's work that produced their source, and every
tensor used across streams is marked with ``record_stream`` so the caching allocator never reuses it
early.
"""

from __future__ import annotations

import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

# Host memory left free when pinning cache buffers (pinned pages cannot be swapped: running the host out of
# memory would get the process killed rather than raise).
HOST_RESERVE_BYTES = 8 << 30


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (unknown: no check)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_memory(nbytes: int, available: int | None, offloaded: int) -> None:
    """Raise a clear error instead of pinning ``nbytes`` more host memory than the host can spare."""
    if available is None or nbytes + HOST_RESERVE_BYTES <= available:
        return
    raise torch.OutOfMemoryError(
        f"chipmunk: the attention caches do not fit: the GPU is full and pinning {nbytes / 2**30:.1f} GB more "
        f"host memory (after {offloaded / 2**30:.1f} GB already offloaded) would leave less than "
        f"{HOST_RESERVE_BYTES / 2**30:.0f} GB of the host's {available / 2**30:.1f} GB available. Lower the "
        "resolution or frame count or attention.keep (the key indices take about as much as the cache), "
        "or use a GPU with more memory."
    )


_LOW_BIAS = 1 << 15  # int16 holds the low 16 bits of an index shifted by this (no out-of-range cast)


def pack_indices_(indices: torch.Tensor, n_keys: int) -> dict[str, torch.Tensor]:
    """Key indices (..., K) int32 in [0, n_keys) in fewer bytes, for the host copy of an attention cache.

    Up to 2**16 keys: the low 16 bits as int16 (2 bytes per index); up to 2**17 (HunyuanVideo at 720p/129
    frames, Wan at 720p/81 frames): also bit 16, packed 8 per byte along K (2.125 bytes); more keys: int32
    as is. Entries past a group's count are never read and may hold anything (they do not round-trip).
    Works in place on ``indices`` (overwritten unless returned as is): it runs when the GPU is nearly
    full, so it makes no int32 temporaries.

    Returns {"lo": (..., K) int16, "hi": (..., ceil(K / 8)) uint8} (``hi`` only when needed), or
    {"indices": indices}.
    """
    if n_keys > 1 << 17:
        return {"indices": indices}
    packed = {}
    if n_keys > 1 << 16:
        k = indices.shape[-1]
        hi = (indices >= 1 << 16).view(torch.uint8)  # bit 16 of every index in [0, 2**17)
        if k % 8:
            hi = torch.nn.functional.pad(hi, (0, -k % 8))
        weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=indices.device)
        packed["hi"] = hi.view(*indices.shape[:-1], -1, 8).mul_(weights).sum(-1, dtype=torch.uint8)
    packed["lo"] = indices.bitwise_and_(0xFFFF).sub_(_LOW_BIAS).to(torch.int16)
    return packed


def unpack_indices(packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """The int32 indices (..., K) :func:`pack_indices_` packed (on the device of ``packed``'s tensors)."""
    if "indices" in packed:
        return packed["indices"]
    lo = packed["lo"]
    indices = lo.to(torch.int32).add_(_LOW_BIAS)
    hi = packed.get("hi")
    if hi is not None:
        shifts = torch.arange(8, dtype=torch.uint8, device=hi.device)
        bits = ((hi.unsqueeze(-1) >> shifts) & 1).view(*hi.shape[:-1], -1)[..., : lo.shape[-1]]
        indices.bitwise_or_(bits.to(torch.int32).bitwise_left_shift_(16))
    return indices


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype, prefault: bool = True) -> torch.Tensor:
    """An uninitialised CPU tensor in page-locked memory of exactly its size.

    ``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host allocator, which rounds each
    block up to a power of two: a 730 MB cache pins 1 GB, and tens of sites pin up to ~1.4x what they hold.
    Here ordinary host memory is page-locked in place with ``cudaHostRegister``, after ``prefault`` has
    touched its pages on all cores; copies from and to it are asynchronous like any pinned tensor's. When the
    returned tensor object is collected, the device is synchronised (no copy may still read it) and the range
    unregistered before the memory is freed: callers must not keep views of it beyond the tensor. Falls back
    to the caching allocator where registration is unavailable or fails.
    """
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return t
    if prefault:
        # Touch the pages first with PyTorch's multi-threaded fill: registering untouched memory faults every
        # page in one thread inside the driver (Wan at 81 frames: 84 GB took 69 s on the H100 host).
        t.view(-1).view(torch.uint8).zero_()
    try:
        cudart = torch.cuda.cudart()
        err = int(cudart.cudaHostRegister(t.data_ptr(), nbytes, 0))
    except (AttributeError, RuntimeError, TypeError):
        err = -1
    if err != 0:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    done = weakref.finalize(t, _unregister, cudart, t.data_ptr())
    done.atexit = False  # at interpreter exit the process's memory goes anyway (and CUDA may be gone)
    return t


def _unregister(cudart: Any, ptr: int) -> None:
    torch.cuda.synchronize()
    cudart.cudaHostUnregister(ptr)


class CacheOffloader:
    """Per-model offload of read-only per-site tensors (CUDA only).

    A key's first store (or one with new shapes) allocates and page-locks its host buffers on a helper
    thread, which then enqueues the copy out: the caller goes on enqueuing GPU work meanwhile (page-locking
    took seconds per ten GB on the H100 host, and the GPU idled through it when the caller did it). The
    helper holds the GPU tensors until the copy is enqueued (``record_stream`` keeps their memory until it
    has run); at most ``max_pending`` such stores wait at a time, so the GPU memory they hold stays bounded.
    """

    def __init__(self, device: torch.device, max_pending: int = 2) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.order: list[Any] = []  # (site, stream) keys in the order of the last forward
        self._position: dict[Any, int] = {}
        self._host: dict[Any, dict[str, torch.Tensor]] = {}  # pinned buffers, reused across dense steps
        self._pinning: dict[Any, Future] = {}  # keys whose buffers the helper thread is still making
        self._pool: ThreadPoolExecutor | None = None
        self.max_pending = max_pending
        self._inflight: dict[Any, tuple[dict[str, torch.Tensor], torch.cuda.Event]] = {}
        self._decode: dict[Any, Any] = {}
        self.bytes_offloaded = 0
        self.pin_seconds = 0.0  # helper-thread time spent allocating and page-locking buffers (first dense steps)

    def note_use(self, key: Any) -> None:
        """Record the call order: a key seen again starts a new pass over the order."""
        if key in self._position and self._position[key] == 0:
            self.order, self._position = [], {}
        if key not in self._position:
            self._position[key] = len(self.order)
            self.order.append(key)

    def store(self, key: Any, tensors: dict[str, torch.Tensor], decode: Any = None) -> None:
        """Copy ``tensors`` (GPU) into this key's pinned buffers; the GPU tensors may be dropped after.

        ``decode``: optional function from the copied-in dict to the dict :meth:`fetch` returns; it runs on
        the side stream right after the copy (so a prefetch hides it too).
        """
        self._decode[key] = decode
        self._resolve(key)
        self._inflight.pop(key, None)  # a prefetch of the old contents is stale
        host = self._host.get(key)
        if host is None or any(host[n].shape != t.shape or host[n].dtype != t.dtype for n, t in tensors.items()):
            if host is not None:  # new shapes: the old buffers go, after any copy still reading them
                self.stream.synchronize()
                del self._host[key]
                self.bytes_offloaded -= sum(h.numel() * h.element_size() for h in host.values())
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            check_host_memory(nbytes, host_available_bytes(), self.bytes_offloaded)
            self.bytes_offloaded += nbytes
            while len(self._pinning) >= self.max_pending:  # bound the GPU memory held by waiting stores
                self._resolve(next(iter(self._pinning)))
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chipmunk-pin")
            self._pinning[key] = self._pool.submit(self._pin_and_copy_out, tensors, ready)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._copy_out(host, tensors)

    def _copy_out(self, host: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
        """Enqueue the copies GPU -> ``host`` on the side stream (which already waits for their producers)."""
        with torch.cuda.stream(self.stream):
            for name, t in tensors.items():
                host[name].copy_(t, non_blocking=True)
                t.record_stream(self.stream)

    def _pin_and_copy_out(
        self, tensors: dict[str, torch.Tensor], ready: torch.cuda.Event
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Helper thread: new pinned buffers for ``tensors``, and their copy out after ``ready``."""
        with torch.cuda.device(self.device):
            start = time.perf_counter()
            host = {n: pinned_empty(tuple(t.shape), t.dtype) for n, t in tensors.items()}
            seconds = time.perf_counter() - start
            self.stream.wait_event(ready)
            self._copy_out(host, tensors)
        return host, seconds

    def _resolve(self, key: Any) -> None:
        """Wait for ``key``'s helper-thread store, if any, and take its buffers (its errors raise here)."""
        pending = self._pinning.pop(key, None)
        if pending is not None:
            host, seconds = pending.result()
            self._host[key] = host
            self.pin_seconds += seconds

    def summary(self) -> str | None:
        """One line for the report: how much is pinned and what pinning it cost, or None if nothing is."""
        if not self.bytes_offloaded:
            return None
        for key in list(self._pinning):
            self._resolve(key)
        return (f"{self.bytes_offloaded / 2**30:.1f} GB of attention caches in pinned CPU memory "
                f"({len(self._host)} cache entries, one per site and CFG stream; page-locking it took "
                f"{self.pin_seconds:.1f} s once, on a helper thread)")

    def has(self, key: Any) -> bool:
        return key in self._host or key in self._pinning

    def fetch(self, key: Any) -> dict[str, torch.Tensor]:
        """GPU copies of ``key``'s tensors, ready on the current stream."""
        self._resolve(key)  # its copy out is enqueued on the side stream then, before the copy in
        current = torch.cuda.current_stream(self.device)
        entry = self._inflight.pop(key, None) or self._copy_in(key)
        tensors, event = entry
        current.wait_event(event)
        for t in tensors.values():
            t.record_stream(current)
        return tensors

    def prefetch_after(self, key: Any, wrap: bool = True) -> None:
        """Start copying in the tensors of the key that followed ``key`` in the last forward (with ``wrap``
        off, not the first key after the last: at a generation's last step nothing follows)."""
        pos = self._position.get(key)
        if pos is None or not self.order or (not wrap and pos + 1 >= len(self.order)):
            return
        nxt = self.order[(pos + 1) % len(self.order)]
        if self.has(nxt) and nxt not in self._inflight:
            self._resolve(nxt)
            self._inflight[nxt] = self._copy_in(nxt)

    def _copy_in(self, key: Any) -> tuple[dict[str, torch.Tensor], torch.cuda.Event]:
        host = self._host[key]
        with torch.cuda.stream(self.stream):
            tensors = {n: h.to(self.device, non_blocking=True) for n, h in host.items()}
            decode = self._decode.get(key)
            if decode is not None:
                tensors = decode(tensors)
            event = torch.cuda.Event()
            event.record(self.stream)
        return tensors, event
