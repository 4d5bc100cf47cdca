"""A soak of one real hub: many users, crashes, interrupts and a lost GPU, checked against the engine.

Used by ``benchmarks/soak.py`` (the full run, minutes) and ``tests/test_soak.py`` (a short run in
``make test``); both build a hub with :func:`hub_config` on GPUs written by :func:`write_gpus`, then
call :func:`run_soak`, which returns a :class:`SoakReport`.

What runs at once, for ``SoakPlan.duration`` seconds or ``SoakPlan.max_operations`` user
operations, whichever ends first:

- user actors: each picks a free (user, server) slot, looks at it through the REST API, then
  spawns a random profile, spawns with bad options, spawns and interrupts the spawn (DELETE while
  it is pending), or stops a running server;
- one chaos actor, in turn: ``docker kill`` of a running server behind the hub's back, a GPU made
  lost in the simulated NVML (and brought back later), a SIGKILL of the hub right after a few
  spawn requests (then the same hub is started again);
- the engine observer: the Docker engine's event stream for this hub's containers, from before
  the first spawn. Which devices a container holds is read from its ``HostConfig.DeviceRequests``
  when it is created; it holds them from its ``start`` event to its ``die`` event (``timeNano``),
  and every ``die`` event is kept by container id;
- a checker, every few seconds: overlapping device holdings in the event log so far, and running
  containers that no server of the hub owns.

Afterwards every server is stopped through the hub and the whole record is checked: no device
ever held by two running containers at once, none busy outside the hub or lost handed out, no
orphan container, every audit record closed and agreeing with the engine's event log, every
accepted spawn recorded, and ``gpuspawner audit verify`` passing. A record ends when its container
ended: within ``SoakPlan.end_tolerance`` of the engine's ``die`` event for it, not when the hub
noticed; so no two records of one exclusive device (a whole GPU, a MIG slice) overlap in time.

Test scaffolding only: it drives a hub from outside, exactly as users and an admin's mishaps would.
"""

from __future__ import annotations

import collections
import datetime
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.errors
import requests

from . import TESTBED_DIR, DockerBed
from .hub import BIN, RunningHub

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))
import simnvml  # noqa: E402

NS = 1_000_000_000
FOREVER = 2**63 - 1

# --- The host: simulated GPUs and the hub's configuration ------------------------------------

WHOLE_GPUS = (0, 1, 2, 3)  # free for the hub; the chaos actor makes one of these lost at a time
BUSY_GPU = 4  # a compute process outside the hub: never to be handed out
MIG_GPU = 5  # in MIG mode, two 1g.10gb devices
MIG_SLOTS = (0, 1)


def gpu_entries(lost: Iterable[int] = ()) -> list[dict[str, Any]]:
    """The six GPUs of the soak's host, with the given whole GPUs lost."""
    lost = set(lost)
    gpus = [simnvml.gpu(i, lost=i in lost) for i in WHOLE_GPUS]
    gpus.append(simnvml.gpu(BUSY_GPU, processes=[{"pid": 4242, "used_memory": 4 * 2**30}]))
    gpus.append(simnvml.gpu(MIG_GPU, mig=[simnvml.mig_device(MIG_GPU, s) for s in MIG_SLOTS]))
    return gpus


def write_gpus(spec: Path, lost: Iterable[int] = ()) -> None:
    simnvml.write_spec(spec, gpu_entries(lost))


def uuid_of(gpu: int) -> str:
    return str(simnvml.gpu(gpu)["uuid"])


def mig_uuid(slot: int) -> str:
    return str(simnvml.mig_device(MIG_GPU, slot)["uuid"])


def conflict_keys(device: str) -> frozenset[str]:
    """What holding `device` occupies: a whole GPU in MIG mode occupies its MIG devices too."""
    if device == uuid_of(MIG_GPU):
        return frozenset({device, *(mig_uuid(s) for s in MIG_SLOTS)})
    return frozenset({device})


def profiles(image: str) -> list[dict[str, Any]]:
    return [
        {"slug": "cpu", "display_name": "CPU only", "image": image, "default": True},
        {"slug": "gpu-1", "display_name": "1 GPU", "image": image, "gpus": 1},
        {"slug": "gpu-2", "display_name": "2 GPUs", "image": image, "gpus": 2},
        {"slug": "mig", "display_name": "1 MIG slice", "image": image, "gpus": {"mig_profile": "1g.10gb"}},
    ]


# What users ask for, with weights: mostly one GPU, as in a course.
PROFILE_WEIGHTS = {"cpu": 3, "gpu-1": 4, "gpu-2": 2, "mig": 2}
# Options a user may not send: an unknown profile, and a key besides "profile" (both HTTP 400).
BAD_OPTIONS = ({"profile": "no-such-profile"}, {"profile": "cpu", "image": "evil/miner:1.0"})


def hub_config(spec: Path, image: str, *, gpu_wait: float = 0) -> str:
    """Extra hub configuration (HubSetup.extra): simulated NVML, the profiles, named servers;
    `gpu_wait` seconds in the GPU queue (0: a spawn with no free GPU is refused at once)."""
    return f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import simnvml
simnvml.install({str(spec)!r})
c.GPUSpawner.nvml_cache_seconds = 0
c.GPUSpawner.gpu_wait_timeout = {gpu_wait!r}
c.GPUSpawner.profiles = {profiles(image)!r}
c.JupyterHub.allow_named_servers = True
# Short enough that most spawns answer 201 and a refusal (503, 400) is the request's own answer.
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 3}}
c.JupyterHub.concurrent_spawn_limit = 200
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 30
# Notice containers killed behind the hub's back within seconds, not the default 30.
c.Spawner.poll_interval = 5
"""


# --- The plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakPlan:
    """How long and how hard to soak; every random choice comes from `seed`."""

    duration: float = 600.0  # seconds of traffic; then everything is stopped and checked
    max_operations: int = 5000  # user operations at most, whatever the duration
    seed: int = 1
    users: int = 6
    servers: tuple[str, ...] = ("", "b")  # each user's servers: the default one and a named one
    actors: int = 4
    think: tuple[float, float] = (0.2, 1.5)  # seconds an actor waits between operations
    bad_share: float = 0.1
    interrupt_share: float = 0.2
    respawn_share: float = 0.5  # of interrupts: the user starts another server as they cancel
    stop_share: float = 0.5  # chance an actor that finds its server running stops it
    chaos_every: float = 15.0  # mean seconds between chaos events
    warmup: float = 5.0  # seconds of plain traffic before the first chaos event
    max_hub_kills: int = 12
    max_container_kills: int = 40
    max_gpu_losses: int = 20
    gpu_lost_seconds: float = 15.0
    checkpoint_every: float = 3.0
    orphan_grace: float = 8.0  # a running container may be unowned this long (a stop on its way)
    lost_grace: float = 3.0  # a spawn that chose a GPU just before it was lost creates its container late
    closed_grace: float = 10.0  # a record may close this long before its container dies (stop on its way)
    end_tolerance: float = 1.0  # seconds a record's end may be from its container's die event
    settle_timeout: float = 120.0
    # A record the hub lost track of (its server's spawn cut short by a SIGKILL, its container
    # killed right after the restart) is closed by the hub's next reconciliation: within
    # GPUSpawner.reconcile_interval (60 s), so the final check waits that long, and a little more.
    records_close_within: float = 75.0


# --- What happened ------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One spawn request as a user (or the chaos actor) sent it, and what came back."""

    kind: str  # "spawn", "bad-options", "interrupt", "before-hub-kill"
    user: str
    server: str
    options: dict[str, Any]
    sent_ns: int
    answered_ns: int = 0
    outcome: str = ""  # "201", "503 no GPU", "400", "503 proxy", "error ConnectionError", …
    message: str = ""
    delete_outcome: str = ""  # interrupts: what the DELETE got
    delete_sent_ns: int = 0

    @property
    def caught_pending(self) -> bool:
        """An interrupt whose DELETE went out before the spawn request was answered."""
        return self.kind == "interrupt" and 0 < self.delete_sent_ns < self.answered_ns

    @property
    def accepted(self) -> bool:
        return self.outcome in ("201", "202")


