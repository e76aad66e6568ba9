"""What the passes found: one :class:`SiteRecord` per attention or MLP candidate in a graph."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

_PLAN_IDS = itertools.count(1)


@dataclass
class SiteRecord:
    """One site found at compile time.

    ``status`` is "rewritten" (now a ``torch.ops.chipmunk.*`` call) or "dense" (left as it was, with
    ``reason``). ``uid`` identifies the site inside its plan (passed to the op).
    """

    kind: str
    status: str
    name: str
    reason: str = ""
    uid: int = -1
    shapes: dict[str, tuple] = field(default_factory=dict)
    variant: str = ""


@dataclass
class Plan:
    """All sites of one compiled graph."""

    sites: list[SiteRecord] = field(default_factory=list)
    graph_id: int = field(default_factory=lambda: next(_PLAN_IDS))
    note: str = ""

    def rewritten(self, kind: str | None = None) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == "rewritten" and (kind is None or s.kind == kind)]

    def dense(self, kind: str | None = None) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == "dense" and (kind is None or s.kind == kind)]

    def next_uid(self) -> int:
        return self.graph_id * 10_000 + len(self.sites)
