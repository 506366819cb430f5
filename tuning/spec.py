"""`SweepJobSpec`: everything a sweep job needs, in one typed file.

The sweep counterpart of `trainer.spec.TrainJobSpec`: what the service hands a Ray job
for ``POST /v1/sweeps`` (``python -m tuning.run --spec FILE``).
"""

from __future__ import annotations

from typing import Literal

from trainer.spec import JobSpecBase
from tuning.config import SweepConfig


class SweepJobSpec(JobSpecBase):
    """A sweep job: its sweep config and where it runs and tracks.

    ``job_id`` is the sweep id (the Tune experiment's name): running it again resumes it.
    """

    kind: Literal["sweep"] = "sweep"
    config: SweepConfig

    def to_json(self) -> str:
        """The spec as the Ray job's file."""
        return self.model_dump_json(indent=2)
