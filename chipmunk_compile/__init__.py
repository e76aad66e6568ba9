"""chipmunk_compile: a torch.compile backend for cached-delta column-sparse diffusion transformers.

    model = torch.compile(model, backend="chipmunk")                       # no import needed
    model = torch.compile(model, backend="chipmunk", options={"preset": "flux", "attention.keep": 0.1})
    model = torch.compile(model, backend=chipmunk_compile.backend(ChipmunkConfig(...)))
    print(chipmunk_compile.report(model)); chipmunk_compile.reset(model)
"""

from __future__ import annotations

import torch

from chipmunk_compile.backend import backend, chipmunk_backend
from chipmunk_compile.config import PRESETS, AttentionConfig, ChipmunkConfig, ConfigError, MlpConfig
from chipmunk_compile.report import Report, SiteReport, report
from chipmunk_compile.runner import states_of

__all__ = [
    "PRESETS",
    "AttentionConfig",
    "ChipmunkConfig",
    "ConfigError",
    "MlpConfig",
    "Report",
    "SiteReport",
    "backend",
    "chipmunk_backend",
    "report",
    "reset",
    "states_of",
]


def reset(model: torch.nn.Module) -> None:
    """Start a new generation at the next call of ``model`` and free its caches (attention and MLP caches and
    selections; the per-site transposed W2 copies and pinned host buffers stay for the next generation, and go
    with the model)."""
    for state in states_of(getattr(model, "_orig_mod", model)):
        state.reset()
