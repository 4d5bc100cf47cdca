"""The reproducibility record of each server, its tamper-evident seal, and what admins export.

A record says which environment a server ran: image (as requested, by repository digest and
image ID), the profile as configured, the devices and the driver, times and outcome. When a
record reaches its final state it is *sealed*: it gets the next sequence number and a hash
over its content and the previous sealed record's hash. Changing any sealed record, or the
order of two, breaks every hash from there on, and :func:`verify_chain` names the first.

Exports are generators over records, so a million rows stream in constant memory.

Pure code: no docker, pynvml, jupyterhub or database imports.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shlex
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from .images import ImageReferenceError, parse_image

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


# --- Exports ---------------------------------------------------------------------------------

CSV_COLUMNS = (
    "id", "seq", "hub_id", "user", "server", "profile", "outcome", "requested_at", "started_at", "ready_at",
    "stopped_at", "image_requested", "repo_digest", "image_id", "container_image_id", "container_id",
    "container_name", "hostname", "docker_version", "driver_version", "cuda_driver_version", "devices",
    "device_models", "cpu_limit", "mem_limit", "error", "exit_code", "oom_killed", "gpuspawner_version", "profile_hash", "hash",
)


def csv_lines(records: Iterable[AuditRecord]) -> Iterator[str]:
    """CSV text, header first, one line per record; devices joined with spaces."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")

    def take(row: Iterable[Any]) -> str:
        writer.writerow(row)
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    yield take(CSV_COLUMNS)
    for r in records:
        row = record_to_dict(r)
        row["devices"] = " ".join(d.uuid for d in r.devices)
        row["device_models"] = " ".join(d.model for d in r.devices)
        yield take("" if row.get(c) is None else row[c] for c in CSV_COLUMNS)


def jsonl_lines(records: Iterable[AuditRecord]) -> Iterator[str]:
    for r in records:
        yield json.dumps(record_to_dict(r), sort_keys=True, ensure_ascii=False) + "\n"


_ACTION_STATUS = {
    "stopped": "http://schema.org/CompletedActionStatus",
    "failed": "http://schema.org/FailedActionStatus",
    "died": "http://schema.org/FailedActionStatus",
    "abandoned": "http://schema.org/FailedActionStatus",
    "running": "http://schema.org/ActiveActionStatus",
    "starting": "http://schema.org/ActiveActionStatus",
    "requested": "http://schema.org/PotentialActionStatus",
}
PROCESS_RUN_CRATE = "https://w3id.org/ro/wfrun/process/0.5"


def ro_crate_chunks(records: Iterable[AuditRecord], *, title: str = "gpuspawner servers") -> Iterator[str]:
    """An RO-Crate metadata file (Process Run Crate profile), streamed.

    Each server is a CreateAction: its instrument is the container image (a ContainerImage with
    registry, name, tag and sha256), its agent the user. Images and users are listed once,
    after the actions, so memory grows with their number, not with the records'.
    """
    yield (
        '{"@context":"https://w3id.org/ro/crate/1.1/context","@graph":[\n'
        + canonical_json({
            "@id": "ro-crate-metadata.json", "@type": "CreativeWork", "about": {"@id": "./"},
            "conformsTo": [{"@id": "https://w3id.org/ro/crate/1.1"}, {"@id": PROCESS_RUN_CRATE}],
        })
        + ",\n"
        + canonical_json({
            "@id": "./", "@type": "Dataset", "name": title,
            "description": "Jupyter servers started by gpuspawner, with the exact container image of each.",
            "conformsTo": {"@id": PROCESS_RUN_CRATE},
            "mentions": {"@id": "#servers"},
        })
        + ",\n"
        + canonical_json({"@id": PROCESS_RUN_CRATE, "@type": "CreativeWork", "name": "Process Run Crate", "version": "0.5"})
    )
    images: dict[str, dict[str, Any]] = {}
    users: set[str] = set()
    for r in records:
        image_id = _image_entity_id(r)
        if image_id not in images:
            images[image_id] = _image_entity(r, image_id)
        users.add(r.user)
        action: dict[str, Any] = {
            "@id": f"#server-{r.id}", "@type": "CreateAction",
            "name": f"Jupyter server {r.user}/{r.server}" if r.server else f"Jupyter server of {r.user}",
            "instrument": {"@id": image_id}, "agent": {"@id": f"#user-{r.user}"},
            "startTime": r.started_at or r.requested_at, "actionStatus": {"@id": _ACTION_STATUS[r.outcome]},
        }
        if r.stopped_at:
            action["endTime"] = r.stopped_at
        if r.error:
            action["error"] = r.error
        if r.devices:
            action["description"] = "GPUs: " + ", ".join(f"{d.model} ({d.uuid})" for d in r.devices)
        yield ",\n" + canonical_json(action)
    for image in images.values():
        yield ",\n" + canonical_json(image)
    for user in sorted(users):
        yield ",\n" + canonical_json({"@id": f"#user-{user}", "@type": "Person", "name": user})
    yield "\n]}\n"


def _image_entity_id(r: AuditRecord) -> str:
    return f"#image-{r.repo_digest or r.image_id or r.image_requested}"


def _image_entity(r: AuditRecord, entity_id: str) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "@id": entity_id, "@type": "ContainerImage",
        "additionalType": {"@id": "https://w3id.org/ro/terms/workflow-run#DockerImage"},
    }
    try:
        ref = parse_image(r.repo_digest or r.image_requested or "")
        requested = parse_image(r.image_requested) if r.image_requested else ref
        entity.update(registry=ref.registry, name=ref.repository)
        if requested.tag:
            entity["tag"] = requested.tag
    except ImageReferenceError:
        pass
    digest = (r.repo_digest or "").partition("@")[2]
    if digest:
        entity["sha256"] = digest.removeprefix("sha256:")
    return entity


def reproduce_command(record: AuditRecord) -> str:
    """One ``docker run`` that recreates the record's environment on another host.

    The image by repository digest, the same number of GPUs, the same limits and the same
    environment without the hub's secrets. An image that was never pushed cannot be pulled
    elsewhere: the command then names the image ID and says so.
    """
    args = ["docker", "run", "--rm", "-it", "-p", "8888:8888"]
    if record.devices:
        args += ["--gpus", str(len(record.devices))]
    if record.cpu_limit:
        args += ["--cpus", f"{record.cpu_limit:g}"]
    if record.mem_limit:
        args += ["--memory", str(record.mem_limit)]
    for name, value in sorted(without_secrets(record.environment).items()):
        args += ["-e", f"{name}={value}"]
    if record.repo_digest:
        ref = parse_image(record.repo_digest)
        args.append(ref.by_digest())
        prefix = ""
    else:
        args.append(record.image_id or record.image_requested or "<unknown image>")
        prefix = (
            "# This image was never pushed to a registry, so only a host that has image "
            f"{record.image_id} can run it.\n"
        )
    args += ["jupyter", "server", "--ip=0.0.0.0", "--port=8888"]
    return prefix + " ".join(shlex.quote(a) for a in args)
