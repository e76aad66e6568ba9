"""Shared bits of the benchmark scripts: provenance of every CSV row."""

from __future__ import annotations

import os
import subprocess
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