@dataclass
class ChaosEvent:
    kind: str  # "container-kill", "gpu-lost", "gpu-back", "hub-kill", "hub-restarted"
    at_ns: int
    detail: str


@dataclass(frozen=True)
class Violation:
    """Something the hub must never do, with what a developer needs to find it."""

    kind: str
    at_ns: int
    message: str
    containers: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    uuids: tuple[str, ...] = ()
    key: tuple[Any, ...] = ()  # the same finding at two checkpoints is one violation


@dataclass
class ContainerLife:
    """One container of the hub as the engine's event log tells it."""

    id: str
    user: str
    server: str
    name: str
    devices: tuple[str, ...]  # the DeviceIDs of its GPU DeviceRequests (its labels if it was gone)
    devices_from: str  # "DeviceRequests" or "labels"
    label_devices: tuple[str, ...]
    created_ns: int
    runs: list[list[int]] = field(default_factory=list)  # [start, die]; die FOREVER while running
    destroyed_ns: int | None = None
    dies: list[int] = field(default_factory=list)  # every die event of the container (timeNano)

    @property
    def who(self) -> str:
        return f"{self.user}/{self.server}"

    @property
    def running(self) -> bool:
        return bool(self.runs) and self.runs[-1][1] == FOREVER

    def last_end(self) -> int | None:
        return self.runs[-1][1] if self.runs else None


@dataclass(frozen=True)
class LostWindow:
    """A whole GPU the simulated NVML answered GPU_IS_LOST for, from `lost_ns` to `back_ns`."""

    uuid: str
    lost_ns: int
    back_ns: int = FOREVER


# --- Time -----------------------------------------------------------------------------------------


