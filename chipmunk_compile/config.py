"""Typed, validated configuration for the chipmunk backend.

Users pass either a :class:`ChipmunkConfig` (``chipmunk_compile.backend(config)``) or ``options`` to
``torch.compile(..., backend="chipmunk", options={...})``: ``"preset"`` picks a named preset and dotted
keys (``"attention.keep": 0.1``) override single fields. Unknown keys and invalid values raise
:class:`ConfigError` naming the key. Keys that are not ours are passed on to Inductor unchanged
(they must be valid Inductor config names, which Inductor itself checks).

Presets follow the configurations the paper's code shipped (chipmunk-method.md section 7), expressed
in our terms: ``keep`` is the fraction of key columns (attention) or hidden units (MLP) recomputed on
sparse steps, ``random_keep`` the extra fraction drawn at random, and the schedule fields say which
denoising steps run densely and refresh the caches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from typing import Any

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """An option key or value the backend cannot accept."""


def _check_fraction(key: str, value: float, *, allow_zero: bool = True) -> None:
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0):
        raise ConfigError(f"{key} must be in {'[0, 1]' if allow_zero else '(0, 1]'}, got {value!r}")


@dataclass(frozen=True)
class ScheduleFields:
    """Which calls of a site run densely (exact output, caches refreshed).

    A step is dense when it is in ``dense_steps`` (if given), else when ``step < first_dense_steps`` or
    ``step % dense_every == 0``; a dense step followed by a dense step makes no caches. Sites whose ordinal
    (order of first execution, per kind) is below ``first_dense_layers`` always run densely and keep no cache.
    """

    dense_steps: tuple[int, ...] | None = None
    first_dense_steps: int = 2
    dense_every: int = 10
    first_dense_layers: int = 2

    def is_dense_step(self, step: int) -> bool:
        if self.dense_steps is not None:
            return step in self.dense_steps
        return step < self.first_dense_steps or (self.dense_every > 0 and step % self.dense_every == 0)

    def is_plain_dense_step(self, step: int, last: bool = False) -> bool:
        """A dense step that makes no caches: the next step is dense too (it remakes them from its own inputs),
        or it is the generation's ``last`` step. Of a run of consecutive dense steps, only the last one selects
        and caches; the original method's step 0 likewise runs plain dense attention."""
        return self.is_dense_step(step) and (last or self.is_dense_step(step + 1))

    def _validate_schedule(self, prefix: str) -> None:
        if self.dense_steps is not None:
            if not all(isinstance(s, int) and s >= 0 for s in self.dense_steps):
                raise ConfigError(f"{prefix}.dense_steps must be non-negative ints, got {self.dense_steps!r}")
        for name in ("first_dense_steps", "dense_every", "first_dense_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{prefix}.{name} must be a non-negative int, got {value!r}")


@dataclass(frozen=True)
class AttentionConfig(ScheduleFields):
    """Column-sparse attention: per (sample, head, group of ``query_group`` consecutive queries)."""

    enabled: bool = True
    keep: float = 0.1
    random_keep: float = 0.01
    query_group: int = 128
    recompute_selection: bool = True
    keep_text_keys: bool = False
    min_seq_len: int = 0

    def __post_init__(self) -> None:
        self._validate_schedule("attention")
        _check_fraction("attention.keep", self.keep, allow_zero=False)
        _check_fraction("attention.random_keep", self.random_keep)
        if self.query_group not in (64, 128, 192):
            raise ConfigError(f"attention.query_group must be 64, 128 or 192, got {self.query_group!r}")
        if self.min_seq_len < 0:
            raise ConfigError(f"attention.min_seq_len must be >= 0, got {self.min_seq_len!r}")


