"""What the hub does about containers and records that no server accounts for: the plan.

The hub checks its containers against its servers when it has started and every
``reconcile_interval`` seconds after. A container of this hub that no active server of the hub
owns is an *orphan* (a hub that died mid-spawn, a spawn interrupted while ``docker start``
ran): a running one is stopped and its devices freed; a dead one has its record closed with
the engine's exit code. An open audit record whose server and container are both gone is
closed with the reason. A pending claim kept by a failed spawn that could not make sure its
container was gone is dropped once the engine shows that container is not running.

A record ends when its container ended, as the engine says (:func:`engine_time`,
:func:`stopped_at`), not when the hub noticed: the records of one device never overlap, and
GPU-hours are not counted past the container's end.

Pure code: no docker, pynvml, jupyterhub or database imports. The spawner module feeds it
what the engine, the hub and the audit store say, and carries out the plan.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .allocation import Holder
from .times import TimeError, parse_time

# Docker container states in which a container may hold devices or may start to.
LIVE_STATES = frozenset({"running", "restarting", "paused"})

ABANDONED_WHILE_STARTING = "The hub stopped while this server was starting."
ORPHAN_STOPPED = (
    "Its container ran on with no server of the hub to own it (the hub stopped while it was "
    "starting, or the spawn was interrupted); the hub stopped it."
)
REPLACED = (
    "The hub lost track of this server while it was starting (it stopped or was killed); "
    "a later spawn of the same server removed its container."
)
GONE_UNSEEN = "Its container was gone when the hub looked for it: it ended while the hub was not watching."


@dataclass(frozen=True)
class ContainerView:
    """One of this hub's containers, as the engine lists it."""

    id: str
    name: str
    user: str
    server: str
    state: str  # Docker's: created, running, paused, restarting, exited, dead, removing
    record_id: str = ""  # label gpuspawner.record


@dataclass(frozen=True)
class ServerView:
    """One server as this hub process knows it."""

    user: str
    server: str
    active: bool  # starting, running or stopping
    spawning: bool  # inside start(), its record not yet closed
    ready: bool
    container_id: str = ""
    record_id: str = ""


@dataclass(frozen=True)
class Ending:
    """How an audit record ends: its outcome, why, and what the engine said of the container."""

    outcome: str  # "stopped", "failed", "died", "abandoned"
    error: str | None = None
    exit_code: int | None = None
    oom_killed: bool | None = None
    container_id: str | None = None  # the container the record was made for (a killed hub may never have noted it)
    container_name: str | None = None
    # When the engine says the container ended (ISO 8601 UTC, see engine_time); None: unknown, the record
    # stops when the hub closes it. Not a field of the record: its stopped_at comes from it (stopped_at()).
    ended_at: str | None = None

    def changes(self) -> dict[str, Any]:
        """The record's fields this ending sets (what it does not know is left as recorded); its stop
        time is not among them (see :func:`stopped_at`)."""
        return {k: v for k, v in vars(self).items() if v is not None and k != "ended_at"}

    def with_container(self, container: Mapping[str, Any] | None) -> Ending:
        """This ending, naming the inspected `container` (none: unchanged)."""
        if container is None:
            return self
        return replace(self, container_id=container.get("Id"), container_name=str(container.get("Name", "")).lstrip("/") or None)


@dataclass(frozen=True)
class OpenRecord:
    id: str
    user: str
    server: str
    outcome: str


@dataclass
class Plan:
    """What to do, each list in the order to do it."""

    stop: list[ContainerView] = field(default_factory=list)  # running orphans: stop, free, record "abandoned"
    ended: list[ContainerView] = field(default_factory=list)  # dead, unowned, its record open: record "died"
    remove: list[ContainerView] = field(default_factory=list)  # unowned debris to remove (remove = True)
    close: list[tuple[str, Ending]] = field(default_factory=list)  # record id, how it ends
    now_running: list[str] = field(default_factory=list)  # records of ready servers still "starting"
    adopt: list[tuple[str, str, str]] = field(default_factory=list)  # user, server, record id to note
    release: list[str] = field(default_factory=list)  # spawn ids whose unconfirmed claims to drop


