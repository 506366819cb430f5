"""Load benchmark of the control plane: concurrent submissions, status polling, cancelling.

Starts its own local stack (`service.localstack.stack.LocalStack`, what ``klssl up`` runs) on free
loopback ports: a Ray head (token authentication, 2 CPUs, lower CPU priority), an MLflow
tracking server (SQLite backend) and the API under uvicorn with
``KLSSL_MAX_CONCURRENT_JOBS=1``. Then:

1. ``--submissions`` (50) concurrent ``POST /v1/jobs``, each with its own Idempotency-Key
   and a tiny digits config (``configs/digits-demo.yaml`` plus `OVERRIDES`, a job of
   seconds). Checks: every 202 id is listed by ``GET /v1/jobs`` exactly once, nothing
   else is listed, at most ``max_concurrent`` jobs are PENDING/RUNNING and the rest wait
   QUEUED; the same 50 requests again (same keys) return the same ids and create nothing.
2. ``--pollers`` (100) concurrent clients, each with its own connection, polling
   ``GET /v1/jobs/{id}`` for ``--poll-seconds`` with ``--poll-pause`` between requests
   (at most ``--max-requests-per-client``; `LeanConnection` clients, or httpx with
   ``--poll-client httpx``): p50/p95/p99 latency seen by the clients, and
   the server's own view from its Prometheus histogram. Meanwhile a monitor samples the
   job list and Ray's job list: never more than ``max_concurrent`` active jobs.
3. ``POST /v1/jobs/{id}/cancel`` for every job (200, or 409 when it already ended), then
   wait until every record is final and Ray runs nothing, and check through Ray's
   `JobSubmissionClient` (with the token) that no Ray job is PENDING/RUNNING and every
   Ray job belongs to a record.

    .venv/bin/python benchmarks/service_load.py [--submissions 50] [--pollers 100]

Writes ``benchmarks/results/service_load.json`` (``--output`` elsewhere), prints a
summary and exits 1 when a check failed. All traffic goes to 127.0.0.1; every process
it started is stopped by its process group (then its remaining descendants by pid),
also on errors and on SIGTERM/Ctrl-C. Logs of the stack stay in a temporary directory
only when something failed (or with ``--keep``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.localstack.stack import LocalStack, StackInfo, StackOptions
from trainer.config import apply_overrides, read_config_file, validate_config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
ACTIVE = {"PENDING", "RUNNING"}
RAY_NOT_FINAL = {"PENDING", "RUNNING"}
STATUS_ROUTE = "/v1/jobs/{job_id}"
BASE_CONFIG = REPO / "configs" / "digits-demo.yaml"
OVERRIDES = [
    "name=bench-service-load",
    "model.head_hidden_dim=32",
    "model.head_bottleneck_dim=16",
    "objective.num_clusters=32",
    "data.max_samples=128",
    "data.num_local_crops=2",
    "schedule.epochs=1",
    "schedule.warmup_epochs=0",
    "eval.knn_k=[5]",
    "runtime.device=cpu",
]


# --- the stack --------------------------------------------------------------------------


class Stack:
    """The local stack of ``klssl up`` on free ports, and how the benchmark reaches it."""

    def __init__(self, base: Path, max_concurrent: int, dispatch_interval_s: float) -> None:
        self.local = LocalStack(
            StackOptions.on_free_ports(
                base / "state",
                head_cpus=2,
                max_concurrent_jobs=max_concurrent,
                dispatch_interval_s=dispatch_interval_s,
            )
        )
        self.info: StackInfo | None = None
        self._ray_client: Any = None

    def start_all(self) -> None:
        self.info = self.local.up(report=lambda _: None)

    def stop_all(self) -> None:
        self.local.down()

    @property
    def api_url(self) -> str:
        assert self.info is not None
        return self.info.api_url

    @property
    def api_headers(self) -> dict[str, str]:
        assert self.info is not None
        return {"Authorization": f"Bearer {self.info.api_token}"}

    def ray_client(self) -> Any:
        """One Jobs API client for the whole run (creating one costs several requests)."""
        from ray.job_submission import JobSubmissionClient

        assert self.info is not None
        if self._ray_client is None:
            headers = {"Authorization": f"Bearer {self.info.ray_token}"}
            self._ray_client = JobSubmissionClient(self.info.dashboard_url, headers=headers)
        return self._ray_client


# --- measurements -----------------------------------------------------------------------


def percentiles(samples: list[float]) -> dict[str, float | int | None]:
    """Count, p50/p95/p99 and max of latencies in seconds, reported in milliseconds."""
    if not samples:
        return {"count": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    if len(samples) == 1:
        cuts = [samples[0]] * 99
    else:
        cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "count": len(samples),
        "p50_ms": round(cuts[49] * 1000, 2),
        "p95_ms": round(cuts[94] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
        "max_ms": round(max(samples) * 1000, 2),
    }


async def server_histogram(client: httpx.AsyncClient, route: str) -> dict[float, float]:
    """Cumulative bucket counts (upper bound -> count) of the API's latency for ``route``."""
    text = (await client.get("/metrics")).text
    buckets: Counter[float] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name != "klssl_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("route") == route:
                buckets[float(sample.labels["le"])] += sample.value
    return dict(buckets)


