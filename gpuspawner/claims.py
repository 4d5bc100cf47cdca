"""Which devices the servers of this hub hold: the claim table.

The Docker engine is the record. Every container carries the UUIDs of its devices in a label
(:mod:`gpuspawner.labels`), and a running container holds them; a container that stopped or
died holds nothing. So the table is rebuilt from the engine before each allocation, and a
restarted hub knows exactly what its predecessor handed out. Running containers that this hub
did not make (another hub, ``docker run --gpus``) hold what their ``DeviceRequests`` name:
:func:`foreign_claims`. The hub's own container, and the gpuspawner services beside it, only read
the GPUs (NVML needs the device nodes) and hold none: :func:`gpu_readers`.

Between choosing devices and the container running, a spawn holds a *pending* claim kept in
memory by :class:`ClaimBook`, so two spawns at the same moment never get the same device. A
failed or interrupted spawn keeps its pending claim until its container is known not to run.

Pure code: no docker, pynvml or jupyterhub imports.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from . import labels
from .allocation import Holder
from .devices import Inventory

# Container states in which a container holds its devices. "created" is not among them: a
# container this hub is creating is covered by a pending claim, and one left "created" by a
# hub that died never started and holds nothing.
HOLDING_STATES = frozenset({"running", "restarting", "paused"})

ROLE = "org.gpuspawner.role"  # docker-compose.yml's label on the hub ("hub") and the audit service ("audit")
COMPOSE_PROJECT = "com.docker.compose.project"  # what Compose labels each container of a project with

# What Docker and Podman bind-mount over these files comes from the container's own folder
# (…/containers/<id>/hostname, …/overlay-containers/<id>/userdata/hosts); on the host they are no mounts.
_ENGINE_FILES = frozenset({"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"})
_ID_IN_FOLDER = re.compile(r"containers/([0-9a-f]{64})/")
_ID_IN_CGROUP = re.compile(r"[/-]([0-9a-f]{64})(?:\.scope)?$")  # cgroup v1 (/docker/<id>), systemd (docker-<id>.scope)
_SHORT_ID = re.compile(r"[0-9a-f]{12,64}")  # Docker's default host name: the id's first 12 characters


def own_container_ids(*, mountinfo: str, cgroup: str, hostname: str) -> tuple[str, ...]:
    """What may name the container this process runs in, best first, from the text of
    ``/proc/self/mountinfo`` and ``/proc/self/cgroup`` and the host name; empty outside a container.

    Candidates only: :func:`gpu_readers` takes the first that names a container of the engine, so an
    id of an outer container (or a host name of hex digits) names none and is harmless.
    """
    found: list[str] = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] in _ENGINE_FILES:
            found += _ID_IN_FOLDER.findall(fields[3])
    for line in cgroup.splitlines():
        found += _ID_IN_CGROUP.findall(line.rpartition(":")[2])
    if _SHORT_ID.fullmatch(hostname):
        found.append(hostname)
    return tuple(dict.fromkeys(found))


def gpu_readers(containers: Iterable[Mapping[str, Any]], *, own_ids: Sequence[str]) -> frozenset[str]:
    """The ids of the containers, among the engine's `containers` (``Id`` and ``Labels`` each), that only
    read the GPUs and hold none, whatever their ``DeviceRequests`` say.

    They are the hub's own container (the first of `own_ids`, from :func:`own_container_ids`, that is
    the id of exactly one of them or its first 12 or more characters) and the containers of its Compose
    project labelled ``org.gpuspawner.role`` (the audit service). A hub not in a container, or in one
    the engine does not list, finds none; a role label on a container of another project (another
    hub's, a user's ``docker run``) counts for nothing.
    """
    listed = list(containers)
    own = _own_container(listed, own_ids)
    if own is None:
        return frozenset()
    project = (own.get("Labels") or {}).get(COMPOSE_PROJECT)
    beside = {
        str(c["Id"]) for c in listed
        if project and (c.get("Labels") or {}).get(COMPOSE_PROJECT) == project and (c.get("Labels") or {}).get(ROLE)
    }
    return frozenset({str(own["Id"])} | beside)


def _own_container(listed: Sequence[Mapping[str, Any]], own_ids: Sequence[str]) -> Mapping[str, Any] | None:
    for ident in own_ids:
        named = [c for c in listed if str(c.get("Id", "")).startswith(ident)] if len(ident) >= 12 else []
        if len(named) == 1:  # a prefix two containers share names neither
            return named[0]
    return None


def claims_from_containers(containers: Iterable[Mapping[str, Any]], *, hub_id: str) -> dict[str, Holder]:
    """UUID -> holder, from the Docker API's container list (``State`` and ``Labels`` of each)."""
    claims: dict[str, Holder] = {}
    for container in containers:
        identity = labels.identity_from_labels(container.get("Labels"))
        if identity is None or identity.hub_id != hub_id or container.get("State") not in HOLDING_STATES:
            continue
        for uuid in labels.devices_from_labels(container.get("Labels")):
            claims[uuid] = Holder(user=identity.user, server=identity.server)
    return claims


