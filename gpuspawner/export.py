"""What admins take out of the audit store: CSV, JSONL, an RO-Crate, and a ``docker run`` line.

Exports are generators over records, so a million rows stream in constant memory.

Pure code: no docker, pynvml, jupyterhub or database imports.
"""

from __future__ import annotations

import csv
import io
import json
import shlex
from collections.abc import Iterable, Iterator
from typing import Any

from .audit import AuditRecord, canonical_json, record_to_dict, without_secrets
from .images import ImageReferenceError, parse_image


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
