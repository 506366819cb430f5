"""The typed sweep configuration: a base `TrainConfig` and a search space over its fields.

A `SweepConfig` is what a user writes (YAML or JSON, or the body of ``POST /v1/sweeps``).
Its ``space`` maps dotted `TrainConfig` field paths (``objective.teacher_temp``) to
distributions, so any numeric or categorical field of a training run can be swept. The
whole sweep is checked before anything runs: an unknown field path (with the close
names), an empty range, a log range through zero, and any range or value that would make
a trial's config invalid, found by substituting every endpoint and value into the base
config and validating it like a training job. Every problem names its field path
(``space.objective.teacher_temp: ...``), as `trainer.config.ConfigError` does.
"""

from __future__ import annotations

import difflib
import json
import math
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from trainer.config import (
    MAX_CLUSTERS,
    MAX_CPUS_PER_WORKER,
    MAX_EPOCHS,
    MAX_NAME_LENGTH,
    MAX_SEED,
    MAX_WORKERS,
    ConfigError,
    DataConfig,
    RuntimeConfig,
    TrainConfig,
    apply_overrides,
    read_config_file,
    validate_config,
)

Mode = Literal["max", "min"]
SearchKind = Literal["random", "grid", "optuna"]

DIAGNOSTIC_METRICS: dict[str, Mode] = {
    "mutual_info": "max",
    "effective_clusters": "max",
    "prior_entropy": "max",
    "teacher_entropy": "min",
    "target_mutual_info": "max",
    "target_mutual_info_norm": "max",
    "target_cluster_usage": "max",
    "target_effective_clusters": "max",
    "target_entropy": "min",
    "logit_spread": "max",
    "kl": "min",
    "loss": "min",
    "epoch_loss": "min",
    "healthy": "max",
}
"""Label-free metrics every epoch reports (`trainer.engine.DIAGNOSTICS`, the epoch's
mean loss and the health verdict), with the direction in which they improve."""

MAX_RANGE_END = 1e12
"""Largest magnitude of a range's endpoint (every field's own bound is checked as well)."""
MAX_CHOICE_VALUES = 1000
"""Values of one choice or grid."""
MAX_SPACE_VALUES = 10_000
"""Choice and grid values of the whole space (each is validated as a trial config)."""
MAX_SPACE_KEYS = 64
"""Swept fields (TrainConfig has fewer)."""
MAX_SPACE_KEY_LENGTH = 128
"""Characters of a swept field path."""
MAX_NUM_SAMPLES = 10_000
"""Trials sampled, or repetitions of a grid."""
MAX_TRIALS = 10_000
"""Trials of a whole sweep: num_samples times the size of every grid."""
MAX_CONCURRENT_TRIALS = 1024
"""Trials at once."""
MAX_REDUCTION_FACTOR = 100.0
"""ASHA's reduction factor (Ray's default is 4; more keeps almost nothing)."""
MAX_SHOWN_VALUE = 100
"""Characters of a value quoted in an error message."""
MAX_VALUE_PROBLEMS = 5
"""Invalid values of one swept field reported one by one (the rest are counted)."""

KNN_METRIC = "knn_top1"
LINEAR_METRIC = "linear_top1"
COLLAPSE_METRICS = ("healthy", "mutual_info", "effective_clusters")


