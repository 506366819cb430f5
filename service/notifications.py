"""Webhook notifications of jobs: their payload, and the loop that delivers them.

A job or sweep submitted with ``notify`` URLs gets one JSON POST per URL when it reaches
a final state (SUCCEEDED, FAILED, CANCELLED) and when its health verdict becomes
``collapsed`` (event COLLAPSED). The store queues them in the transaction that records
the event (`service.store.JobStore.transition` / ``update``: the ``notifications``
outbox, unique per job, event and URL), so a restart neither loses nor repeats one.

`Notifier` sends what is due, in its own loop beside the dispatcher (a receiver that is
down or slow never holds a dispatcher round): a 2xx is delivered; a failure is tried
again after ``notify_backoff_s``, doubling up to an hour, at most
``notify_max_attempts`` times, then given up with its last error kept. Like the
dispatcher, one API process of a deployment delivers (the ``notifier`` lease), and each
row is claimed before it is sent (a compare-and-set), so no two processes send it.
Where webhooks may go is `service.webhooks`' business.

The body is Slack-compatible (an incoming webhook shows ``text``) and carries the
record's fields for any other receiver.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx

from service.leases import Leadership
from service.schemas import JobOut, utc
from service.settings import Settings
from service.store import COLLAPSED, Job, JobStore, Notification, utcnow
from service.webhooks import DeliveryError, post_json, redacted, webhook_client
from trainer.config import TrainConfig
from trainer.summary import result_lines

log = logging.getLogger(__name__)

LEASE = "notifier"
"""The store lease whose holder delivers the deployment's notifications."""
BATCH = 32
"""Notifications one pass claims at most."""
PARALLEL = 8
"""Notifications one pass sends at once."""
MAX_BACKOFF_S = 3600.0
TEXT_ERROR_CHARS = 300
MAX_ERROR_CHARS = 4000

KEY_METRICS = (
    "knn_top1",
    "init_knn_top1",
    "random_init_knn_top1",
    "pixels_knn_top1",
    "linear_top1",
    "init_linear_top1",
    "random_init_linear_top1",
    "epoch",
    "loss",
    "effective_clusters",
    "mutual_info",
)
"""A training job's metrics a notification carries (the quality beside its baselines,
and where training stood); a sweep's carry its trial counts and best objective."""


def slack_text(value: str, limit: int) -> str:
    """User-supplied text made one harmless line: whitespace runs become one space,
    and ``&``, ``<`` and ``>`` are escaped as Slack asks (``<!channel>`` in a job's name
    would otherwise notify a whole channel)."""
    line = re.sub(r"\s+", " ", value).strip()
    if len(line) > limit:
        line = line[: limit - 1] + "…"
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def key_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The headline metrics among a record's latest ones."""
    return {
        key: value
        for key, value in metrics.items()
        if key in KEY_METRICS or key.startswith(("trials", "best_"))
    }


def _summary(job: Job, event: str) -> str:
    what = {
        "SUCCEEDED": "succeeded",
        "FAILED": "failed",
        "CANCELLED": "was cancelled",
        COLLAPSED: f"collapsed at step {job.progress_collapse_step} (still {job.state})",
    }.get(event, event)
    head = (
        f"klssl {job.kind} '{slack_text(job.name, 100)}' ({job.id}) of "
        f"{slack_text(job.owner, 64)} {what}"
    )
    details = []
    if event == "FAILED" and job.error:
        details.append(slack_text(job.error, TEXT_ERROR_CHARS))
    metrics = dict(job.progress_metrics or {})
    if isinstance(job.config, TrainConfig):
        details += result_lines(metrics, job.config.eval.knn_k[0])
    else:
        details += [f"{key} {value:g}" for key, value in sorted(key_metrics(metrics).items())]
    return head + (": " + "; ".join(details) if details else "")


