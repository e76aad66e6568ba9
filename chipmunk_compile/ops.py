"""The custom ops the passes insert: ``torch.ops.chipmunk.attention``, ``torch.ops.chipmunk.mlp`` and
``torch.ops.chipmunk.mlp_select`` (an MLP's selection, or with ``mlp.sparse_ahead`` its whole sparse call,
launched ahead of its call, see ``mlp.early_selection``).

Both are functional (no argument is mutated): their caches live in the per-model state that the runner
activates for each compiled call (see :mod:`chipmunk_compile.state`), never in the graph. Called with no
active runner (eager use, ``opcheck``) they return the exact dense result. They are tagged
``cudagraph_unsafe`` so that under ``mode="reduce-overhead"`` Inductor's graph partitioning runs them
eagerly (their step logic is Python) and CUDA-graphs everything around them.

They are registered with ``torch.library.Library`` (explicit schema, one CompositeExplicitAutograd kernel)
rather than ``torch.library.custom_op``: the latter adds Python layers (autograd wrapper, redispatch, a
Dynamo-disable wrapper, an aliasing check) to every call, 20.5 µs against 7.9 µs per call for a no-op on
the H100 host (``bench/bench_host.py``, bench/results/host_NVIDIA-H100_2026-11-27.txt), and a FLUX step
makes 133 calls. The ops are inference-only (the backend compiles with plain Inductor under autograd).
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from chipmunk_compile import sparse_attention, sparse_mlp
from chipmunk_compile.state import SiteStats, active_context

_TAGS = (torch._C.Tag.cudagraph_unsafe,) if hasattr(torch._C.Tag, "cudagraph_unsafe") else ()
_LIB = torch.library.Library("chipmunk", "DEF")  # lives as long as the module
_LIB.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? site_key, int site_uid, float? scale, "
    "bool enable_gqa, SymInt text_start, SymInt text_len, Tensor? after=None) -> Tensor",
    tags=_TAGS,
)
_LIB.define(
    "mlp(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int site_uid, str activation, bool gated, "
    "int w2_offset, int w2_width, Tensor? selection=None) -> Tensor",
    tags=_TAGS,
)
# Seeded: it draws the selection's random seed, so its order among the model's draws matters (Inductor neither
# merges nor moves such ops in its FX passes). What keeps it ahead of the attention is its output, passed to that
# op: Inductor's scheduler orders by data dependencies, and without one it ran the op next to its MLP.
_LIB.define("mlp_select(Tensor x, Tensor w1, Tensor? b1, bool gated) -> Tensor",
            tags=(*_TAGS, torch._C.Tag.nondeterministic_seeded))
# The stats of the op call that just ran, read by the FLOP formulas (FlopCounterMode calls them right
# after the op); the FLOPs themselves are computed only when asked, as they need a host sync.
_LAST_STATS: contextvars.ContextVar[SiteStats | None] = contextvars.ContextVar("chipmunk_last_stats", default=None)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    site_key: torch.Tensor | None,
    site_uid: int,
    scale: float | None,
    enable_gqa: bool,
    text_start: int,
    text_len: int,
    after: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self/joint attention with cached column-sparse deltas.

    Args:
        q: (B, H, S, D); k, v: (B, Hkv, S, D) with H % Hkv == 0 (GQA when ``enable_gqa``).
        attn_mask: None or a key-padding mask broadcastable to (B, H, 1, S): bool (True = attend) or
            additive float. Masked keys are never selected.
        site_key: a weight of the site's layer, its runtime identity (None: the graph position only).
        site_uid: the site's id in its compiled plan. scale: softmax scale (None: D**-0.5).
        text_start, text_len: the span of text keys (joint attention), kept by every group when
            configured.
        after: an ``mlp_select`` output that must run before this op (unused: the dependency orders them).

    Returns:
        (B, H, S, Dv), laid out in memory as (B, S, H, Dv).
    """
    ctx = active_context()
    if ctx is None:
        _LAST_STATS.set(None)
        return sparse_attention.dense_attention(q, k, v, attn_mask, scale, enable_gqa)
    site = ctx.state.site("attention", site_uid, site_key, ctx.info)
    out = sparse_attention.run_attention(ctx, site, q, k, v, attn_mask, scale, enable_gqa, text_start, text_len)
    _LAST_STATS.set(site.stats)
    if ctx.info.last:
        site.release(ctx.info)
    return out