@dataclass(frozen=True)
class MlpConfig(ScheduleFields):
    """Column-sparse MLP: per block of ``block`` consecutive tokens, recompute the changed hidden units.

    ``min_tokens``: MLP sites whose traced input has fewer tokens (batch × sequence) stay dense, with that
    reason in the report (decided at compile time from the traced shape). A short sequence gives the sparse
    kernels too few row tiles to fill the GPU, so they save no time while the site still pays its launches
    and selections (FLUX's 512-token text MLPs; the original method leaves them dense too).

    ``early_selection``: where an attention that does not depend on an MLP runs between the point where the
    MLP's input is ready and the MLP's own call (FLUX's and HunyuanVideo's single-stream blocks: the MLP and
    attention branches share one input), a selection step's unit selection is launched before that attention,
    on a side stream, and overlaps it; the MLP waits for it. The same selection, bit for bit. Off under
    ``mode="reduce-overhead"`` (every op call outside the CUDA graphs splits them).

    ``sparse_ahead`` (with ``early_selection``, CUDA): at those sites the whole sparse call, selection and both
    sparse kernels, runs at that point on the side stream, so the MLP's kernels overlap the attention and the
    work up to the MLP's call, which then only waits for them. The same kernels on the same inputs: the same
    output, bit for bit.
    """

    enabled: bool = True
    keep: float = 0.3
    random_keep: float = 0.05
    block: int = 128
    selection_every: int = 2
    first_dense_steps: int = 1
    min_tokens: int = 0
    early_selection: bool = True
    sparse_ahead: bool = True

    def __post_init__(self) -> None:
        self._validate_schedule("mlp")
        for name in ("early_selection", "sparse_ahead"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"mlp.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise ConfigError(f"mlp.min_tokens must be an int >= 0, got {self.min_tokens!r}")
        _check_fraction("mlp.keep", self.keep, allow_zero=False)
        _check_fraction("mlp.random_keep", self.random_keep)
        if self.block not in (64, 128, 256, 512):
            raise ConfigError(f"mlp.block must be one of 64, 128, 256, 512, got {self.block!r}")
        if not isinstance(self.selection_every, int) or self.selection_every < 1:
            raise ConfigError(f"mlp.selection_every must be an int >= 1, got {self.selection_every!r}")


@dataclass(frozen=True)
class ChipmunkConfig:
    """Everything the backend needs; immutable, so one config can serve many compiles.

    ``streams_per_step`` only matters where the runner cannot read a timestep (regional compilation
    without :func:`chipmunk_compile.attach`): then every ``streams_per_step`` consecutive calls of a
    site form one denoising step (2 for pipelines that call the model twice per step for CFG).
    ``num_steps``, when set, starts a new generation after that many steps in the same situation.

    ``offload`` places attention caches (the large ones: B·H·S·D per site and CFG stream) in pinned CPU
    memory, fetched back one site ahead on a side stream: "always", "never", or "auto" (from the first
    cache that would not fit, with the generation's others, in the GPU memory free at its first cache less
    ``offload_reserve_gb``). CUDA only; MLP caches,
    updated in place at every sparse step, stay on the GPU.
    """

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MlpConfig = field(default_factory=MlpConfig)
    check_error: bool = False
    seed: int = 0
    streams_per_step: int = 1
    num_steps: int | None = None
    use_triton: bool = True
    offload: str = "auto"
    offload_reserve_gb: float = 4.0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.offload not in ("auto", "never", "always"):
            raise ConfigError(f"offload must be 'auto', 'never' or 'always', got {self.offload!r}")
        if self.offload_reserve_gb < 0:
            raise ConfigError(f"offload_reserve_gb must be >= 0, got {self.offload_reserve_gb!r}")
        if self.streams_per_step < 1:
            raise ConfigError(f"streams_per_step must be >= 1, got {self.streams_per_step!r}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1 or None, got {self.num_steps!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_name(cls, name: str) -> ChipmunkConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> tuple[ChipmunkConfig, dict[str, Any]]:
        """Split ``torch.compile`` options into our config and the rest (Inductor's).

        Our keys: ``preset``, ``config`` (a ChipmunkConfig), top-level field names of ChipmunkConfig,
        and ``attention.<field>`` / ``mlp.<field>``.
        """
        options = dict(options or {})
        base = options.pop("config", None)
        if base is not None and not isinstance(base, ChipmunkConfig):
            raise ConfigError(f"config must be a ChipmunkConfig, got {type(base).__name__}")
        preset = options.pop("preset", None)
        if preset is not None:
            if base is not None:
                raise ConfigError("pass either 'preset' or 'config', not both")
            base = cls.from_name(preset)
        cfg = base or cls()
        top_fields = {f.name for f in fields(cls)} - {"attention", "mlp", "version"}
        overrides: dict[str, Any] = {}
        rest: dict[str, Any] = {}
        for key, value in options.items():
            if key.startswith(("attention.", "mlp.")) or key in top_fields:
                overrides[key] = value
            elif key.startswith("chipmunk.") or key in {"attention", "mlp"}:
                raise ConfigError(f"unknown chipmunk option {key!r}")
            else:
                rest[key] = value
        return cfg.with_overrides(overrides), rest

    def with_overrides(self, overrides: dict[str, Any]) -> ChipmunkConfig:
        """Return a copy with dotted-key overrides applied and validated."""
        sub: dict[str, dict[str, Any]] = {"attention": {}, "mlp": {}}
        top: dict[str, Any] = {}
        for key, value in overrides.items():
            head, _, tail = key.partition(".")
            if tail:
                if head not in sub:
                    raise ConfigError(f"unknown chipmunk option {key!r}")
                target = getattr(self, head)
                valid = {f.name: f for f in fields(target)}
                if tail not in valid:
                    raise ConfigError(f"unknown chipmunk option {key!r}; valid: {sorted(valid)}")
                sub[head][tail] = _coerce(key, value, getattr(target, tail), valid[tail])
            else:
                valid = {f.name: f for f in fields(self)}
                if head not in valid or head in ("attention", "mlp", "version"):
                    raise ConfigError(f"unknown chipmunk option {key!r}")
                top[head] = _coerce(key, value, getattr(self, head), valid[head])
        try:
            attention = replace(self.attention, **sub["attention"])
            mlp = replace(self.mlp, **sub["mlp"])
            return replace(self, attention=attention, mlp=mlp, **top)
        except TypeError as err:  # pragma: no cover - guarded by the field checks above
            raise ConfigError(str(err)) from err

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChipmunkConfig:
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(f"config version {version} is not supported (expected {CONFIG_VERSION})")
        attention = AttentionConfig(**_tuplify(data.pop("attention", {})))
        mlp = MlpConfig(**_tuplify(data.pop("mlp", {})))
        return cls(attention=attention, mlp=mlp, **data)


def _tuplify(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _coerce(key: str, value: Any, current: Any, f: dataclasses.Field) -> Any:
    """Type-check one override against the field's current value type."""
    annotation = str(f.type)
    if "tuple" in annotation:
        if value is None and "None" in annotation:
            return None
        if isinstance(value, (list, tuple, set, frozenset)):
            return tuple(sorted(int(v) for v in value))
        raise ConfigError(f"{key} must be a list of ints, got {value!r}")
    if annotation.startswith("bool") or isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be a bool, got {value!r}")
        return value
    if "int" in annotation and "float" not in annotation:
        if value is None and "None" in annotation:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an int, got {value!r}")
        return value
    if "float" in annotation:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    return value


# Presets, from the configurations shipped with the paper's code (chipmunk-method.md section 7).
# FLUX: 672 of 4352 keys (~15.4%) recomputed, set once per generation; MLP 30% + 5% random, the 512-token
# text MLPs of the double blocks dense.
# HunyuanVideo: 5% of keys + 1% random, dense at {0, 1, 10, 40}; MLP dense (the paper left it dense).
# Wan 2.1: 10% of keys + 1% random, dense every 10 (plus steps 0 and 1); MLP dense.
PRESETS: dict[str, ChipmunkConfig] = {
    "default": ChipmunkConfig(),
    "flux": ChipmunkConfig(
        attention=AttentionConfig(keep=672 / 4352, random_keep=0.0, recompute_selection=False),
        mlp=MlpConfig(keep=0.3, random_keep=0.05, dense_every=10, first_dense_steps=1, selection_every=2,
                      min_tokens=1024),
    ),
    "hunyuan": ChipmunkConfig(
        attention=AttentionConfig(keep=0.05, random_keep=0.01, dense_steps=(0, 1, 10, 40), keep_text_keys=True),
        mlp=MlpConfig(enabled=False),
    ),
    "wan": ChipmunkConfig(
        attention=AttentionConfig(keep=0.10, random_keep=0.01, dense_every=10),
        mlp=MlpConfig(enabled=False),
    ),
}
