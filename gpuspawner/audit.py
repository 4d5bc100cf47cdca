"""The reproducibility record of each server, its tamper-evident seal, and what admins export.

A record says which environment a server ran: image (as requested, by repository digest and
image ID), the profile as configured, the devices and the driver, times and outcome. When a
record reaches its final state it is *sealed*: it gets the next sequence number and a hash
over its content and the previous sealed record's hash. Changing any sealed record, or the
order of two, breaks every hash from there on, and :func:`verify_chain` names the first.

Exports live in :mod:`gpuspawner.export`.

Pure code: no docker, pynvml, jupyterhub or database imports.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

# stopped: by the hub (user, admin, culler); died: the container ended on its own or behind the
# hub's back (crash, OOM, docker stop); failed: never became ready; abandoned: the hub stopped
# while it was starting, or it ran on with no server of the hub to own it.
Outcome = Literal["requested", "starting", "running", "stopped", "died", "failed", "abandoned"]
FINAL_OUTCOMES = frozenset({"stopped", "died", "failed", "abandoned"})
GENESIS = "0" * 64  # the "previous hash" of the first sealed record

# Environment variables never exported or reproduced: the hub's per-server secrets.
SECRET_PREFIXES = ("JUPYTERHUB_", "JPY_")
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY")


@dataclass(frozen=True)
class RecordedDevice:
    uuid: str
    model: str
    memory_total: int
    mig_parent: str | None = None
    mig_profile: str | None = None


@dataclass(frozen=True)
class AuditRecord:
    """One server's environment. Times are ISO 8601 UTC strings; unknown values are None."""

    id: str
    hub_id: str
    user: str
    server: str
    requested_at: str
    outcome: Outcome = "requested"
    profile: str | None = None
    profile_hash: str | None = None
    image_requested: str | None = None
    repo_digest: str | None = None  # "registry/repo@sha256:…", None for a never-pushed image
    image_id: str | None = None  # the image's ID (config digest) when the spawn resolved it
    container_image_id: str | None = None  # the image ID the created container reports
    image_labels: Mapping[str, str] = field(default_factory=dict)  # org.opencontainers.image.*
    container_id: str | None = None
    container_name: str | None = None
    hostname: str | None = None
    docker_version: str | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    devices: tuple[RecordedDevice, ...] = ()
    device_requests: tuple[Mapping[str, Any], ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)  # without secrets
    cpu_limit: float | None = None
    mem_limit: int | None = None
    started_at: str | None = None
    ready_at: str | None = None
    stopped_at: str | None = None
    error: str | None = None
    exit_code: int | None = None  # the container's exit code, where the engine still knew it
    oom_killed: bool | None = None  # the engine's OOMKilled flag for the container
    gpuspawner_version: str | None = None
    note: str | None = None  # e.g. why the image cannot be pulled elsewhere
    # the seal, set once the record is final
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None

    @property
    def sealed(self) -> bool:
        return self.hash is not None

    def content(self) -> dict[str, Any]:
        """Everything but the seal, as plain JSON-able data."""
        data = record_to_dict(self)
        for key in ("seq", "prev_hash", "hash"):
            data.pop(key)
        return data


SEAL_FIELDS = ("seq", "prev_hash", "hash")
RECORD_FIELDS = tuple(f.name for f in fields(AuditRecord))


def record_to_dict(record: AuditRecord) -> dict[str, Any]:
    """The record as plain JSON-able data (a shallow walk: dataclasses.asdict deep-copies, slowly)."""
    data = {name: getattr(record, name) for name in RECORD_FIELDS}
    data["image_labels"] = dict(record.image_labels)
    data["environment"] = dict(record.environment)
    data["device_requests"] = [dict(r) for r in record.device_requests]
    data["devices"] = [dict(d.__dict__) for d in record.devices]
    return data


def record_from_dict(data: Mapping[str, Any]) -> AuditRecord:
    values = {k: data[k] for k in RECORD_FIELDS if k in data}
    values["devices"] = tuple(RecordedDevice(**d) for d in data.get("devices") or ())
    values["device_requests"] = tuple(data.get("device_requests") or ())
    values["image_labels"] = dict(data.get("image_labels") or {})
    values["environment"] = dict(data.get("environment") or {})
    return AuditRecord(**values)


def canonical_json(data: Any) -> str:
    """One spelling per value: sorted keys, no spaces, UTF-8 kept."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def seal_digest(*, seq: int, prev_hash: str, content_json: str) -> str:
    """The seal of record number `seq`: its canonical content, chained to the previous seal."""
    return hashlib.sha256(f"{seq}\n{prev_hash}\n{content_json}".encode()).hexdigest()


def seal(record: AuditRecord, *, seq: int, prev_hash: str) -> AuditRecord:
    """The record sealed as number `seq`, chained to the previous sealed record's hash."""
    if record.outcome not in FINAL_OUTCOMES:
        raise ValueError(f"record {record.id} is {record.outcome}; only final records are sealed")
    digest = seal_digest(seq=seq, prev_hash=prev_hash, content_json=canonical_json(record.content()))
    return replace(record, seq=seq, prev_hash=prev_hash, hash=digest)


@dataclass(frozen=True)
class SealedEntry:
    """A sealed record as stored: its seal and its canonical content, as text."""

    id: str
    seq: int | None
    prev_hash: str | None
    hash: str | None
    content_json: str

    @classmethod
    def of(cls, record: AuditRecord) -> SealedEntry:
        return cls(record.id, record.seq, record.prev_hash, record.hash, canonical_json(record.content()))


@dataclass(frozen=True)
class Verification:
    ok: bool
    checked: int
    first_bad: str | None = None  # the id of the first record whose content or order changed
    reason: str = ""

    def message(self) -> str:
        if self.ok:
            return f"OK: {self.checked} sealed records, chain intact."
        return f"FAILED at record {self.first_bad}: {self.reason} ({self.checked} records checked before it)."


def verify_chain(entries: Iterable[SealedEntry | AuditRecord]) -> Verification:
    """Check sealed records in sequence order; the first that does not fit is named."""
    prev, expected_seq, checked = GENESIS, 1, 0
    for item in entries:
        entry = item if isinstance(item, SealedEntry) else SealedEntry.of(item)
        if entry.seq != expected_seq:
            return Verification(False, checked, entry.id, f"sequence number {entry.seq}, expected {expected_seq}")
        if entry.prev_hash != prev:
            return Verification(False, checked, entry.id, "its link to the previous record does not match")
        if seal_digest(seq=expected_seq, prev_hash=prev, content_json=entry.content_json) != entry.hash:
            return Verification(False, checked, entry.id, "its content does not match its seal")
        prev, expected_seq, checked = entry.hash or "", expected_seq + 1, checked + 1
    return Verification(True, checked)


def is_secret(name: str) -> bool:
    upper = name.upper()
    return upper.startswith(SECRET_PREFIXES) or any(word in upper for word in SECRET_WORDS)


def without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not is_secret(k)}
