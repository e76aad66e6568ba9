"""The runner: a thin callable around Inductor's compiled graph that keeps the step state.

Per call it finds the model's :class:`ModelState` (attached to the model's first parameter input),
advances its step clock from the timestep input (or by counting calls where the graph has none),
activates it for the ops, and calls the compiled graph. It is plain Python that Dynamo never traces,
so it adds no guards and causes no recompiles.
"""

from __future__ import annotations

import collections
import contextvars
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from chipmunk_compile.config import ChipmunkConfig
from chipmunk_compile.passes.graph_utils import is_weight, source_name
from chipmunk_compile.passes.sites import Plan
from chipmunk_compile.state import CallContext, ModelState, activate, deactivate


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
        state = self.state_for(args)
        if not self.plan.rewritten():
            return self._run(args)
        signature = self._signature(args)
        t = args[self.timestep_index] if self.timestep_index is not None else None
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            info = state.clock.advance_timestep(float(t.reshape(-1)[0]), signature)
        elif isinstance(t, (int, float)):
            info = state.clock.advance_timestep(float(t), signature)
        else:
            info = state.clock.advance_count(signature)
        token = activate(CallContext(state, info))
        try:
            return self._run(args)
        finally:
            deactivate(token)


def states_of(module: torch.nn.Module) -> list[ModelState]:
    """Every ModelState attached to a module's parameters (deduplicated, in order of discovery)."""
    found: dict[int, ModelState] = {}
    for p in list(module.parameters()) + list(module.buffers()):
        for state in getattr(p, _STATES_ATTR, {}).values():
            found.setdefault(state.id, state)
    return list(found.values())
