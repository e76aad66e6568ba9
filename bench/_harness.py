"""Shared bits of the benchmark scripts: provenance of every CSV row."""

from __future__ import annotations

import csv
import datetime
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

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


RUN_COLUMNS = ["card", "torch", "triton", "git_sha", "date"]


def run_fields(card: str) -> list[str]:
    """The values of :data:`RUN_COLUMNS` for this run on ``card``: where each CSV row came from."""
    import torch

    return [card, torch.__version__, triton_version(), git_sha(), datetime.date.today().isoformat()]


def append_csv(path: Path, header: list[str], rows: Iterable[list]) -> None:
    """Append ``rows`` to the CSV at ``path``, writing ``header`` first when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)
        w.writerows(rows)


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


def split_top_level(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets (``[...]``, ``{...}``) and double-quoted strings; empty
    pieces dropped. ``"a,b[x=[1,2]],c"`` -> ``["a", "b[x=[1,2]]", "c"]``."""
    pieces, depth, quoted, escaped, start = [], 0, False, False, 0
    for i, ch in enumerate(text):
        if quoted:
            quoted = escaped or ch != '"'
            escaped = not escaped and ch == "\\"
        elif ch == '"':
            quoted = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == sep and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    return [piece.strip() for piece in pieces if piece.strip()]


def parse_overrides(text: str) -> tuple[tuple[str, Any], ...]:
    """``KEY=JSON;KEY=JSON`` (the inside of a variant's brackets, e.g. ``flux[mlp.keep=0.15]``) -> the
    (key, value) pairs in order. A value that is not JSON is taken as a string (``offload=never``); JSON lists
    become tuples (hashable settings). Raises ValueError on an item without ``=`` or a key given twice."""
    pairs: dict[str, Any] = {}
    for item in split_top_level(text, ";"):
        key, eq, raw = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise ValueError(f"override {item!r} is not KEY=JSON")
        if key in pairs:
            raise ValueError(f"{key!r} is given twice")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        pairs[key] = tuple(value) if isinstance(value, list) else value
    return tuple(pairs.items())
