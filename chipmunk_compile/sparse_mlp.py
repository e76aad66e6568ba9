"""Cached-delta column-sparse MLP (the algorithm behind ``torch.ops.chipmunk.mlp``).

The site computes ``out = a(x) · W2ᵀ (+ b2)`` with ``a(x) = act(x·W1ᵀ + b1)`` (plain) or
``a(x) = u · act(g)`` with ``[u | g] = x·W1ᵀ + b1`` (gated: GEGLU / SwiGLU). Per block of ``block``
consecutive tokens of one sample:

- dense step: exact output; cache the activation ``a`` (unit-major), the output, and the block means of
  the pre-activation;
- sparse step: choose the hidden units whose block-mean pre-activation moved most since they were last
  refreshed (plus a random fraction), refreshing their reference; recompute only those units of ``a``,
  add ``(a_new − a_cached) · W2[:, S]ᵀ`` to the cached output, store ``a_new`` in the activation cache.
  The selection is redone every ``selection_every`` sparse steps and reused in between.

Because ``W1`` is affine, the block mean of the pre-activation is ``mean(x_block) · W1ᵀ + b1``: the
selection costs one small matmul over the block means, not the full first linear.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chipmunk_compile.config import MlpConfig
from chipmunk_compile.kernels import column_sparse_mlp as mlp_kernels
from chipmunk_compile.kernels import mlp_dense_cache as dense_kernels
from chipmunk_compile.kernels import select_units as unit_kernels
from chipmunk_compile.selection import column_budget, select_columns_fast
from chipmunk_compile.state import CallContext, SiteState

ACTIVATIONS = ("gelu_tanh", "gelu", "silu")
log = logging.getLogger("chipmunk_compile")


@dataclass
class MlpCache:
    """Per (site, CFG stream) state, valid for one generation.

    act: (B, F, S) unit-major activation cache; out: (B, S, Dout) output cache;
    block_mean: (B, nb, F or 2F) fp32 reference pre-activation block means;
    indices: (B, nb, k) int32 current selection (None until the first sparse step).
    """

    generation: int
    act: torch.Tensor
    out: torch.Tensor
    block_mean: torch.Tensor
    indices: torch.Tensor | None = None
    selected_at: int = -1


@dataclass
class PendingSelection:
    """A selection, or a whole sparse call, launched ahead of its site's call by :func:`select_ahead`.

    call: (generation, step) it was made for; entry: the cache whose reference it refreshed (and, with
    ``out``, whose caches it updated); indices: (B, nb, k) int32, None where it did not select; flops: its
    matmul's FLOPs; ready: the event the call waits for (CUDA; None when it ran
    synchronously); keep: other main-stream tensors the side stream reads, held (with ``entry``) until that
    wait so that their memory goes to no other work while it runs.
    """

    call: tuple[int, int]
    entry: MlpCache
    indices: torch.Tensor | None
    flops: int
    ready: torch.cuda.Event | None
    keep: tuple
    out: torch.Tensor | None = None  # (B, S, Dout): the whole sparse call ran ahead (``mlp.sparse_ahead``)
    selected: bool = True  # it chose units (else it reused entry.indices)


@dataclass(frozen=True)
class AheadArgs:
    """What a sparse call needs beyond the ``mlp_select`` op's arguments, recorded by the site's latest call:
    w2 (Dout, W) and the activation's columns of it, and whether the site runs the Triton kernels."""

    w2: torch.Tensor
    activation: str
    w2_offset: int
    w2_width: int
    triton: bool


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "gelu":
        return F.gelu(h)
    if activation == "silu":
        return F.silu(h)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def hidden_activation(x, w1, b1, activation: str, gated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-activation h (…, F or 2F) and activation a (…, F)."""
    h = F.linear(x, w1, b1)
    if gated:
        u, g = h.chunk(2, dim=-1)
        return h, u * activate(g, activation)
    return h, activate(h, activation)


def block_means(x: torch.Tensor, block: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, S, C) -> (B, nb, C) means over consecutive blocks of ``block`` tokens (last may be short), in
    ``dtype`` (fp32, or x's dtype: the fp32 means rounded once).

    Accumulates in fp32 without materialising an fp32 copy of ``x`` (on dense steps x is the whole
    pre-activation, B·S·F elements).
    """
    b, s, c = x.shape
    full, tail = divmod(s, block)
    if not tail and x.is_cuda:
        # one kernel: this runs on every selection step. CUDA reduces 16-bit inputs in fp32 and rounds the
        # fp32 mean once, so asking for x's dtype here equals the fp32 mean cast afterwards.
        return torch.mean(x.view(b, full, block, c), dim=2, dtype=dtype)
    if not tail:
        return torch.mean(x.view(b, full, block, c), dim=2, dtype=torch.float32).to(dtype)
    parts = []
    if full:
        parts.append(torch.sum(x[:, : full * block].reshape(b, full, block, c), dim=2, dtype=torch.float32) / block)
    if tail:
        parts.append(torch.sum(x[:, full * block :], dim=1, keepdim=True, dtype=torch.float32) / tail)
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).to(dtype)


