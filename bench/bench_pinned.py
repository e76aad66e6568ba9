"""Page-locking host memory for offloaded caches: ``pinned_empty`` with and without prefaulting (CUDA only).

Allocates and registers 8 GB twice each way and times it, then one 1 GB device-to-host copy into it.
H100 host, session 5 (bench/results/pinned_memory_NVIDIA-H100_session5.txt): 2.8-3.2 GB/s without,
8.8-11.6 GB/s with prefaulting.

    python bench/bench_pinned.py
"""
import time

import torch

from chipmunk_compile.offload import pinned_empty


def main() -> None:
    torch.cuda.init()
    gb = 8
    for prefault in (False, True, False, True):
        start = time.perf_counter()
        t = pinned_empty((gb << 30,), torch.uint8, prefault=prefault)
        secs = time.perf_counter() - start
        d = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        s2 = time.perf_counter()
        t[: 1 << 30].copy_(d, non_blocking=True)
        torch.cuda.synchronize()
        print(f"pinned_empty {gb} GB prefault={prefault}: {secs:.2f} s ({gb / secs:.1f} GB/s); "
              f"1 GB D2H {1 / (time.perf_counter() - s2):.1f} GB/s; threads {torch.get_num_threads()}", flush=True)
        del t, d


if __name__ == "__main__":
    main()
