"""Per-model runtime state: the step clock, per-site caches and statistics.

Nothing here is global. A :class:`ModelState` belongs to one model (it is attached to the model's
parameters, so it is freed with them) and is made active for the duration of one compiled call by the
runner through a context variable; the custom ops read it from there. Outside a runner call (eager
debugging, ``opcheck``) the ops compute the exact dense result.

Site identity: the ops receive a weight tensor of their layer (the q-projection for attention, the
first MLP linear for MLPs). State is keyed by that tensor's Python identity, which survives weight
offloading (offloaders swap ``param.data``, keeping the Parameter object) and regional compilation
(one compiled graph, different weights per block). A changed data pointer is checked against a value
fingerprint so that new weights (e.g. a fused LoRA) invalidate the caches while moved weights do not.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from chipmunk_compile.config import ChipmunkConfig

log = logging.getLogger("chipmunk_compile")

MAX_STREAMS = 4


@dataclass(frozen=True)
class StepInfo:
    """Where one call sits in the denoising loop. ``last``: the generation's last step, known only when the
    loop's length is (a diffusers loop over ``timesteps``, or ``num_steps`` when counting calls); its calls
    free their caches once they have used them."""

    generation: int
    step: int
    stream: int
    last: bool = False


def same_loop(a: Any, b: Any) -> bool:
    """Whether two step-clock keys come from the same denoising loop: keys taken from a loop's index carry a
    weak reference to its ``timesteps`` tensor (``loop``), which every pipeline call makes anew. Without it
    (step 0 of one loop and step 0 of the next are both key -0) a generation that ran only step 0 (a
    one-step warm-up, an interrupt) would go on into the next call. Keys without a loop compare equal."""
    ra, rb = getattr(a, "loop", None), getattr(b, "loop", None)
    if ra is None or rb is None:
        return ra is rb
    loop = ra()
    return loop is not None and loop is rb()


class StepClock:
    """Derives (generation, step, stream) from successive calls.

    Timestep mode (the compiled graph has a timestep input): a call whose timestep equals the previous
    call's is another CFG stream of the same step; a lower timestep is the next step; a higher timestep,
    a change of input shapes, or :meth:`reset` starts a new generation. Keys taken from a denoising loop's
    index (``in_loop``) say by themselves where a loop starts (a rising key, or another loop: see
    :func:`same_loop`), so within one loop a call with other shapes is just another stream (SD3's
    skip-layer guidance adds a batch-1 call to the batch-2 CFG call of some steps: each shape change
    restarted the generation, and most of the loop ran dense).

    Counting mode (no timestep visible, e.g. one block of a regionally compiled model): every
    ``streams_per_step`` calls form a step; a shape change, :meth:`reset`, or ``num_steps`` completed
    steps start a new generation.
    """

    def __init__(self, config: ChipmunkConfig) -> None:
        self._config = config
        self.generation = -1
        self.step = 0
        self.stream = 0
        self._t: float | None = None
        self._signature: Any = None
        self._in_loop = False  # the previous key came from a loop index
        self._calls = 0
        self._reset_pending = True
        self._warned_streams = False

    def reset(self) -> None:
        self._reset_pending = True

    def _new_generation(self, signature: Any) -> None:
        self.generation += 1
        self.step = 0
        self.stream = 0
        self._calls = 0
        self._signature = signature
        self._reset_pending = False

    def advance_timestep(self, t: float, signature: Any, in_loop: bool = False) -> StepInfo:
        reshaped = signature != self._signature and not (in_loop and self._in_loop)
        self._in_loop = in_loop
        if self._reset_pending or reshaped or self._t is None or t > self._t or not same_loop(t, self._t):
            self._new_generation(signature)
        elif t == self._t:
            self.stream += 1
            if self.stream >= MAX_STREAMS:
                if not self._warned_streams:
                    log.warning(
                        "chipmunk: more than %d calls with the same timestep %s; treating them as "
                        "repeats of stream 0 (dense step)", MAX_STREAMS, t,
                    )
                    self._warned_streams = True
                self.stream %= MAX_STREAMS
        else:
            self.step += 1
            self.stream = 0
        self._t = t
        return StepInfo(self.generation, self.step, self.stream)

    def advance_count(self, signature: Any) -> StepInfo:
        cfg = self._config
        per_step = cfg.streams_per_step
        if self._reset_pending or signature != self._signature:
            self._new_generation(signature)
        elif cfg.num_steps is not None and self._calls >= cfg.num_steps * per_step:
            self._new_generation(signature)
        self.step, self.stream = divmod(self._calls, per_step)
        self._calls += 1
        last = cfg.num_steps is not None and self.step == cfg.num_steps - 1
        return StepInfo(self.generation, self.step, self.stream, last)


@dataclass
class SiteStats:
    """What a site did; read by :func:`chipmunk_compile.report`.

    The kept fraction and FLOPs of the last call are computed on demand from the device-side counts,
    so recording them costs no host sync on the hot path.
    """

    calls: int = 0
    dense_calls: int = 0
    sparse_calls: int = 0
    selections: int = 0
    selections_ahead: int = 0  # of them, made by a selection launched ahead of the call (mlp_select)
    sparse_ahead: int = 0  # sparse calls run whole ahead of the call (mlp_select with mlp.sparse_ahead)
    last_phase: str = ""
    dense_flops: int = 0
    errors: list[tuple[int, float]] = field(default_factory=list)
    backend: str = ""
    cache_location: str = ""
    text_span: str = ""  # a text-key span taken at run time from the model's other sites (see sparse_attention)
    text_span_taken: tuple[int, int] | None = None  # that span as (start, length)
    _counts: torch.Tensor | None = None
    _columns: int = 1
    _fixed_flops: int = 0
    _kept_flops: int = 0
    _kept_static: float | None = None

    def record(self, phase: str, *, fixed_flops: int, kept_flops: int, counts: torch.Tensor | None,
               columns: int, kept_static: float | None = None) -> None:
        """Note one call: FLOPs = fixed_flops + kept_fraction * kept_flops."""
        self.last_phase = phase
        self._fixed_flops, self._kept_flops = fixed_flops, kept_flops
        self._counts, self._columns, self._kept_static = counts, columns, kept_static

    @property
    def kept_fraction(self) -> float | None:
        if self._kept_static is not None:
            return self._kept_static
        if self._counts is None:
            return None
        return float(self._counts.float().mean()) / self._columns

    @property
    def last_flops(self) -> int:
        kept = self.kept_fraction or 0.0
        return self._fixed_flops + round(kept * self._kept_flops)


class SiteState:
    """One rewritten site of one model: its identity, caches per CFG stream, and statistics."""

    def __init__(self, kind: str, uid: int, ordinal: int, key: torch.Tensor | None, generation: int = -1) -> None:
        self.kind = kind
        self.uid = uid
        self.ordinal = ordinal
        self._key_ref = weakref.ref(key) if key is not None else None
        # fingerprints of the weights the caches and weight_copies derive from: the key, and others (see watch)
        # (a new site's baseline sample stays on the device until a later generation compares with it: no sync)
        self._watched: dict[str, tuple] = {"key": _fingerprint(key, generation, lazy=True)} if key is not None else {}
        self.caches: dict[int, Any] = {}
        self.used: dict[int, tuple[int, int]] = {}  # stream -> (generation, step) of its latest call
        self.weight_copies: dict[str, torch.Tensor] = {}  # derived layouts of the site's weights
        # Host-side decisions that depend only on shapes/dtypes/layouts, made once per signature:
        # signature -> [reason the Triton path cannot run, or None].
        self.launch_checks: dict[tuple, list] = {}
        self.selection_kernel_error: str | None = None  # set when the Triton selection failed here
        self.dense_kernel_error: str | None = None  # set when the dense-step MLP kernel failed here
        # stream -> a selection launched ahead of this site's call (MLP early selection, see sparse_mlp)
        self.pending: dict[int, Any] = {}
        # MLP: the static arguments of the latest call, for a sparse call run ahead (sparse_mlp.AheadArgs), and
        # why running ahead stopped at this site (a kernel failed there)
        self.ahead: Any = None
        self.ahead_error: str | None = None
        self.stats = SiteStats()

    @property
    def key(self) -> torch.Tensor | None:
        return self._key_ref() if self._key_ref is not None else None

    def check_weights(self, key: torch.Tensor | None, generation: int = -1, deferred: list | None = None) -> None:
        """Drop the caches when the key weight's values changed (not merely moved)."""
        if key is not None and "key" in self._watched:
            self.watch("key", key, generation, deferred)

    def watch(self, name: str, weight: torch.Tensor, generation: int = -1, deferred: list | None = None) -> None:
        """Drop every cache and derived copy when ``weight``'s values changed (not merely moved): the key
        (:meth:`check_weights`), or another weight they derive from (the MLP's W2: a LoRA fused into the second
        linear alone leaves the key, W1, unchanged). Two attribute reads per call while it is unchanged.

        Inference tensors (weights made under ``torch.inference_mode``) keep no version counter: their values
        are compared once per ``generation`` instead (an in-place change mid-generation goes unseen until the
        next one). A change through ``weight.data`` (peft's ``fuse_lora`` / ``unfuse_lora``) moves neither the
        address nor the version: once per generation a view of the sampled values goes into ``deferred``
        (no kernel, no sync), and :meth:`ModelState.resolve_deferred` reads and compares them all at once."""
        old = self._watched.get(name)
        if old is not None and weight.data_ptr() == old[0]:
            version = _version(weight)
            if version == old[1]:
                if generation == old[3]:
                    return
                if version is not None:  # first call in a new generation: sample on the device, compare later
                    if deferred is not None and generation >= 0:
                        self._watched[name] = (*old[:3], generation)
                        deferred.append((self, name, weight, _sample(weight)))
                    return
                # an inference tensor in a new generation: compare its values now (below)
        # new: keep a device copy of the sample (no sync); moved or changed: compare a sample of the values (a sync)
        new = _fingerprint(weight, generation, lazy=old is None)
        if old is not None and _read_samples([new[2]])[0] != _read_samples([old[2]])[0]:
            log.info("chipmunk: weights (%s) of %s site %d changed; caches dropped", name, self.kind, self.ordinal)
            self.caches.clear()
            self.weight_copies.clear()
            self.launch_checks.clear()
        self._watched[name] = new

    def launch_check(self, signature: tuple, decide: Any) -> list:
        """[reason the Triton path cannot run, or None] for a call ``signature`` (a one-item list the caller
        updates when a kernel fails). The kernels validate their arguments once per signature themselves.

        ``decide()`` runs once per signature: these host-side checks would otherwise cost time every step.
        """
        checks = self.launch_checks.get(signature)
        if checks is None:
            checks = self.launch_checks[signature] = [decide()]
        return checks

    def triton_failed(self, err: Exception) -> str:
        """Log that a Triton kernel of this site failed (compile or launch); the reason the site now runs its
        PyTorch path for the failing call signature (the caller stores it in the signature's launch check)."""
        first = str(err).splitlines()[0] if str(err) else ""
        reason = f"Triton kernel failed: {type(err).__name__}: {first}"[:160]
        log.warning("chipmunk: %s site %d: %s; it runs the PyTorch path for these shapes from now on",
                    self.kind, self.ordinal, reason)
        self.stats.backend = f"pytorch ({reason})"
        return reason

    def release(self, info: StepInfo) -> None:
        """After a call of the generation's last step: drop its stream's caches (they would otherwise hold GPU
        memory until the next generation replaced them, e.g. through the VAE decode), and those of streams no
        call has used since before the previous step (SD3's skip-layer guidance stream stops after a few
        steps) or made in an earlier generation. Another stream of the last step that has not run yet (CFG as
        two calls) used its caches at the previous step and keeps them for its own call. Derived weight copies
        and pinned host buffers stay for the next generation."""
        for stream, entry in list(self.caches.items()):
            used = self.used.get(stream)
            if (stream == info.stream or entry.generation != info.generation or used is None
                    or used < (info.generation, info.step - 1)):
                del self.caches[stream]

    def cache(self, stream: int, generation: int) -> Any:
        """The cache of ``stream`` if it was made in ``generation``, else None."""
        entry = self.caches.get(stream)
        if entry is None or entry.generation != generation:
            return None
        return entry


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference tensors, which keep none."""
    return None if t.is_inference() else t._version


def _sample(t: torch.Tensor) -> torch.Tensor:
    """A strided view of up to 64 values spread over ``t`` (no kernel, no copy; read later)."""
    flat = t.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 64)][:64]


def _fingerprint(t: torch.Tensor, generation: int, lazy: bool = False) -> tuple[int, int | None, Any, int]:
    """(address, version, the :func:`_sample` values, the generation they were taken in).

    The values are read at once (a sync), or with ``lazy`` kept as a device copy of the sample (one small
    kernel, no sync) that :func:`_read_samples` reads when a later generation first compares with it. A model's
    first generation then runs without syncs: one per new site made the host wait for the device at every site
    of step 0, so the first launches of the Triton kernels at steps 1 and 2 (their compiles) found an empty
    queue and the device idled through them."""
    sample = _sample(t)
    return t.data_ptr(), _version(t), sample.clone() if lazy else tuple(sample.tolist()), generation


def _read_samples(samples: list[Any]) -> list[tuple[float, ...]]:
    """The values of samples (tuples, or device tensors of equal size, dtype and device, read in one transfer)."""
    tensors = [s for s in samples if isinstance(s, torch.Tensor)]
    rows = iter(torch.stack(tensors).tolist() if tensors else [])
    return [tuple(next(rows)) if isinstance(s, torch.Tensor) else s for s in samples]


class ModelState:
    """All runtime state of one compiled model (or one block, under regional compilation)."""

    _ids = itertools.count()
    _stamps = itertools.count(1)

    def __init__(self, config: ChipmunkConfig) -> None:
        self.id = next(self._ids)
        self.config = config
        self.clock = StepClock(config)
        self.last_active = 0  # ordering stamp of the last call, to tell which config a model now runs with
        # Regions driven by an enclosing forward (see runner): the step of the forward in progress.
        self.forward_info: StepInfo | None = None
        self.forward_t: float | None = None
        self.forward_t_ref: Any = None  # weakref to the timestep tensor whose value is forward_t
        self.forward_seen: set[tuple[int, int]] = set()
        self.plans: list[Any] = []
        self._sites: dict[tuple, SiteState] = {}
        self._last_use: dict[tuple, tuple[tuple[int, int, int], int]] = {}  # ident -> (last call, repeat)
        self._ordinals: dict[str, int] = {"attention": 0, "mlp": 0}
        self.offloader: Any = None
        self._selection_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._tokens: dict[torch.device, torch.Tensor] = {}
        self.offload_active = config.offload == "always"
        # views of weight samples, once per generation, read and compared in one batch (SiteState.watch)
        self.deferred: list[tuple[SiteState, str, torch.Tensor, torch.Tensor]] = []
        self._deferred_generation: int | None = None  # the generation whose samples wait in ``deferred``
        # offload "auto": per device, (generation, GPU memory the caches may take in it, bytes per cache key)
        self._gpu_cache_budget: dict[torch.device, tuple[int, int, dict[Hashable, int]]] = {}
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(config.seed)
        self._device_generators: dict[torch.device, torch.Generator] = {}
        self._seed_counter = itertools.count()
        # key length -> (start, length) of the text keys, from attention sites whose graph shows the span
        self.text_spans: dict[int, tuple[int, int]] = {}

    def touch(self) -> None:
        self.last_active = next(self._stamps)

    def add_plan(self, plan: Any) -> None:
        if all(p is not plan for p in self.plans):
            self.plans.append(plan)

    def peek_site(self, kind: str, key: torch.Tensor, info: StepInfo) -> SiteState | None:
        """The existing site that the next :meth:`site` call for ``key`` in ``info``'s call would return, without
        counting a use (an op that runs ahead of the site's own call, in the same forward); None if there is none
        yet or the id now names another tensor."""
        ident: tuple = (kind, id(key))
        last, repeat = self._last_use.get(ident, (None, 0))
        if last == (info.generation, info.step, info.stream):
            ident = (*ident, repeat + 1)
        site = self._sites.get(ident)
        return site if site is not None and site.key is key else None

    def selection_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The model's side stream on ``device`` for MLP work launched ahead: selections (high priority: their
        few latency-bound programs take the first free multiprocessors instead of queueing behind a GEMM's) and,
        with ``mlp.sparse_ahead``, whole sparse calls beside the attention."""
        stream = self._selection_streams.get(device)
        if stream is None:
            # a large negative priority maps to the device's highest
            stream = self._selection_streams[device] = torch.cuda.Stream(device, priority=-100)
        return stream

    def token(self, device: torch.device) -> torch.Tensor:
        """An empty (0,) tensor on ``device``, made once: what ``mlp_select`` returns (it holds no data, so one
        tensor serves every call; an allocation per call costs host time at every site and step)."""
        token = self._tokens.get(device)
        if token is None:
            token = self._tokens[device] = torch.empty((0,), device=device)
        return token

    def site(self, kind: str, uid: int, key: torch.Tensor | None, info: StepInfo | None = None) -> SiteState:
        """The state of the site with weight ``key`` (or, without a weight, graph position ``uid``).

        Keying by the weight, not the graph position, keeps a layer's caches when Dynamo recompiles
        the graph that contains it (a more general graph for the second block under regional
        compilation, dynamic shapes after a resolution change).

        ``info``: the call's place in the loop. A weight used again in the same forward (same generation,
        step and stream: a module applied twice, weight tying) is another site, with its own caches: keyed by
        the weight alone, the second use would run on the first one's caches.
        """
        ident: tuple = (kind, id(key)) if key is not None else (kind, -uid)
        if info is not None:
            call = (info.generation, info.step, info.stream)
            last, repeat = self._last_use.get(ident, (None, 0))
            repeat = repeat + 1 if last == call else 0
            self._last_use[ident] = (call, repeat)
            if repeat:
                ident = (*ident, repeat)
        site = self._sites.get(ident)
        if site is not None and key is not None and site.key is not key:
            site = None  # the id was reused by a new tensor
        if site is None:
            site = SiteState(kind, uid, self._ordinals[kind], key, -1 if info is None else info.generation)
            self._ordinals[kind] += 1
            self._sites[ident] = site
        else:
            site.uid = uid
            site.check_weights(key, -1 if info is None else info.generation, self.deferred)
        if info is not None:
            site.used[info.stream] = (info.generation, info.step)
            if self.deferred:
                # samples noted at step 0 wait for the generation's first later call (one sync per generation);
                # samples left by a generation that ended at step 0 are read at the next generation's first call
                if self._deferred_generation is None:
                    self._deferred_generation = info.generation
                if info.step >= 1 or self._deferred_generation != info.generation:
                    self.resolve_deferred()
        return site

    def resolve_deferred(self) -> None:
        """Compare the weight samples :meth:`SiteState.watch` noted this generation with the ones before: one
        gathering copy and one transfer per (device, dtype) (a single sync; at the first call after step 0,
        before any sparse step reads a weight's derived copy). A weight whose values changed without a new
        version (changed through ``.data``) gets its derived copies dropped (the MLP's transposed W2); the
        caches made since, at step 0, came from the new values and stay."""
        pending, self.deferred, self._deferred_generation = self.deferred, [], None
        groups: dict[tuple, list] = {}
        for item in pending:
            groups.setdefault((item[3].device, item[3].dtype, item[3].numel()), []).append(item)
        for key, items in groups.items():
            olds = [site._watched.get(name) for site, name, _, _ in items]
            # baselines still on the device (a new site's, see _fingerprint) of this group's size: the same read
            lazy = [i for i, old in enumerate(olds) if old is not None and isinstance(old[2], torch.Tensor)
                    and (old[2].device, old[2].dtype, old[2].numel()) == key]
            read = _read_samples([item[3] for item in items] + [olds[i][2] for i in lazy])
            for i, value in zip(lazy, read[len(items):]):
                olds[i] = (*olds[i][:2], value, olds[i][3])
                items[i][0]._watched[items[i][1]] = olds[i]
            for (site, name, weight, _), value, old in zip(items, read, olds):
                if old is not None and isinstance(old[2], torch.Tensor):  # a baseline of another size: own read
                    old = (*old[:2], _read_samples([old[2]])[0], old[3])
                    site._watched[name] = old
                if old is not None and old[0] == weight.data_ptr() and value != old[2]:
                    log.info("chipmunk: weights (%s) of %s site %d changed in place without a new version (e.g. "
                             "a fused LoRA); derived copies dropped", name, site.kind, site.ordinal)
                    site.weight_copies.clear()
                    site.launch_checks.clear()
                    site._watched[name] = (old[0], old[1], value, old[3])

    @property
    def sites(self) -> list[SiteState]:
        return list(self._sites.values())

    def reset(self) -> None:
        """Start a new generation at the next call and free every cache."""
        self.clock.reset()
        self.forward_info = None
        for site in self._sites.values():
            site.caches.clear()

    def offloader_for(self, device: torch.device) -> Any:
        """The model's CacheOffloader when offloading can apply (CUDA, offload != "never"), else None."""
        if self.config.offload == "never" or device.type != "cuda":
            return None
        if self.offloader is None:
            from chipmunk_compile.offload import CacheOffloader

            self.offloader = CacheOffloader(device)
        return self.offloader

    def should_offload(self, nbytes: int, device: torch.device, key: Hashable = None, generation: int = 0) -> bool:
        """Whether a new cache of ``nbytes`` (for ``key``: one site and stream) goes to pinned CPU memory.

        "auto": caches stay on the GPU while all of this generation's (one per key: a remade cache replaces
        its key's) fit in what the driver reported free at the generation's first cache, less
        ``offload_reserve_gb``; from the first one that does not, every cache goes to pinned memory, in later
        generations too (sticky). Starting each generation over would not keep the same caches on the GPU: the
        first generation's, freed after its last step, stay with the caching allocator, so the driver reports
        that much less free at the next generation's first cache.
        The budget is fixed at that first cache because the caching allocator carves caches out of memory it
        already holds (a dense step's activations) without the driver's free memory moving: checking each
        cache against the driver alone kept ~60 GB of Wan's caches on the GPU at 81 frames until a forward
        found no room left in the fragmented pool (session 7). The allocator's held but unused blocks never
        count as free: they are often fragments of segments that also hold live tensors (with them counted,
        Wan ran out of memory with 14 GB of them reserved; git 647329f).
        """
        if self.offload_active or self.config.offload != "auto":
            return self.offload_active
        reserve = int(self.config.offload_reserve_gb * 2**30)
        free, _ = torch.cuda.mem_get_info(device)
        budget = self._gpu_cache_budget.get(device)
        if budget is None or budget[0] != generation:
            budget = self._gpu_cache_budget[device] = (generation, free - reserve, {})
        _, limit, held = budget
        on_gpu = sum(held.values()) - held.get(key, 0)
        # the driver's free memory is checked too: other memory (MLP caches, the user's) may have grown since
        if on_gpu + nbytes > limit or free - nbytes < reserve:
            log.warning("chipmunk: GPU memory is short for this model's attention caches (%.1f GB of them on the "
                        "GPU, %.1f GB free); they go to pinned CPU memory from now on", on_gpu / 2**30, free / 2**30)
            self.offload_active = True
            held.clear()
        else:
            held[key] = nbytes
        return self.offload_active

    def next_seed(self) -> int:
        """A fresh seed for one random draw (a selection step): ``config.seed`` in the high bits, a per-model
        call counter in the low 32. Pure Python, so no device generator state and no host sync; distinct
        calls get distinct seeds (for the first 2**32 calls), and the same config replays the same seeds.
        """
        return ((self.config.seed & 0x3FFFFFFF) << 32) | (next(self._seed_counter) & 0xFFFFFFFF)

    def random_generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            return self.generator
        gen = self._device_generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.config.seed)
            self._device_generators[device] = gen
        return gen


@dataclass(frozen=True)
class CallContext:
    """What the ops of one compiled call see."""

    state: ModelState
    info: StepInfo


_ACTIVE: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("chipmunk_active", default=None)


def active_context() -> CallContext | None:
    return _ACTIVE.get()


def activate(ctx: CallContext) -> contextvars.Token:
    return _ACTIVE.set(ctx)


def deactivate(token: contextvars.Token) -> None:
    _ACTIVE.reset(token)
