"""FX graph passes that find attention and MLP sites and rewrite them into ``torch.ops.chipmunk.*``."""

from chipmunk_compile.passes.pipeline import run_passes
from chipmunk_compile.passes.sites import Plan, SiteRecord

__all__ = ["Plan", "SiteRecord", "run_passes"]
