"""``chipmunk_compile.report(model)``: every site found, rewritten or left dense, and what it did."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chipmunk_compile.config import ChipmunkConfig
from chipmunk_compile.runner import states_of
from chipmunk_compile.state import ModelState


@dataclass
class SiteReport:
    """One row of the report. Runtime fields are None until the site has run."""

    kind: str
    status: str
    name: str
    reason: str = ""
    shapes: dict[str, tuple] = field(default_factory=dict)
    variant: str = ""
    kept_fraction: float | None = None
    selections: int = 0
    selections_ahead: int = 0
    sparse_ahead: int = 0
    calls: int = 0
    dense_calls: int = 0
    sparse_calls: int = 0
    last_phase: str = ""
    backend: str = ""
    cache_location: str = ""
    errors: list[tuple[int, float]] = field(default_factory=list)

    @property
    def mean_error(self) -> float | None:
        return sum(e for _, e in self.errors) / len(self.errors) if self.errors else None


@dataclass
class Report:
    sites: list[SiteReport]
    notes: list[str] = field(default_factory=list)

    def by_kind(self, kind: str, status: str | None = None) -> list[SiteReport]:
        return [s for s in self.sites if s.kind == kind and (status is None or s.status == status)]

    def __str__(self) -> str:
        if not self.sites:
            return "chipmunk report: no compiled chipmunk graph has run for this model yet" + "".join(
                f"\n  note: {n}" for n in self.notes
            )
        header = ("kind", "status", "name", "kept", "calls d/s", "sel", "err", "detail")
        rows = [header]
        for s in self.sites:
            kept = "" if s.kept_fraction is None else f"{s.kept_fraction:.3f}"
            err = "" if s.mean_error is None else f"{s.mean_error:.2e}"
            calls = f"{s.dense_calls}/{s.sparse_calls}" if s.calls else ""
            if s.sparse_ahead:
                calls += f" ({s.sparse_ahead} ahead)"
            detail = s.reason or s.variant or ""
            if s.backend and s.status == "rewritten":
                detail = (detail + f" [{s.backend}]").strip()
            if s.cache_location == "cpu (pinned)":
                detail += " [cache in pinned CPU memory]"
            sel = str(s.selections or "") + (f" ({s.selections_ahead} ahead)" if s.selections_ahead else "")
            rows.append((s.kind, s.status, s.name, kept, calls, sel, err, detail))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
        n_rw = sum(s.status == "rewritten" for s in self.sites)
        summary = f"chipmunk report: {len(self.sites)} sites, {n_rw} rewritten, {len(self.sites) - n_rw} dense"
        return "\n".join([summary, *lines, *(f"note: {n}" for n in self.notes)])


def report(model: torch.nn.Module, config: ChipmunkConfig | None = None) -> Report:
    """Collect the sites of every chipmunk graph compiled for ``model`` (or its ``_orig_mod``).

    A module compiled several times with different configs keeps one state per config; the report shows
    the config that ran most recently, or ``config`` when given, and notes the others. Several states of one
    config (compiled whole, then by regions) show each site once, from the state that ran it last.
    """
    module = getattr(model, "_orig_mod", model)
    names = {id(p): n for n, p in module.named_parameters()}
    states = states_of(module)
    configs = {s.config for s in states}
    if config is None and states:
        config = max(states, key=lambda s: s.last_active).config
    rows: list[SiteReport] = []
    notes: list[str] = []
    shown: set[tuple[str, str]] = set()
    # Most recent first: a module compiled whole and then by regions (same config) keeps both states, and a
    # site's row is the one of the state that ran it last.
    for state in sorted(states, key=lambda s: -s.last_active):
        if state.config != config:
            continue
        state_rows = _rows(state, names)
        rows.extend(r for r in state_rows if (r.kind, r.name) not in shown)
        shown.update((r.kind, r.name) for r in state_rows)
        notes.extend(p.note for p in state.plans if p.note)
        offloaded = state.offloader.summary() if state.offloader is not None else None
        if offloaded:
            notes.append(offloaded)
    if len(configs) > 1:
        notes.append(f"this module was compiled with {len(configs)} chipmunk configurations; showing "
                     "the one that ran last (pass config= for another)")
    return Report(rows, sorted(set(notes)))


def _rows(state: ModelState, names: dict[int, str]) -> list[SiteReport]:
    records = {rec.uid: rec for plan in state.plans for rec in plan.sites}
    plan_of = {rec.uid: plan.graph_id for plan in state.plans for rec in plan.sites}
    # Under regional compilation one block graph serves every block, and its records name sites relative to
    # the block ("attn2"): the sites that ran give each plan's block prefixes ("blocks.0."), from their weights'
    # names in the model, so its dense records can be listed once per block under their full names.
    prefixes: dict[int, list[str]] = {}
    out: list[SiteReport] = []
    ran: set[tuple] = set()
    ran_uids: set[int] = set()
    for site in sorted(state.sites, key=lambda s: (s.kind != "attention", s.ordinal)):
        rec = records.get(site.uid)
        if rec is None:
            continue
        row = _row(rec)
        key = site.key
        if key is not None and id(key) in names:
            row.name = _module_of(names[id(key)], rec.kind)
            if row.name.endswith(rec.name):
                found = prefixes.setdefault(plan_of[rec.uid], [])
                prefix = row.name[: len(row.name) - len(rec.name)]
                if prefix not in found:
                    found.append(prefix)
        st = site.stats
        row.kept_fraction = st.kept_fraction
        row.selections, row.selections_ahead, row.calls = st.selections, st.selections_ahead, st.calls
        row.dense_calls, row.sparse_calls, row.sparse_ahead = st.dense_calls, st.sparse_calls, st.sparse_ahead
        row.last_phase, row.backend, row.errors = st.last_phase, st.backend, list(st.errors)
        row.cache_location = st.cache_location
        if st.text_span:
            row.variant = f"{row.variant} {st.text_span}".strip()
        out.append(row)
        ran.add((rec.kind, row.name, rec.status))
        ran.add((rec.kind, rec.name, rec.status))
        ran_uids.add(rec.uid)
    # Sites that have not run (dense ones never create state). A recompiled graph repeats the records of
    # the sites above, and identical dense records (same place, reason and shapes) are listed once.
    for rec in records.values():
        if rec.status == "rewritten" and rec.uid in ran_uids:
            continue
        for prefix in prefixes.get(plan_of[rec.uid]) or [""]:
            name = prefix + rec.name
            key = (rec.kind, name, rec.status) if rec.status == "rewritten" else (
                rec.kind, name, rec.status, rec.reason, str(rec.shapes))
            if key not in ran and (rec.kind, name, "rewritten") not in ran:
                row = _row(rec)
                row.name = name
                out.append(row)
                ran.add(key)
    return out


def _row(rec) -> SiteReport:
    return SiteReport(kind=rec.kind, status=rec.status, name=rec.name, reason=rec.reason, shapes=rec.shapes,
                      variant=rec.variant)


def _module_of(param_name: str, kind: str) -> str:
    parts = param_name.split(".")[:-1]  # drop "weight"
    if kind == "attention" and len(parts) > 1:
        parts = parts[:-1]  # drop the projection (to_q) to name the attention module
    return ".".join(parts)
