"""The runner: a thin callable around Inductor's compiled graph that keeps the step state.

Per call it finds the model's :class:`ModelState` (attached to the model's first parameter input),
advances its step clock from the enclosing denoising loop's index when it is called from one (no device
sync), else from the timestep input's value (or by counting calls where the graph has none),
activates it for the ops, and calls the compiled graph. It is plain Python that Dynamo never traces,
so it adds no guards and causes no recompiles.
"""

from __future__ import annotations

import collections
import contextvars
import re
import sys
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx

from chipmunk_compile.config import ChipmunkConfig
from chipmunk_compile.passes.graph_utils import is_weight, source_name
from chipmunk_compile.passes.sites import Plan
from chipmunk_compile.state import CallContext, ModelState, StepInfo, activate, deactivate, same_loop


class FlopTally:
    """FLOPs per op of every compiled call made while it is installed in :data:`FLOP_COUNTER`.

    A ``FlopCounterMode`` is entered inside each compiled call: opened around a compiled model it would
    make Dynamo run the model eagerly (dispatch modes disable compiled code), counting the dense model.
    """

    def __init__(self) -> None:
        self.by_op: collections.Counter = collections.Counter()
        self.calls = 0

    def run(self, fn: Callable, *args: Any) -> Any:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as mode:
            out = fn(*args)
        self.by_op.update({str(k): v for k, v in mode.get_flop_counts().get("Global", {}).items()})
        self.calls += 1
        return out

    def total(self, substring: str = "") -> int:
        return sum(v for k, v in self.by_op.items() if substring in k)


FLOP_COUNTER: contextvars.ContextVar[FlopTally | None] = contextvars.ContextVar("chipmunk_flops", default=None)
_TIMESTEP_NAMES = re.compile(r"\['(timestep|timesteps|t|sigma|sigmas)'\]$")
_STATES_ATTR = "_chipmunk_model_states"


