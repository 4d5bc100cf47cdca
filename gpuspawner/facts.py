"""What a spawn learns about its image and devices, as the dataclasses its audit record is noted from.

Pure: the spawner reads the Docker engine and NVML and hands what they said to these
functions; the recorder (:mod:`gpuspawner.recorder`) writes the dataclasses into the record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import images
from .audit import RecordedDevice
from .devices import Device

OCI_LABEL_PREFIX = "org.opencontainers.image."


@dataclass(frozen=True)
class ResolvedImage:
    """The image a spawn resolved: what was asked for, and what the engine has under that name."""

    requested: str  # the image name the spawn asked for
    image_id: str  # the image's ID (config digest)
    repo_digest: str | None  # "registry/repo@sha256:…"; None for an image never pushed
    labels: Mapping[str, str] = field(default_factory=dict)  # its org.opencontainers.image.* labels
    note: str | None = None  # why it cannot be pulled elsewhere, where it cannot

    @property
    def shown(self) -> str:
        """The repository digest, else the image ID: how the spawn's progress names the image."""
        return self.repo_digest or self.image_id


def resolved_image(requested: str, inspection: Mapping[str, Any]) -> ResolvedImage:
    """The facts of `requested` from the engine's inspection of it (``docker image inspect``)."""
    ref = images.parse_image(requested)
    repo_digest = images.repo_digest_for(ref, inspection.get("RepoDigests") or [])
    image_id = str(inspection["Id"])
    config_labels: Mapping[str, str] = (inspection.get("Config") or {}).get("Labels") or {}
    return ResolvedImage(
        requested=requested,
        image_id=image_id,
        repo_digest=repo_digest,
        labels={k: v for k, v in config_labels.items() if k.startswith(OCI_LABEL_PREFIX)},
        note=None if repo_digest else (
            f"Image {requested} ({image_id}) has no repository digest: it was built here or never "
            "pushed, so it cannot be pulled on another host."
        ),
    )


@dataclass(frozen=True)
class DeviceFacts:
    """The devices a spawn was granted, as the record keeps them, and the host's driver versions."""

    devices: tuple[RecordedDevice, ...]
    driver_version: str | None
    cuda_driver_version: str | None


def device_facts(
    devices: tuple[Device, ...], *, driver_version: str | None, cuda_driver_version: str | None
) -> DeviceFacts:
    """The record's view of granted `devices` on a host with these driver versions."""
    return DeviceFacts(
        devices=tuple(
            RecordedDevice(uuid=d.uuid, model=d.model, memory_total=d.memory_total,
                           mig_parent=d.parent_uuid, mig_profile=d.mig_profile)
            for d in devices
        ),
        driver_version=driver_version,
        cuda_driver_version=cuda_driver_version,
    )
