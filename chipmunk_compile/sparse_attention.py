"""Cached-delta column-sparse attention (the algorithm behind ``torch.ops.chipmunk.attention``).

Per (sample, head, group of ``query_group`` consecutive queries) ``g``, with ``A_S`` attention restricted
to (and renormalised over) the key set ``S_g``:

- selection step (dense): exact output ``o``; the column sums of the exact softmax probabilities over
  the group rank the keys; ``S_g`` = the top ``keep`` fraction + ``random_keep`` random others (+ text
  keys when configured; masked keys never); cache ``C = o - A_S(q, k, v)``; return ``o``;
- refresh step (dense, selection kept): exact ``o``; ``C = o - A_S``; return ``o``;
- sparse step: return ``C + A_S(q, k, v)``: only the selected columns are recomputed.

On CUDA the Triton kernels in :mod:`chipmunk_compile.kernels` run; elsewhere their PyTorch references.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chipmunk_compile.config import AttentionConfig
from chipmunk_compile.kernels import attention_colsum as colsum_kernels
from chipmunk_compile.kernels import column_sparse_attention as csa_kernels
from chipmunk_compile.kernels import select_columns as select_kernels
from chipmunk_compile.offload import pack_indices_, unpack_indices
from chipmunk_compile.selection import column_budget, select_columns
from chipmunk_compile.state import CallContext, SiteState


@dataclass
class AttentionCache:
    """Per (site, CFG stream) state, valid for one generation.

    cache: (B, H, S, D), the dense output minus the selected columns' part, in (B, S, H, D) memory.
    indices: (B, H, G, K) int32 and counts: (B, H, G) int32, the selected keys per query group.
    When ``offloaded``, cache and indices live in the model's CacheOffloader (pinned CPU memory) and the
    fields here are None.
    """

    generation: int
    cache: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    index_shape: tuple = ()
    offloaded: bool = False

    def tensors(self, offloader, key) -> tuple[torch.Tensor, torch.Tensor]:
        """(cache, indices) on the compute device."""
        if not self.offloaded:
            return self.cache, self.indices
        fetched = offloader.fetch(key)  # the indices come back unpacked (store's decode)
        return fetched["cache"], fetched["indices"]


def _unpack_fetched(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An offloaded entry as copied back ({"cache", packed index parts}) -> {"cache", "indices"}."""
    cache = tensors.pop("cache")
    return {"cache": cache, "indices": unpack_indices(tensors)}


def key_bias_from_mask(mask: torch.Tensor | None, batch: int, heads: int, sk: int) -> torch.Tensor | None:
    """A key-padding mask (bool keep-mask or additive float) as fp32 bias (B, 1|H, Sk), or None."""
    if mask is None:
        return None
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m[:, :, 0, :]  # (B|1, 1|H, Sk): the query dim is 1 (checked by the pass and by the op)
    if m.dtype == torch.bool:
        bias = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
    else:
        bias = m.float()
    return bias.expand(batch, bias.shape[1], sk).contiguous()


def _bshd_empty_like(q: torch.Tensor, dv: int) -> torch.Tensor:
    b, h, s, _ = q.shape
    return q.new_empty((b, s, h, dv)).permute(0, 2, 1, 3)


def dense_attention(q, k, v, attn_mask, scale, enable_gqa) -> torch.Tensor:
    """Exact SDPA, returned in the op's (B, S, H, D) memory layout."""
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)
    out = _bshd_empty_like(q, v.shape[-1])
    out.copy_(o)
    return out


def _use_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, use_triton: bool) -> str | None:
    """None if the Triton kernels can run on these tensors, else why not."""
    if not use_triton:
        return "use_triton=False"
    if not q.is_cuda:
        return "not a CUDA tensor"
    return csa_kernels.supports(q, k, v)


def _sparse(q, k, v, indices, counts, *, scale, group, key_bias, base, sign, triton: bool):
    if triton:
        return csa_kernels.column_sparse_attention(q, k, v, indices, counts, scale=scale, group_size=group,
                                                   key_bias=key_bias, base=base, sign=sign)
    return csa_kernels.column_sparse_attention_ref(q, k, v, indices, counts, scale=scale, group_size=group,
                                                   key_bias=key_bias, base=base, sign=sign)