class Runner:
    """Callable returned by the backend; ``runner(*flat_inputs)`` runs one compiled call."""

    def __init__(self, compiled: Callable, plan: Plan, config: ChipmunkConfig, gm: fx.GraphModule) -> None:
        self.compiled = compiled
        self.plan = plan
        self.config = config
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.timestep_index: int | None = None
        self.anchor_index: int | None = None
        self.user_indices: list[int] = []
        for i, node in enumerate(placeholders):
            name = source_name(node) or ""
            if self.timestep_index is None and _TIMESTEP_NAMES.search(name):
                self.timestep_index = i
            elif is_weight(node):
                if self.anchor_index is None:
                    self.anchor_index = i
            else:
                self.user_indices.append(i)
        self._graph_state: ModelState | None = None
        self._joins: dict[tuple[int, int], bool] = {}  # see _outer_forward

    # ------------------------------------------------------------------ state lookup
    def state_for(self, args: tuple) -> ModelState:
        anchor = args[self.anchor_index] if self.anchor_index is not None else None
        if not isinstance(anchor, torch.Tensor):
            if self._graph_state is None:
                self._graph_state = ModelState(self.config)
                self._graph_state.add_plan(self.plan)
            return self._graph_state
        states: dict[ChipmunkConfig, ModelState] | None = getattr(anchor, _STATES_ATTR, None)
        if states is None:
            states = {}
            setattr(anchor, _STATES_ATTR, states)
        state = states.get(self.config)
        if state is None:
            state = states[self.config] = ModelState(self.config)
        state.add_plan(self.plan)
        return state

    def _run(self, args: tuple) -> Any:
        tally = FLOP_COUNTER.get()
        return self.compiled(*args) if tally is None else tally.run(self.compiled, *args)

    def _signature(self, args: tuple) -> tuple:
        sig: list[Any] = []
        for i in self.user_indices:
            a = args[i]
            sig.append(tuple(a.shape) if isinstance(a, torch.Tensor) else a)
        return tuple(sig)

    # ------------------------------------------------------------------ call
    def __call__(self, *args: Any) -> Any:
        t = args[self.timestep_index] if self.timestep_index is not None else None
        # A graph without a timestep input is driven by the eager forward around it; so is one with a timestep
        # input that runs inside a larger model's eager forward (a regionally compiled block with a timestep of
        # its own, e.g. HunyuanVideo's token refiner): all regions of one model share its step clock and its
        # site numbering, as when the whole model is compiled.
        driver = _enclosing_forward() if t is None else _outer_forward(self._joins)
        if driver is not None:
            # A region of a larger model (regional compilation, or a graph after a graph break): the
            # enclosing eager forward holds the timestep; all regions of one forward share one step.
            module, t_outer, signature = driver
            state = _module_state(module, self.config)
            state.add_plan(self.plan)
            if not self.plan.rewritten():
                return self._run(args)
            # Each region runs once per forward: a region seen again (or a new timestep) is a new forward.
            region = (id(self), id(args[self.anchor_index]) if self.anchor_index is not None else 0)
            # Read the timestep (a device sync) once per forward, not once per region: while the same
            # tensor object is alive, its value is the one already read.
            known = state.forward_t_ref is not None and state.forward_t_ref() is t_outer
            t_value = state.forward_t if known else _step_key(t_outer)
            signature = (*signature, type(t_value).__name__)  # loop index and timestep value never compare
            if not known:
                state.forward_t_ref = weakref.ref(t_outer) if isinstance(t_outer, torch.Tensor) else None
            if (state.forward_info is None or region in state.forward_seen or t_value != state.forward_t
                    or type(t_value) is not type(state.forward_t) or not same_loop(t_value, state.forward_t)):
                state.forward_seen.clear()
                state.forward_t = t_value
                state.forward_info = _mark_last(
                    state.clock.advance_timestep(t_value, signature, isinstance(t_value, _LoopKey)), t_value)
            state.forward_seen.add(region)
            info = state.forward_info
        else:
            state = self.state_for(args)
            if not self.plan.rewritten():
                return self._run(args)
            signature = self._signature(args)
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                key = _step_key(t)
                info = _mark_last(state.clock.advance_timestep(key, (*signature, type(key).__name__),
                                                               isinstance(key, _LoopKey)), key)
            elif isinstance(t, (int, float)):
                info = state.clock.advance_timestep(float(t), signature)
            else:
                info = state.clock.advance_count(signature)
        state.touch()
        token = activate(CallContext(state, info))
        try:
            return self._run(args)
        finally:
            deactivate(token)


def _first(t: Any) -> float:
    return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)


class _LoopKey(float):
    """A step-clock key taken from a denoising loop's index (``-i``), not from a timestep value; ``last``:
    ``i`` is the loop's last index; ``loop``: a weak reference to the loop's ``timesteps`` tensor (each
    pipeline call makes its own, so a call from another loop is a new generation even at the same index)."""

    last = False
    loop: Any = None


def _mark_last(info: StepInfo, key: Any) -> StepInfo:
    """``info`` flagged as the generation's last step when ``key`` comes from the loop's last index."""
    return replace(info, last=True) if getattr(key, "last", False) and not info.last else info


def _step_key(t: Any) -> float:
    """The value the step clock orders calls by: minus the denoising loop's index when the caller is such a
    loop (no device sync), else the timestep's value (a device sync: the timestep lives on the GPU). The two
    kinds never compare: the runner puts the key's type into the clock's signature, so switching between
    them (a warm-up call outside the loop, then the loop) starts a new generation."""
    if isinstance(t, torch.Tensor):
        found = _loop_index(sys._getframe(2))
        if found is not None:
            index, timesteps = found
            key = _LoopKey(-index)
            key.last = index == timesteps.shape[0] - 1
            key.loop = weakref.ref(timesteps)
            return key
    return _first(t)