def clock(t0_ns: int) -> Callable[[int | None], str]:
    """A formatter of engine/wall times (ns): wall clock UTC and seconds since the soak began."""

    def fmt(t: int | None) -> str:
        if t is None or t >= FOREVER:
            return "still running"
        wall = datetime.datetime.fromtimestamp(t / NS, tz=datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
        return f"{wall} (+{(t - t0_ns) / NS:.1f} s)"

    return fmt


def iso_to_ns(text: str) -> int:
    return int(datetime.datetime.fromisoformat(text).timestamp() * NS)


# --- Checks over the event log (pure) -------------------------------------------------------------


def device_overlaps(lives: Iterable[ContainerLife], *, t0_ns: int, now_ns: int) -> list[Violation]:
    """Every pair of containers that ran at the same moment with a device in common (the log read at now_ns)."""
    fmt = clock(t0_ns)
    holdings: dict[str, list[tuple[int, int, ContainerLife, str]]] = collections.defaultdict(list)
    for life in lives:
        for start, end in life.runs:
            for device in life.devices:
                for key in conflict_keys(device):
                    holdings[key].append((start, end, life, device))
    found: dict[tuple[Any, ...], Violation] = {}
    for key, spans in holdings.items():
        spans.sort(key=lambda s: s[0])
        for i, (s1, e1, a, da) in enumerate(spans):
            for s2, e2, b, db in spans[i + 1 :]:
                if s2 >= e1:
                    break
                if a.id == b.id:
                    continue
                vkey = ("two-containers-one-device", key, *sorted((a.id, b.id)))
                found.setdefault(vkey, Violation(
                    kind="two-containers-one-device", at_ns=s2, key=vkey,
                    message=(
                        f"{key} ran in two containers at once for {(min(e1, e2, now_ns) - s2) / NS:.1f} s"
                        + (" so far" if min(e1, e2) > now_ns else "") + ": "
                        f"{a.id[:12]} of {a.who} (devices {','.join(a.devices)}; started {fmt(s1)}, died {fmt(e1)}) "
                        f"and {b.id[:12]} of {b.who} (devices {','.join(b.devices)}; started {fmt(s2)}, died {fmt(e2)})"
                    ),
                    containers=(a.id, b.id), users=(a.who, b.who), uuids=tuple(sorted({da, db})),
                ))
    return list(found.values())


def unusable_handouts(
    lives: Iterable[ContainerLife], *, busy: Iterable[str], lost: Iterable[LostWindow], grace_ns: int, t0_ns: int
) -> list[Violation]:
    """Containers started with a GPU busy outside the hub, or created while their GPU was lost.

    A spawn that chose a GPU a moment before it was lost creates its container a moment after,
    through no fault of its own: `grace_ns` after the loss, it must have seen it.
    """
    fmt = clock(t0_ns)
    busy = set(busy)
    lost = list(lost)
    found = []
    for life in lives:
        if not life.runs:
            continue
        for device in life.devices:
            if device in busy:
                found.append(Violation(
                    kind="busy-gpu-handed-out", at_ns=life.runs[0][0], key=("busy", life.id, device),
                    message=f"{device} is busy outside the hub, yet container {life.id[:12]} of {life.who} "
                            f"started with it at {fmt(life.runs[0][0])}",
                    containers=(life.id,), users=(life.who,), uuids=(device,),
                ))
            for w in lost:
                if w.uuid == device and w.lost_ns + grace_ns <= life.created_ns < w.back_ns:
                    found.append(Violation(
                        kind="lost-gpu-handed-out", at_ns=life.created_ns, key=("lost", life.id, device),
                        message=f"{device} was lost from {fmt(w.lost_ns)} to {fmt(w.back_ns)}, yet container "
                                f"{life.id[:12]} of {life.who} was created with it at {fmt(life.created_ns)}",
                        containers=(life.id,), users=(life.who,), uuids=(device,),
                    ))
    return found


def orphans(
    running: Iterable[Mapping[str, Any]], servers: Mapping[tuple[str, str], Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """Running containers (the engine's list) that no server of the hub (REST models) owns.

    A server owns the container its state names; a server still spawning also owns one with its
    labels, which it may not have put into its state yet.
    """
    owned = {str((m.get("state") or {}).get("object_id") or "") for m in servers.values()}
    spawning = {k for k, m in servers.items() if m.get("pending") == "spawn"}
    return [
        c for c in running
        if c["Id"] not in owned
        and (c["Labels"].get("gpuspawner.user", ""), c["Labels"].get("gpuspawner.server", "")) not in spawning
    ]


def max_concurrency(lives: Iterable[ContainerLife], *, end_ns: int) -> tuple[int, int]:
    """The most containers, and the most containers with GPUs, running at one moment."""
    events: list[tuple[int, int, int]] = []
    for life in lives:
        gpu = 1 if life.devices else 0
        for start, end in life.runs:
            events.append((start, 1, gpu))
            events.append((min(end, end_ns), -1, -gpu))
    most = most_gpu = now = now_gpu = 0
    for _, step, gpu_step in sorted(events, key=lambda e: (e[0], e[1])):  # ends before starts at a tie
        now += step
        now_gpu += gpu_step
        most, most_gpu = max(most, now), max(most_gpu, now_gpu)
    return most, most_gpu


def record_checks(
    records: Iterable[Any], lives: Mapping[str, ContainerLife], attempts: Iterable[Attempt], *,
    closed_grace_ns: int, t0_ns: int,
) -> list[Violation]:
    """Audit records against the engine's event log and the spawns the hub accepted.

    Every record is closed; a record's devices are the ones its container got; a record is not
    closed while its container runs on; every container that ran is named by a record; every
    accepted spawn has a record; a spawn with bad options never got a container.
    """
    fmt = clock(t0_ns)
    records = list(records)
    found = []
    named = set()
    for r in records:
        who = f"{r.user}/{r.server}"
        if not r.sealed:
            life = lives.get(r.container_id or "")
            found.append(Violation(
                kind="open-record", at_ns=iso_to_ns(r.requested_at), key=("open", r.id),
                message=f"audit record {r.id} of {who} (requested {fmt(iso_to_ns(r.requested_at))}) is still "
                        f"{r.outcome!r} after every server stopped; its container "
                        f"{(r.container_id or 'none')[:12]} "
                        + (f"died {fmt(life.last_end())}" if life else "was never seen by the engine"),
                containers=tuple(filter(None, [r.container_id])), users=(who,),
                uuids=tuple(d.uuid for d in r.devices),
            ))
        if not r.container_id:
            continue
        named.add(r.container_id)
        life = lives.get(r.container_id)
        if life is None:
            found.append(Violation(
                kind="record-names-unknown-container", at_ns=iso_to_ns(r.requested_at), key=("unknown", r.id),
                message=f"audit record {r.id} of {who} names container {r.container_id[:12]}, "
                        "which the engine's event log never showed being created",
                containers=(r.container_id,), users=(who,),
            ))
            continue
        recorded = tuple(sorted(d.uuid for d in r.devices))
        if recorded != tuple(sorted(life.devices)):
            found.append(Violation(
                kind="record-devices-differ", at_ns=life.created_ns, key=("devices", r.id),
                message=f"audit record {r.id} of {who} says devices {list(recorded)}, but its container "
                        f"{life.id[:12]} got {list(life.devices)} from the engine ({life.devices_from})",
                containers=(life.id,), users=(who,), uuids=tuple(sorted(set(recorded) | set(life.devices))),
            ))
        end = life.last_end()
        if r.sealed and r.stopped_at and end is not None and end > iso_to_ns(r.stopped_at) + closed_grace_ns:
            found.append(Violation(
                kind="record-closed-while-running", at_ns=iso_to_ns(r.stopped_at), key=("closed", r.id),
                message=f"audit record {r.id} of {who} closed as {r.outcome!r} at {fmt(iso_to_ns(r.stopped_at))}, "
                        f"but its container {life.id[:12]} ran on until {fmt(end)}",
                containers=(life.id,), users=(who,), uuids=life.devices,
            ))
    for life in lives.values():
        if life.runs and life.id not in named:
            found.append(Violation(
                kind="container-without-record", at_ns=life.runs[0][0], key=("unrecorded", life.id),
                message=f"container {life.id[:12]} of {life.who} ran from {fmt(life.runs[0][0])} to "
                        f"{fmt(life.last_end())} with devices {list(life.devices)}, and no audit record names it",
                containers=(life.id,), users=(life.who,), uuids=life.devices,
            ))
    by_server: dict[tuple[str, str], list[Any]] = collections.defaultdict(list)
    for r in records:
        by_server[(r.user, r.server)].append(r)
    # The hub stamps requested_at between our request and its answer (one clock); the next request
    # for the same server is sent only after the answer, so nothing later can belong to this one.
    skew = NS // 20
    for a in attempts:
        if not (a.accepted or a.kind == "bad-options"):
            continue
        mine = [r for r in by_server[(a.user, a.server)]
                if a.sent_ns - skew <= iso_to_ns(r.requested_at) <= a.answered_ns]
        if a.accepted and not mine and not still_open_at(by_server[(a.user, a.server)], a.sent_ns):
            found.append(Violation(
                kind="accepted-spawn-without-record", at_ns=a.sent_ns, key=("norecord", a.user, a.server, a.sent_ns),
                message=f"the hub answered {a.outcome} to {a.user}/{a.server}'s spawn ({a.kind}, {a.options}) "
                        f"sent {fmt(a.sent_ns)}, yet no audit record was requested then",
                users=(f"{a.user}/{a.server}",),
            ))
        if a.kind == "bad-options":
            for r in mine:
                if r.container_id:
                    found.append(Violation(
                        kind="bad-options-started", at_ns=a.sent_ns, key=("bad", r.id),
                        message=f"{a.user}/{a.server} sent bad options {a.options} at {fmt(a.sent_ns)} "
                                f"(answer {a.outcome}) and got container {r.container_id[:12]} (record {r.id})",
                        containers=(r.container_id,), users=(f"{a.user}/{a.server}",),
                    ))
    return found


def still_open_at(records: Iterable[Any], t_ns: int) -> bool:
    """Whether a spawn requested earlier was still going at t_ns (the hub answers 202 to a spawn
    request for a server that is starting already, and starts nothing new)."""
    return any(
        iso_to_ns(r.requested_at) < t_ns and (not r.stopped_at or iso_to_ns(r.stopped_at) > t_ns) for r in records
    )


def record_overlaps(records: Iterable[Any], *, t0_ns: int) -> tuple[list[Violation], int]:
    """Pairs of audit records that held one exclusive device (a whole GPU, a MIG slice, or the GPU a
    MIG slice is cut from) over the same time, each record from its ``started_at`` to its
    ``stopped_at`` (still open: for ever); and how many records held a device from a start. A record
    that never noted its start counted no GPU time, and is left out."""
    fmt = clock(t0_ns)
    holdings: dict[str, list[tuple[int, int, Any, str]]] = collections.defaultdict(list)
    held = 0
    for r in records:
        if not r.started_at or not r.devices:
            continue
        held += 1
        start, end = iso_to_ns(r.started_at), iso_to_ns(r.stopped_at) if r.stopped_at else FOREVER
        for device in {d.uuid for d in r.devices}:
            for key in conflict_keys(device):
                holdings[key].append((start, end, r, device))
    found: dict[tuple[Any, ...], Violation] = {}
    for key, spans in holdings.items():
        spans.sort(key=lambda s: s[0])
        for i, (s1, e1, a, da) in enumerate(spans):
            for s2, e2, b, db in spans[i + 1:]:
                if s2 >= e1:
                    break
                vkey = ("two-records-one-device", key, *sorted((a.id, b.id)))
                found.setdefault(vkey, Violation(
                    kind="two-records-one-device", at_ns=s2, key=vkey,
                    message=(
                        f"{key} is in two audit records over the same {(min(e1, e2) - s2) / NS:.3f} s: "
                        f"{a.id} of {a.user}/{a.server} ({a.outcome}, container {(a.container_id or 'none')[:12]}; "
                        f"{fmt(s1)} to {fmt(e1)}) and {b.id} of {b.user}/{b.server} ({b.outcome}, container "
                        f"{(b.container_id or 'none')[:12]}; {fmt(s2)} to {fmt(e2)})"
                    ),
                    containers=tuple(c for c in (a.container_id, b.container_id) if c),
                    users=(f"{a.user}/{a.server}", f"{b.user}/{b.server}"), uuids=tuple(sorted({da, db})),
                ))
    return list(found.values()), held


def record_ends_off_die(
    records: Iterable[Any], lives: Mapping[str, ContainerLife], *, tolerance_ns: int, t0_ns: int
) -> tuple[list[Violation], list[int]]:
    """Sealed records whose end is further than `tolerance_ns` from the engine's die event of their
    container (the nearest one: a kept container may run again), and the gap of every record whose
    container died. A record whose container never ran, or whose death the log never showed, is
    left to the other checks."""
    fmt = clock(t0_ns)
    found, gaps = [], []
    for r in records:
        life = lives.get(r.container_id or "")
        if not (r.sealed and r.stopped_at and life is not None and life.dies):
            continue
        stopped = iso_to_ns(r.stopped_at)
        died = min(life.dies, key=lambda t: abs(t - stopped))
        gaps.append(abs(stopped - died))
        if abs(stopped - died) > tolerance_ns:
            found.append(Violation(
                kind="record-end-not-at-die", at_ns=died, key=("end", r.id),
                message=f"audit record {r.id} of {r.user}/{r.server} ({r.outcome}) stopped at {fmt(stopped)}, "
                        f"{(stopped - died) / NS:+.3f} s from the die event of its container {life.id[:12]} "
                        f"at {fmt(died)}",
                containers=(life.id,), users=(f"{r.user}/{r.server}",), uuids=tuple(d.uuid for d in r.devices),
            ))
    return found, gaps


# --- The engine observer --------------------------------------------------------------------------


def requested_devices(info: Mapping[str, Any]) -> tuple[str, ...]:
    """The GPU DeviceIDs of an inspected container's DeviceRequests (CDI names by their UUID)."""
    found: list[str] = []
    for request in (info.get("HostConfig") or {}).get("DeviceRequests") or ():
        for device in request.get("DeviceIDs") or ():
            found.append(device.split("=", 1)[1] if device.startswith("nvidia.com/gpu=") else device)
    return tuple(found)


def label_devices(labels: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(u for u in labels.get("gpuspawner.devices", "").split(",") if u)


class EngineObserver:
    """Reads the engine's container events for one hub, from construction until stop()."""

    def __init__(self, bed: DockerBed, hub_id: str, *, events_file: Path | None = None) -> None:
        self.bed = bed
        # Every raw event, one JSON line each: what a developer replays to see what the engine saw.
        self._events_file = open(events_file, "a") if events_file else None
        self.lives: dict[str, ContainerLife] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        # Opened here, before any spawn: everything from now on comes through this stream.
        self._stream = bed.api.events(decode=True, filters={"type": "container", "label": f"gpuspawner.hub={hub_id}"})
        self._thread = threading.Thread(target=self._read, name="soak-observer", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                if self._events_file:
                    self._events_file.write(json.dumps(event) + "\n")
                self._handle(event)
        except Exception as e:  # the stream closed under us at stop(), or the engine went away
            if not self._stopping:
                self.errors.append(f"event stream ended: {type(e).__name__}: {e}")

    _stopping = False

    def _handle(self, event: Mapping[str, Any]) -> None:
        action = str(event.get("Action") or event.get("status") or "")
        cid = str((event.get("Actor") or {}).get("ID") or event.get("id") or "")
        t = int(event.get("timeNano") or int(event.get("time", 0)) * NS)
        attributes = (event.get("Actor") or {}).get("Attributes") or {}
        if action == "create" or (action == "start" and cid not in self.lives):
            self._created(cid, t, attributes)
        with self._lock:
            life = self.lives.get(cid)
            if life is None:
                return
            if action == "start":
                life.runs.append([t, FOREVER])
            elif action in ("die", "destroy") and life.running:
                life.runs[-1][1] = t
            if action == "die":
                life.dies.append(t)
            if action == "destroy":
                life.destroyed_ns = t

    def _created(self, cid: str, t: int, attributes: Mapping[str, str]) -> None:
        labelled = label_devices(attributes)
        try:
            devices, source = requested_devices(self.bed.api.inspect_container(cid)), "DeviceRequests"
        except docker.errors.NotFound:  # removed before we looked: its labels name what it was given
            devices, source = labelled, "labels"
        life = ContainerLife(
            id=cid, user=attributes.get("gpuspawner.user", "?"), server=attributes.get("gpuspawner.server", ""),
            name=attributes.get("name", ""), devices=devices, devices_from=source, label_devices=labelled,
            created_ns=t,
        )
        with self._lock:
            self.lives.setdefault(cid, life)

    def snapshot(self) -> dict[str, ContainerLife]:
        """A copy of the log so far (runs copied, so the reader sees one moment)."""
        with self._lock:
            return {
                cid: ContainerLife(**{**life.__dict__, "runs": [list(r) for r in life.runs], "dies": list(life.dies)})
                for cid, life in self.lives.items()
            }

    def stop(self) -> None:
        self._stopping = True
        self._stream.close()
        self._thread.join(timeout=10)
        if self._events_file:
            self._events_file.close()


# --- Talking to the hub ------------------------------------------------------------------------------


class HubClient:
    """The hub's REST API with the service token, one HTTP session per thread."""

    def __init__(self, hub: RunningHub) -> None:
        self.hub = hub
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            s = requests.Session()
            s.headers["Authorization"] = f"token {self.hub.settings.token}"
            self._local.session = s
        return self._local.session  # type: ignore[no-any-return]

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return self.session.request(method, f"{self.hub.api_url}{path}", **kwargs)

    @staticmethod
    def server_path(user: str, server: str) -> str:
        return f"/users/{user}/server" if not server else f"/users/{user}/servers/{server}"

    def servers(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(user, server) -> REST model of every active server; raises if the hub does not answer."""
        r = self.request("GET", "/users", params={"limit": 1000})
        r.raise_for_status()
        return {(u["name"], name): model for u in r.json() for name, model in (u.get("servers") or {}).items()}

    def server(self, user: str, server: str) -> dict[str, Any] | None:
        r = self.request("GET", f"/users/{user}")
        r.raise_for_status()
        found: dict[str, Any] | None = (r.json().get("servers") or {}).get(server)
        return found


def outcome_of(call: Callable[[], requests.Response]) -> tuple[str, str]:
    """(outcome, message) of one request: its status, the hub's 503 told from the proxy's, or the error."""
    try:
        r = call()
    except requests.RequestException as e:
        return f"error {type(e).__name__}", str(e)[:200]
    try:
        message = str(r.json().get("message", ""))
    except ValueError:
        message = r.text[:200]
        if r.status_code == 503:  # configurable-http-proxy while the hub is down: not the hub's answer
            return "503 proxy", message
    if r.status_code == 503 and message.startswith("No free GPU"):
        return "503 no GPU", message
    return str(r.status_code), message


# --- The run -------------------------------------------------------------------------------------------


@dataclass
class SoakReport:
    plan: SoakPlan
    hub_id: str
    t0_ns: int
    traffic_s: float = 0.0
    wall_s: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
    stops: collections.Counter[str] = field(default_factory=collections.Counter)
    chaos: list[ChaosEvent] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    containers: int = 0
    max_containers: int = 0
    max_gpu_containers: int = 0
    record_outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    operations: int = 0
    device_records: int = 0  # records that held an exclusive device, checked for overlaps
    end_gaps_ns: list[int] = field(default_factory=list)  # |record's end - its container's die event|

    @property
    def ok(self) -> bool:
        return not self.violations

    def count(self, kind: str) -> int:
        return sum(1 for e in self.chaos if e.kind == kind)

    def summary(self) -> str:
        """The run as a table: what was done, what the engine saw, and every violation in full."""
        fmt = clock(self.t0_ns)
        by = collections.Counter((a.kind, a.outcome) for a in self.attempts)
        lines = [
            f"soak of hub {self.hub_id}: seed {self.plan.seed}, {self.traffic_s:.0f} s of traffic "
            f"({self.operations} user operations, {self.plan.actors} actors, {self.plan.users} users), "
            f"{self.wall_s:.0f} s in all",
            "",
            "| what | count |",
            "| --- | --- |",
        ]
        rows: list[tuple[str, int | str]] = [(f"spawn requests: {kind} → {outcome}", n) for (kind, outcome), n in sorted(by.items())]
        rows += [
            ("spawns accepted (201/202)", sum(a.accepted for a in self.attempts)),
            ("interrupted spawns (DELETE sent before the spawn request was answered)",
             sum(a.caught_pending for a in self.attempts)),
        ]
        rows += [(f"DELETE: {what}", n) for what, n in sorted(self.stops.items())]
        rows += [
            ("containers killed behind the hub's back", self.count("container-kill")),
            ("hub SIGKILLs (each followed by a restart)", self.count("hub-kill")),
            ("GPU losses (each brought back)", self.count("gpu-lost")),
            ("containers the engine created", self.containers),
            ("most containers running at once", self.max_containers),
            ("most GPU containers running at once", self.max_gpu_containers),
        ]
        rows += [(f"audit records: {outcome}", n) for outcome, n in sorted(self.record_outcomes.items())]
        rows += [
            ("records of exclusive devices checked for overlaps", self.device_records),
            ("records whose end was checked against their container's die event", len(self.end_gaps_ns)),
            ("largest gap between a record's end and its container's die event (s)",
             f"{max(self.end_gaps_ns, default=0) / NS:.3f}"),
        ]
        kinds = collections.Counter(v.kind for v in self.violations)
        rows += [(f"VIOLATIONS: {kind}", n) for kind, n in sorted(kinds.items())]
        rows.append(("violations", len(self.violations)))
        lines += [f"| {what} | {n} |" for what, n in rows]
        if self.violations:
            lines += ["", "Violations, in time order:"]
            for v in sorted(self.violations, key=lambda v: v.at_ns):
                lines.append(f"- [{v.kind}] {fmt(v.at_ns)}: {v.message}")
                if v.containers:
                    lines.append(f"    containers: {' '.join(v.containers)}")
        if self.notes:
            lines += ["", "Notes:"] + [f"- {n}" for n in self.notes]
        lines += ["", "Chaos, in time order:"] + [f"- {fmt(e.at_ns)} {e.kind}: {e.detail}" for e in self.chaos]
        return "\n".join(lines)


class Soak:
    """One soak of one hub; run() drives it and returns the report. See the module docstring."""

    def __init__(
        self, *, hub: RunningHub, bed: DockerBed, spec: Path, plan: SoakPlan, log: Callable[[str], None] = print
    ) -> None:
        self.hub, self.bed, self.spec, self.plan, self.log = hub, bed, spec, plan, log
        self.hub_id = hub.settings.hub_id
        self.client = HubClient(hub)
        self.report = SoakReport(plan=plan, hub_id=self.hub_id, t0_ns=time.time_ns())
        self.fmt = clock(self.report.t0_ns)
        self._lock = threading.Lock()
        self._violations: dict[tuple[Any, ...], Violation] = {}
        self._stop = threading.Event()
        self._hub_up = threading.Event()
        self._hub_up.set()
        self._free_slots = [(f"soak{u}", s) for u in range(plan.users) for s in plan.servers]
        self._lost: dict[int, LostWindow] = {}  # GPU index -> its open loss
        self._lost_windows: list[LostWindow] = []
        self._unowned_since: dict[str, int] = {}
        self.observer: EngineObserver | None = None

    # -- bookkeeping shared by the threads

    def _note_violations(self, found: Iterable[Violation], *, during: bool) -> None:
        """Note findings once each; a finding of the final checks replaces the same one seen during
        the run, since it knows how it ended (when both containers died)."""
        with self._lock:
            for v in found:
                if during and v.key not in self._violations:
                    self.log(f"violation during the run: [{v.kind}] {v.message}")
                if not during or v.key not in self._violations:
                    self._violations[v.key] = v

    def _chaos(self, kind: str, detail: str) -> None:
        event = ChaosEvent(kind=kind, at_ns=time.time_ns(), detail=detail)
        with self._lock:
            self.report.chaos.append(event)
        self.log(f"{self.fmt(event.at_ns)} {kind}: {detail}")

    def _take_operation(self) -> bool:
        with self._lock:
            if self.report.operations >= self.plan.max_operations:
                return False
            self.report.operations += 1
            return True

    @contextmanager
    def _slot(self, rng: random.Random) -> Iterator[tuple[str, str] | None]:
        """A (user, server) no other actor is using, held for one operation."""
        with self._lock:
            slot = self._free_slots.pop(rng.randrange(len(self._free_slots))) if self._free_slots else None
        try:
            yield slot
        finally:
            if slot is not None:
                with self._lock:
                    self._free_slots.append(slot)

    # -- user actions

    def _spawn(self, kind: str, user: str, server: str, options: dict[str, Any], timeout: float = 60) -> Attempt:
        attempt = Attempt(kind=kind, user=user, server=server, options=options, sent_ns=time.time_ns())
        path = HubClient.server_path(user, server)
        attempt.outcome, attempt.message = outcome_of(lambda: self.client.request("POST", path, json=options, timeout=timeout))
        attempt.answered_ns = time.time_ns()
        with self._lock:
            self.report.attempts.append(attempt)
        return attempt

    def _delete(self, user: str, server: str, *, why: str) -> str:
        outcome, _ = outcome_of(lambda: self.client.request("DELETE", HubClient.server_path(user, server)))
        with self._lock:
            self.report.stops[f"{why} → {outcome}"] += 1
        return outcome

    def _interrupted_spawn(self, rng: random.Random, user: str, server: str, options: dict[str, Any]) -> None:
        """Spawn, and DELETE the server a moment later, while it is (most likely) still starting.

        Half the time the impatient user asks for another server with the same profile as they
        cancel: that spawn wants the very devices the interrupted one is letting go of.
        """
        holder: list[Attempt] = []
        post = threading.Thread(target=lambda: holder.append(self._spawn("interrupt", user, server, options)))
        post.start()
        time.sleep(rng.uniform(0.02, 0.5))  # a light spawn takes 0.2 to 0.7 s here
        with self._slot(rng) if rng.random() < self.plan.respawn_share else nullcontext() as other:
            again = threading.Thread(target=self._spawn, args=("after-interrupt", *other, options)) if other else None
            delete_sent_ns = time.time_ns()
            if again:
                again.start()
            outcome = self._delete(user, server, why="interrupt")
            post.join(timeout=90)
            if again:
                again.join(timeout=90)
        if holder:
            holder[0].delete_outcome, holder[0].delete_sent_ns = outcome, delete_sent_ns

    def _user_operation(self, rng: random.Random) -> None:
        with self._slot(rng) as slot:
            if slot is None:
                return
            user, server = slot
            try:
                model = self.client.server(user, server)
            except requests.RequestException:
                return  # the hub is down or busy; try again later
            if model is not None:
                if model.get("ready") and rng.random() < self.plan.stop_share:
                    self._delete(user, server, why="stop")
                return
            roll = rng.random()
            if roll < self.plan.bad_share:
                self._spawn("bad-options", user, server, dict(rng.choice(BAD_OPTIONS)))
                return
            slug = rng.choices(list(PROFILE_WEIGHTS), weights=list(PROFILE_WEIGHTS.values()))[0]
            if roll < self.plan.bad_share + self.plan.interrupt_share:
                self._interrupted_spawn(rng, user, server, {"profile": slug})
            else:
                self._spawn("spawn", user, server, {"profile": slug})

    def _user_actor(self, number: int) -> None:
        rng = random.Random(self.plan.seed * 1000 + number)
        while not self._stop.is_set():
            if not self._hub_up.wait(timeout=0.5):
                continue
            if not self._take_operation():
                return
            try:
                self._user_operation(rng)
            except Exception as e:  # an actor reports and goes on: the soak must outlive the hub's failures
                self.log(f"actor {number}: {type(e).__name__}: {e}")
            self._stop.wait(rng.uniform(*self.plan.think))

    # -- chaos

    def _kill_a_container(self, rng: random.Random) -> None:
        running = self._running_containers()
        if not running:
            self._chaos("container-kill-skipped", "no container running")
            return
        victim = rng.choice(running)
        labels = victim["Labels"]
        try:
            self.bed.api.kill(victim["Id"])
        except docker.errors.APIError as e:  # it stopped by itself a moment ago
            self._chaos("container-kill-skipped", f"{victim['Id'][:12]}: {getattr(e, 'explanation', None) or e}")
            return
        self._chaos("container-kill", f"{victim['Id'][:12]} of {labels.get('gpuspawner.user')}/"
                                      f"{labels.get('gpuspawner.server')} (devices {labels.get('gpuspawner.devices') or 'none'})")

    def _lose_a_gpu(self, rng: random.Random) -> None:
        with self._lock:
            candidates = [g for g in WHOLE_GPUS if g not in self._lost]
            gpu = rng.choice(candidates)
            # The window opens before the file changes: a container created after it is measured from here.
            window = LostWindow(uuid=uuid_of(gpu), lost_ns=time.time_ns())
            self._lost[gpu] = window
            write_gpus(self.spec, lost=self._lost)
        self._chaos("gpu-lost", f"GPU {gpu} {window.uuid} for {self.plan.gpu_lost_seconds:.0f} s")

    def _bring_back_gpus(self, *, all_of_them: bool = False) -> None:
        now = time.time_ns()
        with self._lock:
            due = [g for g, w in self._lost.items()
                   if all_of_them or now - w.lost_ns >= self.plan.gpu_lost_seconds * NS]
            for gpu in due:
                window = self._lost.pop(gpu)
                write_gpus(self.spec, lost=self._lost)
                # Closed after the file changed: a container created before then may still be wrong.
                self._lost_windows.append(LostWindow(uuid=window.uuid, lost_ns=window.lost_ns, back_ns=time.time_ns()))
        for gpu in due:
            self._chaos("gpu-back", f"GPU {gpu} {uuid_of(gpu)}")

    def _kill_the_hub(self, rng: random.Random) -> None:
        """A few spawn requests, then SIGKILL while they are on their way; then start the hub again."""
        with self._lock:
            count = min(3, len(self._free_slots))
            slots = [self._free_slots.pop(rng.randrange(len(self._free_slots))) for _ in range(count)]
        posts = [
            threading.Thread(
                target=self._spawn, args=("before-hub-kill", user, server, {"profile": rng.choice(["gpu-1", "gpu-2", "mig"])}),
            )
            for user, server in slots
        ]
        try:
            for post in posts:
                post.start()
            time.sleep(rng.uniform(0.1, 0.8))
            self._hub_up.clear()
            self.hub.kill()
            self._chaos("hub-kill", f"SIGKILL with spawns of {', '.join(f'{u}/{s}' for u, s in slots)} in flight")
            for post in posts:
                post.join(timeout=60)
            time.sleep(rng.uniform(0.5, 2.0))  # the containers of the killed spawns go on meanwhile
            self.hub.start(timeout=120)
            self._chaos("hub-restarted", "answers again")
        finally:
            self._hub_up.set()
            with self._lock:
                self._free_slots.extend(slots)

    def _chaos_actor(self) -> None:
        rng = random.Random(self.plan.seed * 1000 + 999)
        plan = self.plan
        # A fixed rotation, so even a short run has each kind of mishap; timing is random.
        rotation = ["container-kill", "gpu-lost", "hub-kill", "container-kill", "gpu-lost"]
        budget = {"container-kill": plan.max_container_kills, "gpu-lost": plan.max_gpu_losses, "hub-kill": plan.max_hub_kills}
        turn = 0
        next_at = time.monotonic() + plan.warmup
        while not self._stop.wait(0.25):
            self._bring_back_gpus()
            if time.monotonic() < next_at:
                continue
            kind = rotation[turn % len(rotation)]
            turn += 1
            next_at = time.monotonic() + rng.uniform(0.5, 1.5) * plan.chaos_every
            if budget[kind] <= 0 or (kind == "gpu-lost" and len(self._lost) >= len(WHOLE_GPUS) - 1):
                continue
            budget[kind] -= 1
            try:
                {"container-kill": self._kill_a_container, "gpu-lost": self._lose_a_gpu, "hub-kill": self._kill_the_hub}[kind](rng)
            except Exception as e:
                self.log(f"chaos {kind}: {type(e).__name__}: {e}")
                if kind == "hub-kill":
                    self._note_violations([Violation(
                        kind="hub-did-not-restart", at_ns=time.time_ns(), key=("restart", time.time_ns()),
                        message=f"the hub did not start again after a SIGKILL: {e}",
                    )], during=True)
                    self._stop.set()  # nothing more to learn from a hub that is gone

    # -- checks during the run

    def _orphan_check(self, *, grace_ns: int, final: bool = False) -> list[Violation]:
        """Running containers no server owns, for longer than grace_ns (at once, if final)."""
        before = self._running_containers()
        servers = self.client.servers()
        after = {c["Id"] for c in self._running_containers()}
        # Unowned in both looks, with the hub's view in between: a spawn or stop between them is no orphan.
        unowned = [c for c in orphans(before, servers) if c["Id"] in after]
        now = time.time_ns()
        found = []
        for c in unowned:
            since = self._unowned_since.setdefault(c["Id"], now)
            if final or now - since >= grace_ns:
                labels = c["Labels"]
                who = f"{labels.get('gpuspawner.user')}/{labels.get('gpuspawner.server')}"
                devices = label_devices(labels)
                found.append(Violation(
                    kind="orphan-container", at_ns=since, key=("orphan", c["Id"]),
                    message=f"container {c['Id'][:12]} ({c['Names'][0].lstrip('/')}) of {who}, devices "
                            f"{list(devices) or 'none'}, running with no server of the hub owning it since "
                            f"{self.fmt(since)}" + (" and still after every server was stopped" if final else ""),
                    containers=(c["Id"],), users=(who,), uuids=devices,
                ))
        self._unowned_since = {c: t for c, t in self._unowned_since.items() if c in {x["Id"] for x in unowned}}
        return found

    def _running_containers(self) -> list[dict[str, Any]]:
        return list(self.bed.api.containers(filters={"label": f"gpuspawner.hub={self.hub_id}", "status": "running"}))

    def _checker(self) -> None:
        assert self.observer is not None
        while not self._stop.wait(self.plan.checkpoint_every):
            lives = self.observer.snapshot().values()
            self._note_violations(device_overlaps(lives, t0_ns=self.report.t0_ns, now_ns=time.time_ns()), during=True)
            if self._hub_up.is_set():
                try:
                    self._note_violations(self._orphan_check(grace_ns=int(self.plan.orphan_grace * NS)), during=True)
                except requests.RequestException:
                    pass  # the hub is restarting; the next checkpoint looks again

    # -- the whole run

    def run(self) -> SoakReport:
        start = time.monotonic()
        # Before the first spawn; the raw events go beside the hub's log.
        self.observer = EngineObserver(self.bed, self.hub_id, events_file=self.events_file)
        try:
            self._create_users()
            self._traffic(deadline=start + self.plan.duration)
            self.report.traffic_s = time.monotonic() - start
            self.log(f"traffic over after {self.report.traffic_s:.0f} s; stopping every server")
            self._bring_back_gpus(all_of_them=True)
            try:
                self._settle()
            except Exception as e:  # still check what the engine and the audit records say
                self._note_violations([Violation(
                    kind="could-not-stop-servers", at_ns=time.time_ns(), key=("settle",),
                    message=f"stopping every server through the hub after the run failed: {type(e).__name__}: {e}",
                )], during=False)
        finally:
            self._stop.set()
            self.observer.stop()
        self._final_checks()
        self.report.wall_s = time.monotonic() - start
        return self.report

    def _create_users(self) -> None:
        for user in sorted({u for u, _ in self._free_slots}):
            r = self.client.request("POST", f"/users/{user}")
            if r.status_code not in (201, 409):  # 409: it exists already
                r.raise_for_status()

    def _traffic(self, *, deadline: float) -> None:
        """The actors and the checker, until the deadline or the last operation; all joined on return."""
        actors = [threading.Thread(target=self._user_actor, args=(i,), name=f"soak-user-{i}") for i in range(self.plan.actors)]
        others = [threading.Thread(target=self._chaos_actor, name="soak-chaos"),
                  threading.Thread(target=self._checker, name="soak-checker")]
        for t in [*actors, *others]:
            t.start()
        try:
            while time.monotonic() < deadline and not self._stop.is_set() and any(t.is_alive() for t in actors):
                time.sleep(0.5)
        finally:
            self._stop.set()
            for t in [*actors, *others]:
                t.join(timeout=180)  # a spawn request times out after 60 s, a hub restart after 120 s

    def _settle(self) -> None:
        """Stop every server through the hub and wait until the hub and the engine say so."""
        deadline = time.monotonic() + self.plan.settle_timeout
        if not self.hub.process or self.hub.process.poll() is not None:
            self.hub.start(timeout=120)

        def quiet() -> dict[tuple[str, str], dict[str, Any]] | None:
            try:
                servers = self.client.servers()
            except requests.RequestException:
                return None
            for (user, server), model in servers.items():
                if model.get("pending") != "stop":
                    self._delete(user, server, why="after the run")  # DELETE of a pending spawn interrupts it, as a user's would
            return servers

        while time.monotonic() < deadline:
            servers = quiet()
            if servers == {}:
                break
            time.sleep(2)
        else:
            self.report.notes.append(f"servers still active {self.plan.settle_timeout:.0f} s after the run: {sorted(quiet() or {})}")
        # A stopped server's container is gone a moment after the hub says so.
        until = min(deadline, time.monotonic() + 30)
        while self._running_containers() and time.monotonic() < until:
            time.sleep(1)
        self._note_violations(self._orphan_check(grace_ns=0, final=True), during=False)
        # The last audit writes (the stop of each record) may trail the hub's answer a little, and
        # records of servers the hub lost track of close at its next reconciliation.
        from gpuspawner.store import AuditStore

        store = AuditStore(self.audit_url)
        until = time.monotonic() + self.plan.records_close_within
        while time.monotonic() < until and store.open_records(self.hub_id):
            time.sleep(1)
        store.dispose()
        time.sleep(1)  # the last events reach the observer

    @property
    def events_file(self) -> Path:
        return self.hub.settings.workdir / "engine-events.jsonl"

    @property
    def audit_url(self) -> str:
        return f"sqlite:///{self.hub.settings.workdir / 'gpuspawner-audit.sqlite'}"

    def _final_checks(self) -> None:
        from gpuspawner.store import AuditStore

        report = self.report
        assert self.observer is not None
        lives = self.observer.snapshot()
        end_ns = time.time_ns()
        report.containers = len(lives)
        report.max_containers, report.max_gpu_containers = max_concurrency(lives.values(), end_ns=end_ns)
        store = AuditStore(self.audit_url)
        records = [r for r in store.iter_records() if r.hub_id == self.hub_id]
        store.dispose()
        report.record_outcomes = collections.Counter(r.outcome + ("" if r.sealed else " (open)") for r in records)
        self._note_violations(device_overlaps(lives.values(), t0_ns=report.t0_ns, now_ns=end_ns), during=False)
        self._note_violations(unusable_handouts(
            lives.values(), busy=[uuid_of(BUSY_GPU)], lost=self._lost_windows,
            grace_ns=int(self.plan.lost_grace * NS), t0_ns=report.t0_ns,
        ), during=False)
        self._note_violations(record_checks(
            records, lives, report.attempts, closed_grace_ns=int(self.plan.closed_grace * NS), t0_ns=report.t0_ns,
        ), during=False)
        overlaps, report.device_records = record_overlaps(records, t0_ns=report.t0_ns)
        self._note_violations(overlaps, during=False)
        off_die, report.end_gaps_ns = record_ends_off_die(
            records, lives, tolerance_ns=int(self.plan.end_tolerance * NS), t0_ns=report.t0_ns)
        self._note_violations(off_die, during=False)
        self._note_violations(self._verify_chain(), during=False)
        if not any(life.runs for life in lives.values()):
            self._note_violations([Violation(
                kind="nothing-started", at_ns=end_ns, key=("nothing",),
                message=f"no container of the hub ever started ({sum(a.accepted for a in report.attempts)} spawns "
                        f"accepted of {len(report.attempts)}): the soak tested nothing; see {self.hub.log_file}",
            )], during=False)
        report.notes.append(f"the engine's events: {self.events_file}; the hub's log: {self.hub.log_file}")
        report.notes += self._hook_notes(lives.values())
        report.notes += [f"engine observer: {e}" for e in self.observer.errors]
        lost_back = {w.uuid for w in self._lost_windows}
        reused = {d for life in lives.values() for d in life.devices
                  if d in lost_back and any(life.created_ns > w.back_ns for w in self._lost_windows if w.uuid == d)}
        if lost_back:
            report.notes.append(f"GPUs lost and brought back: {len(lost_back)} ({len(self._lost_windows)} losses); "
                                f"handed out again after coming back: {len(reused)}")
        report.violations = sorted(self._violations.values(), key=lambda v: v.at_ns)

    def _verify_chain(self) -> list[Violation]:
        out = subprocess.run(
            [str(BIN / "gpuspawner"), "audit", "verify", "-f", str(self.hub.config_file)],
            capture_output=True, text=True, timeout=300,
        )
        if out.returncode == 0:
            self.report.notes.append(f"gpuspawner audit verify: {out.stdout.strip()}")
            return []
        return [Violation(kind="audit-chain-broken", at_ns=time.time_ns(), key=("verify",),
                          message=f"gpuspawner audit verify exited {out.returncode}: {(out.stdout + out.stderr).strip()}")]

    def _hook_notes(self, lives: Iterable[ContainerLife]) -> list[str]:
        """Where the stand-in hook saw other devices than the DeviceRequests (the test bed's own check)."""
        notes = []
        for life in lives:
            path = TESTBED_DIR / "hook-records" / f"{life.id}.json"
            if life.runs and life.devices and path.exists():
                got = tuple(json.loads(path.read_text())["devices"])
                if sorted(got) != sorted(life.devices):
                    notes.append(f"hook record of {life.id[:12]} ({life.who}) says {list(got)}, "
                                 f"DeviceRequests {list(life.devices)}")
        return notes


def run_soak(
    *, hub: RunningHub, bed: DockerBed, spec: Path, plan: SoakPlan, log: Callable[[str], None] = print
) -> SoakReport:
    """Soak a started hub (configured with hub_config(spec, …), GPUs from write_gpus(spec)); see the module docstring."""
    return Soak(hub=hub, bed=bed, spec=spec, plan=plan, log=log).run()