def histogram_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """Upper bucket bounds holding the p50/p95/p99 of the requests between two scrapes."""
    diff = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in sorted(after)}
    total = diff.get(float("inf"), 0.0)
    out: dict[str, Any] = {"count": int(total)}
    for name, q in (("p50_le_ms", 0.50), ("p95_le_ms", 0.95), ("p99_le_ms", 0.99)):
        bound = next((le for le, n in diff.items() if total and n >= q * total), None)
        out[name] = None if bound is None else (bound * 1000 if bound != float("inf") else "inf")
    return out


def ray_jobs(stack: Stack) -> list[dict[str, Any]]:
    """Ray's job list through JobSubmissionClient (with the token)."""
    return [
        {"submission_id": job.submission_id, "status": str(job.status.value)}
        for job in stack.ray_client().list_jobs()
    ]


async def list_records(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """Every job record (paging through ``GET /v1/jobs``)."""
    items: list[dict[str, Any]] = []
    for offset in range(0, 10_000, 500):
        page = (await client.get("/v1/jobs", params={"offset": offset, "limit": 500})).json()
        items += page["items"]
        if len(items) >= page["total"] or not page["items"]:
            break
    return items


async def submit_all(
    client: httpx.AsyncClient, config: dict[str, Any], n: int, tag: str
) -> list[dict[str, Any]]:
    async def one(i: int) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            response = await client.post(
                "/v1/jobs",
                json={"config": config, "name": f"bench-{i:03d}"},
                headers={"Idempotency-Key": f"{tag}-{i:03d}"},
            )
        except httpx.HTTPError as error:
            return {"i": i, "status": None, "error": repr(error)}
        latency = time.perf_counter() - start
        body = response.json() if response.status_code == 202 else {}
        return {
            "i": i,
            "status": response.status_code,
            "latency_s": latency,
            "id": body.get("id"),
            "replayed": response.headers.get("Idempotent-Replayed") == "true",
            "error": None if response.status_code == 202 else response.text[:300],
        }

    return list(await asyncio.gather(*(one(i) for i in range(n))))


class LeanConnection:
    """A keep-alive HTTP/1.1 connection that only GETs: the load generator of the pollers.

    Why not httpx: 100 ``httpx.AsyncClient`` in one process cost more CPU per request than
    the API itself; on 2 cores that client-side work and its event-loop lag dominated the
    measured latency (``/healthz``, which does nothing, read p99 118 ms through httpx and
    2.1 ms through this client at the same 90 requests/s). ``--poll-client httpx`` keeps the
    old measurement for comparison.
    """

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.extra = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str) -> int:
        """GET ``path``; the status code (the body is read and dropped)."""
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.extra}\r\n".encode())
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
        await reader.readexactly(int(fields["content-length"]))
        return int(head[0].split()[1])

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