def _select_units(site: SiteState, diff: torch.Tensor, k_top: int, n_rand: int, seed: int) -> torch.Tensor:
    """Selected units (B, nb, k) int32; a failing selection kernel is logged once and replaced by PyTorch."""
    use_kernel = site.selection_kernel_error is None
    try:
        return select_columns_fast(diff, k_top, n_rand, seed, use_kernel=use_kernel)
    except Exception as err:  # noqa: BLE001 - Triton compile/launch errors have no common base class
        if not (use_kernel and diff.is_cuda):
            raise
        _selection_failed(site, "selection", err)
        return select_columns_fast(diff, k_top, n_rand, seed, use_kernel=False)


def _selection_failed(site: SiteState, which: str, err: Exception) -> None:
    """Log a failed selection kernel once; the site selects with PyTorch from now on (see run_mlp)."""
    log.warning("chipmunk: the %s kernel failed (%s: %s); MLP site %d selects with PyTorch from now on",
                which, type(err).__name__, err, site.ordinal)
    site.selection_kernel_error = f"{type(err).__name__}: {err}"
    site.stats.backend += " [selection: pytorch after a kernel failure]"


def _select_units_fused(
    site: SiteState, bm: torch.Tensor, ref: torch.Tensor, gated: bool, k_top: int, n_rand: int, seed: int
) -> torch.Tensor | None:
    """Selected units (B, nb, k) int32 with ``ref``'s chosen units refreshed from ``bm``, in one launch.

    None where the fused kernel does not run (not CUDA, unsupported inputs, or a selection kernel failed
    at this site before: the caller takes the PyTorch path); a failing launch is logged once and disables
    the Triton selection of this site (``ref`` is untouched: Triton raises before it launches).
    """
    if not bm.is_cuda or site.selection_kernel_error is not None:
        return None
    if unit_kernels.supports(bm, ref, gated=gated) is not None:
        return None
    try:
        return unit_kernels.select_units_drift(bm, ref, k_top, n_rand, seed, gated=gated)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - Triton compile/launch errors have no common base class
        _selection_failed(site, "fused selection", err)
        return None