def _colsum(q, k, v, *, scale, group, key_bias, triton: bool):
    fn = colsum_kernels.attention_with_colsum if triton else colsum_kernels.attention_with_colsum_ref
    return fn(q, k, v, scale=scale, group_size=group, key_bias=key_bias)


def attention_flops(b: int, h: int, sq: int, sk: int, d: int, dv: int) -> int:
    return 2 * b * h * sq * sk * (d + dv)


def run_attention(
    ctx: CallContext,
    site: SiteState,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
    enable_gqa: bool,
    text_start: int,
    text_len: int,
) -> torch.Tensor:
    """One call of an attention site. Shapes: q (B, H, S, D); k, v (B, Hkv, S, D); returns (B, H, S, Dv).

    A Triton kernel that fails (compile or launch, e.g. a tile that does not fit the card's shared memory) is
    logged and the site runs the PyTorch references for those shapes from then on: never a crash mid-loop.
    """
    b, h, s, d = q.shape
    sk, dv = k.shape[2], v.shape[-1]
    stats = site.stats
    stats.calls += 1
    stats.dense_flops = attention_flops(b, h, s, sk, d, dv)
    signature = (q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, q.device,
                 None if attn_mask is None else attn_mask.shape)
    checks = site.launch_check(signature, lambda: _use_triton(q, k, v, ctx.state.config.use_triton))
    if checks[0] is not None:
        stats.backend = f"pytorch ({checks[0]})"
        return _attention_call(ctx, site, q, k, v, attn_mask, scale, enable_gqa, text_start, text_len, False, checks)
    stats.backend = "triton"
    try:
        return _attention_call(ctx, site, q, k, v, attn_mask, scale, enable_gqa, text_start, text_len, True, checks)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - Triton compile/launch errors (e.g. out of shared memory) share no base
        checks[0] = site.triton_failed(err)
        return _attention_call(ctx, site, q, k, v, attn_mask, scale, enable_gqa, text_start, text_len, False, checks)


