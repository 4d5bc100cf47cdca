"""The life of a server's audit records: begin a spawn's record, note what it learns, flush, finish.

A :class:`SpawnRecorder` belongs to one server (one spawner). Notes are queued and written by
the audit store's thread while the spawn goes on; :meth:`SpawnRecorder.flush` waits for them,
and a spawn flushes before it hands its server to the hub, so no server runs with a record
that failed to say what it is. Closing a record never raises (:func:`close_record`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from tornado import web

from . import metrics, reconcile, seams, userinput
from .audit import AuditRecord
from .facts import DeviceFacts, ResolvedImage
from .hubwide import resources
from .reconcile import Ending
from .store import AsyncAuditStore, AuditLogRefused, AuditRecordSealed, AuditStoreError
from .swarm import SwarmNode, SwarmTask

Log = logging.Logger | logging.LoggerAdapter[logging.Logger]


async def close_record(store: AsyncAuditStore, record_id: str, log: Log, ending: Ending, *, now: str | None = None) -> None:
    """Give a record its final state, stopped when its container ended as the engine says
    (``ending.ended_at``; never before the record's earlier times nor after `now`), else `now` (default:
    the clock's now); a sealed one is left alone, and an unreachable database gets the change later
    (``finish_eventually``). Never raises: a user sees the refusal or the stop they asked for, never a
    database error. The idle GPU-seconds the hub's samples counted for its server
    (:mod:`gpuspawner.reclaim`) go into it too."""
    changes = ending.changes()
    idle = resources.gpu_idle_seconds.pop(record_id, None)
    if idle is not None:
        changes["idle_gpu_seconds"] = round(idle, 3)
    try:
        stopped_at = await _stopped_at(store, record_id, ending.ended_at, now=now or seams.now_iso())
        await store.finish_eventually(record_id, stopped_at=stopped_at, **changes)
    except AuditStoreError as e:
        log.debug("Audit record %s not closed: %s", record_id, e)
    except Exception:
        log.exception("Could not close audit record %s", record_id)


async def _stopped_at(store: AsyncAuditStore, record_id: str, ended_at: str | None, *, now: str) -> str:
    """The record's stop time (:func:`gpuspawner.reconcile.stopped_at`): the engine's end, read against the
    record's earlier times; `now` where the engine did not say, or the record cannot be read (surely
    after them all)."""
    if ended_at is None:
        return now
    try:
        record = await store.get(record_id)
    except Exception:
        return now
    if record is None:
        return now
    return reconcile.stopped_at(ended_at, now=now, not_before=(record.requested_at, record.started_at, record.ready_at))


class SpawnRecorder:
    """One server's audit records: the spawn's notes queued in order, then the record closed.

    `store` gives the hub's audit store (resolved when first needed), `log` is the spawner's
    log and `name` says which user's server the log lines concern.
    """

    def __init__(self, store: Callable[[], AsyncAuditStore], log: Callable[[], Log], name: Callable[[], str]) -> None:
        self._store = store
        self._log = log
        self._name = name
        self._writes: list[asyncio.Future[Any]] = []  # queued changes to the current record

    async def begin(self, record: AuditRecord) -> None:
        """Write a spawn's new record; HTTP 500 where it cannot be written.

        Interrupted while it is written, the record is closed as failed once it is, and the
        cancellation goes on.
        """
        inserting = resources.keep(self._store().insert(record))
        try:
            await asyncio.shield(inserting)
        except asyncio.CancelledError as e:
            resources.keep(self._close_after_insert(inserting, record.id, e))
            raise
        except AuditLogRefused as e:
            metrics.REFUSALS.labels("audit_log").inc()
            raise web.HTTPError(
                503, "The hub's audit log failed its integrity check (it was rolled back or changed behind the hub's "
                "back), so the hub starts no servers until an admin has looked; tell an admin."
            ) from e
        except Exception as e:
            self._log().error("Cannot write the audit record of %s: %s", self._name(), e)
            raise web.HTTPError(500, "The hub cannot write its audit record, so it starts no server; tell an admin.") from e

    async def _close_after_insert(self, inserting: asyncio.Future[Any], record_id: str, error: BaseException) -> None:
        try:
            await inserting
        except Exception:
            return  # never written: nothing to close
        await self.finish(record_id, Ending("failed", error_text(error)))

    def _note(self, record_id: str, **changes: Any) -> None:
        self._writes.append(self._store().update_soon(record_id, **changes))

    def note_request(
        self, record_id: str, *, profile: str | None, profile_hash: str | None, image_requested: str,
        cpu_limit: float | None, mem_limit: int | None, environment: Mapping[str, str],
    ) -> None:
        """Queue what the spawn asks for: its profile, image, limits and environment (without secrets)."""
        self._note(
            record_id, profile=profile, profile_hash=profile_hash, image_requested=image_requested,
            cpu_limit=cpu_limit, mem_limit=mem_limit, environment=environment,
        )

    def note_devices(self, record_id: str, facts: DeviceFacts) -> None:
        """Queue the devices the spawn was granted and the host's driver versions."""
        self._note(
            record_id, devices=facts.devices, driver_version=facts.driver_version,
            cuda_driver_version=facts.cuda_driver_version,
        )

    def note_image(self, record_id: str, image: ResolvedImage, *, docker_version: str | None) -> None:
        """Queue the image the spawn resolved, and the engine's version."""
        self._note(
            record_id, docker_version=docker_version, image_requested=image.requested, repo_digest=image.repo_digest,
            image_id=image.image_id, image_labels=image.labels, note=image.note,
        )

    def note_requirement(self, record_id: str, requirement: str | None) -> None:
        """Queue the image's CUDA requirements the host's driver met (:mod:`gpuspawner.cudareq`)."""
        if requirement:
            self._note(record_id, cuda_requirement=requirement)

    def note_container_soon(self, written: asyncio.Future[Any]) -> None:
        """Count a write of the container's facts (see :meth:`note_container`) among the queued notes."""
        self._writes.append(written)

    async def note_container(
        self, record_id: str, *, container_id: str, container_name: str, inspection: Mapping[str, Any]
    ) -> None:
        """Write what the engine made of the create request: the container, its image and devices."""
        await self._store().update(
            record_id,
            container_id=container_id,
            container_name=container_name,
            container_image_id=inspection.get("Image"),
            device_requests=tuple((inspection.get("HostConfig") or {}).get("DeviceRequests") or ()),
        )

    def note_swarm_task(self, record_id: str, *, node: SwarmNode, task: SwarmTask, devices: DeviceFacts,
                        service_name: str) -> None:
        """Queue where a swarm placed the server: its node (ID, host name, engine version), the devices
        Swarm assigned its task with the node's driver versions, and the service and task."""
        self._note(
            record_id, node=node.id, hostname=node.hostname, docker_version=node.engine_version or None,
            devices=devices.devices, driver_version=devices.driver_version, cuda_driver_version=devices.cuda_driver_version,
            container_name=service_name, container_id=task.container_id or None,
        )

    def note_started(self, record_id: str) -> None:
        """Queue that the container started."""
        self._note(record_id, outcome="starting", started_at=seams.now_iso())

    def note_running(self, record_id: str) -> None:
        """Queue that the hub has seen the server answer."""
        self._note(record_id, outcome="running", ready_at=seams.now_iso())

    async def watch_ready(
        self, record_id: str, *, answered: asyncio.Future[Any] | None, ready: Callable[[], bool], timeout: float
    ) -> None:
        """Note when JupyterHub has seen the server answer: once `answered` (JupyterHub's spawn
        future, done when the server answered or the hub gave up on it) is done, within `timeout`
        seconds, the record says the server runs if `ready()`. Without it (a spawn JupyterHub's
        handlers did not start), the hub's reconciliation notes it. Never raises."""
        if answered is None:
            return
        try:
            await asyncio.wait([answered], timeout=timeout)
            if ready():
                self.note_running(record_id)
                await self.flush()
        except Exception:
            self._log().exception("Could not note that %s is ready in its audit record", self._name())

    async def stopped(self, record_id: str, *, never_answered: bool, started_here: bool, http_timeout: float) -> Ending:
        """How a stopped server's record ends: failed if it never answered, stopped otherwise.

        `never_answered`: JupyterHub stops it because it did not answer within `http_timeout`.
        A server this hub process did not start (resumed at hub start) that JupyterHub gave up
        waiting for has its flag cleared by then: its record, still "requested" or "starting",
        says it never ran. One this process started is stopped, though its record may still say
        "starting" a moment after the server answered.
        """
        if never_answered:
            return Ending("failed", f"The server did not answer within {http_timeout:.0f} s, so the hub stopped it.")
        if not started_here:
            record = await self._store().get(record_id)
            if record is not None and record.outcome in ("requested", "starting"):
                return Ending("failed", "The server was stopped before it ever answered the hub.")
        return Ending("stopped")

    async def flush(self) -> None:
        """Wait for the queued notes; raise the first that failed (HTTP 500), unless the record was sealed."""
        writes, self._writes = self._writes, []
        for result in await asyncio.gather(*writes, return_exceptions=True):
            if isinstance(result, AuditRecordSealed):  # the spawn ended while this was on its way
                self._log().debug("Audit record of %s not updated: %s", self._name(), result)
            elif isinstance(result, AuditStoreError):
                raise web.HTTPError(
                    500, "The hub could not write this server's audit record, so it does not start it; tell an admin."
                ) from result
            elif isinstance(result, BaseException):
                raise result

    async def finish(self, record_id: str, ending: Ending) -> None:
        """Close a record as `ending` says: stopped when its container ended (``ending.ended_at``), else
        now, when this is called (not once the queued notes are written); never raises. A database
        that does not answer gets the change later."""
        now = seams.now_iso()
        try:
            await self.flush()
        except Exception as e:
            self._log().error("A change to the audit record of %s was not written: %s", self._name(), e)
        await close_record(self._store(), record_id, self._log(), ending, now=now)


def error_text(e: BaseException) -> str:
    """Why a spawn failed, for its record: clipped, since a record can never shrink once sealed."""
    if isinstance(e, web.HTTPError):
        return userinput.clip(f"HTTP {e.status_code}: {e.log_message}")
    if isinstance(e, asyncio.CancelledError):
        return "the spawn was cancelled (timed out, or the hub stopped it)"
    return userinput.clip(f"{type(e).__name__}: {e}")
