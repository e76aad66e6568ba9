"""Pass: replace GELU/SiLU MLPs with ``torch.ops.chipmunk.mlp``.

Starting at each activation node, recognised forms (torch IR, as Dynamo records diffusers models):

- plain: ``linear(W1) -> gelu|silu -> [dropout(p=0 or eval)] -> linear(W2)``;
- gated (GEGLU, SwiGLU): ``linear(W1) -> chunk(2, -1) -> u * act(g) -> [dropout] -> linear(W2)``;
- concatenated (FLUX / HunyuanVideo single-stream blocks): ``act -> cat([other, act], -1) -> linear(W2)``:
  W2 is split by columns; ``linear(other, W2[:, other cols], b2) + chipmunk.mlp(..., W2 act cols)``.

An intermediate with another user (the pre-activation, the activation) keeps the MLP dense, with the
reason recorded.

Early selection (``mlp.early_selection``): when a rewritten attention that does not depend on the MLP runs
between the MLP's input and its consumer in graph order (single-stream blocks: the attention branch),
``chipmunk.mlp_select(x, ...)`` goes right before that attention, and its output into the attention op
(``after``) and into the MLP op: a selection step's unit selection (with ``mlp.sparse_ahead``, every sparse
call's whole work) then overlaps the attention. Inductor's
scheduler orders nodes by their data dependencies (graph order alone did not keep the selection ahead of the
attention), hence the token into the attention. The MLP op stays where the consumer was.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from chipmunk_compile.passes.graph_utils import (
    ADD_TARGETS,
    CAT_TARGETS,
    DIV_TARGETS,
    DROPOUT_TARGETS,
    GELU_TARGETS,
    LINEAR_TARGETS,
    MUL_TARGETS,
    PASSTHROUGH_METHODS,
    SILU_TARGETS,
    arg,
    hint,
    input_dependencies,
    input_name,
    is_call,
    is_weight,
    module_path,
    source_name,
    value,
)
from chipmunk_compile.passes.sites import Plan, SiteRecord
from torch._dynamo.utils import counters

import chipmunk_compile.ops  # noqa: F401  (registers torch.ops.chipmunk.*)
from chipmunk_compile.config import MlpConfig


def _activation_name(node: fx.Node) -> str | None:
    if is_call(node, GELU_TARGETS):
        approx = arg(node, 1, "approximate", "none")
        return "gelu_tanh" if approx == "tanh" else ("gelu" if approx == "none" else None)
    if is_call(node, SILU_TARGETS):
        return "silu"
    return None


def _is_identity_dropout(node: fx.Node) -> bool:
    if not is_call(node, DROPOUT_TARGETS):
        return False
    p = arg(node, 1, "p", 0.5)
    training = arg(node, 2, "training", True)
    return p == 0.0 or training is False


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


class _Match:
    def __init__(self) -> None:
        self.x = self.fc1 = self.act = self.out = self.consumer = self.cat = None
        self.chain: list[fx.Node] = []
        self.gated = False
        self.activation = ""
        self.cat_index = -1


def match_mlp(act: fx.Node) -> tuple[_Match | None, str]:
    """Match the MLP around activation node ``act``; (match, "") or (None, reason)."""
    m = _Match()
    m.activation = _activation_name(act) or ""
    if not m.activation:
        return None, f"unsupported activation {act.target}"
    m.act = act
    h = arg(act, 0, "input")
    hv = value(h)
    if hv is None or hv.dim() < 3:
        return None, "not a token MLP (no sequence dimension, e.g. a timestep embedding)"
    if is_call(h, LINEAR_TARGETS):
        m.fc1 = h
        if len(h.users) != 1:
            return None, "pre-activation (first linear's output) is also used elsewhere"
        m.out = act
    elif isinstance(h, fx.Node) and h.op == "call_function" and h.target is operator.getitem:
        chunk, index = h.args[0], h.args[1]
        is_chunk = isinstance(chunk, fx.Node) and (
            (chunk.op == "call_method" and chunk.target == "chunk") or chunk.target is torch.chunk
        )
        if not is_chunk or index != 1:
            return None, "activation input is not the second half of chunk(2) (gated form)"
        parts = arg(chunk, 1, "chunks")
        dim = arg(chunk, 2, "dim", 0)
        fc1 = chunk.args[0]
        fv = value(fc1)
        if _linear_plus_branch(fc1):
            return None, f"gated pre-activation is a linear plus another branch ({_ADAPTER_HINT})"
        if parts != 2 or fv is None or dim not in (-1, fv.dim() - 1) or not is_call(fc1, LINEAR_TARGETS):
            return None, "gated form needs linear -> chunk(2, dim=-1)"
        if len(fc1.users) != 1:
            return None, "pre-activation (first linear's output) is also used elsewhere"
        first = [u for u in chunk.users if u.target is operator.getitem and u.args[1] == 0]
        if len(chunk.users) != 2 or len(first) != 1:
            return None, "gated halves are used elsewhere"
        mul = _only_user(act)
        if mul is None or not is_call(mul, MUL_TARGETS) or set(mul.args) != {first[0], act}:
            return None, "gated form needs u * act(g)"
        if len(first[0].users) != 1:
            return None, "gated halves are used elsewhere"
        m.fc1, m.gated, m.out = fc1, True, mul
        m.chain = [first[0], h, chunk]
    elif _linear_plus_branch(h):
        return None, f"pre-activation is a linear plus another branch ({_ADAPTER_HINT})"
    else:
        return None, "activation input is not produced by a linear"
    m.x = arg(m.fc1, 0, "input")
    node = m.out
    while True:
        user = _only_user(node)
        if user is None:
            if len(node.users) == 2 and all(is_call(u, LINEAR_TARGETS) for u in node.users):
                return None, f"activation output escapes the pattern: it feeds two linears ({_ADAPTER_HINT})"
            return None, f"activation output escapes the pattern ({len(node.users)} users)"
        if _is_identity_dropout(user) or (user.op == "call_method" and user.target in PASSTHROUGH_METHODS):
            m.chain.append(user)
            node = user
            continue
        break
    if is_call(user, LINEAR_TARGETS) and arg(user, 0, "input") is node:
        m.consumer = user
        return _check_weights(m)
    if is_call(user, CAT_TARGETS):
        parts = arg(user, 0, "tensors")
        dim = arg(user, 1, "dim", 0)
        nv = value(node)
        if not isinstance(parts, (list, tuple)) or len(parts) != 2 or nv is None or dim not in (-1, nv.dim() - 1):
            return None, "activation is concatenated in an unsupported way"
        lin = _only_user(user)
        if lin is None or not is_call(lin, LINEAR_TARGETS) or arg(lin, 0, "input") is not user:
            return None, "concatenated activation does not feed a single linear"
        m.cat, m.consumer, m.cat_index = user, lin, list(parts).index(node)
        return _check_weights(m)
    return None, f"activation output feeds {user.target} (not a linear)"


def _check_weights(m: _Match) -> tuple[_Match | None, str]:
    w1, w2 = arg(m.fc1, 1, "weight"), arg(m.consumer, 1, "weight")
    if not (is_weight(w1) and is_weight(w2)):
        return None, "MLP weights are computed in the graph (e.g. unfused LoRA)"
    xv = value(m.x)
    if xv is None:
        return None, "input without shape information"
    if isinstance(m.x, fx.Node) and m.x.op == "placeholder" and _is_conditioning(source_name(m.x) or m.x.name):
        return None, "conditioning projection (its input is the text/condition input, constant over steps)"
    if xv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None, f"dtype {xv.dtype}"
    return m, ""


def _is_conditioning(name: str) -> bool:
    return any(w in name for w in ("encoder", "context", "caption", "text", "prompt"))


def replace_mlp(gm: fx.GraphModule, cfg: MlpConfig, plan: Plan, early_selection: bool | None = None) -> int:
    """Rewrite every recognised MLP; record every activation candidate in ``plan``.

    ``early_selection``: whether to place selections ahead where other work follows (None: from ``cfg``).
    """
    early = cfg.early_selection if early_selection is None else early_selection
    n = 0
    erased: set[fx.Node] = set()
    deps = input_dependencies(gm)  # before any rewrite: the matched nodes are the original ones
    for act in list(gm.graph.nodes):
        if act in erased or not (is_call(act, GELU_TARGETS) or is_call(act, SILU_TARGETS)):
            continue
        m, reason = match_mlp(act)
        h = arg(act, 0, "input")
        producer = _first_linear(h) or act  # the first linear names the MLP best
        record = SiteRecord(kind="mlp", status="dense", name=module_path(producer) or module_path(act) or act.name,
                            uid=plan.next_uid())
        if m is None:
            if _is_mlp_like(act):
                record.reason = reason
                plan.sites.append(record)
                counters["chipmunk"]["mlp_dense"] += 1
            continue
        inputs = deps.get(m.x) if isinstance(m.x, fx.Node) else None
        if inputs and all(_is_conditioning(input_name(p)) for p in inputs):
            # e.g. Wan 2.1's image embedder, on layer_norm(encoder_hidden_states_image): its input never changes
            # over the steps, so there is nothing to cache a delta of (and, rewritten, it took a slot of
            # mlp.first_dense_layers from the first transformer block)
            names = ", ".join(sorted(input_name(p) for p in inputs))
            record.reason = f"conditioning projection (its input depends only on {names}, constant over steps)"
            plan.sites.append(record)
            counters["chipmunk"]["mlp_dense"] += 1
            continue
        record.name = module_path(m.consumer) or module_path(m.fc1) or record.name
        w1v, w2v, xv = value(arg(m.fc1, 1, "weight")), value(arg(m.consumer, 1, "weight")), value(m.x)
        f = hint(w1v.shape[0]) // (2 if m.gated else 1)
        record.shapes = {"x": tuple(hint(s) for s in xv.shape), "w1": tuple(w1v.shape), "w2": tuple(w2v.shape)}
        record.variant = ("gated " if m.gated else "") + m.activation + (" concat" if m.cat is not None else "")
        plan.sites.append(record)
        if not cfg.enabled:
            record.reason = "MLP sparsity disabled by config"
            counters["chipmunk"]["mlp_dense"] += 1
            continue
        tokens = _tokens(xv)
        if tokens is not None and tokens < cfg.min_tokens:
            record.reason = f"{tokens} tokens < mlp.min_tokens={cfg.min_tokens} (too few to gain from sparsity)"
            counters["chipmunk"]["mlp_dense"] += 1
            continue
        ahead = _attention_between(m) if early else None
        erased |= _rewrite(gm, m, record.uid, f, ahead)
        if ahead is not None:
            record.variant += ", selection ahead"
            counters["chipmunk"]["mlp_select_ahead"] += 1
        record.status = "rewritten"
        counters["chipmunk"]["mlp_rewritten"] += 1
        n += 1
    return n


def _tokens(xv) -> int | None:
    """Tokens (product of all but the last dim) of a traced input, from size hints; None if unknown."""
    n = 1
    for size in xv.shape[:-1]:
        h = hint(size)
        if h is None:
            return None
        n *= h
    return n


# An adapter kept beside a linear (PEFT's LoRA layers before fusing) computes linear(x) + scale * B(A(x)):
# the MLP's weights are then not single tensors. Fusing folds the branch into the weight.
_ADAPTER_HINT = "an unfused LoRA or adapter? fuse it into the weights, e.g. pipe.fuse_lora(), to make this MLP sparse"


def _linear_plus_branch(h: Any) -> bool:
    """Whether ``h`` is ``linear(x) + branch`` (either order) with the branch a linear, possibly scaled: the
    shape of an unfused adapter (``base(x) + scale * B(A(x))``), not, say, a separately added bias."""
    if not is_call(h, ADD_TARGETS):  # call_function operator.add / torch.add, or call_method add / add_
        return False
    a, b = (h.args[:2] + (None, None))[:2]
    if not is_call(a, LINEAR_TARGETS):
        a, b = b, a
    if not is_call(a, LINEAR_TARGETS):
        return False
    if is_call(b, MUL_TARGETS) or is_call(b, DIV_TARGETS):  # scale * B(A(x)), B(A(x)) * scale, B(A(x)) / r
        b = next((t for t in b.args[:2] if isinstance(t, fx.Node)), None)
    return is_call(b, LINEAR_TARGETS)


def _first_linear(h: Any) -> fx.Node | None:
    """The linear that produces an activation's input ``h``: h itself, the base linear of an adapter sum, or
    (gated forms) the linear under ``chunk``; None if there is none."""
    if isinstance(h, fx.Node) and h.target is operator.getitem and isinstance(h.args[0], fx.Node) and h.args[0].args:
        h = h.args[0].args[0]
    if is_call(h, LINEAR_TARGETS):
        return h
    if _linear_plus_branch(h):
        return next(a for a in h.args[:2] if is_call(a, LINEAR_TARGETS))
    return None


def _is_mlp_like(act: fx.Node) -> bool:
    """Whether a rejected activation looked like an MLP (fed by a linear, directly or via chunk, or by a linear
    plus an adapter branch)."""
    return _first_linear(arg(act, 0, "input")) is not None


def _attention_between(m: _Match) -> fx.Node | None:
    """The first ``chipmunk.attention`` node between the MLP's input and its consumer in graph order that no
    MLP node feeds (taking the selection's token adds no cycle), without a token yet; or None."""
    own = {n for n in (m.fc1, m.act, m.out, m.cat, *m.chain) if n is not None}
    node = m.x.next if isinstance(m.x, fx.Node) else m.fc1.next
    while node is not m.consumer and node.op != "output":
        if node.target is torch.ops.chipmunk.attention.default and node.kwargs.get("after") is None:
            if not (_ancestors(node) & own):
                return node
        node = node.next
    return None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _rewrite(gm: fx.GraphModule, m: _Match, uid: int, f: int, ahead: fx.Node | None) -> set[fx.Node]:
    g = gm.graph
    w1, b1 = arg(m.fc1, 1, "weight"), arg(m.fc1, 2, "bias")
    lin = m.consumer
    w2, b2 = arg(lin, 1, "weight"), arg(lin, 2, "bias")
    select = None
    if ahead is not None:
        with g.inserting_before(ahead):
            select = g.call_function(torch.ops.chipmunk.mlp_select.default, (m.x, w1, b1, m.gated))
        ahead.kwargs = {**ahead.kwargs, "after": select}
    with g.inserting_before(lin):
        if m.cat is None:
            new = g.call_function(
                torch.ops.chipmunk.mlp.default, (m.x, w1, b1, w2, b2, uid, m.activation, m.gated, 0, f, select)
            )
        else:
            parts = list(arg(m.cat, 0, "tensors"))
            other = parts[1 - m.cat_index]
            width_other = hint(value(other).shape[-1])
            off_other, off_act = (0, width_other) if m.cat_index == 1 else (f, 0)
            w2_other = g.call_function(torch.narrow, (w2, 1, off_other, width_other))
            part = g.call_function(torch._C._nn.linear, (other, w2_other, b2))
            delta = g.call_function(
                torch.ops.chipmunk.mlp.default,
                (m.x, w1, b1, w2, None, uid, m.activation, m.gated, off_act, f, select),
            )
            new = g.call_function(operator.add, (part, delta))
            part.meta = dict(lin.meta)
            delta.meta = dict(lin.meta)
    new.meta = dict(lin.meta)
    lin.replace_all_uses_with(new)
    pending = {n for n in (lin, m.cat, *m.chain, m.out, m.act, m.fc1) if n is not None}
    erased: set[fx.Node] = set()
    while True:
        ready = [n for n in pending if not n.users]
        if not ready:
            return erased
        for node in ready:
            g.erase_node(node)
            pending.discard(node)
            erased.add(node)