def _activation_and_caches(
    site: SiteState, h: torch.Tensor, activation: str, gated: bool, block: int, triton: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense step: from the pre-activation h (B, S, F or 2F), the activation a (B, S, F), its unit-major
    cache (B, F, S) and h's block means (B, nb, F or 2F) fp32: one Triton pass on CUDA (the transposing copy
    alone is slow in ATen), else PyTorch. A failing kernel is logged once; the site then uses PyTorch.
    For one sample the kernel writes only the cache and ``a`` is its transposed view (see :func:`_down`)."""
    if triton and site.dense_kernel_error is None and block <= 256 and dense_kernels.supports(h) is None:
        try:
            return dense_kernels.dense_activation_cache(h, activation=activation, gated=gated, block=block,
                                                        row_major=h.shape[0] != 1)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - Triton compile/launch errors have no common base class
            log.warning("chipmunk: the dense-step MLP kernel failed (%s: %s); MLP site %d uses PyTorch there "
                        "from now on", type(err).__name__, err, site.ordinal)
            site.dense_kernel_error = f"{type(err).__name__}: {err}"
    if gated:
        u, g = h.chunk(2, dim=-1)
        a = u * activate(g, activation)
    else:
        a = activate(h, activation)
    return a, a.transpose(1, 2).contiguous(), block_means(h, block)


def _down(a: torch.Tensor, w2s: torch.Tensor, b2: torch.Tensor | None) -> torch.Tensor:
    """The second linear ``a · W2ᵀ (+ b2)``, (B, S, Dout) contiguous, from a (B, S, F) that may be the
    transposed view of the unit-major cache: for one sample that view is a column-major (S, F) matrix,
    which addmm takes as it is (F.linear would fold it through matmul and add the bias in another kernel)."""
    if a.shape[0] == 1 and not a.is_contiguous():
        a2 = a[0]
        out = torch.addmm(b2, a2, w2s.t()) if b2 is not None else torch.mm(a2, w2s.t())
        return out.unsqueeze(0)
    return F.linear(a, w2s, b2).contiguous()


@functools.lru_cache(maxsize=256)
def padded_budget(keep: float, random_keep: float, f: int, multiple: int) -> tuple[int, int]:
    """(k_top, n_rand) of ``column_budget``, with the random part grown so that k_top + n_rand fills the
    kernels' unit tiles (a multiple of ``multiple``) when that adds at most 10% of the units.

    The kernels compute a k-unit selection in whole tiles, so real units in the padding slots cost only
    their activation-cache traffic (the MMAs run anyway): they recompute more randomly chosen units instead,
    as the original method pads its counts to 256 with extra columns. The 10% bound keeps small layers
    (tests, tiny models) at their configured fraction. The same budget on every path (CPU references
    included), so the paths choose alike. Cached: it runs on every sparse call of every site.
    """
    k_top, n_rand = column_budget(keep, random_keep, f)
    k = k_top + n_rand
    padded = min(f, -(-k // multiple) * multiple)
    if padded - k <= 0.1 * f:
        n_rand += padded - k
    return k_top, n_rand


def _selection_due(cfg: MlpConfig, entry: MlpCache, step: int) -> bool:
    """Whether a sparse call at ``step`` chooses its units anew (else it reuses ``entry.indices``)."""
    return entry.indices is None or step - entry.selected_at >= cfg.selection_every


def _select(
    ctx: CallContext, site: SiteState, entry: MlpCache, x3: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
    gated: bool, f: int,
) -> tuple[torch.Tensor, int]:
    """Choose the units of a selection step from x3 (B, S, Din) and refresh ``entry.block_mean`` at them;
    returns ((B, nb, k) int32 indices, the FLOPs of the block-mean linear)."""
    cfg: MlpConfig = ctx.state.config.mlp
    k_top, n_rand = padded_budget(cfg.keep, cfg.random_keep, f, mlp_kernels.unit_multiple(gated, x3.dtype))
    # (B, nb, F or 2F) in x's dtype; the fused selection reads it as is, the PyTorch path widens it
    bm = F.linear(block_means(x3, cfg.block, x3.dtype), w1, b1)
    seed = ctx.state.next_seed()
    # refresh the reference block means of the chosen units only (unchosen ones keep drifting)
    idx = _select_units_fused(site, bm, entry.block_mean, gated, k_top, n_rand, seed)
    if idx is None:
        bm = bm.float()
        diff = torch.sub(bm, entry.block_mean).abs_()
        if gated:
            diff = diff[..., :f] + diff[..., f:]
        idx = _select_units(site, diff, k_top, n_rand, seed)
        ref_idx = torch.cat([idx, idx + f], dim=-1).long() if gated else idx.long()
        entry.block_mean.scatter_(-1, ref_idx, bm.gather(-1, ref_idx))
    return idx, 2 * x3.shape[0] * bm.shape[1] * x3.shape[2] * w1.shape[0]


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """x (..., C) as (B, S, C): a 2-D input is one sample."""
    return x.reshape(x.shape[0] if x.dim() >= 3 else 1, -1, x.shape[-1])


def select_ahead(
    ctx: CallContext, site: SiteState, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, gated: bool
) -> None:
    """``torch.ops.chipmunk.mlp_select``: if this forward's call of ``site`` will choose its units, choose
    them now from its input x (..., Din), before the other work that the graph runs until that call; with
    ``mlp.sparse_ahead``, run that sparse call's whole work now (selection, both kernels, cache updates) from
    the second sparse call on (the arguments beyond this op's come from the site's latest call, see
    :class:`AheadArgs`; on CUDA the first call makes the W2ᵀ copy the kernels read).

    On CUDA the work runs on the model's selection stream, after the work enqueued so far; the call waits for
    it (:func:`run_mlp`) and returns the output made here. It is the work the call would do itself (the same
    seed, kernels, inputs and caches), so the result does not change, only when the work runs. Anything the
    call would do densely (a dense step, a cache it will remake) is left to the call.
    """
    cfg: MlpConfig = ctx.state.config.mlp
    info = ctx.info
    entry: MlpCache | None = site.cache(info.stream, info.generation)
    # cheapest tests first: this runs at every step
    if entry is None or cfg.is_dense_step(info.step):
        return
    args: AheadArgs | None = site.ahead
    whole = cfg.sparse_ahead and args is not None and site.ahead_error is None and (
        not args.triton or "w2t" in site.weight_copies)
    due = _selection_due(cfg, entry, info.step)
    if not (due or whole):
        return
    x3 = _as_3d(x)
    gate = 2 if gated else 1
    f = w1.shape[0] // gate
    if (site.ordinal < cfg.first_dense_layers or cfg.is_plain_dense_step(info.step, info.last)
            or entry.act.shape != (x3.shape[0], f, x3.shape[1]) or entry.block_mean.shape[-1] != gate * f
            or (whole and (args.w2_width != f or entry.out.shape[-1] != args.w2.shape[0]))):
        return
    stale = site.pending.pop(info.stream, None)  # a call that never came (an exception in between)
    if stale is not None:
        _drop_stale(site, info.stream, stale, x3.device)
        entry = site.cache(info.stream, info.generation)
        if entry is None:
            return
    call = (info.generation, info.step)
    if not x3.is_cuda:
        site.pending[info.stream] = _run_ahead(ctx, site, entry, call, x3, w1, b1, gated, f, due, whole, None,
                                               info.stream)
        return
    main = torch.cuda.current_stream(x3.device)
    side = ctx.state.selection_stream(x3.device)
    # the output is made on the main stream, which reads it after its wait: no other work gets its memory
    out = torch.empty_like(entry.out) if whole else None
    side.wait_stream(main)
    with torch.cuda.stream(side):
        pending = _run_ahead(ctx, site, entry, call, x3, w1, b1, gated, f, due, whole, out, info.stream)
        pending.ready = torch.cuda.Event()
        pending.ready.record(side)
    # x3 was made by the main stream: held until the call's wait (the pending entry holds the caches it
    # writes). Tensors made here belong to the side stream, which only runs after a wait for the main stream.
    pending.keep = (x3,)
    site.pending[info.stream] = pending


def _run_ahead(
    ctx: CallContext, site: SiteState, entry: MlpCache, call: tuple[int, int], x3: torch.Tensor, w1: torch.Tensor,
    b1: torch.Tensor | None, gated: bool, f: int, due: bool, whole: bool, out: torch.Tensor | None, stream: int,
) -> PendingSelection:
    """The work :func:`select_ahead` moves ahead, on the current stream: the selection if ``due``, and if
    ``whole`` the sparse call itself into ``out`` (None: a new tensor). A failing kernel stops ``whole`` at
    this site (logged once) and drops the caches it may have half-updated: the call then runs densely."""
    idx, flops = _select(ctx, site, entry, x3, w1, b1, gated, f) if due else (None, 0)
    if not whole:
        return PendingSelection(call, entry, idx, flops, None, ())
    if due:
        entry.indices, entry.selected_at = idx, call[1]
    args: AheadArgs = site.ahead
    try:
        out = _sparse_update(site, entry, x3, w1, b1, args.w2, args.activation, gated, args.w2_offset,
                             args.w2_width, ctx.state.config.mlp.block, args.triton, out)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - Triton compile/launch errors share no base class
        log.warning("chipmunk: MLP site %d failed running ahead (%s: %s); its calls run in place from now on",
                    site.ordinal, type(err).__name__, err)
        site.ahead_error = f"{type(err).__name__}: {err}"
        site.caches.pop(stream, None)
        return PendingSelection(call, entry, None, 0, None, ())
    return PendingSelection(call, entry, idx, flops, None, (), out=out, selected=due)


def _drop_stale(site: SiteState, stream: int, stale: PendingSelection, device: torch.device) -> None:
    """A pending entry whose call never came: wait for its work; if it ran the whole sparse call, the caches
    moved one step on without a caller, so they are dropped (the next call remakes them densely)."""
    if stale.ready is not None:
        torch.cuda.current_stream(device).wait_event(stale.ready)
    if stale.out is not None and site.caches.get(stream) is stale.entry:
        site.caches.pop(stream, None)


def mlp_flops(m: int, din: int, f: int, dout: int, gated: bool) -> int:
    return 2 * m * din * f * (2 if gated else 1) + 2 * m * f * dout


def _use_triton(x, w1, w2, use_triton: bool) -> str | None:
    if not use_triton:
        return "use_triton=False"
    if not x.is_cuda:
        return "not a CUDA tensor"
    return mlp_kernels.supports(x, w1, w2)


def _sparse_update(
    site: SiteState, entry: MlpCache, x3: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
    w2: torch.Tensor, activation: str, gated: bool, w2_offset: int, w2_width: int, block: int, triton: bool,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """A sparse call's work at ``entry.indices``: the caches updated in place and the output (B, S, Dout), in
    ``out`` when given (Triton) or a new tensor. The Triton kernels' errors propagate (the caller drops the
    half-updated caches)."""
    dout = w2.shape[0]
    w2s = w2.narrow(1, w2_offset, w2_width)
    if not triton:
        mlp_kernels.column_sparse_mlp_delta_ref(x3, w1, b1, w2s, entry.indices, entry.act, entry.out,
                                                activation=activation, gated=gated, block_size=block)
        return entry.out.clone()
    # The kernel gathers rows of W2ᵀ: keep one contiguous transposed copy of the activation's columns per site
    # (made once; a strided view of W2 makes the gather uncoalesced and the sparse step slower than the dense
    # one).
    w2t = site.weight_copies.get("w2t")
    if w2t is None or w2t.device != w2.device or w2t.shape != (w2_width, dout):
        w2t = site.weight_copies["w2t"] = w2s.t().contiguous()
    # The result must not alias the cache (the graph may reuse its buffer): the down kernel writes it beside
    # the cache update, instead of a clone afterwards.
    out = torch.empty_like(entry.out) if out is None else out
    mlp_kernels.column_sparse_mlp_delta(x3, w1, b1, w2t.t(), entry.indices, entry.act, entry.out,
                                        activation=activation, gated=gated, block_size=block, out=out)
    return out


def run_mlp(
    ctx: CallContext,
    site: SiteState,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    gated: bool,
    w2_offset: int,
    w2_width: int,
) -> torch.Tensor:
    """One call of an MLP site. x: (..., Din); returns (..., Dout), contiguous."""
    cfg: MlpConfig = ctx.state.config.mlp
    info = ctx.info
    lead = x.shape[:-1]
    x3 = _as_3d(x)
    bsz, s, din = x3.shape
    # the key is w1: a change of w2 alone must drop the caches and the w2t copy too
    site.watch("w2", w2, info.generation, ctx.state.deferred)
    w2s = w2.narrow(1, w2_offset, w2_width)
    f = w2_width
    dout = w2.shape[0]
    stats = site.stats
    stats.calls += 1
    stats.dense_flops = mlp_flops(bsz * s, din, f, dout, gated)
    signature = (x3.shape, x3.stride(), x3.dtype, x3.device, w2_offset, w2_width, b1 is None)
    checks = site.launch_check(signature, lambda: _use_triton(x3, w1, w2s, ctx.state.config.use_triton))
    why_not = checks[0]
    triton = why_not is None
    stats.backend = "triton" if triton else f"pytorch ({why_not})"
    if triton and site.selection_kernel_error is not None:
        stats.backend += " [selection: pytorch after a kernel failure]"
    if triton and site.dense_kernel_error is not None:
        stats.backend += " [dense step: pytorch after a kernel failure]"

    if site.ahead is None or site.ahead.w2 is not w2 or site.ahead.triton != triton:
        site.ahead = AheadArgs(w2, activation, w2_offset, w2_width, triton)

    entry: MlpCache | None = site.cache(info.stream, info.generation)
    if entry is not None and entry.out.shape != (bsz, s, dout):
        entry = None
    pending: PendingSelection | None = site.pending.pop(info.stream, None)
    if pending is not None and pending.ready is not None:
        torch.cuda.current_stream(x3.device).wait_event(pending.ready)  # used or not: its tensors are free after
    if pending is not None and not (pending.entry is entry and pending.call == (info.generation, info.step)):
        if pending.out is not None and entry is pending.entry:  # it moved these caches on for another call
            site.caches.pop(info.stream, None)
            entry = None
        pending = None
    first_layers = site.ordinal < cfg.first_dense_layers
    plain = cfg.is_plain_dense_step(info.step, info.last)  # the next step caches, or nothing follows
    if first_layers or plain or entry is None or cfg.is_dense_step(info.step):
        stats.dense_calls += 1
        if first_layers or plain:
            _, a = hidden_activation(x3, w1, b1, activation, gated)
            out = F.linear(a, w2s, b2).contiguous()
            stats.record("dense (first layers)" if first_layers else "dense (no cache)",
                         fixed_flops=stats.dense_flops, kept_flops=0, counts=None, columns=f, kept_static=1.0)
            return out.reshape(*lead, dout)
        h = F.linear(x3, w1, b1)
        a, act_t, means = _activation_and_caches(site, h, activation, gated, cfg.block, triton)
        out = _down(a, w2s, b2)
        site.caches[info.stream] = MlpCache(generation=info.generation, act=act_t, out=out.clone(), block_mean=means)
        stats.record("dense+cache", fixed_flops=stats.dense_flops, kept_flops=0, counts=None, columns=f,
                     kept_static=1.0)
        return out.reshape(*lead, dout)

    sel_flops = 0
    if pending is not None and pending.out is not None:  # the whole call ran ahead (sparse_ahead)
        out, sel_flops = pending.out, pending.flops
        stats.sparse_ahead += 1
        if pending.selected:
            stats.selections += 1
            stats.selections_ahead += 1
    else:
        if _selection_due(cfg, entry, info.step):
            if pending is not None and pending.indices is not None:
                idx, sel_flops = pending.indices, pending.flops
                stats.selections_ahead += 1
            else:
                idx, sel_flops = _select(ctx, site, entry, x3, w1, b1, gated, f)
            entry.indices, entry.selected_at = idx, info.step
            stats.selections += 1
        try:
            out = _sparse_update(site, entry, x3, w1, b1, w2, activation, gated, w2_offset, w2_width, cfg.block,
                                 triton, None)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - Triton compile/launch errors share no base class
            if not triton:
                raise
            # The caches may be half-updated: drop them, and let this call recompute densely on PyTorch.
            checks[0] = site.triton_failed(err)
            site.caches.pop(info.stream, None)
            stats.calls -= 1
            return run_mlp(ctx, site, x, w1, b1, w2, b2, activation, gated, w2_offset, w2_width)
    stats.sparse_calls += 1
    kept = entry.indices.shape[-1] / f
    stats.record("sparse", fixed_flops=sel_flops, kept_flops=stats.dense_flops, counts=None, columns=f,
                 kept_static=kept)
    if ctx.state.config.check_error:
        _, a = hidden_activation(x3, w1, b1, activation, gated)
        ref = F.linear(a, w2s, b2).float()
        err = (out.float() - ref).norm() / ref.norm().clamp_min(1e-30)
        stats.errors.append((info.step, float(err)))
    return out.reshape(*lead, dout)