def _attention_call(ctx, site, q, k, v, attn_mask, scale, enable_gqa, text_start, text_len, triton: bool,
                    checks: list) -> torch.Tensor:
    """The body of :func:`run_attention` on one path (Triton kernels, or their PyTorch references)."""
    cfg: AttentionConfig = ctx.state.config.attention
    info = ctx.info
    b, h, s, d = q.shape
    sk = k.shape[2]
    scale_f = float(scale) if scale is not None else d**-0.5
    stats = site.stats
    if cfg.keep_text_keys:
        text_start, text_len = _text_span(ctx.state, stats, sk, text_start, text_len)
    if site.ordinal < cfg.first_dense_layers:
        stats.dense_calls += 1
        stats.record("dense (first layers)", fixed_flops=stats.dense_flops, kept_flops=0, counts=None,
                     columns=sk, kept_static=1.0)
        return dense_attention(q, k, v, attn_mask, scale, enable_gqa)

    # A dense step followed by a dense step makes no cache (the next one makes it). Where the selection is
    # re-made at every dense step, it runs plain dense attention; where it is made once (recompute_selection
    # off), the first dense step still selects: on the reference DiT, the flux preset selecting at step 1
    # instead of step 0 lost 2.2 dB (CPU, 8 samples; README).
    plain = cfg.is_plain_dense_step(info.step, info.last)
    if plain and (cfg.recompute_selection or info.last):
        return _plain_dense(stats, q, k, v, attn_mask, scale, enable_gqa)

    entry: AttentionCache | None = site.cache(info.stream, info.generation)
    group = cfg.query_group
    key_bias = key_bias_from_mask(attn_mask, b, h, sk)
    # The selection never lists a masked key among a group's ``counts`` (their scores are -inf), and a bool
    # key-padding mask gives every other key a bias of exactly 0: the sparse passes then need no bias (the
    # bias-free kernel is the faster one: 23.5 vs 27.6 ms per HunyuanVideo 129-frame call on the H100,
    # attention_long2_NVIDIA-H100_session8.csv). An additive float mask may hold other values: kept.
    sparse_bias = None if attn_mask is not None and attn_mask.dtype == torch.bool else key_bias
    offloader = ctx.state.offloader_for(q.device)
    okey = (id(site), info.stream)
    if offloader is not None:
        offloader.note_use(okey)
    if entry is not None and entry.index_shape[:3] != (b, h, -(-s // group)):
        entry = None

    # a selection made at a plain dense step, whose cache the next step did not make (a step skipped)
    uncached = entry is not None and entry.cache is None and not entry.offloaded
    if entry is None or not entry.index_shape or uncached or cfg.is_dense_step(info.step):
        select = entry is None or not entry.index_shape or cfg.recompute_selection
        if plain and not select:
            return _plain_dense(stats, q, k, v, attn_mask, scale, enable_gqa)
        if entry is None:
            entry = AttentionCache(generation=info.generation)
            site.caches[info.stream] = entry
        if select:
            o, indices, counts = _dense_and_select(ctx, q, k, v, scale=scale_f, key_bias=key_bias, triton=triton,
                                                   text_start=text_start, text_len=text_len)
            stats.selections += 1
            extra = attention_flops(b, h, s, sk, d, 0)  # the column-sum pass recomputes q·k
            if plain:  # kept for the generation; the next (dense) step makes the cache
                entry.indices, entry.counts, entry.index_shape = indices, counts, tuple(indices.shape)
                entry.cache, entry.offloaded = None, False
                stats.dense_calls += 1
                stats.record("dense+select (next step dense)", fixed_flops=stats.dense_flops + extra, kept_flops=0,
                             counts=counts, columns=sk)
                return o
        else:
            _, indices = entry.tensors(offloader, okey)
            counts = entry.counts
            o = dense_attention(q, k, v, attn_mask, scale, enable_gqa)
            extra = 0
        cache = _sparse(
            q, k, v, indices, counts, scale=scale_f, group=group, key_bias=sparse_bias,
            base=o, sign=-1.0, triton=triton,
        )
        entry.counts, entry.index_shape = counts, tuple(indices.shape)
        nbytes = cache.numel() * cache.element_size() + indices.numel() * 4
        if offloader is not None and ctx.state.should_offload(nbytes, q.device, okey, info.generation):
            # host copies keep the indices in 2-2.125 bytes each where the key count allows (Wan at 81 frames
            # did not fit the 128 GB host with int32 ones)
            packed = pack_indices_(indices, sk)  # indices are not used after this
            offloader.store(okey, {"cache": cache, **packed}, decode=_unpack_fetched)
            entry.cache, entry.indices, entry.offloaded = None, None, True
        else:
            entry.cache, entry.indices, entry.offloaded = cache, indices, False
        stats.cache_location = "cpu (pinned)" if entry.offloaded else str(q.device)
        stats.dense_calls += 1
        stats.record("dense+select" if select else "dense+refresh", fixed_flops=stats.dense_flops + extra,
                     kept_flops=stats.dense_flops, counts=entry.counts, columns=sk)
        if offloader is not None:  # not the last step: a dense last step returned above
            offloader.prefetch_after(okey)
        return o

    cache, indices = entry.tensors(offloader, okey)
    out = _sparse(
        q, k, v, indices, entry.counts, scale=scale_f, group=group, key_bias=sparse_bias,
        base=cache, sign=1.0, triton=triton,
    )
    if offloader is not None:
        offloader.prefetch_after(okey, wrap=not info.last)
    stats.sparse_calls += 1
    stats.record("sparse", fixed_flops=0, kept_flops=stats.dense_flops, counts=entry.counts, columns=sk)
    if ctx.state.config.check_error:
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)
        err = (out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)
        stats.errors.append((info.step, float(err)))
    return out


def _text_span(state, stats, sk: int, text_start: int, text_len: int) -> tuple[int, int]:
    """The site's text keys (start, length) for ``keep_text_keys``. The pass finds them where the keys are a
    concatenation of separately projected image and text parts (double-stream blocks). Single-stream blocks
    project the already joined sequence, and in a whole-model graph nothing near their keys names the text:
    such a site takes the span the model's other sites of the same key length showed (same joint sequence),
    and the report says so."""
    if text_len:
        state.text_spans[sk] = (text_start, text_len)  # refreshed each call: a new prompt length moves it
        return text_start, text_len
    span = state.text_spans.get(sk)
    if span is None:
        return text_start, text_len
    if stats.text_span_taken != span:  # the current one: a new resolution moves it
        stats.text_span_taken = span
        stats.text_span = f"text[{span[0]}:{span[0] + span[1]}] (from the sites of the same key length)"
    return span


def _plain_dense(stats, q, k, v, attn_mask, scale, enable_gqa) -> torch.Tensor:
    """A dense step that needs no cache (the next step is dense too, or it is the last): exact output."""
    stats.dense_calls += 1
    stats.record("dense (no cache)", fixed_flops=stats.dense_flops, kept_flops=0, counts=None,
                 columns=k.shape[2], kept_static=1.0)
    return dense_attention(q, k, v, attn_mask, scale, enable_gqa)


def _dense_and_select(ctx, q, k, v, *, scale, key_bias, triton, text_start, text_len):
    """Exact output (B, H, S, Dv) in (B, S, H, Dv) memory, and the selection: indices (B, H, G, K), counts
    (B, H, G).

    The column sums are (B, H, G, Sk) fp32: 10.6 GB for HunyuanVideo at 720p/129 frames. They are made and
    consumed a few heads at a time, so no more than ``COLSUM_BYTES`` of them (plus the selection's own
    temporaries) exist at once.
    """
    cfg: AttentionConfig = ctx.state.config.attention
    b, h, s, _ = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    groups = -(-s // cfg.query_group)
    ratio = h // hkv  # query heads per kv head (GQA): a chunk holds whole kv heads
    per_kv_head = b * ratio * groups * sk * 4
    chunk = max(1, min(hkv, COLSUM_BYTES // max(per_kv_head, 1))) * ratio
    if chunk >= h:
        o, _lse, colsum = _colsum(q, k, v, scale=scale, group=cfg.query_group, key_bias=key_bias, triton=triton)
        return (o, *_select_keys(ctx, colsum, key_bias, cfg, sk, text_start, text_len, triton))
    o = q.new_empty((b, s, h, dv)).permute(0, 2, 1, 3)
    parts = []
    for h0 in range(0, h, chunk):
        h1 = min(h, h0 + chunk)
        bias = key_bias if key_bias is None or key_bias.shape[1] == 1 else key_bias[:, h0:h1]
        kv = slice(h0 // ratio, h1 // ratio)
        o_part, _lse, colsum = _colsum(q[:, h0:h1], k[:, kv], v[:, kv], scale=scale, group=cfg.query_group,
                                       key_bias=bias, triton=triton)
        o[:, h0:h1].copy_(o_part)
        del o_part
        parts.append(_select_keys(ctx, colsum, bias, cfg, sk, text_start, text_len, triton))
        del colsum
    return o, torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


# Column sums made at once at most (bytes); above this a selection step works through the heads in chunks.
COLSUM_BYTES = 1 << 30


def _select_keys(ctx, colsum, key_bias, cfg: AttentionConfig, sk, text_start, text_len, triton: bool):
    """Indices (B, H, G, K) and counts (B, H, G) from column sums (B, H, G, Sk), which it overwrites.
    ``triton``: the site runs its Triton kernels (then a selection with no masked key and no random part
    takes the top-k kernel; ties may go to other columns than torch.topk's, the chosen set is the same)."""
    scores = colsum
    if key_bias is not None:
        invalid = torch.isneginf(key_bias).unsqueeze(2)  # (B, 1|H, 1, Sk)
        scores.masked_fill_(invalid, float("-inf"))
    if cfg.keep_text_keys and text_len > 0:
        forced = scores[..., text_start : text_start + text_len]
        forced.masked_fill_(forced > float("-inf"), float("inf"))
    k_top, n_rand = column_budget(cfg.keep, cfg.random_keep, sk)
    if cfg.keep_text_keys and text_len > 0:
        k_top = min(sk, max(k_top, text_len + 1))
        n_rand = min(n_rand, sk - k_top)
    if triton and key_bias is None and n_rand == 0 and not (cfg.keep_text_keys and text_len > 0):
        # Every column valid and no random part (FLUX): the top-k kernel, one launch with the indices already
        # ascending, instead of torch.topk, a gather and a sort (at FLUX's size 69 against 410 µs a site on an
        # H100: bench/results/flux_micro_NVIDIA-H100_session11.csv).
        flat = scores.reshape(-1, sk)
        if select_kernels.supports(flat) is None:
            idx = select_kernels.select_topk_random(flat, k_top, 0, seed=0)
            counts = torch.full(scores.shape[:-1], k_top, dtype=torch.int32, device=scores.device)
            return idx.view(*scores.shape[:-1], k_top), counts
    gen = ctx.state.random_generator(colsum.device)
    return select_columns(scores, k_top, n_rand, gen)
