"""Docker labels that mark a container as one of this hub's servers.

Every container GPUSpawner creates carries these labels, so that the hub can rebuild what
it knows (which servers exist, which devices they hold) from the Docker engine alone after
a restart, and so that two hubs sharing one engine never mistake each other's containers.

Pure code: no docker, jupyterhub or pynvml imports.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "gpuspawner."
HUB = PREFIX + "hub"
USER = PREFIX + "user"
SERVER = PREFIX + "server"
VERSION = PREFIX + "version"
DEVICES = PREFIX + "devices"  # comma-separated UUIDs of the GPUs / MIG devices the server holds
PROFILE = PREFIX + "profile"  # the slug of the profile the server was started with ("" without profiles)
RECORD = PREFIX + "record"  # the id of the audit record of the spawn that created the container
SETTINGS = PREFIX + "settings"  # a hash of the settings the container was created from (see settings_hash)
LIMITS = PREFIX + "limits"  # the server's time limits as JSON (gpuspawner.limits), "" without any


@dataclass(frozen=True)
class ServerIdentity:
    """Which hub, user and server a container belongs to."""

    hub_id: str
    user: str
    server: str = ""  # "" is the user's default (unnamed) server


def hub_id_for(*, hostname: str, db_url: str) -> str:
    """A stable identity for one hub: the same host and database give the same id.

    A hub is its database: restarting it keeps the id, while a second hub on the same Docker
    engine (another database) gets another one.
    """
    digest = hashlib.sha256(f"{hostname}\n{db_url}".encode()).hexdigest()
    return "hub-" + digest[:12]


def server_labels(
    identity: ServerIdentity,
    *,
    version: str,
    devices: tuple[str, ...] = (),
    profile: str = "",
    record: str = "",
    settings: str = "",
    limits: str = "",
) -> dict[str, str]:
    """The labels to put on a server's container: its devices, profile, audit record and settings hash."""
    return {
        HUB: identity.hub_id,
        USER: identity.user,
        SERVER: identity.server,
        VERSION: version,
        DEVICES: ",".join(devices),
        PROFILE: profile,
        RECORD: record,
        SETTINGS: settings,
        LIMITS: limits,
    }


def settings_hash(settings: Mapping[str, object]) -> str:
    """A short hash of what a container is made from (image, limits, environment, devices…).

    A kept container (``DockerSpawner.remove = False``) is reused only when the hash of the
    settings resolved for the new spawn equals the one in its label.
    """
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def devices_from_labels(labels: Mapping[str, str] | None) -> tuple[str, ...]:
    """The device UUIDs a container's labels say it holds."""
    return tuple(u for u in (labels or {}).get(DEVICES, "").split(",") if u)


def identity_from_labels(labels: Mapping[str, str] | None) -> ServerIdentity | None:
    """Read back the identity of a container from its labels; None if it is not a gpuspawner server."""
    if not labels or HUB not in labels or USER not in labels:
        return None
    return ServerIdentity(hub_id=labels[HUB], user=labels[USER], server=labels.get(SERVER, ""))


def hub_filter(hub_id: str) -> dict[str, list[str]]:
    """A filter for the Docker API's container list: this hub's containers only."""
    return {"label": [f"{HUB}={hub_id}"]}


def merge_labels(configured: Mapping[str, str] | None, ours: Mapping[str, str]) -> dict[str, str]:
    """Admin-configured labels plus ours; ours win, since the hub's bookkeeping depends on them."""
    merged = dict(configured or {})
    merged.update(ours)
    return merged