def _loop_index(frame: Any, max_depth: int = 64) -> tuple[int, torch.Tensor] | None:
    """The index ``i`` of an enclosing ``for i, t in enumerate(timesteps)`` loop, as every diffusers pipeline
    writes its denoising loop, and the loop's ``timesteps`` (its length, and its identity); or None.

    A frame qualifies when its locals ``i`` (int), ``t`` (one-element tensor) and ``timesteps`` (1-D tensor)
    satisfy: ``t`` is a view of element ``i`` of ``timesteps`` (same address). Checking addresses, not values,
    costs no device sync, so the host can run ahead of the GPU across steps. The index orders the calls of
    one generation exactly as the timesteps do (the clock sees ``-i``: equal for the CFG calls of a step,
    lower for later steps, higher when a new loop starts).
    """
    for _ in range(max_depth):
        if frame is None:
            return None
        code = frame.f_code
        names = code.co_varnames + code.co_cellvars  # cells: locals a closure or generator expression reads
        if "timesteps" in names and "i" in names and "t" in names:
            local = frame.f_locals
            i, t, ts = local.get("i"), local.get("t"), local.get("timesteps")
            if (
                type(i) is int and isinstance(t, torch.Tensor) and isinstance(ts, torch.Tensor) and ts.dim() == 1
                and t.numel() == 1 and 0 <= i < ts.shape[0] and t.device == ts.device
                and t.data_ptr() == ts.data_ptr() + i * ts.stride(0) * ts.element_size()
            ):
                return i, ts
        frame = frame.f_back
    return None


def _timestep_forwards(max_depth: int = 48):
    """The eager ``forward`` frames on the call stack (innermost first, from the runner's caller) that have a
    ``timestep`` argument: yields (module, timestep, shape signature). Costs a walk over code objects, reading
    locals only of frames whose code has a ``timestep`` variable."""
    frame = sys._getframe(3)
    for _ in range(max_depth):
        if frame is None:
            return
        code = frame.f_code
        if "timestep" in code.co_varnames and "self" in code.co_varnames:
            local = frame.f_locals
            t, module = local.get("timestep"), local.get("self")
            if isinstance(module, torch.nn.Module) and isinstance(t, (torch.Tensor, int, float)):
                hidden = local.get("hidden_states", local.get("x"))
                yield module, t, ((tuple(hidden.shape),) if isinstance(hidden, torch.Tensor) else ())
        frame = frame.f_back


def _enclosing_forward() -> tuple[torch.nn.Module, Any, tuple] | None:
    """The innermost eager ``forward`` on the call stack that has a ``timestep`` argument, if any: (its module,
    the timestep, a shape signature). For graphs without a timestep input."""
    return next(_timestep_forwards(), None)


def _outer_forward(joins: dict[tuple[int, int], bool]) -> tuple[torch.nn.Module, Any, tuple] | None:
    """For a graph with a timestep input: the outermost ``forward`` with a timestep on the call stack when the
    graph is a region of a model compiled by regions (another module's forward than the innermost one, the
    graph's own, and that module has other compiled submodules: ``compile_repeated_blocks``); else None (the
    graph drives its own clock: a whole compiled model, also when an eager wrapper with a ``timestep`` argument
    calls it). ``joins`` caches the decision per (inner, outer) module pair."""
    found = list(_timestep_forwards())
    if len(found) < 2:
        return None
    inner, outer = found[0][0], found[-1][0]
    if outer is inner:
        return None
    key = (id(inner), id(outer))
    join = joins.get(key)
    if join is None:
        own = {id(m) for m in inner.modules()}
        join = joins[key] = any(getattr(m, "_compiled_call_impl", None) is not None
                                for m in outer.modules() if id(m) not in own)
    return found[-1] if join else None


def _module_state(module: torch.nn.Module, config: ChipmunkConfig) -> ModelState:
    states = module.__dict__.setdefault(_STATES_ATTR, {})
    state = states.get(config)
    if state is None:
        state = states[config] = ModelState(config)
    return state


def states_of(module: torch.nn.Module) -> list[ModelState]:
    """Every ModelState of a module: on its parameters (whole-model graphs) or on the module itself
    (regions driven by its forward). Deduplicated, in order of discovery."""
    found: dict[int, ModelState] = {}
    for state in module.__dict__.get(_STATES_ATTR, {}).values():
        found.setdefault(state.id, state)
    for p in list(module.parameters()) + list(module.buffers()):
        for state in getattr(p, _STATES_ATTR, {}).values():
            found.setdefault(state.id, state)
    return list(found.values())