class _Strict(BaseModel):
    """Unknown keys are errors; every float is finite (no ``Infinity`` or ``NaN``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


RangeEnd = Annotated[float, Field(ge=-MAX_RANGE_END, le=MAX_RANGE_END)]


# ------------------------------------------------------------------ distributions


class Uniform(_Strict):
    """Uniform on [low, high] (integers for an integer field)."""

    type: Literal["uniform"]
    low: RangeEnd
    high: RangeEnd

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be smaller than high ({self.high:g})")
        return self

    def endpoints(self) -> list[Any]:
        """The values whose validity stands for the whole range."""
        return [self.low, self.high]


class LogUniform(Uniform):
    """Log-uniform on [low, high], 0 < low < high (integers for an integer field)."""

    type: Literal["loguniform"]  # type: ignore[assignment]

    @model_validator(mode="after")
    def _positive(self) -> Self:
        if self.low <= 0:
            raise ValueError(f"a log-uniform range needs low > 0, got low = {self.low:g}")
        return self


class Choice(_Strict):
    """One of ``values``, drawn at random (a grid search tries each)."""

    type: Literal["choice"]
    values: list[JsonValue] = Field(max_length=MAX_CHOICE_VALUES)

    @field_validator("values")
    @classmethod
    def _not_empty(cls, values: list[JsonValue]) -> list[JsonValue]:
        if not values:
            raise ValueError("values must hold at least one value")
        return values

    def endpoints(self) -> list[Any]:
        """Every value (each must make a valid config)."""
        return list(self.values)


class Grid(Choice):
    """Every one of ``values``: each sample of the search runs them all."""

    type: Literal["grid"]  # type: ignore[assignment]


Distribution = Annotated[Uniform | LogUniform | Choice | Grid, Field(discriminator="type")]
DISTRIBUTION_TAGS = frozenset({"uniform", "loguniform", "choice", "grid"})


# ----------------------------------------------------------------------- sections


class AshaConfig(_Strict):
    """Asynchronous successive halving over epochs (Ray Tune's ``ASHAScheduler``)."""

    enabled: bool = Field(True, description="Stop the worse trials early.")
    grace_period: int = Field(
        1, ge=1, le=MAX_EPOCHS, description="Epochs every trial trains at least."
    )
    reduction_factor: float = Field(
        2.0, gt=1, le=MAX_REDUCTION_FACTOR, description="1/fraction kept at each rung."
    )
    max_t: int | None = Field(
        None,
        ge=1,
        le=MAX_EPOCHS,
        description="Epochs of the longest trial (default: base schedule.epochs).",
    )


class CollapseConfig(_Strict):
    """Stop a trial whose clusters collapsed (see `tuning.stoppers.CollapseStopper`)."""

    enabled: bool = Field(True, description="Stop collapsed trials.")
    metric: Literal["healthy", "mutual_info", "effective_clusters"] = Field(
        "healthy",
        description="healthy: the trainer's own verdict (trainer.health: normalised target "
        "mutual information, target cluster usage and logit spread), the rule "
        "behind every run's klssl.health; mutual_info or effective_clusters: that raw "
        "teacher metric below `threshold`.",
    )
    threshold: float = Field(
        0.05,
        ge=0,
        le=MAX_CLUSTERS,
        description="Collapsed while the raw metric is below (healthy is 0 or 1: below 0.5).",
    )
    patience: int = Field(
        2, ge=1, le=MAX_EPOCHS, description="Consecutive collapsed epochs before stopping."
    )
    grace_epochs: int = Field(
        1, ge=0, le=MAX_EPOCHS, description="Epochs never judged (the warm-up)."
    )


class ResourcesConfig(_Strict):
    """Resources of every trial (its TorchTrainer workers; the trial driver takes no CPU)."""

    workers_per_trial: int | None = Field(
        None,
        ge=1,
        le=MAX_WORKERS,
        description="Training workers per trial (default: base runtime.num_workers).",
    )
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        le=MAX_CPUS_PER_WORKER,
        description="CPUs per worker (default: base runtime.cpus_per_worker).",
    )


# ------------------------------------------------------------------------ config