async def poll(
    url: str, headers: dict[str, str], ids: list[str], k: int, deadline: float, args: Any
) -> tuple[list[float], Counter[str]]:
    """One client: GET a job's status in turn until the deadline or the request bound."""
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    lean = LeanConnection(url, headers)
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=30, trust_env=False
    ) as client:
        await asyncio.sleep(args.poll_pause * k / args.pollers)  # spread the starts
        for j in range(args.max_requests_per_client):
            if time.monotonic() >= deadline:
                break
            job_id = ids[(k + j) % len(ids)]
            start = time.perf_counter()
            try:
                if args.poll_client == "lean":
                    code = await asyncio.wait_for(lean.get(f"/v1/jobs/{job_id}"), 30)
                else:
                    code = (await client.get(f"/v1/jobs/{job_id}")).status_code
                latencies.append(time.perf_counter() - start)
                outcomes[str(code)] += 1
            except (httpx.HTTPError, OSError, TimeoutError, asyncio.IncompleteReadError) as error:
                outcomes[type(error).__name__] += 1
                lean.close()
                lean = LeanConnection(url, headers)
            await asyncio.sleep(args.poll_pause)
    lean.close()
    return latencies, outcomes


async def monitor(
    client: httpx.AsyncClient, stack: Stack, stop: asyncio.Event, seen: dict[str, Any]
) -> None:
    """Sample active records (every s) and non-final Ray jobs (every 3 s) until ``stop``."""
    rounds = 0
    while not stop.is_set() and rounds < 10_000:
        with contextlib.suppress(Exception):
            records = await list_records(client)
            states = Counter(job["state"] for job in records)
            active = sum(states[s] for s in ACTIVE)
            seen["max_active_records"] = max(seen["max_active_records"], active)
            seen["samples"] += 1
            seen["last_states"] = dict(states)
        if rounds % 3 == 0:
            with contextlib.suppress(Exception):
                jobs = await asyncio.to_thread(ray_jobs, stack)
                running = sum(job["status"] in RAY_NOT_FINAL for job in jobs)
                seen["max_ray_not_final"] = max(seen["max_ray_not_final"], running)
                seen["ray_samples"] += 1
        rounds += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def benchmark(stack: Stack, args: Any) -> dict[str, Any]:
    raw = apply_overrides(read_config_file(BASE_CONFIG), OVERRIDES)
    config = validate_config(raw).model_dump(mode="json")
    checks: dict[str, bool] = {}
    out: dict[str, Any] = {"checks": checks}
    limits = httpx.Limits(max_connections=args.submissions + 10)
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=stack.api_headers, limits=limits, timeout=120,
        trust_env=False,
    ) as client:  # fmt: skip
        # 1. concurrent submissions
        out["load_before_submit"] = os.getloadavg()
        tag = f"bench-{secrets.token_hex(4)}"
        started = time.perf_counter()
        subs = await submit_all(client, config, args.submissions, tag)
        out["submit_wall_s"] = round(time.perf_counter() - started, 3)
        records = await list_records(client)
        ids = [sub["id"] for sub in subs if sub["status"] == 202]
        listed = [job["id"] for job in records]
        states = Counter(job["state"] for job in records)
        active = sum(states[s] for s in ACTIVE)
        finished = sum(states[s] for s in FINAL)
        out["submissions"] = {
            "latency": percentiles([s["latency_s"] for s in subs if s["status"] == 202]),
            "status_codes": dict(Counter(str(s["status"]) for s in subs)),
            "errors": [s["error"] for s in subs if s["error"]][:5],
            "states_right_after": dict(states),
        }
        checks["every_submission_accepted"] = len(ids) == args.submissions
        checks["submissions_recorded_exactly_once"] = len(set(ids)) == len(ids) == len(
            listed
        ) == len(set(listed)) and set(ids) == set(listed)
        checks["at_most_max_concurrent_active_after_submit"] = active <= args.max_concurrent
        checks["surplus_queued_after_submit"] = (
            states["QUEUED"] == len(listed) - active - finished
            and states["QUEUED"] >= len(listed) - args.max_concurrent - finished
        )
        # The same requests again (a client retrying): the same jobs, nothing new.
        replays = await submit_all(client, config, args.submissions, tag)
        total_after = (await client.get("/v1/jobs", params={"limit": 1})).json()["total"]
        out["replays"] = {
            "latency": percentiles([s["latency_s"] for s in replays if s["status"] == 202]),
            "status_codes": dict(Counter(str(s["status"]) for s in replays)),
            "total_records_after": total_after,
        }
        # A key whose first request was rejected made nothing: its retry may create the job.
        again = [(s, r) for s, r in zip(subs, replays, strict=True) if s["status"] == 202]
        created = {r["id"] for s, r in zip(subs, replays, strict=True) if s["status"] != 202}
        created.discard(None)
        out["replays"]["jobs_created_by_retrying_rejected_keys"] = len(created)
        checks["replays_return_the_same_jobs"] = all(
            r["id"] == s["id"] and r["replayed"] for s, r in again
        ) and total_after == len(ids) + len(created)

        # 2. status polling: first one client alone (the cost of a request), then the crowd
        if not listed:
            raise RuntimeError(f"no job was accepted: {out['submissions']}")
        sequential = []
        for j in range(args.sequential_requests):
            start = time.perf_counter()
            await client.get(f"/v1/jobs/{listed[j % len(listed)]}")
            sequential.append(time.perf_counter() - start)
        out["status_reads_one_client"] = percentiles(sequential)
        seen = {"max_active_records": active, "max_ray_not_final": 0, "samples": 0}
        seen |= {"ray_samples": 0, "last_states": dict(states)}
        stop = asyncio.Event()
        watcher = asyncio.create_task(monitor(client, stack, stop, seen))
        out["load_before_poll"] = os.getloadavg()
        before = await server_histogram(client, STATUS_ROUTE)
        deadline = time.monotonic() + args.poll_seconds
        started = time.perf_counter()
        polled = await asyncio.gather(
            *(
                poll(stack.api_url, stack.api_headers, ids or listed, k, deadline, args)
                for k in range(args.pollers)
            )
        )
        wall = time.perf_counter() - started
        after = await server_histogram(client, STATUS_ROUTE)
        out["load_after_poll"] = os.getloadavg()
        stop.set()
        await watcher
        latencies = [x for lat, _ in polled for x in lat]
        outcomes: Counter[str] = Counter()
        for _, counts in polled:
            outcomes.update(counts)
        out["status_reads"] = {
            "client_latency": percentiles(latencies),
            "server_histogram": histogram_quantiles(before, after),
            "outcomes": dict(outcomes),
            "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 1),
        }
        out["monitor"] = seen
        p99 = out["status_reads"]["client_latency"]["p99_ms"]
        checks["status_reads_all_200"] = set(outcomes) == {"200"}
        checks["status_read_p99_under_50ms"] = p99 is not None and p99 < 50
        checks["never_more_than_max_concurrent_active"] = (
            seen["max_active_records"] <= args.max_concurrent
            and seen["max_ray_not_final"] <= args.max_concurrent
        )

        # 3. cancel everything, let the dispatcher settle, look for orphans in Ray
        async def cancel(job_id: str) -> tuple[int | str, float]:
            start = time.perf_counter()
            try:
                response = await client.post(f"/v1/jobs/{job_id}/cancel")
            except httpx.HTTPError as error:
                return type(error).__name__, time.perf_counter() - start
            return response.status_code, time.perf_counter() - start

        everything = [job["id"] for job in await list_records(client)]
        cancelled = await asyncio.gather(*(cancel(job_id) for job_id in everything))
        out["cancels"] = {
            "latency": percentiles([t for _, t in cancelled]),
            "status_codes": dict(Counter(str(code) for code, _ in cancelled)),
        }
        checks["cancels_200_or_409"] = all(code in (200, 409) for code, _ in cancelled)
        settle_start = time.monotonic()
        settled_at = None
        records, jobs = [], []
        while time.monotonic() - settle_start < args.settle_seconds:
            records = await list_records(client)
            jobs = await asyncio.to_thread(ray_jobs, stack)
            quiet = all(job["state"] in FINAL for job in records) and not any(
                job["status"] in RAY_NOT_FINAL for job in jobs
            )
            if quiet and settled_at is None:
                settled_at = time.monotonic()  # then a few more rounds: a late dispatch?
            elif not quiet:
                settled_at = None
            if settled_at is not None and time.monotonic() - settled_at > 3 * args.dispatch:
                break
            await asyncio.sleep(1.0)
        out["settle_s"] = round(time.monotonic() - settle_start, 1)
        final_states = Counter(job["state"] for job in records)
        recorded = {job["ray_submission_id"] for job in records if job["ray_submission_id"]}
        not_final = [job for job in jobs if job["status"] in RAY_NOT_FINAL]
        unrecorded = [job for job in jobs if job["submission_id"] not in recorded]
        out["after_cancel"] = {
            "record_states": dict(final_states),
            "ray_jobs": len(jobs),
            "ray_status": dict(Counter(job["status"] for job in jobs)),
            "ray_not_final": not_final,
            "ray_jobs_without_record": unrecorded,
        }
        checks["every_record_final"] = len(records) == len(everything) and all(
            job["state"] in FINAL for job in records
        )
        checks["no_ray_job_running_or_pending"] = not not_final
        checks["every_ray_job_has_a_record"] = not unrecorded
    out["ok"] = all(checks.values())
    return out