def payload(job: Job, event: str, settings: Settings | None) -> dict[str, Any]:
    """The body of the notification of ``event`` (a final state or COLLAPSED) of ``job``:
    ``text`` (one line for people, Slack's field) and the record's fields. Links are
    those of `JobOut` (none without ``settings``)."""
    links = JobOut.of(job, settings) if settings is not None else None
    text = _summary(job, event)
    if links is not None and links.mlflow_run_url:
        text += f" · MLflow: {links.mlflow_run_url}"
    return {
        "text": text,
        "event": event,
        "job_id": job.id,
        "kind": job.kind,
        "name": job.name,
        "owner": job.owner,
        "state": job.state,
        "health": job.progress_health,
        "collapse_step": job.progress_collapse_step,
        "epoch": job.progress_epoch,
        "step": job.progress_step,
        "metrics": key_metrics(dict(job.progress_metrics or {})),
        "error": job.error[:MAX_ERROR_CHARS] if job.error else None,
        "mlflow_run_id": job.mlflow_run_id,
        "mlflow_run_url": links.mlflow_run_url if links else None,
        "ray_dashboard_url": links.ray_dashboard_url if links else None,
        "finished_at": utc(job.finished_at).isoformat() if job.finished_at else None,
    }


@dataclass
class Notifier:
    """One delivery pass at a time (`deliver_due`), or forever in the background (`run`)."""

    store: JobStore
    settings: Settings

    def __post_init__(self) -> None:
        self.leadership = Leadership(
            self.store, LEASE, self.settings.dispatcher_lease_s, working="delivers"
        )

    def lead(self) -> bool:
        """Take or renew the deployment's notifier lease; whether this one works."""
        return self.leadership.lead()

    def resign(self) -> None:
        """Give the lease up (at shutdown), so another process takes over at once."""
        self.leadership.resign()

    @property
    def claim_s(self) -> float:
        """How long a claimed row is held: longer than a pass can take to reach and
        send it (each POST: connect, send, answer, each within the timeout)."""
        return math.ceil(BATCH / PARALLEL) * 4 * self.settings.notify_timeout_s + 60

    def backoff_s(self, attempts: int) -> float:
        """The wait after the ``attempts``-th failed attempt."""
        return min(MAX_BACKOFF_S, self.settings.notify_backoff_s * 2 ** (attempts - 1))

    def deliver_due(self, now: datetime | None = None) -> int:
        """Send the notifications due at ``now`` (default: now), up to `BATCH`, at most
        `PARALLEL` at once; returns how many were delivered. Only the lease holder sends."""
        if not self.lead():
            return 0
        now = now or utcnow()
        hold = now + timedelta(seconds=self.claim_s)
        due = self.store.due_notifications(now, BATCH)
        claimed = [row for row in due if self.store.claim_notification(row, hold)]
        if not claimed:
            return 0
        with webhook_client(self.settings) as client, ThreadPoolExecutor(
            min(PARALLEL, len(claimed)), thread_name_prefix="klssl-notify"
        ) as pool:  # fmt: skip
            delivered = list(pool.map(lambda row: self._attempt(client, row, now), claimed))
        return sum(delivered)

    def _attempt(self, client: httpx.Client, row: Notification, now: datetime) -> bool:
        attempts = row.attempts + 1
        try:
            post_json(client, row.url, row.payload, self.settings)
        except Exception as error:
            if not isinstance(error, DeliveryError):  # a bug of ours: logged, tried again
                log.exception("notification %s of %s failed", row.event, row.job_id)
            permanent = isinstance(error, DeliveryError) and error.permanent
            gives_up = permanent or attempts >= self.settings.notify_max_attempts
            retry_at = None if gives_up else now + timedelta(seconds=self.backoff_s(attempts))
            log.log(
                logging.WARNING if gives_up else logging.INFO,
                "notification %s of %s to %s: attempt %d failed (%s)%s",
                row.event, row.job_id, redacted(row.url), attempts, error,
                ", given up" if gives_up else "",
            )  # fmt: skip
            self.store.settle_notification(
                row.id,
                attempts=attempts,
                next_attempt_at=retry_at,
                last_error=(str(error) or type(error).__name__)[:MAX_ERROR_CHARS],
            )
            return False
        self.store.settle_notification(
            row.id, attempts=attempts, next_attempt_at=None, delivered_at=utcnow()
        )
        return True

    async def run(self) -> None:
        """Passes every ``dispatch_interval_s``, forever (in a thread: never on the loop)."""
        while True:
            try:
                await asyncio.to_thread(self.deliver_due)
            except Exception:
                log.exception("notification pass failed")
            await asyncio.sleep(self.settings.dispatch_interval_s)
