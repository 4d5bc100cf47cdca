"""Which devices the servers of this hub hold: the claim table.

The Docker engine is the record. Every container carries the UUIDs of its devices in a label
(:mod:`gpuspawner.labels`), and a running container holds them; a container that stopped or
died holds nothing. So the table is rebuilt from the engine before each allocation, and a
restarted hub knows exactly what its predecessor handed out.

Between choosing devices and the container running, a spawn holds a *pending* claim kept in
memory by :class:`ClaimBook`, so two spawns at the same moment never get the same device.

Pure code: no docker, pynvml or jupyterhub imports.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import labels
from .allocation import Holder

# Container states in which a container holds its devices. "created" is not among them: a
# container this hub is creating is covered by a pending claim, and one left "created" by a
# hub that died never started and holds nothing.
HOLDING_STATES = frozenset({"running", "restarting", "paused"})


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


class ClaimBook:
    """Pending claims of spawns in progress in this hub process.

    Not thread-safe by design: the spawner uses it from the hub's event loop only, inside
    its allocation lock.
    """

    def __init__(self) -> None:
        self._pending: dict[Holder, tuple[str, ...]] = {}

    def reserve(self, holder: Holder, uuids: tuple[str, ...]) -> None:
        self._pending[holder] = uuids

    def release(self, holder: Holder) -> tuple[str, ...]:
        """Drop `holder`'s pending claim; returns the UUIDs it had (empty if none)."""
        return self._pending.pop(holder, ())

    def pending(self) -> dict[Holder, tuple[str, ...]]:
        return dict(self._pending)

    def merged(self, engine_claims: Mapping[str, Holder]) -> dict[str, Holder]:
        """The full claim table: what running containers hold plus pending claims."""
        merged = dict(engine_claims)
        for holder, uuids in self._pending.items():
            for uuid in uuids:
                merged[uuid] = holder
        return merged