def summary(result: dict[str, Any]) -> str:
    def row(name: str, stats: dict[str, Any]) -> str:
        return (
            f"  {name:<16} n={stats['count']:<6} p50={stats['p50_ms']} ms  "
            f"p95={stats['p95_ms']} ms  p99={stats['p99_ms']} ms  max={stats['max_ms']} ms"
        )

    reads = result["status_reads"]
    lines = [
        f"load average (1/5/15 min) before polling: {result['load_before_poll']}",
        row("submissions", result["submissions"]["latency"]),
        row("replays", result["replays"]["latency"]),
        row("1 client reads", result["status_reads_one_client"]),
        row("status reads", reads["client_latency"]),
        row("cancels", result["cancels"]["latency"]),
        f"  status reads: {reads['requests_per_s']} req/s over {reads['wall_s']} s, "
        f"server histogram {reads['server_histogram']}",
        f"  after cancel: {result['after_cancel']['record_states']}, "
        f"Ray {result['after_cancel']['ray_status']}",
        *(f"  [{'ok' if ok else 'FAIL'}] {name}" for name, ok in result["checks"].items()),
    ]
    return "\n".join(lines)


def _portable(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it, else as given."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--submissions", type=int, default=50)
    parser.add_argument("--pollers", type=int, default=100)
    parser.add_argument("--poll-seconds", type=float, default=20.0)
    parser.add_argument("--poll-pause", type=float, default=1.0, help="seconds between GETs")
    parser.add_argument(
        "--poll-client", choices=("lean", "httpx"), default="lean", help="load generator"
    )
    parser.add_argument("--sequential-requests", type=int, default=200)
    parser.add_argument("--max-requests-per-client", type=int, default=100)
    parser.add_argument("--max-concurrent", type=int, default=1)
    parser.add_argument("--dispatch", type=float, default=1.0, help="dispatch interval (s)")
    parser.add_argument("--settle-seconds", type=float, default=120.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "service_load.json")
    parser.add_argument("--keep", action="store_true", help="keep the stack's logs")
    args = parser.parse_args()

    def terminate(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally below

    signal.signal(signal.SIGTERM, terminate)
    base = Path(tempfile.mkdtemp(prefix="klssl-bench-", dir="/tmp"))  # short: Ray's sockets
    stack = Stack(base, args.max_concurrent, args.dispatch)
    ok = False
    try:
        started = time.monotonic()
        stack.start_all()
        startup_s = time.monotonic() - started
        result = asyncio.run(benchmark(stack, args))
        result = {
            "benchmark": "service_load",
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "params": {
                # Paths inside the repository are recorded relative to it (no machine's paths).
                **{k: _portable(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "config": str(BASE_CONFIG.relative_to(REPO)),
                "overrides": OVERRIDES,
            },
            "stack_startup_s": round(startup_s, 1),
            **result,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(summary(result))
        print(f"wrote {args.output}")
        ok = bool(result["ok"])
    finally:
        stack.stop_all()
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"stack logs kept in {base}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
