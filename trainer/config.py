"""The typed training configuration: one object from the REST body to every worker.

A `TrainConfig` is what a user writes (YAML or JSON), what the service validates, what
travels to Ray inside the job's spec, what every worker re-validates, and what is stored
beside every checkpoint. Every invalid value is rejected with its field path and the
reason, so no code further down needs defaults of its own (no ``dict.get(key, default)``).

Validation is pure: shapes and ranges only, no disk access and no torch or timm import,
so the API process and any client can validate cheaply. Whether a config can run on a
given host (its data path allowed and present, its backbone known to timm) is
`trainer.preflight`'s check.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import InitErrorDetails, PydanticCustomError, core_schema

from trainer.backbone_kwargs import BACKBONE_KWARGS, MAX_BACKBONE_KWARGS, check_backbone_kwargs
from trainer.bounds import (
    MAX_BATCH_SIZE,
    MAX_CLIP_GRAD,
    MAX_CLUSTERS,
    MAX_CPUS_PER_WORKER,
    MAX_EPOCHS,
    MAX_FAILURES,
    MAX_HEAD_DIM,
    MAX_HEAD_LAYERS,
    MAX_IMAGE_SIZE,
    MAX_KEEP_CHECKPOINTS,
    MAX_KNN_K,
    MAX_KNN_KS,
    MAX_LEARNING_RATE,
    MAX_LOADER_WORKERS,
    MAX_LOCAL_CROPS,
    MAX_NAME_LENGTH,
    MAX_PATH_COMPONENT_BYTES,
    MAX_PATH_LENGTH,
    MAX_PATTERN_LENGTH,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_SINKHORN_ITERS,
    MAX_STEPS,
    MAX_SYNTHETIC_IMAGE_SIZE,
    MAX_SYNTHETIC_SAMPLES,
    MAX_TEMPERATURE,
    MAX_WEIGHT_DECAY,
    MAX_WORKERS,
)
from trainer.init_weights import init_problem
from trainer.object_store import S3_URI, uri_problem

NormalisationMode = Literal["prior", "center", "sinkhorn", "none"]
StatisticsOrder = Literal["auto", "current", "previous"]
DatasetKind = Literal["digits", "synthetic", "imagefolder", "cifar10", "files"]
ObjectUri = Annotated[str, StringConstraints(pattern=S3_URI.pattern)]
"""An ``s3://bucket/prefix`` data location (kept as a string: a `Path` would fold ``//``)."""
PATH_KINDS = ("imagefolder", "cifar10", "files")
"""Dataset kinds read from ``data.path``."""
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
LoaderKind = Literal["torch", "ray"]
AugmentDevice = Literal["auto", "cpu", "cuda", "device"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]

SMALL_IMAGE_BLUR_LIMIT = 64
"""Global crops of at most this many pixels are not blurred by ``data.blur: auto``."""

Temperature = Annotated[float, Field(gt=0, le=MAX_TEMPERATURE)]
LearningRate = Annotated[float, Field(gt=0, le=MAX_LEARNING_RATE)]
Momentum = Annotated[float, Field(ge=0, lt=1)]
Fraction = Annotated[float, Field(gt=0, le=1)]
EpochCount = Annotated[int, Field(ge=0, le=MAX_EPOCHS)]


@dataclass(frozen=True)
class BoundedPath:
    """Metadata of a path field: at most ``max_length`` characters, short components.

    Checked on the raw string before it becomes a `Path`, so an over-long path is a
    validation error with its field path, never an ``OSError`` (file name too long)
    further down. ``max_length`` is what the configuration reference shows.
    """

    max_length: int

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_before_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler.resolve_ref_schema(handler(schema))
        json_schema["maxLength"] = self.max_length
        return json_schema

    def _check(self, value: Any) -> Any:
        if value is None:
            return value
        text = str(value) if isinstance(value, str | Path) else None
        if text is None:
            return value  # not a path at all: the path validator says so
        if len(text) > self.max_length:
            raise ValueError(
                f"path of {len(text)} characters is longer than {self.max_length} "
                "(Linux's PATH_MAX)"
            )
        long = [part for part in text.split("/") if len(part.encode()) > MAX_PATH_COMPONENT_BYTES]
        if long:
            raise ValueError(
                f"a path component of {len(long[0].encode())} bytes is longer than "
                f"{MAX_PATH_COMPONENT_BYTES} (Linux's NAME_MAX)"
            )
        return value