def profiles_of_servers(containers: Iterable[Mapping[str, Any]], *, hub_id: str) -> dict[Holder, str]:
    """Holder -> profile slug, for this hub's live containers started from a profile."""
    found: dict[Holder, str] = {}
    for container in containers:
        identity = labels.identity_from_labels(container.get("Labels"))
        profile = (container.get("Labels") or {}).get(labels.PROFILE, "")
        if identity and identity.hub_id == hub_id and profile and container.get("State") in HOLDING_STATES:
            found[Holder(user=identity.user, server=identity.server)] = profile
    return found


def foreign_claims(containers: Iterable[Mapping[str, Any]], inventory: Inventory) -> dict[str, Holder]:
    """UUID -> holder for running containers this hub did not make, from their inspection.

    A container holds what its ``HostConfig.DeviceRequests`` name (UUIDs, indices, CDI names
    ``nvidia.com/gpu=…``, or a ``Count``: -1 for all GPUs, N for the first N), and, on the
    ``nvidia`` runtime, what its ``NVIDIA_VISIBLE_DEVICES`` names. A whole GPU held this way
    holds its MIG devices too. The holder is named after the container, for admins.
    """
    whole = sorted((d for d in inventory.devices if not d.is_mig and d.uuid), key=lambda d: d.index)
    by_index = {str(d.index): d.uuid for d in whole}
    children: dict[str, list[str]] = {}
    for d in inventory.devices:
        if d.parent_uuid:
            children.setdefault(d.parent_uuid, []).append(d.uuid)

    def resolve(ids: Iterable[str]) -> set[str]:
        found: set[str] = set()
        for raw in ids:
            ident = raw.split("=", 1)[1] if raw.startswith("nvidia.com/gpu=") else raw
            if ident == "all":
                found.update(d.uuid for d in whole)
            elif ident in by_index:
                found.add(by_index[ident])
            elif ident and ident not in ("none", "void"):
                found.add(ident)
        return found

    claims: dict[str, Holder] = {}
    for container in containers:
        host_config = container.get("HostConfig") or {}
        held: set[str] = set()
        for request in host_config.get("DeviceRequests") or ():
            if request.get("Driver") not in ("", None, "nvidia", "cdi") and not _asks_for_gpus(request):
                continue
            ids = request.get("DeviceIDs") or ()
            count = request.get("Count") or 0
            if ids:
                held |= resolve(ids)
            elif count < 0:
                held |= {d.uuid for d in whole}
            elif count > 0:
                held |= {d.uuid for d in whole[:count]}
        if host_config.get("Runtime") == "nvidia":
            env = dict(e.split("=", 1) for e in (container.get("Config") or {}).get("Env") or () if "=" in e)
            held |= resolve(env.get("NVIDIA_VISIBLE_DEVICES", "").split(","))
        name = str(container.get("Name") or container.get("Id", "")[:12]).lstrip("/")
        for uuid in held | {c for u in held for c in children.get(u, ())}:
            claims[uuid] = Holder(user="", server=f"container {name}")
    return claims


def _asks_for_gpus(request: Mapping[str, Any]) -> bool:
    return any("gpu" in caps for caps in request.get("Capabilities") or ())


class ClaimBook:
    """Pending claims of spawns in progress in this hub process, one per spawn.

    A claim is taken when devices are chosen and given back by the spawn that took it: once its
    container runs (then the container's labels hold the devices), or once a failed spawn's
    container is known to be gone. A failed spawn that could not make sure of that marks its
    claim *unconfirmed*; the hub's reconciliation drops it once the engine shows no container
    of that server running. Claims are kept per spawn, not per server: a server started again
    while its interrupted spawn still cleans up never takes over that spawn's claim.

    Not thread-safe by design: the spawner uses it from the hub's event loop only.
    """

    def __init__(self) -> None:
        self._pending: dict[str, tuple[Holder, tuple[str, ...]]] = {}
        self._unconfirmed: set[str] = set()

    def reserve(self, spawn_id: str, holder: Holder, uuids: tuple[str, ...]) -> None:
        self._pending[spawn_id] = (holder, uuids)

    def release(self, spawn_id: str) -> tuple[str, ...]:
        """Drop the spawn's pending claim; returns the UUIDs it had (empty if none)."""
        self._unconfirmed.discard(spawn_id)
        return self._pending.pop(spawn_id, (Holder(""), ()))[1]

    def keep_unconfirmed(self, spawn_id: str) -> None:
        """Keep the spawn's claim: it failed, but its container may still run."""
        if spawn_id in self._pending:
            self._unconfirmed.add(spawn_id)

    def unconfirmed(self) -> tuple[tuple[str, Holder], ...]:
        """(spawn id, holder) of the claims kept by failed spawns."""
        return tuple(sorted((i, self._pending[i][0]) for i in self._unconfirmed))

    def merged(self, engine_claims: Mapping[str, Holder]) -> dict[str, Holder]:
        """The full claim table: what running containers hold plus pending claims."""
        merged = dict(engine_claims)
        for holder, uuids in self._pending.values():
            for uuid in uuids:
                merged[uuid] = holder
        return merged
