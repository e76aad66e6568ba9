"""Low-host-overhead launches of ``@triton.jit`` kernels that are called again and again with one signature.

``kernel[grid](*args, **constexprs)`` (Triton's ``JITFunction.run``) binds and specializes every argument,
builds a string cache key and launch metadata on each call (tens of µs of host time per launch: ~90 µs
per launch under cProfile in a FLUX step on the H200 host, bench/results/profiles_flux_NVIDIA-H200_session2/),
while a sparse denoising step enqueues about 200 such launches. :class:`CachedLauncher` takes that path once per
*key* and keeps the ``CompiledKernel`` it returns; later launches with the same key call the compiled
kernel's launcher directly, exactly as ``JITFunction.run`` ends (Triton 3.6)::

    kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,
               launch_metadata, launch_enter_hook, launch_exit_hook, *bound_args.values())

with ``bound_args`` every kernel parameter in declaration order, constexprs included with their values.
Launch hooks are empty on the fast path, so it passes ``None`` for the metadata and both hooks, which the
launcher treats as "no hook" (the normal path would call the two empty hook chains).

The key must determine everything Triton specializes a kernel on. It is built from

- ``signature``: a hashable the caller guarantees to determine every non-tensor runtime argument (in
  practice the shapes, strides, dtypes, devices and options every int argument is derived from). Without
  one, the helper derives it from the arguments: per int its 32/64-bit class, ``== 1`` and ``% 16 == 0``;
  the type of floats, bools and None;
- the constexpr values (by name), ``num_warps``, ``num_stages`` and Triton's ``debug`` /
  ``instrumentation_mode`` knobs (part of its compile options);
- per tensor argument, computed here on every call: its dtype and whether ``data_ptr() % 16 == 0``
  (Triton's pointer-alignment specialization), plus the current CUDA device.

The normal path is taken for a key's first launch and whenever the fast path does not apply: under
``TRITON_INTERPRET=1`` (the kernel is not a ``JITFunction``), while Dynamo traces, with launch hooks or
pre-run hooks set, a callable grid, constexprs interleaved with runtime parameters, or anything missing or
raising on the fast path (another Triton version). ``CHECK = True`` (or ``CHIPMUNK_CHECK_LAUNCH=1``)
recomputes Triton's own specialization on every fast launch and raises if it differs from the cached
kernel's (tests, debugging).

Triton internals used on the fast path: ``JITFunction.params`` / ``.fn`` / ``.pre_run_hooks`` /
``.used_global_vals`` / ``.device_caches`` (check mode only), ``CompiledKernel.run`` / ``.function`` /
``.packed_metadata``, ``driver.active.get_current_device`` / ``get_current_stream``,
``knobs.runtime.launch_enter_hook`` / ``launch_exit_hook`` / ``debug``, ``knobs.compilation.instrumentation_mode``.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import triton

__all__ = [
    "CHECK",
    "CachedLauncher",
    "LaunchCheckError",
    "ParamLayout",
    "PlanCache",
    "arg_spec",
    "fast_path_reason",
    "hooks_active",
    "launch_key",
    "normal_path_stats",
    "ordered_args",
    "param_layout",
    "tensor_key",
    "tensor_signature",
]

CHECK = os.environ.get("CHIPMUNK_CHECK_LAUNCH", "0") == "1"
_MAX_KEYS = 512  # per kernel; a denoising loop uses a handful, a test run a few dozen
_NEVER = object()  # marks a key whose launches always take the normal path
_I32, _I64 = 2**31, 2**63


@dataclass(frozen=True)
class ParamLayout:
    """A kernel's parameters: ``n_runtime`` runtime ones first, then ``constexpr_names`` in declaration order."""

    names: tuple[str, ...]
    n_runtime: int
    constexpr_names: tuple[str, ...]


def _is_constexpr_annotation(annotation: Any) -> bool:
    # Triton's rule (KernelParam.is_constexpr): "constexpr" in the annotation, which may be a string
    # under `from __future__ import annotations`.
    if annotation is inspect.Parameter.empty:
        return False
    if isinstance(annotation, str):
        return "constexpr" in annotation
    return "constexpr" in getattr(annotation, "__name__", repr(annotation))


