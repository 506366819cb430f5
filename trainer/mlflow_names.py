"""Every MLflow tag and artifact name klssl writes or reads, in one place.

A run is the record users compare in MLflow's UI and what the REST service reads back,
so these names are a contract: the trainer writes them, the tuning driver and the
service read them. Tags under ``klssl.`` (and MLflow's own ``mlflow.``) are reserved:
nothing a user sends may set them.
"""

from __future__ import annotations

RESERVED_TAG_PREFIXES = ("klssl.", "mlflow.")
"""Tag prefixes only klssl and MLflow may write."""

# --- a job's run (written when the service accepts the job, or by the driver) ----------
JOB_ID_TAG = "klssl.job_id"
"""The service's job id (also the Ray Train run name; the Ray submission id is
``klssl-<job id>``)."""
OWNER_TAG = "klssl.owner"
"""Who submitted the job (the owner of the API token)."""
RUN_NAME_TAG = "klssl.run_name"
"""The Ray Train run name: reusing it resumes the run from its newest checkpoint."""
STORAGE_TAG = "klssl.storage"
"""URI of the run's (or sweep's) folder on the checkpoint storage."""
WORKERS_TAG = "klssl.workers"
"""Data-parallel workers of the run."""

# --- progress (written by rank 0 while training) ------------------------------------------
LATEST_CHECKPOINT_TAG = "klssl.latest_checkpoint"
"""URI of the newest checkpoint directory."""
RESUMED_FROM_EPOCH_TAG = "klssl.resumed_from_epoch"
RESUMED_FROM_STEP_TAG = "klssl.resumed_from_step"
HEALTH_TAG = "klssl.health"
"""The collapse verdict: ``ok`` or ``collapsed`` (`trainer.health`)."""
COLLAPSE_STEP_TAG = "klssl.collapse_step"
"""The step at which the current collapse started (empty when ok)."""
BACKBONE_MODEL_URI_TAG = "klssl.backbone_model_uri"
"""``runs:/<id>/backbone``: the exported backbone as an MLflow model."""
ERROR_TAG = "klssl.error"
"""Why a sweep trial's training failed."""

# --- sweeps (`tuning`) ------------------------------------------------------------------
PARENT_TAG = "mlflow.parentRunId"
"""MLflow's own nesting tag: a trial's run under its sweep's parent run."""
SWEEP_ID_TAG = "klssl.sweep_id"
TRIAL_ID_TAG = "klssl.trial_id"
ROLE_TAG = "klssl.role"
"""``sweep`` on a sweep's parent run, ``trial`` on its children."""
SAMPLE_TAG = "klssl.sampled"
"""JSON of a trial's sampled values by dotted config path."""
CONFIG_TAG = "klssl.config"
"""JSON of a trial's full config."""
STOPPED_TAG = "klssl.stopped"
"""Why Tune stopped a trial early: ``collapse`` or ``asha``."""
STOPPED_AT_TAG = "klssl.stopped_at_epoch"
DONE_TAG = "klssl.done"
"""A trial that ran to its end (a resumed sweep replays it instead of training again)."""
BEST_TAG = "klssl.best"
"""``true`` on the best trial's run."""
BEST_TRIAL_ID_TAG = "klssl.best_trial_id"
BEST_RUN_ID_TAG = "klssl.best_run_id"
BEST_METRIC_TAG = "klssl.best_metric"
BEST_VALUE_TAG = "klssl.best_value"
INTERRUPTED_TAG = "klssl.interrupted"
"""``true`` on a sweep's parent run that stopped before all its trials ended."""

# --- artifacts ----------------------------------------------------------------------------
CONFIG_ARTIFACT = "config.json"
"""The run's validated TrainConfig."""
SWEEP_ARTIFACT = "sweep.json"
"""A sweep parent's validated SweepConfig."""
CHECKPOINTS_ARTIFACT = "checkpoints/checkpoints.json"
"""Every checkpoint of the run: URI, epoch and step."""
BACKBONE_ARTIFACT_DIR = "backbone"
"""The exported backbone (weights and timm recipe), also an MLflow model."""
BACKBONE_WEIGHTS = "backbone.pt"
"""The backbone's state_dict in ``backbone/`` (what ``model.init`` reads from a run)."""
BACKBONE_RECIPE = "timm_recipe.json"
"""The timm arguments that rebuild the backbone, in ``backbone/``."""
BACKBONE_MODEL_NAME = "backbone"
"""The logged MLflow pytorch model's name (``runs:/<run id>/backbone``)."""
REPORT_ARTIFACT_DIR = "report"
"""A sweep's report (table and plots) on its parent run."""
