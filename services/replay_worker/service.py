"""`routemesh serve replay-worker`: a ReplayCompleted for each ReplayRequested, exactly
once per ``replay_id``.

A replay can take minutes, so the handler does not run it: it holds the request's offset
and queues it; one replay runs at a time in a worker thread, writing its report files to
a staging directory of its own; they are moved into the report directory and its
ReplayCompleted is published, and only then is the offset released. A crash mid-replay
leaves the offset uncommitted and no partial report published: the request is delivered
again and replayed from the start. When the running replay's partition is taken away in a
rebalance, its answer is dropped (its staged files too): the partition's new owner
replays it, and two answers would otherwise reach the results topic. The
ReplayCompleted's event id is derived from the replay id, and the worker reads the
results topic whenever it is given partitions, so a request answered before a crash, by
this instance or by another of the group that held the partition, is not answered twice.
Instances share the report directory (a request and its report may be handled by any of
them).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import Field, model_validator

from routemesh.contracts import ReplayCompleted, ReplayRequested
from routemesh.contracts.events import utc_now
from routemesh.contracts.topics import REPLAY_REQUESTS, REPLAY_RESULTS
from routemesh.services.replay_worker import learn as learning
from routemesh.services.replay_worker import shadow
from routemesh.services.replay_worker.receipt import Bands
from routemesh.services.replay_worker.replay import ReplayError
from routemesh.services.replay_worker.runner import ReplaySpec, run
from routemesh.services.router import file_sha256, open_qdrant
from routemesh.services.router.bank import announcement
from routemesh.services.runtime.consumer import (
    Delivery,
    OffsetTracker,
    PartitionKey,
    Position,
    recent_event_ids,
)
from routemesh.services.runtime.files import pretty_json, write_atomically
from routemesh.services.runtime.service import ServiceContext, ServiceSpec, metrics_port
from routemesh.services.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)
GROUP = "routemesh-replay-worker"
_COMPLETED = uuid.UUID("6f1d8a52-58a4-4b8e-9d0e-0c1b7f3e2a91")
# Results read back at start to learn which requests were answered.
RESULTS_REMEMBERED = 100_000
# Where a replay writes its report files until its answer is published, and how old a
# staged replay must be for a starting instance to clear it (longer than any replay).
STAGING = ".staging"
STALE_STAGING_S = 24 * 3600


def completed_event_id(replay_id: str) -> uuid.UUID:
    """The one ReplayCompleted a replay id gets has this id, whoever publishes it."""
    return uuid.uuid5(_COMPLETED, replay_id)


@dataclass(frozen=True)
class Answer:
    completed: ReplayCompleted
    # The report files, named as in the report directory, until the answer is published.
    staged: Path | None = None

    def discard(self) -> None:
        if self.staged is not None:
            shutil.rmtree(self.staged, ignore_errors=True)


def _discard(job: asyncio.Task[Answer]) -> None:
    if not job.cancelled() and job.exception() is None:
        job.result().discard()


class ReplayWorkerSettings(ServiceSettings):
    # The current config (a request may name another in replay_config_dir).
    router_config: Path = Path("deploy/examples/lite-deep.yaml")
    # Configs and inputs (datasets, captures directories) a request names by file name;
    # unset: the current config's directory.
    replay_config_dir: Path | None = None
    replay_input_dir: Path | None = None
    # Reports (and their receipts), one set per replay id; also the drift history.
    replay_report_dir: Path = Path("replays")
    replay_allow_remote_embeddings: bool = False
    # A headline figure that moves by more than this share of the last report's on the
    # same input set warns, or alerts (the report's drift section).
    replay_drift_warn: float = Field(default=0.20, gt=0)
    replay_drift_alert: float = Field(default=0.50, gt=0)
    # Scheduled learning, opt-in (`routemesh learn` on a timer): every this many seconds
    # (0: never) the instance holding the requests topic's first partition learns from
    # the audit and review capture directories; a model that passes the gate is written
    # and announced. Receipts (and the models they replaced) go to replay_learn_dir.
    replay_learn_every_s: float = Field(default=0, ge=0)
    replay_learn_audit_dir: Path | None = None
    replay_learn_captures_dir: Path | None = None
    replay_learn_dir: Path = Path("learn")

    @model_validator(mode="after")
    def _learn_sources(self) -> ReplayWorkerSettings:
        if self.replay_learn_every_s and (self.replay_learn_audit_dir is None
                                          or self.replay_learn_captures_dir is None):
            raise ValueError("ROUTEMESH_REPLAY_LEARN_EVERY_S needs "
                             "ROUTEMESH_REPLAY_LEARN_AUDIT_DIR and "
                             "ROUTEMESH_REPLAY_LEARN_CAPTURES_DIR")
        return self


def _named(directory: Path, name: str | None, what: str) -> Path:
    """A file of ``directory`` by its bare name: a request never locates files."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ReplayError(f"{what} {name!r} is no file name")
    path = directory / name
    if not path.exists():
        raise ReplayError(f"no {what} named {name!r}")
    return path