def param_layout(kernel: Any) -> ParamLayout | None:
    """The parameter layout of a ``@triton.jit`` kernel (compiled or interpreted).

    None when a constexpr parameter comes before a runtime one: the fast path appends the constexpr
    values after the positional runtime arguments, so it needs all constexprs last.
    """
    params = getattr(kernel, "params", None)
    if params is not None:
        names = [p.name for p in params]
        flags = [bool(p.is_constexpr) for p in params]
    else:
        sig = inspect.signature(kernel.fn)
        names = list(sig.parameters)
        flags = [_is_constexpr_annotation(p.annotation) for p in sig.parameters.values()]
    n_runtime = flags.index(True) if True in flags else len(flags)
    if not all(flags[n_runtime:]):
        return None
    return ParamLayout(tuple(names), n_runtime, tuple(names[n_runtime:]))


def ordered_args(layout: ParamLayout, args: Sequence[Any], constexprs: Mapping[str, Any]) -> tuple[Any, ...]:
    """Every kernel argument in declaration order (``bound_args.values()`` of ``JITFunction.run``).

    ``args`` are the runtime arguments, positional; ``constexprs`` every constexpr by name. Raises
    ValueError if they do not cover the parameters exactly.
    """
    if len(args) != layout.n_runtime:
        raise ValueError(f"expected {layout.n_runtime} positional runtime arguments, got {len(args)}")
    if constexprs.keys() != set(layout.constexpr_names):
        missing = sorted(set(layout.constexpr_names) - constexprs.keys())
        unknown = sorted(constexprs.keys() - set(layout.constexpr_names))
        raise ValueError(f"constexprs must name every constexpr parameter: missing {missing}, unknown {unknown}")
    return (*args, *(constexprs[name] for name in layout.constexpr_names))


def arg_spec(arg: Any) -> Hashable:
    """What Triton specializes one runtime argument on (a superset: do_not_specialize is ignored).

    Tensors: dtype and 16-byte alignment; ints: ``== 1`` (a constant), else 32/64-bit class and
    ``% 16 == 0``; floats, bools, None: their type.
    """
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):
        return "u1"
    if isinstance(arg, int):
        if arg == 1:
            return "one"
        width = "i32" if -_I32 <= arg < _I32 else "i64" if -_I64 <= arg < _I64 else "u64"
        return width, arg % 16 == 0
    if isinstance(arg, float):
        return "fp32"
    if arg is None:
        return "none"
    return type(arg), arg  # anything else: its value (unhashable values make the launch take the normal path)


def launch_key(
    signature: Hashable | None,
    args: Sequence[Any],
    constexprs: Mapping[str, Any],
    num_warps: int | None,
    num_stages: int | None,
) -> tuple[Hashable, ...]:
    """The per-signature part of the key (tensor pointers are added by :func:`tensor_key`)."""
    rt = triton.knobs.runtime
    scalars = tuple([arg_spec(a) for a in args]) if signature is None else signature
    return (
        scalars, tuple(constexprs.items()), num_warps, num_stages, rt.debug,
        triton.knobs.compilation.instrumentation_mode,
    )  # fmt: skip


def tensor_key(args: Sequence[Any], positions: Sequence[int], device: int) -> tuple[Hashable, ...]:
    """The per-call part of the key: the device and each tensor argument's dtype and 16-byte alignment."""
    return (device, *[(args[i].dtype, args[i].data_ptr() % 16 == 0) for i in positions])


def hooks_active() -> bool:
    """True if a Triton launch hook is installed (the fast path does not call hooks)."""
    rt = triton.knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        # Triton 3.6: a HookChain, active when it holds calls; older versions: a callable or None.
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def fast_path_reason(kernel: Any) -> str | None:
    """None if launches of ``kernel`` may skip ``JITFunction.run`` after the first, else why not."""
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1"
    if not isinstance(kernel, JITFunction):
        return f"{type(kernel).__name__} is not a JITFunction"
    if getattr(kernel, "pre_run_hooks", None):
        return "the kernel has pre-run hooks"
    if param_layout(kernel) is None:
        return "a constexpr parameter precedes a runtime parameter"
    return None


