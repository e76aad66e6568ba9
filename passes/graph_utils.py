"""Small helpers for reading Dynamo-level (torch IR) FX graphs."""

from __future__ import annotations

import operator
import re
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
LINEAR_TARGETS = {torch._C._nn.linear, F.linear}
GELU_TARGETS = {torch._C._nn.gelu, F.gelu}
SILU_TARGETS = {F.silu, torch.nn.functional.silu, torch.ops.aten.silu.default}
if hasattr(torch._C._nn, "silu"):
    SILU_TARGETS.add(torch._C._nn.silu)
DROPOUT_TARGETS = {F.dropout, torch.dropout}
PASSTHROUGH_METHODS = {"contiguous", "clone"}
MUL_TARGETS = {operator.mul, torch.mul, "mul"}
ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_"}
DIV_TARGETS = {operator.truediv, torch.div, "div"}
CAT_TARGETS = {torch.cat, torch.concat, torch.concatenate}


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call node, given positionally at ``index`` or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_call(node: Any, targets: set) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in targets
    return False


def value(node: Any) -> Any:
    """The example value (FakeTensor) Dynamo recorded for a node, or None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def is_weight(node: Any) -> bool:
    """A graph input or attribute holding a parameter (a stable per-layer tensor)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    src = source_name(node)
    return src is not None and ("_parameters" in src or "_buffers" in src or "parameters" in src)


def source_name(node: fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return None
    src = getattr(grapharg, "source", None)
    if src is None:
        return None
    name = src.name
    return name() if callable(name) else name


def module_path(node: fx.Node) -> str:
    """Dotted module path of the code that created ``node`` (from ``nn_module_stack``), or ""."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    key, _ = list(stack.values())[-1]
    return _clean_path(key)


def _clean_path(key: str) -> str:
    out = key
    for junk in ("L['self'].", "L['self']", "__dict__['_modules']", "._modules", "_modules"):
        out = out.replace(junk, "")
    out = out.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "")
    return ".".join(p for p in out.split(".") if p)


def ancestors(node: fx.Node, limit: int = 64) -> Iterator[fx.Node]:
    """Breadth-first walk over the inputs of ``node`` (not including it), at most ``limit`` nodes."""
    seen = {node}
    queue = deque(node.all_input_nodes)
    count = 0
    while queue and count < limit:
        n = queue.popleft()
        if n in seen:
            continue
        seen.add(n)
        count += 1
        yield n
        queue.extend(n.all_input_nodes)


def hint(x: Any) -> int | None:
    """A concrete int for an int or SymInt size (its hint), or None."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        node = x.node
        h = getattr(node, "hint", None)
        return int(h) if h is not None else None
    return None


def same_size(a: Any, b: Any) -> bool:
    """Whether two sizes are provably equal (ints or SymInts), without adding guards."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def input_dependencies(gm: fx.GraphModule) -> dict[fx.Node, frozenset]:
    """For every node, the graph's tensor inputs it depends on (placeholders that are not weights or buffers).

    One pass in topological order. It tells cross-attention from self-attention when the query and key
    lengths happen to be equal (a text length equal to the token count): cross-attention keys and values come
    from the text / conditioning input alone, while the queries depend on more; a self or joint attention's
    keys depend on every input its queries do. Keys from unnamed inputs (a graph cut right before the
    attention) prove nothing: such a site is taken as self-attention, as its equal lengths suggest.
    """
    deps: dict[fx.Node, frozenset] = {}
    empty: frozenset = frozenset()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            deps[n] = frozenset((n,)) if isinstance(value(n), torch.Tensor) and not is_weight(n) else empty
            continue
        parents = [deps[p] for p in n.all_input_nodes if deps.get(p)]
        deps[n] = empty if not parents else parents[0] if len(parents) == 1 else frozenset().union(*parents)
    return deps


def input_name(node: fx.Node) -> str:
    """A graph input's user-facing name: ``hidden_states`` for Dynamo's ``L['kwargs']['hidden_states']``."""
    src = source_name(node) or node.name
    found = re.findall(r"\['([^']+)'\]", src)
    return found[-1] if found else src