class _Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are re-validated.

    Every float is finite: ``1e999``, ``Infinity`` and ``NaN`` are errors naming the field.
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )


class DataSource(_Section):
    """Which images: a dataset kind, where it is, how much of it, which part is held out."""

    kind: DatasetKind = Field("digits", description="Built-in dataset kind.")
    path: Annotated[ObjectUri | Path | None, BoundedPath(MAX_PATH_LENGTH)] = Field(
        None,
        description="Root of the data: a folder per class (imagefolder), the folder "
        "holding the CIFAR-10 binary batches (cifar10), or for files a folder searched "
        "recursively, a manifest (.txt: a path per line; .csv or .parquet: a path column, "
        "label optional) whose paths are relative to it and stay inside its folder, or a "
        "packed dataset (`klssl data pack`: a folder of part-NNNNN.parquet shards, or one "
        "shard); for files also s3://<bucket>/<prefix> (a prefix, a manifest object or a "
        "pack). Unused by digits and synthetic. Every component at most "
        f"{MAX_PATH_COMPONENT_BYTES} bytes.",
    )
    pattern: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PATTERN_LENGTH,
        description="files from a folder: a glob relative to data.path (e.g. '**/*.png'); "
        "default: every image file (.jpg .jpeg .png .gif .webp) at any depth.",
    )
    max_unreadable_fraction: Fraction = Field(
        0.01,
        description="Images that cannot be decoded are logged with their path, counted and "
        "replaced by the next readable one, up to this fraction of the set; one more fails "
        "the run.",
    )
    max_samples: int | None = Field(
        None,
        ge=1,
        le=MAX_SAMPLES,
        description="Use at most this many training images (quick runs).",
    )
    holdout_fraction: Fraction = Field(
        0.1,
        description="Fraction of every class held out, labelled, for k-NN evaluation; "
        "never used for training (the last files of each class in sorted order).",
    )
    synthetic_samples: int = Field(
        2000, ge=2, le=MAX_SYNTHETIC_SAMPLES, description="Images in the synthetic set."
    )
    synthetic_classes: int = Field(
        10, ge=2, le=MAX_CLUSTERS, description="Known clusters of the synthetic set."
    )
    synthetic_image_size: int = Field(
        32, ge=8, le=MAX_SYNTHETIC_IMAGE_SIZE, description="Side of synthetic images."
    )

    @field_validator("path", mode="before")
    @classmethod
    def _uri_form(cls, path: Any) -> Any:
        problem = uri_problem(str(path)) if isinstance(path, str | Path) else None
        if problem is not None:
            raise ValueError(problem)
        return path

    @model_validator(mode="after")
    def _path_matches_kind(self) -> Self:
        if self.kind in PATH_KINDS and self.path is None:
            raise ValueError(f"data.path is required for dataset kind {self.kind!r}")
        if isinstance(self.path, str) and self.kind != "files":
            raise ValueError(f"object storage is read by kind 'files', not {self.kind!r}")
        if self.pattern is not None and self.kind != "files":
            raise ValueError(f"data.pattern is only read by kind 'files', not {self.kind!r}")
        return self

    @field_validator("pattern")
    @classmethod
    def _relative_pattern(cls, pattern: str | None) -> str | None:
        if pattern is not None and (pattern.startswith("/") or ".." in pattern.split("/")):
            raise ValueError(f"pattern {pattern!r} must stay inside data.path (no /, no ..)")
        return pattern