class LaunchCheckError(RuntimeError):
    """Check mode: a fast launch's arguments specialize differently from the cached kernel's."""


@dataclass
class _Compiled:
    launch: Any  # CompiledKernel.run: the C launcher
    function: Any
    packed_metadata: Any
    specialization: Any = None  # Triton's own, recorded in check mode


@dataclass
class _Entry:
    tensor_positions: tuple[int, ...]
    constexpr_values: tuple[Any, ...]
    kernels: dict[tuple[Hashable, ...], _Compiled] = field(default_factory=dict)


class CachedLauncher:
    """Launches one ``@triton.jit`` kernel, skipping ``JITFunction.run`` for a key it has launched before.

    Usage: ``_launch_foo = CachedLauncher(_foo_kernel)`` at module level, then
    ``_launch_foo(grid, args, constexprs, signature=sig, num_warps=4, num_stages=3)`` where ``args`` are
    the runtime arguments in declaration order and ``constexprs`` every constexpr parameter by name.
    ``fast_launches`` / ``normal_launches`` count which path each launch took; ``enabled = False`` sends
    every launch through the normal path (tests compare the two).
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.enabled = True
        self.fast_launches = 0
        self.normal_launches = 0
        self._reason: str | None | object = _NEVER  # fast_path_reason, computed at the first launch
        self._layout: ParamLayout | None = None
        self._entries: dict[Hashable, _Entry | object] = {}
        self._device_fn: Any = None
        self._stream_fn: Any = None
        self.normal_seconds = 0.0  # host time of normal-path launches: Triton's compiles (or cache loads) mostly
        _LAUNCHERS.append(self)

    def clear(self) -> None:
        """Forget every cached key (the next launch of each takes the normal path)."""
        self._entries.clear()

    def __call__(
        self,
        grid: tuple[int, ...],
        args: tuple[Any, ...],
        constexprs: Mapping[str, Any],
        *,
        signature: Hashable | None = None,
        num_warps: int | None = None,
        num_stages: int | None = None,
    ) -> None:
        """Launch ``kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)``.

        ``num_warps`` / ``num_stages`` None: Triton's defaults (not passed).
        """
        if self._reason is _NEVER:
            self._reason = fast_path_reason(self.kernel)
            self._layout = param_layout(self.kernel) if self._reason is None else None
        key = None
        # under torch.compile, Dynamo traces the normal path (it knows how to wrap a JITFunction launch)
        if self._reason is None and self.enabled and type(grid) is tuple and not torch.compiler.is_compiling():
            try:
                key = launch_key(signature, args, constexprs, num_warps, num_stages)
                entry = self._entries.get(key)
            except TypeError:  # an unhashable signature or constexpr value
                key = entry = None
            if entry is not None and entry is not _NEVER and not hooks_active() and self._fast(key, entry, grid, args):
                self.fast_launches += 1
                return
        options = {}
        if num_warps is not None:
            options["num_warps"] = num_warps
        if num_stages is not None:
            options["num_stages"] = num_stages
        start = time.perf_counter()
        compiled_kernel = self.kernel[grid](*args, **constexprs, **options)
        self.normal_seconds += time.perf_counter() - start
        self.normal_launches += 1
        if key is not None and not hooks_active():
            self._record(key, args, constexprs, compiled_kernel)

    def _fast(self, key: Hashable, entry: _Entry, grid: tuple[int, ...], args: tuple[Any, ...]) -> bool:
        """Launch through the cached launcher; False (nothing launched) if there is no kernel for these args."""
        try:
            device = self._device_fn()
            compiled = entry.kernels.get(tensor_key(args, entry.tensor_positions, device))
            if compiled is None or not self._globals_unchanged():
                return False
            if CHECK:
                self._check(compiled, args, entry, device)
            n = len(grid)
            compiled.launch(
                grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, self._stream_fn(device),
                compiled.function, compiled.packed_metadata, None, None, None, *args, *entry.constexpr_values,
            )  # fmt: skip
        except LaunchCheckError:
            raise
        except Exception:
            # a non-tensor where a tensor was, or a launcher that changed (another Triton): the C launcher
            # parses every argument and raises before it launches, so nothing ran; the normal path takes
            # this launch and every later one with this key
            self._entries[key] = _NEVER
            return False
        return True

    def _record(self, key: Hashable, args: tuple[Any, ...], constexprs: Mapping[str, Any], ck: Any) -> None:
        """Remember the CompiledKernel the normal path just launched under ``key``."""
        entry = self._entries.get(key)
        if entry is _NEVER:
            return
        try:
            from triton.runtime import driver

            if self._device_fn is None:
                self._device_fn = driver.active.get_current_device
                self._stream_fn = driver.active.get_current_stream
            if entry is None:
                if len(self._entries) >= _MAX_KEYS:
                    self._entries.clear()
                values = ordered_args(self._layout, args, constexprs)[len(args) :]
                positions = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
                entry = self._entries[key] = _Entry(positions, values)
            compiled = _Compiled(ck.run, ck.function, ck.packed_metadata)
            if compiled.function is None:
                raise AttributeError("CompiledKernel.function is not loaded")
            device = self._device_fn()
            if CHECK:
                compiled.specialization = self._specialization(args, entry, device)
            entry.kernels[tensor_key(args, entry.tensor_positions, device)] = compiled
        except Exception:  # another Triton's CompiledKernel, no active driver, constexprs not all named
            self._entries[key] = _NEVER

    def _globals_unchanged(self) -> bool:
        # JITFunction.run raises when a global the kernel read at compile time has changed: let it.
        missing = object()
        for (name, _), (val, globals_dict) in self.kernel.used_global_vals.items():
            if globals_dict.get(name, missing) != val:
                return False
        return True

    def _specialization(self, args: tuple[Any, ...], entry: _Entry, device: int) -> Any:
        """Triton's own specialization of these arguments (JITFunction.run's binder)."""
        binder = self.kernel.device_caches[device][4]
        return binder(*args, **dict(zip(self._layout.constexpr_names, entry.constexpr_values)))[1]

    def _check(self, compiled: _Compiled, args: tuple[Any, ...], entry: _Entry, device: int) -> None:
        spec = self._specialization(args, entry, device)
        if spec != compiled.specialization:
            raise LaunchCheckError(
                f"CachedLauncher({getattr(self.kernel, '__name__', self.kernel)}): the cached kernel was "
                f"specialized as {compiled.specialization}, these arguments as {spec}: the caller's signature "
                "misses an argument Triton specializes on"
            )


_LAUNCHERS: list[CachedLauncher] = []  # every launcher of this process (module-level, one per kernel)


def normal_path_stats() -> tuple[int, float]:
    """(launches, seconds) of every CachedLauncher's normal path in this process: the first launch of each
    kernel variant compiles it (or loads it from Triton's disk cache), later ones cost tens of µs, so the
    seconds are mostly Triton's compile time (first-call cost, part of what a user sees as compile time)."""
    return sum(x.normal_launches for x in _LAUNCHERS), sum(x.normal_seconds for x in _LAUNCHERS)


def tensor_signature(t: torch.Tensor) -> tuple[Any, ...]:
    """(shape, strides, dtype, device): what a launcher's host-side plan may depend on for one tensor."""
    return t.shape, t.stride(), t.dtype, t.device


class PlanCache(dict):
    """Host-side launch plans by signature (offsets, configs, grids): a dict that empties itself when full."""

    def __init__(self, max_size: int = _MAX_KEYS) -> None:
        super().__init__()
        self.max_size = max_size

    def put(self, key: Hashable, plan: Any) -> Any:
        """Store and return ``plan``."""
        if len(self) >= self.max_size:
            self.clear()
        self[key] = plan
        return plan