def _base(path: str | None) -> str | None:
    return Path(path).name if path else None


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.replays = Counter("routemesh_replay_worker_replays_total",
                               "Replay requests answered, by kind and status",
                               ["kind", "status"], registry=registry)
        self.skipped = Counter("routemesh_replay_worker_duplicate_requests_total",
                               "Requests for a replay id already answered",
                               registry=registry)
        self.duration = Histogram("routemesh_replay_worker_replay_seconds",
                                  "Time to run one replay", ["kind"], registry=registry,
                                  buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
        self.learns = Counter("routemesh_replay_worker_learns_total",
                              "Scheduled learns, by result (written, unchanged, refused, failed)",
                              ["result"], registry=registry)


class ReplayWorker:
    def __init__(self, ctx: ServiceContext) -> None:
        settings = ctx.settings
        assert isinstance(settings, ReplayWorkerSettings)
        self.ctx = ctx
        self.settings = settings
        self.metrics = _Metrics(ctx.registry)
        self.consumer = ctx.consumer([REPLAY_REQUESTS], GROUP, self, batch_max_records=100,
                                     on_assigned=self.assigned)
        self.answered: set[uuid.UUID] = set()
        self.queue: deque[tuple[Position, ReplayRequested]] = deque()
        self.queued: set[str] = set()
        self.job: asyncio.Task[Answer] | None = None
        self.job_position: Position | None = None
        self.partitions: set[PartitionKey] = set()
        self.learner: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.settings.replay_report_dir.mkdir(parents=True, exist_ok=True)
        self._clear_stale_staging()
        self.ctx.readiness.set("replay_reports", True, "writable")
        await self.consumer.start()
        if self.settings.replay_learn_every_s:
            self.learner = asyncio.create_task(self._learn_on_schedule())

    def _clear_stale_staging(self) -> None:
        """Staged reports of replays that died with their instance: old enough that no
        live replay (of this instance or another sharing the directory) still writes."""
        staging = self.settings.replay_report_dir / STAGING
        cutoff = time.time() - STALE_STAGING_S
        for staged in staging.glob("*") if staging.is_dir() else ():
            if staged.stat().st_mtime < cutoff:
                shutil.rmtree(staged, ignore_errors=True)

    async def assigned(self, partitions: Collection[PartitionKey]) -> None:
        """What the group has answered, read again before a partition's requests are
        handled: another instance may have answered some since this one last looked."""
        self.partitions |= set(partitions)
        self.answered |= await recent_event_ids(
            self.settings, self.settings.topic(REPLAY_RESULTS), RESULTS_REMEMBERED)

    async def stop(self) -> None:
        if self.learner is not None:
            self.learner.cancel()
        await self.consumer.stop()
        if self.job is not None:
            # The thread finishes its replay; nothing is published for it and its offset
            # stays uncommitted, so the next start replays it.
            self.job.cancel()

    # -- handling ---------------------------------------------------------------------

    async def handle(self, deliveries: Sequence[Delivery], offsets: OffsetTracker) -> None:
        for delivery in deliveries:
            event = delivery.event
            if not isinstance(event, ReplayRequested):
                continue
            if completed_event_id(event.replay_id) in self.answered \
                    or event.replay_id in self.queued:
                self.metrics.skipped.inc()
                continue
            offsets.hold(delivery.position)
            self.queue.append((delivery.position, event))
            self.queued.add(event.replay_id)
        if self.job is not None and self.job.done():
            await self._finish(offsets)
        if self.job is None and self.queue:
            self.job_position, request = self.queue.popleft()
            self.job = asyncio.create_task(self._run(request))

    async def _finish(self, offsets: OffsetTracker) -> None:
        job, position = self.job, self.job_position
        assert job is not None
        assert position is not None
        answer = job.result()
        completed = answer.completed
        # A retry after a failed publish finds them moved already.
        if answer.staged is not None and answer.staged.exists():
            for staged in answer.staged.iterdir():
                os.replace(staged, self.settings.replay_report_dir / staged.name)
            answer.discard()
        # Published before the offset moves: a crash in between answers again on restart
        # only if the answer is not in the results topic, and it carries the same id.
        try:
            await self.ctx.producer.publish(completed)
        except Exception as exc:
            log.error("replay result not published; retrying",
                      extra={"replay_id": completed.replay_id, "error": str(exc)})
            return
        self.job = self.job_position = None
        self.answered.add(completed.event_id)
        self.queued.discard(completed.replay_id)
        self.metrics.replays.labels(completed.kind, completed.status).inc()
        offsets.release(position)

    def revoked(self, partitions: Collection[PartitionKey]) -> None:
        self.partitions -= set(partitions)
        self.queue = deque((p, e) for p, e in self.queue if (p[0], p[1]) not in partitions)
        self.queued = {e.replay_id for _, e in self.queue}
        if self.job is not None and self.job_position is not None \
                and self.job_position[:2] in partitions:
            # A thread cannot be stopped: it runs to its end, and what it wrote goes.
            log.info("running replay's partition revoked; its answer is dropped")
            self.job.add_done_callback(_discard)
            self.job = self.job_position = None

    # -- one replay -------------------------------------------------------------------

    async def _run(self, request: ReplayRequested) -> Answer:
        started = asyncio.get_running_loop().time()
        log.info("replay started", extra={"replay_id": request.replay_id,
                                          "kind": request.kind})
        staged = self.settings.replay_report_dir / STAGING / uuid.uuid4().hex
        staged.mkdir(parents=True)
        answer = Answer(await self._answer(request, staged), staged)
        if answer.completed.status != "ok":
            # A failed replay's answer names no report: what it wrote goes.
            answer.discard()
            answer = Answer(answer.completed)
        self.metrics.duration.labels(request.kind).observe(
            asyncio.get_running_loop().time() - started)
        return answer

    async def _answer(self, request: ReplayRequested, staged: Path) -> ReplayCompleted:
        try:
            if request.kind == "shadow":
                return await self._shadow(request, staged)
            return await asyncio.to_thread(self._replay, request, staged)
        except ReplayError as exc:
            return self._completed(request, status="failed", error=str(exc))
        except Exception as exc:
            log.exception("replay failed", extra={"replay_id": request.replay_id})
            return self._completed(request, status="failed",
                                   error=f"{type(exc).__name__}: {exc}")

    def _completed(self, request: ReplayRequested, **fields: Any) -> ReplayCompleted:
        return ReplayCompleted(event_id=completed_event_id(request.replay_id),
                               replay_id=request.replay_id, kind=request.kind, **fields)

    def _replay(self, request: ReplayRequested, staged: Path) -> ReplayCompleted:
        s = self.settings
        configs = s.replay_config_dir or s.router_config.parent
        inputs = s.replay_input_dir or s.router_config.parent
        config = _named(configs, request.config or _base(request.config_path),
                        "config") if (request.config or request.config_path) \
            else s.router_config
        spec = ReplaySpec(
            config=config, source=request.source,
            # 1.0 named the dataset by path (read for its base name); from 1.1 it is a
            # name, and a name with a path is refused like a config's.
            input=_named(inputs, _base(request.dataset) if request.schema_version == "1.0"
                         else request.dataset, request.source),
            candidate=_named(configs, request.candidate, "config")
            if request.candidate else None,
            previous=_named(configs, request.previous
                            or _base(request.previous_config_path), "config")
            if request.previous or request.previous_config_path else None,
            limit=request.limit, allow_remote_embeddings=s.replay_allow_remote_embeddings,
        )
        json_path = staged / f"{request.replay_id}.json"
        outcome = run(spec, history=s.replay_report_dir, json_output=json_path,
                      markdown_output=json_path.with_suffix(".md"),
                      bands=Bands(warn=s.replay_drift_warn, alert=s.replay_drift_alert))
        report = outcome.report
        if request.dataset_sha256 and request.dataset_sha256 != report.inputs.files_sha256:
            raise ReplayError(f"{request.dataset} has sha256 {report.inputs.files_sha256}, "
                              f"not the {request.dataset_sha256} the request names")
        systems = {x.name: x for x in report.systems}
        changed = next((d.route_changed for d in report.deltas), 0)
        return self._completed(
            request, status="ok", items=len(report.cases),
            accuracy=systems["current"].accuracy,
            candidate_accuracy=systems["candidate"].accuracy if "candidate" in systems
            else None,
            baseline_accuracy={x.name: x.accuracy for x in report.systems
                               if x.kind in ("always", "rules") and x.accuracy is not None},
            changed_routes=changed,
            config_sha256=report.inputs.configs["current"].config_sha256,
            dataset_sha256=report.inputs.files_sha256,
            report_name=json_path.name,
            report_sha256=file_sha256(json_path),
            run_hash=report.receipt.run_hash, drift_status=report.drift.status,
        )

    async def _shadow(self, request: ReplayRequested, staged: Path) -> ReplayCompleted:
        since = utc_now() - timedelta(seconds=request.window_s)
        report = shadow.compare(await shadow.read_window(self.settings, since))
        path = staged / f"{request.replay_id}.json"
        data = pretty_json(report)
        await asyncio.to_thread(write_atomically, path, data)
        await asyncio.to_thread(write_atomically, path.with_suffix(".md"),
                                shadow.render_markdown(report).encode())
        return self._completed(request, status="ok", items=report.pairs,
                               agreement=report.agreement, report_name=path.name,
                               report_sha256=hashlib.sha256(data).hexdigest())


    # -- scheduled learning -----------------------------------------------------------

    async def _learn_on_schedule(self) -> None:
        while True:
            await asyncio.sleep(self.settings.replay_learn_every_s)
            if self.leads():
                await self.learn_once()

    def leads(self) -> bool:
        """One instance learns, as one bank is written: the first partition's holder."""
        return any(partition == 0 for _, partition in self.partitions)

    async def learn_once(self) -> learning.LearnRun | None:
        """Learn, write a model that passes the gate, announce it; None when it failed."""
        s = self.settings
        assert s.replay_learn_audit_dir is not None
        assert s.replay_learn_captures_dir is not None
        key = s.qdrant_api_key.get_secret_value() if s.qdrant_api_key else None
        try:
            done = await asyncio.to_thread(
                learning.run, s.router_config, open_qdrant(*s.qdrant_location(), key),
                s.replay_learn_audit_dir, s.replay_learn_captures_dir, None,
                s.replay_learn_dir, learning.LearnPolicy())
        except Exception as exc:
            # Errors may quote local paths: only their kind is logged.
            log.error("scheduled learn failed", extra={"error": type(exc).__name__})
            self.metrics.learns.labels("failed").inc()
            return None
        receipt = done.receipt
        if not receipt.written:
            result = "unchanged" if receipt.unchanged else "refused"
            log.info(f"scheduled learn {result}", extra={"reasons": receipt.reasons})
            self.metrics.learns.labels(result).inc()
            return done
        assert receipt.route_bank_sha256_after is not None
        try:
            await self.ctx.producer.publish(announcement(
                done.loaded, done.collection, receipt.route_bank_sha256_after, done.encoder,
                done.utterances))
        except Exception as exc:
            log.error("learned bank written, announcing it failed; gateways load it at "
                      "their next reload", extra={"error": type(exc).__name__})
            self.metrics.learns.labels("written").inc()
            return done
        log.info("scheduled learn wrote and announced a route bank", extra={
            "route_bank_sha256": receipt.route_bank_sha256_after,
            "learned": len(receipt.learned_text_sha256)})
        self.metrics.learns.labels("written").inc()
        return done.announced()


SPEC = ServiceSpec(
    name="replay-worker",
    settings_class=ReplayWorkerSettings,
    factory=ReplayWorker,
    ports=(metrics_port(9105),),
    description="replays labelled sets and captures through configs and baselines; "
                "shadow reports",
    # The instances share one report directory, as their pods share one volume.
    dev_env=lambda data_dir, instance: {
        "ROUTEMESH_REPLAY_REPORT_DIR": str(data_dir / "replays")},
)
