"""What a server knows about itself: its audit record, image, profile, GPUs and driver, as environment
variables and as a JSON file inside its container.

Pure: :func:`server_info` takes the values a spawn has resolved (its record id, the plan's profile and
image, the engine's :class:`~gpuspawner.facts.ResolvedImage`, the granted
:class:`~gpuspawner.facts.DeviceFacts`) and returns a frozen :class:`ServerInfo`;
:func:`server_environment`, :func:`server_json` and :func:`server_archive` say it as variables, as
JSON and as the tar archive the spawner puts into the created container (``docker cp``'s
``put_archive``, through the spawner's one Docker path: no host file is mounted, so it works where
the hub itself runs in a container).

The file is :data:`SERVER_INFO_PATH`, owned by root and read-only (mode 0444); its format is
documented by :data:`SCHEMA_VERSION` (raised when a field changes meaning or goes; fields may be
added without it). The variables named in :data:`NAMES` are gpuspawner's: the configuration may set
none (:func:`check_names`), and the last check of the create request refuses one that differs from
what gpuspawner set (:func:`check_create_environment`).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .audit import RecordedDevice
from .facts import DeviceFacts, ResolvedImage

SCHEMA_VERSION = 1
SERVER_INFO_PATH = "/etc/gpuspawner/server.json"
PREFIX = "GPUSPAWNER_"
RECORD_ID = PREFIX + "RECORD_ID"
NAMES = tuple(PREFIX + name for name in (
    "SERVER_INFO", "RECORD_ID", "PROFILE", "IMAGE", "IMAGE_DIGEST", "IMAGE_ID", "GPUS", "DRIVER_VERSION",
    "CUDA_DRIVER_VERSION",
))  # every variable :func:`server_environment` sets


@dataclass(frozen=True)
class ServerInfo:
    """What one spawn's server is, as its audit record says it: ``image`` is the reference the container
    is created from (by digest where the image is pinned), ``gpus`` the granted devices (none: CPU only)."""

    record_id: str
    hub_id: str
    user: str
    server: str
    profile: str | None
    image_requested: str
    image: str
    repo_digest: str | None
    image_id: str | None
    gpus: tuple[RecordedDevice, ...] = ()
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    gpuspawner_version: str = ""


def server_info(
    *, record_id: str, hub_id: str, user: str, server: str, profile: str | None, image: str,
    resolved: ResolvedImage, devices: DeviceFacts | None, version: str,
) -> ServerInfo:
    """The server's facts from a spawn's values: `image` is the reference its container is created from,
    `resolved` what the engine said of the requested image, `devices` the grant (None: CPU only)."""
    return ServerInfo(
        record_id=record_id, hub_id=hub_id, user=user, server=server, profile=profile or None,
        image_requested=resolved.requested, image=image, repo_digest=resolved.repo_digest, image_id=resolved.image_id,
        gpus=devices.devices if devices is not None else (),
        driver_version=devices.driver_version if devices is not None else None,
        cuda_driver_version=devices.cuda_driver_version if devices is not None else None,
        gpuspawner_version=version,
    )


def server_environment(info: ServerInfo, *, with_record: bool = True) -> dict[str, str]:
    """The server's variables. Every one is set, empty where unknown (a CPU-only server has no GPUs nor
    driver), so no other setting can stand in for one. `with_record`: False for a container that later
    spawns start again (``DockerSpawner.remove = False``): its environment is fixed when it is created,
    so the record id, which each spawn changes, is in the file only."""
    env = {
        PREFIX + "SERVER_INFO": SERVER_INFO_PATH,
        RECORD_ID: info.record_id,
        PREFIX + "PROFILE": info.profile or "",
        PREFIX + "IMAGE": info.image,
        PREFIX + "IMAGE_DIGEST": info.repo_digest or "",
        PREFIX + "IMAGE_ID": info.image_id or "",
        PREFIX + "GPUS": ",".join(d.uuid for d in info.gpus),
        PREFIX + "DRIVER_VERSION": info.driver_version or "",
        PREFIX + "CUDA_DRIVER_VERSION": info.cuda_driver_version or "",
    }
    if not with_record:
        del env[RECORD_ID]
    return env


def server_document(info: ServerInfo) -> dict[str, Any]:
    """The JSON file's content (``schema_version`` :data:`SCHEMA_VERSION`)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "record_id": info.record_id,
        "hub_id": info.hub_id,
        "user": info.user,
        "server": info.server,
        "profile": info.profile,
        "image": {
            "requested": info.image_requested, "reference": info.image, "repo_digest": info.repo_digest,
            "image_id": info.image_id,
        },
        "gpus": [
            {"uuid": d.uuid, "model": d.model, "memory_total": d.memory_total, "mig_parent": d.mig_parent,
             "mig_profile": d.mig_profile}
            for d in info.gpus
        ],
        "driver_version": info.driver_version,
        "cuda_driver_version": info.cuda_driver_version,
        "gpuspawner_version": info.gpuspawner_version,
    }


def server_json(info: ServerInfo) -> str:
    return json.dumps(server_document(info), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def server_archive(info: ServerInfo, *, mtime: float) -> bytes:
    """A tar archive holding :data:`SERVER_INFO_PATH` (root's, mode 0444) and its folder (mode 0755), to
    extract at ``/`` of the container."""
    folder, _, name = SERVER_INFO_PATH.lstrip("/").rpartition("/")
    data = server_json(info).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entry = tarfile.TarInfo(folder)
        entry.type, entry.mode, entry.mtime = tarfile.DIRTYPE, 0o755, int(mtime)
        tar.addfile(entry)
        entry = tarfile.TarInfo(f"{folder}/{name}")
        entry.size, entry.mode, entry.mtime = len(data), 0o444, int(mtime)
        tar.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


# --- Nothing else sets gpuspawner's variables --------------------------------------------------


class ReservedName(ValueError):
    """A setting that names a variable of gpuspawner's (:data:`NAMES`)."""


def check_names(names: Sequence[str], *, where: str) -> None:
    """Refuse configured variables named as gpuspawner's: they would say something of the server that
    gpuspawner did not decide (and the audit record would keep the made-up value)."""
    reserved = sorted(n for n in names if n in NAMES)
    if reserved:
        which = "is a variable" if len(reserved) == 1 else "are variables"
        raise ReservedName(
            f"{where}: {', '.join(repr(n) for n in reserved)} {which} of gpuspawner's own, which it sets in every "
            f"server to what its audit record says; allowed: any name but {', '.join(NAMES)}."
        )


def check_create_environment(variables: Sequence[tuple[str, str | None]], *, expected: Mapping[str, str]) -> list[str]:
    """Sentences refusing a create request's variables named like gpuspawner's that are not what it set.

    `variables` are (name, value) pairs as docker-py sends them (value None: a name without "="); other
    ``GPUSPAWNER_*`` names are not gpuspawner's (the test bed's stand-in hook reads one).
    `expected` is :func:`server_environment`'s answer, or empty where gpuspawner sets none.
    """
    problems = []
    for name, value in dict.fromkeys(variables):
        if name in NAMES and expected.get(name) != value:
            shown = f"{name} without a value" if value is None else f"{name}={value!r}"
            wanted = f"it must be {expected[name]!r}" if name in expected else "gpuspawner leaves it out of this server"
            problems.append(
                f"Refused {shown}: {name} is gpuspawner's own variable, and {wanted}. "
                "Remove it from DockerSpawner.extra_create_kwargs['environment'] (or Spawner.env_keep)."
            )
    return problems
