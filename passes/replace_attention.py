"""Pass: replace eligible ``F.scaled_dot_product_attention`` calls with ``torch.ops.chipmunk.attention``.

Eligible: self/joint attention (query and key lengths provably equal, keys not from the text input
alone), rank 4 (B, H, S, D) in any memory layout, fp16/bf16/fp32, no dropout, not causal, and no mask or
a key-padding mask (one that broadcasts over queries: shape (B|1, H|1, 1, S)). Everything else stays
dense with the reason recorded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from chipmunk_compile.passes.graph_utils import (
    CAT_TARGETS,
    LINEAR_TARGETS,
    SDPA_TARGETS,
    ancestors,
    arg,
    hint,
    input_dependencies,
    input_name,
    is_call,
    is_weight,
    module_path,
    same_size,
    source_name,
    value,
)
from chipmunk_compile.passes.sites import Plan, SiteRecord
from torch._dynamo.utils import counters

import chipmunk_compile.ops  # noqa: F401  (registers torch.ops.chipmunk.*)
from chipmunk_compile.config import AttentionConfig

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = (64, 128)


def _shape(v) -> tuple:
    return tuple(hint(s) if hint(s) is not None else str(s) for s in v.shape) if v is not None else ()


def check_attention(
    node: fx.Node, cfg: AttentionConfig, deps: dict[fx.Node, frozenset] | None = None
) -> tuple[str | None, dict]:
    """Why the SDPA ``node`` must stay dense (None if it can be rewritten), and its parsed arguments.
    ``deps``: :func:`input_dependencies` of the graph (without it, only the lengths tell cross-attention)."""
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    mask = arg(node, 3, "attn_mask")
    dropout_p = arg(node, 4, "dropout_p", 0.0)
    is_causal = arg(node, 5, "is_causal", False)
    scale = arg(node, 6, "scale")
    enable_gqa = node.kwargs.get("enable_gqa", arg(node, 7, "enable_gqa", False))
    parsed = {"q": q, "k": k, "v": v, "mask": mask, "scale": scale, "enable_gqa": enable_gqa}
    if not cfg.enabled:
        return "attention sparsity disabled by config", parsed
    qv, kv, vv = value(q), value(k), value(v)
    if qv is None or kv is None or vv is None:
        return "no shape information for q/k/v", parsed
    if is_causal is not False:
        return "causal attention", parsed
    if not isinstance(dropout_p, (int, float)) or dropout_p != 0.0:
        return f"attention dropout (dropout_p={dropout_p})", parsed
    if scale is not None and not isinstance(scale, (int, float)):
        return "non-constant softmax scale", parsed
    if not isinstance(enable_gqa, bool):
        return "non-constant enable_gqa", parsed
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        return f"q/k/v of rank {qv.dim()} (expected (B, H, S, D))", parsed
    if qv.dtype not in SUPPORTED_DTYPES or kv.dtype != qv.dtype or vv.dtype != qv.dtype:
        return f"dtype {qv.dtype} (supported: fp16, bf16, fp32, all equal)", parsed
    if not same_size(qv.shape[2], kv.shape[2]):
        return f"cross-attention (query length {_shape(qv)[2]}, key length {_shape(kv)[2]})", parsed
    if deps is not None:  # equal lengths: cross-attention all the same if the keys come from the text alone
        qd, kd = deps.get(q, frozenset()), deps.get(k, frozenset()) | deps.get(v, frozenset())
        if kd and not qd <= kd and all(_is_encoder_input(n) for n in kd):
            names = ", ".join(sorted(input_name(n) for n in kd))
            return f"cross-attention (keys and values come from {names} only)", parsed
    sk = hint(kv.shape[2])
    if sk is not None and sk < cfg.min_seq_len:
        return f"sequence length {sk} below attention.min_seq_len={cfg.min_seq_len}", parsed
    if not same_size(qv.shape[0], kv.shape[0]):
        return "batch sizes of q and k differ", parsed
    hq, hk = hint(qv.shape[1]), hint(kv.shape[1])
    if hq is None or hk is None or hq % hk != 0 or (hq != hk and not enable_gqa):
        return f"head counts q={hq}, kv={hk} not supported", parsed
    if qv.device.type == "cuda" and hint(qv.shape[3]) not in KERNEL_HEAD_DIMS:
        return f"head dim {_shape(qv)[3]} (the CUDA kernels take {KERNEL_HEAD_DIMS})", parsed
    if mask is not None:
        mv = value(mask)
        if mv is None:
            return "attention mask without shape information", parsed
        if mv.dim() > 4 or mv.dim() < 1:
            return f"attention mask of rank {mv.dim()}", parsed
        shape = (1,) * (4 - mv.dim()) + tuple(mv.shape)
        if not (same_size(shape[2], 1) and same_size(shape[3], kv.shape[2])):
            return f"arbitrary attention mask of shape {_shape(mv)} (only key-padding masks are sparse)", parsed
        if mv.dtype != torch.bool and mv.dtype != qv.dtype and not mv.dtype.is_floating_point:
            return f"attention mask dtype {mv.dtype}", parsed
    return None, parsed


def _site_key(q: fx.Node) -> fx.Node | None:
    """The weight of the nearest linear producing q (the layer's identity at run time)."""
    for n in ancestors(q, limit=48):
        if is_call(n, LINEAR_TARGETS):
            w = arg(n, 1, "weight")
            if is_weight(w):
                return w
    return None


def _text_span(k: fx.Node, sk: int | None) -> tuple[list, int, int] | None:
    """Where the text keys are in a joint attention whose keys are ``cat([text, image])`` or
    ``cat([image, text])`` along the sequence: (the two parts, the cat dim, the text part's index); None if
    not recognisable."""
    if sk is None:
        return None
    for n in ancestors(k, limit=48):
        if not is_call(n, CAT_TARGETS):
            continue
        parts = arg(n, 0, "tensors")
        if not isinstance(parts, (list, tuple)) or len(parts) != 2:
            continue
        vals = [value(p) for p in parts]
        if any(v is None or v.dim() != 4 for v in vals):
            continue
        dim = arg(n, 1, "dim", 0) % 4
        lens = [hint(v.shape[dim]) for v in vals]
        if None in lens or sum(lens) != sk:
            continue
        for i, p in enumerate(parts):
            if _from_encoder(p):
                return list(parts), dim, i
    return None


def _span_args(gm: fx.GraphModule, before: fx.Node, span) -> tuple[Any, Any, int, int]:
    """The op's (text_start, text_len) arguments for a :func:`_text_span` result, and their traced values.

    A size that is symbolic in the graph (a dynamic-shape graph, compiled after a resolution change) is
    passed as an ``aten.sym_size`` node, so every call gets its own sizes: as plain ints from the traced
    sizes, HunyuanVideo's span (text after the video tokens) stayed at the first size's place."""
    if span is None:
        return 0, 0, 0, 0
    parts, dim, i = span

    def size(part: fx.Node) -> tuple[Any, int]:
        s = value(part).shape[dim]
        if isinstance(s, int):
            return s, s
        with gm.graph.inserting_before(before):
            node = gm.graph.call_function(torch.ops.aten.sym_size.int, (part, dim))
        node.meta["val"] = s
        return node, hint(s)

    length, length_hint = size(parts[i])
    start, start_hint = (0, 0) if i == 0 else size(parts[0])
    return start, length, start_hint, length_hint


def _encoder_like(name: str) -> bool:
    return "encoder" in name or "context" in name or "text" in name


def _is_encoder_input(node: fx.Node) -> bool:
    """A graph input named like the text / conditioning stream (``encoder_hidden_states``, ``context``...)."""
    return node.op == "placeholder" and _encoder_like(input_name(node))


# Weights of the text stream's own projections in joint attention (diffusers' add_{q,k,v}_proj and
# norm_added_{q,k}; "txt" in QwenImage's modules): its graph input may lie farther up than the ancestors searched.
_TEXT_STREAM_WEIGHTS = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_", "txt")


def _from_encoder(node: fx.Node) -> bool:
    """Whether ``node`` comes from the text stream: a graph input (user input or weight) among its nearest
    ancestors has a source name that mentions encoder, context or text, or names a weight of the text
    stream's projections (QwenImage's text input is more than 32 nodes up, behind txt_norm, txt_in and its
    modulation; keep_text_keys found no span there)."""
    for n in [node, *ancestors(node, limit=32)]:
        if n.op == "placeholder":
            name = source_name(n) or n.name
            if _encoder_like(name) or any(w in name for w in _TEXT_STREAM_WEIGHTS):
                return True
    return False


def replace_attention(gm: fx.GraphModule, cfg: AttentionConfig, plan: Plan) -> int:
    """Rewrite every eligible SDPA node; record every candidate in ``plan``. Returns the rewrite count."""
    n_rewritten = 0
    used_keys: set[fx.Node] = set()
    deps = input_dependencies(gm) if any(is_call(n, SDPA_TARGETS) for n in gm.graph.nodes) else {}
    for node in list(gm.graph.nodes):
        if not is_call(node, SDPA_TARGETS):
            continue
        reason, p = check_attention(node, cfg, deps)
        qv, kv, vv = value(p["q"]), value(p["k"]), value(p["v"])
        shapes = {"q": _shape(qv), "k": _shape(kv), "v": _shape(vv)}
        if p["mask"] is not None:
            shapes["mask"] = _shape(value(p["mask"]))
        record = SiteRecord(kind="attention", status="dense", name=module_path(node) or node.name,
                            shapes=shapes, uid=plan.next_uid())
        plan.sites.append(record)
        if reason is not None:
            record.reason = reason
            counters["chipmunk"]["attention_dense"] += 1
            continue
        key = _site_key(p["q"])
        if key in used_keys:
            key = None
        if key is not None:
            used_keys.add(key)
        text_start, text_len, start_hint, len_hint = _span_args(gm, node, _text_span(p["k"], hint(kv.shape[2])))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                torch.ops.chipmunk.attention.default,
                (p["q"], p["k"], p["v"], p["mask"], key, record.uid,
                 None if p["scale"] is None else float(p["scale"]), bool(p["enable_gqa"]), text_start, text_len),
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        record.status = "rewritten"
        record.variant = "masked" if p["mask"] is not None else ""
        if len_hint:
            traced = "" if isinstance(text_start, int) and isinstance(text_len, int) else " at the traced size"
            record.variant = (record.variant + f" text[{start_hint}:{start_hint + len_hint}]{traced}").strip()
        if key is None:
            record.reason = "no layer weight found: state keyed by graph position"
        counters["chipmunk"]["attention_rewritten"] += 1
        n_rewritten += 1
    return n_rewritten