@torch.library.register_fake("chipmunk::attention")
def _attention_fake(q, k, v, attn_mask, site_key, site_uid, scale, enable_gqa, text_start, text_len, after=None):
    b, h, s, _ = q.shape
    return q.new_empty((b, s, h, v.shape[-1])).permute(0, 2, 1, 3)


def mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    site_uid: int,
    activation: str,
    gated: bool,
    w2_offset: int,
    w2_width: int,
    selection: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x·W1ᵀ + b1) · W2[:, off:off+width]ᵀ + b2`` with cached column-sparse deltas.

    Args:
        x: (..., Din). w1: (F, Din), or (2F, Din) when ``gated`` (``[u | g]``, a = u · act(g)).
        b1: (F,) / (2F,) or None. w2: (Dout, W) of which columns [w2_offset, w2_offset + w2_width)
            (width F) multiply the activation (the rest belong to another input of a fused linear).
        b2: (Dout,) or None. activation: "gelu_tanh", "gelu" or "silu".
        selection: the output of this site's ``mlp_select`` when the graph launches its selection ahead
            (its value is unused: it orders the two ops), else None.

    Returns:
        (..., Dout), contiguous.
    """
    ctx = active_context()
    if ctx is None:
        _LAST_STATS.set(None)
        _, a = sparse_mlp.hidden_activation(x, w1, b1, activation, gated)
        return F.linear(a, w2.narrow(1, w2_offset, w2_width), b2).contiguous()
    site = ctx.state.site("mlp", site_uid, w1, ctx.info)
    out = sparse_mlp.run_mlp(ctx, site, x, w1, b1, w2, b2, activation, gated, w2_offset, w2_width)
    _LAST_STATS.set(site.stats)
    if ctx.info.last:
        site.release(ctx.info)
    return out


@torch.library.register_fake("chipmunk::mlp")
def _mlp_fake(x, w1, b1, w2, b2, site_uid, activation, gated, w2_offset, w2_width, selection=None):
    return x.new_empty((*x.shape[:-1], w2.shape[0]))


def mlp_select(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, gated: bool) -> torch.Tensor:
    """Launch the unit selection of the MLP site with first weight ``w1`` now, if its coming call selects;
    with ``mlp.sparse_ahead`` the coming sparse call's whole work (see ``sparse_mlp.select_ahead``).

    Placed by the pass right before an attention op that runs between ``x`` and the site's ``mlp`` call, with
    its output passed to that attention (``after``) and to the call (``selection``): Inductor's scheduler keeps
    data dependencies, not graph order. On CUDA that work runs on a side stream, overlapping the attention, and
    the ``mlp`` call waits for it; elsewhere it runs here.

    Args:
        x: (..., Din), the MLP's input. w1: (F or 2F, Din). b1: (F or 2F,) or None.

    Returns:
        An empty (0,) tensor on x's device (an ordering token).
    """
    ctx = active_context()
    if ctx is None:
        return x.new_empty((0,))
    site = ctx.state.peek_site("mlp", w1, ctx.info)
    if site is not None:
        sparse_mlp.select_ahead(ctx, site, x, w1, b1, gated)
    return ctx.state.token(x.device)


@torch.library.register_fake("chipmunk::mlp_select")
def _mlp_select_fake(x, w1, b1, gated):
    return x.new_empty((0,))


_LIB.impl("attention", attention, "CompositeExplicitAutograd")
_LIB.impl("mlp", mlp, "CompositeExplicitAutograd")
_LIB.impl("mlp_select", mlp_select, "CompositeExplicitAutograd")


@register_flop_formula(torch.ops.chipmunk.attention, get_raw=True)
def _attention_flops(q, k, v, *args, out_val=None, **kwargs) -> int:
    last = _LAST_STATS.get()
    if last is not None:
        return last.last_flops
    b, h, s, d = q.shape
    return sparse_attention.attention_flops(b, h, s, k.shape[2], d, v.shape[-1])


@register_flop_formula(torch.ops.chipmunk.mlp, get_raw=True)
def _mlp_flops(x, w1, b1, w2, b2, site_uid, activation, gated, w2_offset, w2_width, *args, out_val=None,
               **kwargs) -> int:  # a selection made ahead is counted here too (the site's stats record it)
    last = _LAST_STATS.get()
    if last is not None:
        return last.last_flops
    m = x.numel() // x.shape[-1]
    return sparse_mlp.mlp_flops(m, x.shape[-1], w2_width, w2.shape[0], gated)