class DataConfig(DataSource):
    """Which images, how they are cropped into views, and how they are batched."""

    global_crop_size: int = Field(
        32, ge=4, le=MAX_IMAGE_SIZE, description="Side of the global (teacher) views."
    )
    local_crop_size: int = Field(
        16, ge=4, le=MAX_IMAGE_SIZE, description="Side of the local (student) views."
    )
    num_global_crops: int = Field(2, ge=1, le=2, description="Teacher views per image.")
    num_local_crops: int = Field(
        6, ge=0, le=MAX_LOCAL_CROPS, description="Extra, smaller student views."
    )
    global_crop_scale: tuple[Fraction, Fraction] = Field(
        (0.4, 1.0), description="Area range of global crops (RandomResizedCrop scale)."
    )
    local_crop_scale: tuple[Fraction, Fraction] = Field(
        (0.05, 0.4), description="Area range of local crops."
    )
    blur: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Gaussian blur with DINO's probabilities (1.0 / 0.1 on the global views, "
        "0.5 on the local ones): on, off, or auto = on for global crops above "
        f"{SMALL_IMAGE_BLUR_LIMIT} px and off at or below, as solo-learn's CIFAR recipe "
        "(a 3-tap kernel on a 32 px crop mostly erases what little detail there is).",
    )
    batch_size: int = Field(64, ge=1, le=MAX_BATCH_SIZE, description="Images per worker per step.")
    loader_workers: int = Field(
        0, ge=0, le=MAX_LOADER_WORKERS, description="DataLoader worker processes."
    )
    loader: LoaderKind = Field(
        "torch",
        description="How training batches are made: torch (a DataLoader in every training "
        "worker: small or local data) or ray (Ray Data decodes and augments on any node of "
        "the cluster and streams each worker its shard, every image once per epoch; needs "
        "a Ray run and a free CPU beyond the workers'). Evaluation always uses a DataLoader.",
    )
    augment_device: AugmentDevice = Field(
        "auto",
        description="Where the training views are made. cpu: in the DataLoader workers, "
        "image by image; cuda: on the CUDA training device, batched (the workers only "
        "decode images and draw the views' random parameters); device: on the training "
        "device whatever it is (on a CPU run: in the training process); auto: cuda when "
        "the training device is CUDA (and data.loader is torch), else cpu. All draw the same "
        "parameters from the same seed and render the same views up to float rounding.",
    )

    @field_validator("global_crop_scale", "local_crop_scale")
    @classmethod
    def _ordered_scale(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if scale[0] > scale[1]:
            raise ValueError(f"scale range {scale} must be (low, high) with low <= high")
        return scale

    @field_validator("local_crop_size")
    @classmethod
    def _local_not_larger(cls, size: int, info: ValidationInfo) -> int:
        if "global_crop_size" not in info.data:  # it failed its own validation
            return size
        global_size = info.data["global_crop_size"]
        if size > global_size:
            raise ValueError(
                f"local crops ({size} px) must not be larger than global crops "
                f"({global_size} px): local views are the small ones"
            )
        return size

    @model_validator(mode="after")
    def _ray_data_makes_its_views(self) -> Self:
        if self.loader == "ray" and self.augment_device in ("cuda", "device"):
            raise ValueError(
                f"data.augment_device {self.augment_device!r} cannot go with data.loader "
                "'ray': Ray Data's tasks make the views on CPUs; set augment_device to auto "
                "or cpu, or use data.loader 'torch'"
            )
        return self

    @property
    def blur_enabled(self) -> bool:
        """Whether views are blurred: ``blur`` with ``auto`` resolved by the crop size."""
        if self.blur == "auto":
            return self.global_crop_size > SMALL_IMAGE_BLUR_LIMIT
        return self.blur == "on"

    @property
    def num_views(self) -> int:
        """Student views per image: the global crops first, then the local ones."""
        return self.num_global_crops + self.num_local_crops


class ModelConfig(_Section):
    """Backbone (any timm model, never pretrained) and the DINO-style projection head."""

    backbone: str = Field(
        "resnet18",
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="timm model name, built with pretrained=False (letters, digits, _ . -: "
        "no hub or local-directory prefixes).",
    )
    small_images: bool = Field(
        True,
        description="Adapt the stem to small (e.g. 32x32) inputs: 3x3 stride-1 stem without "
        "max-pool for ResNets; patch_size for ViTs.",
    )
    patch_size: int | None = Field(
        None, ge=1, le=MAX_IMAGE_SIZE, description="ViT patch size (None: timm default)."
    )
    backbone_kwargs: dict[str, int | float | str | bool] = Field(
        default_factory=dict,
        max_length=MAX_BACKBONE_KWARGS,
        json_schema_extra={"propertyNames": {"enum": list(BACKBONE_KWARGS)}},
        description="Extra keyword arguments for timm.create_model (e.g. depth for a ViT), "
        "architecture arguments only: "
        + ", ".join(f"{name} ({spec.describe()})" for name, spec in BACKBONE_KWARGS.items())
        + ". Arguments that name a file or load weights (pretrained, checkpoint_path, "
        "pretrained_cfg, ...) are refused.",
    )
    init: Annotated[str | None, BoundedPath(MAX_PATH_LENGTH)] = Field(
        None,
        description="Start from these backbone weights instead of random ones: a local .pt, "
        ".pth (a state_dict, loaded weights-only) or .safetensors file, or an MLflow URI: "
        "runs:/<run id> (a klssl run's exported backbone), models:/<name>@<alias>, "
        "models:/<name>/<version> or models:/<model id>. Nothing is downloaded from a hub.",
    )
    head_hidden_dim: int = Field(
        2048, ge=1, le=MAX_HEAD_DIM, description="Hidden width of the head MLP."
    )
    head_bottleneck_dim: int = Field(
        256, ge=1, le=MAX_HEAD_DIM, description="L2-normalised bottleneck width."
    )
    head_layers: int = Field(
        3, ge=1, le=MAX_HEAD_LAYERS, description="Linear layers before the bottleneck."
    )
    norm_last_layer: bool = Field(
        True, description="Fix the prototypes' weight-norm gain to 1 (more stable)."
    )

    @field_validator("backbone_kwargs")
    @classmethod
    def _allowed_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        return check_backbone_kwargs(kwargs)

    @field_validator("init")
    @classmethod
    def _init_form(cls, init: str | None) -> str | None:
        problem = None if init is None else init_problem(init)
        if problem is not None:
            raise ValueError(problem)
        return init


class ObjectiveConfig(_Section):
    """The KL clustering objective (docs/design.md section 1)."""

    mode: NormalisationMode = Field(
        "prior",
        description="Teacher normalisation: prior (inverse cluster prior, the paper), center "
        "(its Jensen approximation, DINO), sinkhorn (SwAV/DINOv2), none (collapses).",
    )
    num_clusters: int = Field(
        1024, ge=2, le=MAX_CLUSTERS, description="K, the number of prototypes."
    )
    student_temp: Temperature = Field(0.1, description="Student softmax temperature.")
    teacher_temp: Temperature = Field(0.04, description="Teacher temperature after warm-up.")
    warmup_teacher_temp: Temperature = Field(0.04, description="Teacher temperature at step 0.")
    warmup_teacher_temp_epochs: EpochCount = Field(
        0, description="Epochs of linear teacher-temperature warm-up."
    )
    prior_momentum: Momentum = Field(
        0.9, description="EMA momentum m of the prior pi and the center c (0: batch marginal)."
    )
    prior_power: float = Field(
        1.0, ge=0, le=1, description="Exponent a in softmax(t/tau_t - a log pi)."
    )
    statistics_order: StatisticsOrder = Field(
        "auto",
        description="current: update pi/c with this batch before the targets; previous: "
        "targets from the last step's statistics (DINO's order); auto: previous for center "
        "(DINOLoss exactly), current otherwise (the design's choice for prior).",
    )
    sinkhorn_iters: int = Field(
        3, ge=1, le=MAX_SINKHORN_ITERS, description="Sinkhorn-Knopp iterations."
    )

    @property
    def effective_statistics_order(self) -> Literal["current", "previous"]:
        """The order a step uses: ``auto`` resolved by the mode."""
        if self.statistics_order != "auto":
            return self.statistics_order
        return "previous" if self.mode == "center" else "current"


class OptimConfig(_Section):
    """Optimiser of the student."""

    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimiser.")
    lr: LearningRate = Field(
        5e-4, description="Peak learning rate for a total batch of 256 (scaled linearly)."
    )
    min_lr: float = Field(
        1e-6, ge=0, le=MAX_LEARNING_RATE, description="Learning rate at the end of the cosine."
    )
    weight_decay: float = Field(
        0.04, ge=0, le=MAX_WEIGHT_DECAY, description="Weight decay at step 0."
    )
    weight_decay_end: float = Field(
        0.4, ge=0, le=MAX_WEIGHT_DECAY, description="Weight decay at the last step."
    )
    clip_grad: float = Field(
        3.0, ge=0, le=MAX_CLIP_GRAD, description="Max gradient norm per tensor (0: off)."
    )
    freeze_last_layer_epochs: EpochCount = Field(
        1, description="Epochs during which the prototypes get no update."
    )


class ScheduleConfig(_Section):
    """Length of training and the warm-up / momentum schedules."""

    epochs: int = Field(100, ge=1, le=MAX_EPOCHS, description="Training epochs.")
    warmup_epochs: EpochCount = Field(10, description="Linear learning-rate warm-up epochs.")
    teacher_momentum: Momentum = Field(0.996, description="Teacher EMA momentum at step 0.")
    teacher_momentum_end: float = Field(
        1.0, ge=0, le=1, description="Teacher EMA momentum at the last step (cosine)."
    )


class EvalConfig(_Section):
    """Label-based evaluation on the held-out split (when the data has labels)."""

    data: DataSource | None = Field(
        None,
        description="A labelled set to evaluate on instead of the training data's held-out "
        "split (for unlabelled training data): the same fields as data's source (kind, "
        "path, pattern, ...); its holdout_fraction gives the queries, the rest is the k-NN "
        "bank and the probe's training set; views use data.global_crop_size.",
    )
    knn_k: list[Annotated[int, Field(ge=1, le=MAX_KNN_K)]] = Field(
        default_factory=lambda: [20, 200],
        min_length=1,
        max_length=MAX_KNN_KS,
        description=f"k of the k-NN votes (each 1 to {MAX_KNN_K}).",
    )
    knn_temperature: Temperature = Field(0.07, description="Weighting temperature.")
    every_epochs: EpochCount = Field(0, description="Run k-NN every N epochs (0: at the end).")
    linear_probe: bool = Field(
        True,
        description="Also fit a logistic-regression probe on frozen training-split features "
        "(linear_top1) whenever k-NN runs.",
    )
    baselines: bool = Field(
        True,
        description="Before training, evaluate the same network at random init "
        "(random_init_*) and raw pixels (pixels_knn_top1), so every result has its baselines.",
    )


class RuntimeConfig(_Section):
    """Where and how the run executes."""

    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of every random generator.")
    device: Device = Field("auto", description="auto picks CUDA when present.")
    precision: Precision = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU.")
    compile: bool = Field(
        False,
        description="torch.compile the backbone passes of training (student and teacher; "
        "one graph per crop size): faster steps after a compilation of a minute or more "
        "at the start. Checkpoints and the exported backbone are the same as without.",
    )
    checkpoint_every_epochs: int = Field(
        1, ge=1, le=MAX_EPOCHS, description="Checkpoint every N epochs."
    )
    checkpoint_every_steps: int = Field(
        0,
        ge=0,
        le=MAX_STEPS,
        description="Also checkpoint every N optimiser steps within an epoch, with the "
        "data loader's position, so a preempted long epoch resumes at its step instead of "
        "its start (0: at epoch ends only). Needs data.loader 'torch'.",
    )
    log_every_steps: int = Field(10, ge=1, le=MAX_STEPS, description="Diagnostics every N steps.")
    num_workers: int = Field(
        1, ge=1, le=MAX_WORKERS, description="Data-parallel training workers (Ray)."
    )
    min_workers: int | None = Field(
        None,
        ge=1,
        le=MAX_WORKERS,
        description="Elastic training: start with as few as this many workers and grow "
        "to num_workers as the cluster gains room (Ray Train restarts the workers at the "
        "new size from the latest checkpoint; the schedules follow the images seen, so "
        "they continue where they were). None: exactly num_workers.",
    )
    resize_check_s: float = Field(
        60.0,
        ge=1,
        le=3600,
        description="How often an elastic run (min_workers set) looks for room to grow.",
    )
    max_failures: int = Field(
        2,
        ge=0,
        le=MAX_FAILURES,
        description="Worker-failure retries (never unlimited: a config that always fails "
        "must end).",
    )
    keep_checkpoints: int = Field(
        2, ge=1, le=MAX_KEEP_CHECKPOINTS, description="Checkpoints kept (newest)."
    )
    cpus_per_worker: float = Field(
        1.0,
        gt=0,
        le=MAX_CPUS_PER_WORKER,
        description="CPUs reserved per training worker (Ray resources).",
    )
    placement_strategy: PlacementStrategy = Field(
        "PACK",
        description="Ray placement of the workers: PACK (fill nodes first), SPREAD, "
        "STRICT_PACK (one node) or STRICT_SPREAD (one worker per node).",
    )

    @model_validator(mode="after")
    def _min_workers_at_most_num_workers(self) -> Self:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise field_error(
                ("min_workers",),
                f"{self.min_workers} is more than num_workers ({self.num_workers}), the "
                "size an elastic run grows to",
                self.min_workers,
            )
        return self


def field_error(location: tuple[str, ...], reason: str, value: Any) -> ValidationError:
    """A validation error of one field, for a check that spans sections: the API's 422
    and the CLI's message then name that field rather than the config as a whole."""
    error = PydanticCustomError("config", "{reason}", {"reason": reason})
    details = [InitErrorDetails(type=error, loc=location, input=value)]
    return ValidationError.from_exception_data("TrainConfig", details)


class TrainConfig(_Section):
    """Everything one training run needs, in seven sections."""

    name: str = Field(
        "klssl",
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="Run / MLflow experiment name.",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _mid_epoch_checkpoints_need_a_position(self) -> Self:
        # A torch loader's epoch is a seeded permutation, so "the first n images of epoch
        # e" names exactly what was trained on; Ray Data's streaming split hands blocks to
        # workers in whatever order they ask, so it has no such position to resume at.
        if self.runtime.checkpoint_every_steps > 0 and self.data.loader == "ray":
            raise field_error(
                ("runtime", "checkpoint_every_steps"),
                "needs data.loader 'torch': a Ray Data stream has no position to resume an "
                "epoch at; set it to 0 (checkpoints at epoch ends) or use data.loader 'torch'",
                self.runtime.checkpoint_every_steps,
            )
        return self

    @model_validator(mode="after")
    def _augmentation_on_a_cuda_device(self) -> Self:
        if self.data.augment_device == "cuda" and self.runtime.device == "cpu":
            raise field_error(
                ("data", "augment_device"),
                "'cuda' needs a CUDA training device but runtime.device is 'cpu': set "
                "data.augment_device to auto, cpu or device, or runtime.device to auto or cuda",
                self.data.augment_device,
            )
        return self

    def to_json(self) -> str:
        """The canonical JSON form (what travels to workers and sits beside checkpoints)."""
        return self.model_dump_json(indent=2)

    def flat(self) -> dict[str, str]:
        """Flattened ``section.field -> value`` strings, e.g. for MLflow params.

        Besides the fields it holds the resolved ``objective.effective_statistics_order``,
        so a run records which order it really used when the config says ``auto``.
        """
        flat = dict(_flatten(self.model_dump(mode="json")))
        flat["objective.effective_statistics_order"] = self.objective.effective_statistics_order
        return flat


class ConfigError(ValueError):
    """A config that failed validation, with one ``field.path: reason`` line per problem."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        super().__init__(f"invalid {source}:\n" + "\n".join(f"  {p}" for p in problems))


def describe_errors(error: ValidationError) -> list[str]:
    """``field.path: reason`` for every error of a pydantic validation."""
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{location}: {message}")
    return problems


def validate_config(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate a raw mapping into a `TrainConfig`, raising `ConfigError` on any problem."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe_errors(error), source) from None


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a mapping (not yet validated)."""
    if not path.exists():
        raise ConfigError([f"{path}: no such file"], "config file")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        kind = path.suffix.lstrip(".") or "YAML"
        raise ConfigError([f"{path}: not valid {kind}: {error}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections"])
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides (values parsed as YAML) to a raw mapping.

    The result still goes through `validate_config`, so an override is checked exactly
    like the file it overrides.
    """
    merged = json.loads(json.dumps(raw, default=str))
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"{override!r}: an override must look like section.field=value"])
        *parents, leaf = key.strip().split(".")
        node = merged
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"{key}: {part!r} is a value, not a section"])
            node = child
        node[leaf] = yaml.safe_load(value) if value.strip() else None
    return merged


def load_config(path: Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Load a config file (YAML or JSON; none means all defaults) plus overrides."""
    raw = read_config_file(path) if path is not None else {}
    return validate_config(apply_overrides(raw, overrides), str(path or "config"))


def _flatten(tree: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, str]]:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{name}.")
        else:
            yield name, json.dumps(value) if isinstance(value, list | dict) else str(value)
