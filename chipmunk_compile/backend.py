"""The ``chipmunk`` TorchDynamo backend.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``torch.compile(model, backend="chipmunk")`` works without importing this package. This module must not
call ``register_backend`` itself: the entry-point load would then register the name twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from chipmunk_compile.config import ChipmunkConfig, ConfigError
from chipmunk_compile.passes import Plan, run_passes
from chipmunk_compile.runner import Runner

log = logging.getLogger("chipmunk_compile")


def _inductor_patches(mode: str | None, options: dict[str, Any]) -> dict[str, Any]:
    import torch._inductor.config as inductor_config

    patches: dict[str, Any] = {}
    if mode not in (None, "default"):
        try:
            patches.update(torch._inductor.list_mode_options(mode))
        except (KeyError, RuntimeError) as err:
            raise ConfigError(f"unknown torch.compile mode {mode!r}") from err
    known = set(inductor_config.get_config_copy())
    for key, value in options.items():
        if key not in known:
            raise ConfigError(f"unknown option {key!r}: neither a chipmunk option nor an Inductor config")
        patches[key] = value
    return patches


def _warm_compile_pool() -> None:
    """Start Inductor's subprocess compile pool now, as its own backend does on entry.

    Inductor compiles Triton kernels in that pool only once it is ready, and in the calling process, one after
    another, until then. Its own backend starts the pool before the graph's passes and lowering, so the pool
    is up by the time kernels are compiled; a backend that calls ``compile_fx`` directly creates it lazily, at
    the first kernel, and compiles the first graph's kernels one by one while it starts. Measured (Wan 2.1 at
    720p/81 frames, fresh caches, H100): the first step's extra time went from 17.2 to 16.5 s, within what
    runs vary; what made our first generation slow was a device sync per new site (see state._fingerprint).
    Kept because it costs nothing and does what Inductor's own entry does.
    """
    try:
        from torch._inductor.async_compile import maybe_warm_pool
    except ImportError:  # an Inductor without it: nothing to start
        return
    maybe_warm_pool()
    counters["chipmunk"]["compile_pool_warmed"] += 1


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    config: ChipmunkConfig,
    *,
    mode: str | None = None,
    inductor_options: dict[str, Any] | None = None,
) -> Callable:
    """Rewrite ``gm``'s attention/MLP sites, compile the rest with Inductor, wrap it in a :class:`Runner`."""
    from torch._inductor.compile_fx import compile_fx

    _warm_compile_pool()
    patches = _inductor_patches(mode, inductor_options or {})
    wants_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
    )
    if wants_grad:
        plan = Plan(note="autograd is enabled: the chipmunk rewrite is inference-only, so this graph was "
                    "compiled by plain Inductor; call the model under torch.no_grad()")
        log.warning("chipmunk: %s", plan.note)
        counters["chipmunk"]["graphs_skipped_grad"] += 1
    else:
        plan = run_passes(gm, config, cudagraphs=bool(patches.get("triton.cudagraphs")))
    counters["chipmunk"]["graphs"] += 1
    if not plan.rewritten() and not wants_grad:
        plan.note = plan.note or "no attention or MLP site could be rewritten in this graph"
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    return Runner(compiled, plan, config, gm)


def chipmunk_backend(
    gm: fx.GraphModule, example_inputs: list[Any], *, mode: str | None = None, options: dict | None = None
) -> Callable:
    """Entry point for ``torch.compile(model, backend="chipmunk", mode=..., options={...})``.

    ``options`` holds our keys (``"preset"``, dotted ``"attention.keep"`` ...; see
    :class:`~chipmunk_compile.config.ChipmunkConfig`) and Inductor config keys, which are passed on; and
    ``"mode"``, since ``torch.compile`` refuses ``mode=`` together with ``options=``
    (``options={"preset": "flux", "mode": "reduce-overhead"}``).
    """
    config, rest = ChipmunkConfig.from_options(options)
    if "mode" in rest:
        if mode is not None:
            raise ConfigError("pass the mode either as mode= or as options['mode'], not both")
        mode = rest.pop("mode")
    return compile_graph(gm, example_inputs, config, mode=mode, inductor_options=rest)


def backend(config: ChipmunkConfig | None = None, *, mode: str | None = None, **inductor_options: Any) -> Callable:
    """A backend callable bound to a typed config: ``torch.compile(m, backend=backend(cfg))``."""
    if config is not None and not isinstance(config, ChipmunkConfig):
        raise ConfigError(f"config must be a ChipmunkConfig, got {type(config).__name__}")
    cfg = config or ChipmunkConfig()
    _inductor_patches(mode, inductor_options)  # validate now, not at the first compile

    def _chipmunk(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        return compile_graph(gm, example_inputs, cfg, mode=mode, inductor_options=inductor_options)

    return _chipmunk