def plan(
    containers: Iterable[ContainerView],
    servers: Iterable[ServerView],
    open_records: Iterable[OpenRecord],
    *,
    unconfirmed: Iterable[tuple[str, Holder]] = (),
    remove: bool = True,
) -> Plan:
    """Decide what to do about unowned containers, unaccounted records and unconfirmed claims.

    A container is owned by the active server of its user and name, unless that server is known
    to run another container. A spawn in progress owns any container of its server: it may have
    just created it. With ``remove = False`` dead containers are kept (DockerSpawner reuses them).
    """
    containers = list(containers)
    open_records = list(open_records)
    open_ids = {r.id for r in open_records}
    by_key: dict[tuple[str, str], ServerView] = {(s.user, s.server): s for s in servers if s.active}
    by_record = {s.record_id: s for s in by_key.values() if s.record_id}
    result = Plan()
    owned_records: set[str] = set()
    handled_records: set[str] = set()

    for c in containers:
        owner = by_key.get((c.user, c.server))
        if owner is not None and (owner.spawning or owner.container_id in ("", c.id)):
            if c.record_id:
                owned_records.add(c.record_id)
                if not owner.record_id and not owner.spawning:
                    result.adopt.append((c.user, c.server, c.record_id))
            continue
        if c.state in LIVE_STATES:
            result.stop.append(c)
            handled_records.add(c.record_id)
        else:
            if c.record_id in open_ids:
                result.ended.append(c)
                handled_records.add(c.record_id)
            if remove:
                result.remove.append(c)

    adopted = {record_id: (user, server) for user, server, record_id in result.adopt}
    for r in open_records:
        server = by_record.get(r.id)
        if server is None and r.id in adopted:
            server = by_key.get(adopted[r.id])
        if server is not None:
            if server.ready and r.outcome in ("requested", "starting"):
                result.now_running.append(r.id)
            continue
        if r.id in owned_records or r.id in handled_records:
            continue
        if r.outcome in ("requested", "starting"):
            result.close.append((r.id, Ending("abandoned", ABANDONED_WHILE_STARTING)))
        else:
            result.close.append((r.id, Ending("died", GONE_UNSEEN)))

    live = {(c.user, c.server) for c in containers if c.state in LIVE_STATES or c.state == "created"}
    spawning = {k for k, s in by_key.items() if s.spawning}
    for spawn_id, holder in unconfirmed:
        key = (holder.user, holder.server)
        if key not in live and key not in spawning:
            result.release.append(spawn_id)
    return result


def ended_container(container: Mapping[str, Any] | None) -> Ending:
    """How the record of a server whose container ended on its own ends, from the container's inspection
    (its exit code, OOM flag and end time)."""
    if container is None:
        return Ending("died", "Its container was removed outside the hub.")
    state = container.get("State") or {}
    code = state.get("ExitCode")
    oom = bool(state.get("OOMKilled"))
    if oom:
        error = f"Its container ran out of memory and was killed (OOM), exit code {code}."
    elif code == 0:
        error = "Its container ended by itself (exit code 0)."
    else:
        error = f"Its container ended by itself or was stopped outside the hub, exit code {code}."
    if state.get("Error"):
        error += f" The engine said: {state['Error']}"
    return Ending("died", error, exit_code=code, oom_killed=oom, ended_at=finished_at(container)).with_container(container)


# RFC 3339 as the engine writes it: Go's time.RFC3339Nano, nanoseconds and "Z" (a zone offset is allowed too).
_ENGINE_TIME = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<time>\d{2}:\d{2}:\d{2})(?:[.,](?P<fraction>\d+))?"
    r"(?P<zone>[Zz]|[+-]\d{2}:?\d{2})?"
)


def engine_time(text: object) -> str | None:
    """An engine's timestamp (a container's ``State.FinishedAt``, a swarm task's ``Status.Timestamp``) as
    gpuspawner stores times: UTC, ISO 8601 with microseconds (nanoseconds cut, never rounded up). None
    where the engine does not know: empty, not a time, or Docker's zero time ("0001-01-01T00:00:00Z",
    which a container that never finished has)."""
    if not isinstance(text, str):
        return None
    match = _ENGINE_TIME.fullmatch(text.strip())
    if match is None:
        return None
    fraction = (match["fraction"] or "")[:6].ljust(6, "0")
    zone = match["zone"] or "Z"
    zone = "+00:00" if zone in ("Z", "z") else zone
    try:
        value = datetime.datetime.fromisoformat(f"{match['date']}T{match['time']}.{fraction}{zone}")
        if value.year <= 1:  # Go's zero time: never set
            return None
        return value.astimezone(datetime.timezone.utc).isoformat(timespec="microseconds")
    except (ValueError, OverflowError):  # a month 13; the year 1 shifted out of range by its zone
        return None


def finished_at(container: Mapping[str, Any]) -> str | None:
    """When an inspected container last ended, as the engine says (``State.FinishedAt``); None while
    it runs or has never run, or where the engine does not say. A kept container started again still
    shows its previous end, older than its start: that is no end of this run."""
    state = container.get("State") or {}
    ended = engine_time(state.get("FinishedAt"))
    started = engine_time(state.get("StartedAt"))
    if ended is None or state.get("Running") or (started is not None and started > ended):
        return None
    return ended


def stopped_at(ended_at: str | None, *, now: str, not_before: Iterable[str | None] = ()) -> str:
    """When a record stops: when its container ended, as the engine says (`ended_at`), else `now`; never
    after `now` (an engine whose clock runs ahead), nor before any of `not_before`, the record's earlier
    times (a container that ends as it starts may end before the hub noted its start). Each is ISO 8601
    text, returned as given; `not_before` entries that are empty or no time are passed over."""
    chosen = min((t for t in (ended_at, now) if t is not None), key=parse_time)
    return max([chosen, *(t for t in not_before if t and _is_time(t))], key=parse_time)


def _is_time(text: str) -> bool:
    try:
        parse_time(text)
    except TimeError:
        return False
    return True
