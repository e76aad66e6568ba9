"""Shared bits of the benchmark scripts: provenance of every CSV row."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_sha() -> str:
    """Short commit of the checkout, or $CHIPMUNK_GIT_SHA where the tree travels without .git (GPU runs)."""
    env = os.environ.get("CHIPMUNK_GIT_SHA")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def host_us(fn: Callable[[], object], calls: int = 100) -> float:
    """Host time per call of ``fn`` in µs: ``calls`` calls without a sync, after a warm-up call and a sync
    (what a host-bound loop pays per call; a loop of GPU work slower than its enqueueing reads GPU time)."""
    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6