class SweepConfig(_Strict):
    """A hyperparameter sweep: a base training config, a search space and the search."""

    name: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="Sweep name (default: base name).",
    )
    base: TrainConfig = Field(description="The training config every trial starts from.")
    space: dict[str, Distribution] = Field(
        max_length=MAX_SPACE_KEYS,
        description="Dotted TrainConfig field path -> distribution, e.g. "
        "objective.teacher_temp: {type: loguniform, low: 0.02, high: 0.1}. At most "
        f"{MAX_CHOICE_VALUES} values per choice or grid, {MAX_SPACE_VALUES} in all, range "
        f"endpoints within +-{MAX_RANGE_END:g}, and at most {MAX_TRIALS} trials in all "
        "(num_samples times every grid's size).",
    )
    num_samples: int | None = Field(
        None,
        ge=1,
        le=MAX_NUM_SAMPLES,
        description="Trials to sample (random, optuna; default 8); for grid search or a "
        "space of grids only, repetitions of the whole grid (default 1).",
    )
    metric: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="Objective reported every epoch (default: knn_top1 when the data has "
        "labels, else mutual_info).",
    )
    mode: Mode | None = Field(None, description="max or min (default: the metric's own).")
    search: SearchKind = Field(
        "random", description="random, grid (every combination) or optuna (TPE)."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of the search algorithm.")
    asha: AshaConfig = Field(default_factory=AshaConfig)
    collapse: CollapseConfig = Field(default_factory=CollapseConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    max_concurrent_trials: int | None = Field(
        None,
        ge=1,
        le=MAX_CONCURRENT_TRIALS,
        description="Trials at once (default: what the cluster can hold, >= 1).",
    )

    @field_validator("space", mode="before")
    @classmethod
    def _bounded(cls, space: Any) -> Any:
        """Size and key lengths, before any distribution is validated."""
        if not isinstance(space, Mapping):
            return space  # the dict validator says what is wrong
        if len(space) > MAX_SPACE_KEYS:
            raise ValueError(
                f"{len(space)} swept fields, more than {MAX_SPACE_KEYS} "
                f"(TrainConfig has {len(field_paths())})"
            )
        for key in space:
            if isinstance(key, str) and len(key) > MAX_SPACE_KEY_LENGTH:
                raise ValueError(
                    f"field path {shown_value(key)} of {len(key)} characters is longer "
                    f"than {MAX_SPACE_KEY_LENGTH}"
                )
        values = sum(
            len(d["values"])
            for d in space.values()
            if isinstance(d, Mapping) and isinstance(d.get("values"), list)
        )
        if values > MAX_SPACE_VALUES:
            raise ValueError(
                f"{values} choice and grid values in all, more than {MAX_SPACE_VALUES}"
            )
        return space

    @field_validator("space")
    @classmethod
    def _not_empty(cls, space: dict[str, Any]) -> dict[str, Any]:
        if not space:
            raise ValueError("the search space is empty: give at least one field to sweep")
        return space

    @model_validator(mode="after")
    def _resolve_and_check(self) -> Self:
        """Fill the derived defaults, then check the space against the base config."""
        self.name = self.name or self.base.name
        only_grids = all(isinstance(d, Grid) for d in self.space.values())
        self.num_samples = self.num_samples or (1 if self.search == "grid" or only_grids else 8)
        self.resources.workers_per_trial = (
            self.resources.workers_per_trial or self.base.runtime.num_workers
        )
        self.resources.cpus_per_worker = (
            self.resources.cpus_per_worker or self.base.runtime.cpus_per_worker
        )
        problems: list[InitErrorDetails] = []

        def problem(loc: tuple[str | int, ...], message: str, value: Any) -> None:
            error = PydanticCustomError("sweep", "{reason}", {"reason": message})
            problems.append(InitErrorDetails(type=error, loc=loc, input=value))

        if self.metric is None:
            self.metric = KNN_METRIC if dataset_has_labels(self.base.data) else "mutual_info"
        known = known_metrics(self.base)
        if self.metric not in known:
            close = difflib.get_close_matches(self.metric, list(known), n=3, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            problem(
                ("metric",),
                f"unknown metric {self.metric!r}; epochs report {', '.join(known)}{hint}",
                self.metric,
            )
        else:
            self.mode = self.mode or known[self.metric]
        labelled_metric = self.metric.startswith((KNN_METRIC, LINEAR_METRIC))
        if labelled_metric and not dataset_has_labels(self.base.data):
            problem(("metric",), f"{self.metric} needs a dataset with labels", self.metric)
        max_t = self.asha.max_t or self.base.schedule.epochs
        if max_t > self.base.schedule.epochs:
            problem(
                ("asha", "max_t"),
                f"max_t ({max_t}) exceeds the base schedule.epochs ({self.base.schedule.epochs})",
                max_t,
            )
        self.asha.max_t = max_t
        if self.asha.grace_period > max_t:
            problem(
                ("asha", "grace_period"),
                f"grace_period ({self.asha.grace_period}) exceeds max_t ({max_t})",
                self.asha.grace_period,
            )
        base_runtime = self.base.runtime
        for path, reason in NOT_IN_SWEEPS.items():
            field = path.removeprefix("runtime.")
            value = getattr(base_runtime, field)
            if path in self.space:
                problem(("space", path), reason, path)
            elif value != RuntimeConfig.model_fields[field].default:
                problem(("base", "runtime", field), reason, value)
        if self.search == "optuna" and not optuna_available():
            problem(
                ("search",),
                "search 'optuna' needs the optuna package (pip install 'klssl[tune]'), "
                "which is not installed; use search: random or grid",
                self.search,
            )
        trials = self.trial_count()
        if trials > MAX_TRIALS:
            grids = self.grid_sizes()
            if grids:
                sizes = " x ".join(str(size) for size in grids)
                problem(
                    ("space",),
                    f"the grid has {sizes} points, times num_samples {self.samples}: "
                    f"{trials} trials, more than {MAX_TRIALS}",
                    trials,
                )
            else:  # num_samples' own bound is MAX_TRIALS: kept here should they differ
                problem(("num_samples",), f"{trials} trials, more than {MAX_TRIALS}", trials)
        for path, reason, value in space_problems(self.trial_base(), self.space, self.search):
            problem(("space", path), reason, value)
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self

    # Resolved values (set by validation; typed without None for the code that runs).

    @property
    def objective(self) -> tuple[str, Mode]:
        """The metric every trial reports each epoch and its direction."""
        assert self.metric is not None and self.mode is not None
        return self.metric, self.mode

    @property
    def sweep_name(self) -> str:
        """The sweep's name (default: the base config's name)."""
        return self.name or self.base.name

    @property
    def samples(self) -> int:
        """Trials to sample, or repetitions of the grid."""
        return self.num_samples or 1

    def grid_sizes(self) -> list[int]:
        """The size of every grid (a choice is one under ``search: grid``)."""
        return [
            len(d.values)
            for d in self.space.values()
            if isinstance(d, Grid) or (self.search == "grid" and isinstance(d, Choice))
        ]

    def trial_count(self) -> int:
        """How many trials the sweep runs in all: num_samples times every grid's size."""
        return self.samples * math.prod(self.grid_sizes())

    @property
    def epochs(self) -> int:
        """Epochs of a trial that is never stopped early (ASHA's ``max_t``)."""
        return self.asha.max_t or self.base.schedule.epochs

    def trial_base(self) -> TrainConfig:
        """The config every trial starts from: the base with the sweep's resources.

        A k-NN objective is evaluated after every epoch (``eval.every_epochs = 1``): the
        scheduler and the search compare trials epoch by epoch, so every epoch must
        report the objective.
        """
        runtime = {
            "num_workers": self.resources.workers_per_trial or self.base.runtime.num_workers,
            "cpus_per_worker": self.resources.cpus_per_worker or self.base.runtime.cpus_per_worker,
        }
        updates: dict[str, Any] = {"runtime": runtime}
        if (self.metric or "").startswith((KNN_METRIC, LINEAR_METRIC)):
            updates["eval"] = {"every_epochs": 1}
        return apply_sample(
            self.base,
            {
                f"{section}.{key}": value
                for section, fields in updates.items()
                for key, value in fields.items()
            },
        )

    def to_json(self) -> str:
        """The canonical JSON form (stored on the parent MLflow run)."""
        return self.model_dump_json(indent=2)


# ------------------------------------------------------------------- field paths


NOT_IN_SWEEPS = {
    # Tune reads every Ray Train report as a result of the trial's epoch; a report
    # within an epoch would be a second result for the same epoch, without its metric.
    "runtime.checkpoint_every_steps": "sweeps checkpoint at epoch ends only (ASHA and the "
    "collapse stopper judge trials by epoch): leave runtime.checkpoint_every_steps at 0",
    "runtime.min_workers": "a trial runs on a fixed number of workers (Tune reserves "
    "them when it starts the trial): leave runtime.min_workers unset",
}
"""Runtime fields a sweep's base must leave at their defaults and may not sweep."""


def dataset_has_labels(data: DataConfig) -> bool:
    """Whether the dataset carries labels for a k-NN objective.

    Every built-in kind does (digits and synthetic know their classes, imagefolder and
    cifar10 read them from their folders): the held-out split is always labelled. A
    future unlabelled kind returns False here and its sweeps default to ``mutual_info``.
    """
    return data.kind in ("digits", "synthetic", "imagefolder", "cifar10")


def known_metrics(config: TrainConfig) -> dict[str, Mode]:
    """Every metric an epoch of ``config`` reports, with the direction it improves in."""
    metrics = dict(DIAGNOSTIC_METRICS)
    if dataset_has_labels(config.data):
        metrics[KNN_METRIC] = "max"
        metrics.update({f"{KNN_METRIC}_k{k}": "max" for k in config.eval.knn_k})
        if config.eval.linear_probe:
            metrics[LINEAR_METRIC] = "max"
    return metrics


def _section_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _section_fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", annotation


def field_paths() -> dict[str, Any]:
    """Every sweepable `TrainConfig` field path and its annotation (not ``name``)."""
    return {path: kind for path, kind in _section_fields(TrainConfig) if "." in path}


def is_integer_field(path: str) -> bool:
    """Whether the field at ``path`` holds an integer (ranges then sample integers)."""
    annotation = field_paths().get(path)
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return annotation is int or (bool(args) and all(arg is int for arg in args))


def apply_sample(base: TrainConfig, sample: Mapping[str, Any]) -> TrainConfig:
    """``base`` with every ``section.field -> value`` of ``sample`` set, re-validated.

    Raises:
        ConfigError: a value the config rejects (with its field path and the reason),
            or a path that names no field.
    """
    raw = base.model_dump(mode="json")
    known = field_paths()
    for path, value in sample.items():
        if path not in known:
            raise ConfigError([unknown_path_message(path, known)], "sweep sample")
        section, leaf = path.split(".", 1)
        raw[section][leaf] = value
    return validate_config(raw, "trial config")


def unknown_path_message(path: str, known: Iterable[str]) -> str:
    """``path: unknown ...`` with the close field paths."""
    close = difflib.get_close_matches(path, list(known), n=4, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return f"{path}: not a TrainConfig field (section.field){hint}"


def space_problems(
    base: TrainConfig, space: Mapping[str, Uniform | Choice], search: SearchKind
) -> list[tuple[str, str, Any]]:
    """(path, reason, value) for every key of ``space`` that cannot be swept.

    Unknown paths list the close ones; a range is checked at both endpoints and a choice
    or grid at every value, by substituting it into ``base`` and validating the config,
    so a range that would give a trial an invalid config (a negative temperature) is
    reported before anything runs.
    """
    known = field_paths()
    problems: list[tuple[str, str, Any]] = []
    for path, distribution in space.items():
        if len(path) > MAX_SPACE_KEY_LENGTH:  # validate_sweep refuses these earlier
            problems.append((path, f"longer than {MAX_SPACE_KEY_LENGTH} characters", path))
            continue
        if path not in known:
            reason = unknown_path_message(path, known).removeprefix(f"{path}: ")
            problems.append((path, reason, path))
            continue
        if search == "grid" and not isinstance(distribution, Choice):
            problems.append(
                (path, f"search 'grid' needs grid or choice values, not {distribution.type}", path)
            )
        if search == "optuna" and isinstance(distribution, Grid):
            problems.append((path, "search 'optuna' cannot run a grid; use choice", path))
        if isinstance(distribution, Uniform) and is_integer_field(path):
            fractional = [end for end in distribution.endpoints() if not float(end).is_integer()]
            if fractional:
                ends = ", ".join(f"{end:g}" for end in fractional)
                problems.append((path, f"an integer field needs whole endpoints, got {ends}", path))
                continue
        invalid = 0
        for value in (_as_field_value(path, end) for end in distribution.endpoints()):
            try:
                apply_sample(base, {path: value})
            except ConfigError as error:
                invalid += 1
                if invalid > MAX_VALUE_PROBLEMS:
                    continue
                reasons = "; ".join(p.removeprefix(f"{path}: ") for p in error.problems)
                label = "value" if isinstance(distribution, Choice) else "endpoint"
                reason = f"{label} {shown_value(value)} is invalid: {reasons}"
                problems.append((path, reason, value))
        if invalid > MAX_VALUE_PROBLEMS:
            more = invalid - MAX_VALUE_PROBLEMS
            problems.append((path, f"and {more} more invalid values", path))
    return problems


def shown_value(value: Any) -> str:
    """``value`` as JSON for an error message, cut to `MAX_SHOWN_VALUE` characters."""
    text = json.dumps(value)
    return text if len(text) <= MAX_SHOWN_VALUE else text[:MAX_SHOWN_VALUE] + "..."


def _as_field_value(path: str, value: Any) -> Any:
    if is_integer_field(path) and isinstance(value, float) and math.isfinite(value):
        return int(value) if value.is_integer() else value
    return value


# --------------------------------------------------------------------- reading


def optuna_available() -> bool:
    """Whether Optuna (the ``tune`` extra) can be imported."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


def describe_sweep_errors(error: ValidationError) -> list[str]:
    """``field.path: reason`` lines; a distribution's ``type`` tag is left out of paths."""
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        if len(loc) >= 3 and loc[0] == "space" and loc[2] in DISTRIBUTION_TAGS:
            del loc[2]
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{'.'.join(loc) or '<root>'}: {message}")
    return problems


def validate_sweep(raw: dict[str, Any], source: str = "sweep") -> SweepConfig:
    """Validate a raw mapping into a `SweepConfig`, raising `ConfigError` on any problem.

    Args:
        raw: the sweep as parsed from YAML or JSON (or a REST body).
        source: what the mapping came from, for the error's first line.

    Raises:
        ConfigError: one ``field.path: reason`` line per problem, e.g.
            ``space.objective.teacher_temp: endpoint -1 is invalid: Input should be
            greater than 0`` or ``base.objective.mode: Input should be ...``.
    """
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe_sweep_errors(error), source) from None


def load_sweep(path: Path, overrides: Iterable[str] = ()) -> SweepConfig:
    """Load a sweep file (YAML or JSON), with ``section.field=value`` base overrides.

    Args:
        path: the sweep file.
        overrides: applied to the ``base`` training config (``schedule.epochs=3``),
            before validation, as ``klssl train --set`` does.
    """
    raw = read_config_file(Path(path))
    overrides = list(overrides)
    if overrides:
        base = raw.get("base", {})
        if not isinstance(base, dict):
            raise ConfigError(["base: must be a mapping of sections"], str(path))
        raw = {**raw, "base": apply_overrides(base, overrides)}
    return validate_sweep(raw, str(path))
