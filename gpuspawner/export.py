"""What admins take out of the audit store: CSV, JSONL, an RO-Crate, and a ``docker run`` line.

Exports are generators over records, so a million rows stream without holding the records.
CSV cells that a spreadsheet would run as a formula are neutralised; JSONL and the RO-Crate
keep every value exactly as recorded.

Pure code: no docker, pynvml, jupyterhub or database imports.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote

from . import seams
from .audit import AuditRecord, canonical_json, record_to_dict
from .images import ImageRef, ImageReferenceError, parse_image
from .redaction import is_redacted, without_secrets

CSV_COLUMNS = (
    "id", "seq", "hub_id", "user", "groups", "server", "profile", "outcome", "requested_at", "started_at", "ready_at",
    "stopped_at", "idle_gpu_seconds", "image_requested", "repo_digest", "image_id", "container_image_id", "container_id",
    "container_name", "hostname", "node", "docker_version", "driver_version", "cuda_driver_version", "cuda_requirement", "devices",
    "device_models", "cpu_limit", "mem_limit", "error", "exit_code", "oom_killed", "gpuspawner_version", "profile_hash", "hash",
    "integrity",
)
# OWASP, "CSV Injection": a spreadsheet runs a cell that starts with one of these as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A record's value as a CSV cell that a spreadsheet shows rather than runs.

    Text that starts like a formula gets a leading single quote, as OWASP advises; any text
    column can carry words a user chose (user and server names, profile, error, image, the
    names a GPU reports). Numbers are left as numbers: gpuspawner writes them itself from
    typed fields, so an exit code of -9 stays the number -9. A value that is text where a
    number belongs (a tampered database) is text, and neutralised like any other.
    """
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_lines(records: Iterable[AuditRecord]) -> Iterator[str]:
    """CSV text, header first, one line per record; devices joined with spaces, groups with ";"
    (a JupyterHub group name may hold a space).

    Text cells are quoted, numbers not (OWASP: wrap each cell in double quotes): a line break
    or carriage return inside a value then stays inside its cell.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)

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
        row["groups"] = ";".join(r.groups)
        yield take(csv_cell(row.get(c)) for c in CSV_COLUMNS)


def jsonl_lines(records: Iterable[AuditRecord]) -> Iterator[str]:
    for r in records:
        yield json.dumps(record_to_dict(r), sort_keys=True, ensure_ascii=False) + "\n"


# --- RO-Crate (Process Run Crate 0.5) -----------------------------------------------------------

RO_CRATE = "https://w3id.org/ro/crate/1.1"
PROCESS_RUN_CRATE = "https://w3id.org/ro/wfrun/process/0.5"
# The workflow-run context defines containerImage, ContainerImage, registry, tag, sha256, environment.
CRATE_CONTEXT = ["https://w3id.org/ro/crate/1.1/context", "https://w3id.org/ro/terms/workflow-run/context"]
DOCKER_IMAGE = "https://w3id.org/ro/terms/workflow-run#DockerImage"
BYTES = "https://qudt.org/vocab/unit/BYTE"
SECONDS = "https://qudt.org/vocab/unit/SEC"
FAILED = "http://schema.org/FailedActionStatus"
_ACTION_STATUS = {
    "stopped": "http://schema.org/CompletedActionStatus",
    "failed": FAILED,
    "died": FAILED,
    "abandoned": FAILED,
    "running": "http://schema.org/ActiveActionStatus",
    "starting": "http://schema.org/ActiveActionStatus",
    "requested": "http://schema.org/PotentialActionStatus",
}
_OCI = "org.opencontainers.image."
_NO_LICENSE = {
    "@id": "#license", "@type": "CreativeWork", "name": "Not licensed for reuse",
    "description": "An audit log of a JupyterHub: ask the hub's administrators before you share or reuse it.",
}


def ro_crate_chunks(
    records: Iterable[AuditRecord],
    *,
    title: str = "gpuspawner servers",
    published: str | None = None,
    license_url: str | None = None,
) -> Iterator[str]:
    """An RO-Crate metadata file that conforms to Process Run Crate 0.5, streamed.

    Each server is a ``CreateAction``: its ``instrument`` the software that ran (a
    ``SoftwareApplication`` for the image's Jupyter server), its ``containerImage`` the image
    (a ``ContainerImage``: registry, name, tag and sha256 of the repository digest; an image
    never pushed names no registry and says so), its ``agent`` the user, its
    ``environment`` the variables as recorded (secrets by name only), and its
    ``additionalProperty`` the facts of the run as ``PropertyValue`` entities: each GPU's
    UUID, model and memory, the NVIDIA driver and CUDA versions, the image ID, the exit code,
    the user's JupyterHub groups and the idle GPU-seconds.

    Each action and its properties are written as its record is read. Images, software, users
    and hubs are written once, after the actions, so they grow with how many there are; the
    root comes last and ``mentions`` every action, so the actions' ids (a few dozen bytes each)
    are the one thing kept per record: one pass cannot list what it has not yet seen.
    """
    yield '{"@context":' + canonical_json(CRATE_CONTEXT) + ',"@graph":[\n' + ",\n".join(canonical_json(e) for e in (
        {"@id": "ro-crate-metadata.json", "@type": "CreativeWork", "about": {"@id": "./"}, "conformsTo": {"@id": RO_CRATE}},
        {"@id": PROCESS_RUN_CRATE, "@type": "CreativeWork", "name": "Process Run Crate", "version": "0.5"},
        {"@id": license_url, "@type": "CreativeWork", "name": license_url} if license_url else _NO_LICENSE,
    ))
    seen = _Seen()
    for r in records:
        image = _image_entity(r)
        seen.note(r, image)
        action, facts = _action_entities(r, image_id=image["@id"], software_id=_software_id(image["@id"]))
        for entity in (action, *facts):
            yield ",\n" + canonical_json(entity)
        seen.mention(action["@id"])
    for entity in seen.contextual_entities():
        yield ",\n" + canonical_json(entity)
    authors = _one_or_list([{"@id": _hub_id(hub)} for hub in sorted(seen.hubs)])
    root = canonical_json({
        "@id": "./", "@type": "Dataset", "name": title,
        "description": "Jupyter servers started by gpuspawner: for each, the exact container image, the GPUs "
                       "(model and UUID), the NVIDIA driver and CUDA versions, the environment and the outcome.",
        "datePublished": published or seams.now_iso(),
        "license": {"@id": license_url or _NO_LICENSE["@id"]},
        "conformsTo": {"@id": PROCESS_RUN_CRATE},
        **({"author": authors, "publisher": authors} if seen.hubs else {}),
    })
    yield ",\n" + root[:-1] + ',"mentions":'
    yield from seen.mentions()
    yield "}\n]}\n"


class _Seen:
    """What a streamed crate lists once, after its actions: the distinct images, software,
    users and hubs, and the ids of the actions for the root's ``mentions``."""

    def __init__(self) -> None:
        self.images: dict[str, dict[str, Any]] = {}
        self.software: list[dict[str, Any]] = []
        self.users: set[str] = set()
        self.hubs: set[str] = set()
        self._blocks: list[str] = []  # the actions' {"@id": …}, joined a thousand at a time
        self._pending: list[str] = []
        self._count = 0

    def note(self, r: AuditRecord, image: dict[str, Any]) -> None:
        if image["@id"] not in self.images:
            self.images[image["@id"]] = image
            self.software.append(_software_entity(r, image))
        self.users.add(r.user)
        self.hubs.add(r.hub_id)

    def mention(self, action_id: str) -> None:
        self._pending.append(canonical_json({"@id": action_id}))
        self._count += 1
        if len(self._pending) == 1000:
            self._blocks.append(",".join(self._pending))
            self._pending.clear()

    def contextual_entities(self) -> Iterator[dict[str, Any]]:
        yield from self.images.values()
        yield from self.software
        for user in sorted(self.users):
            yield {"@id": _person_id(user), "@type": "Person", "name": user}
        for hub in sorted(self.hubs):
            yield {"@id": _hub_id(hub), "@type": "Organization", "name": f"The administrators of JupyterHub {hub}"}

    def mentions(self) -> Iterator[str]:
        """The JSON value of the root's ``mentions``: one reference alone, several as a list."""
        blocks = [*self._blocks, ",".join(self._pending)] if self._pending else self._blocks
        if self._count == 1:
            yield blocks[0]
            return
        yield "["
        for i, block in enumerate(blocks):
            yield ("," if i else "") + block
        yield "]"


def _fragment(text: str) -> str:
    return quote(text, safe=":@/+-._~")


def _person_id(user: str) -> str:
    return f"#user-{_fragment(user)}"


def _hub_id(hub: str) -> str:
    return f"#hub-{_fragment(hub)}"


def _software_id(image_id: str) -> str:
    return "#software-" + image_id.removeprefix("#image-")


def _parse(reference: str | None) -> ImageRef | None:
    try:
        return parse_image(reference) if reference else None
    except ImageReferenceError:
        return None


def _image_entity(r: AuditRecord) -> dict[str, Any]:
    """The image as the profile's ContainerImage; a registry only where one holds it."""
    requested = _parse(r.image_requested)
    pushed = _parse(r.repo_digest)
    digest = (pushed.digest if pushed else None) or r.image_id or "unresolved"
    key = f"{(r.image_requested or 'unknown').partition('@')[0]}@{digest}"
    entity: dict[str, Any] = {
        "@id": f"#image-{_fragment(key)}", "@type": "ContainerImage", "additionalType": {"@id": DOCKER_IMAGE},
    }
    if pushed and pushed.digest:
        entity.update(registry=pushed.registry, name=pushed.repository, sha256=pushed.digest.removeprefix("sha256:"))
    elif requested:
        entity["name"] = requested.repository
    if requested and requested.tag:
        entity["tag"] = requested.tag
    if not pushed:
        entity["description"] = (
            f"Image {r.image_id}, never pushed to a registry: it has no repository digest, so no registry "
            "can serve it and only a host that holds this image ID can run it."
            if r.image_id else
            "The spawn ended before the image was resolved: its digest is unknown."
        )
    return entity


def _software_entity(r: AuditRecord, image: dict[str, Any]) -> dict[str, Any]:
    """The software that ran: the Jupyter server of the image, named by the image's OCI labels."""
    labels = r.image_labels
    requested = _parse(r.image_requested)
    shown = requested.familiar_name if requested else "an unknown image"
    entity: dict[str, Any] = {
        "@id": _software_id(image["@id"]), "@type": "SoftwareApplication",
        "name": labels.get(_OCI + "title") or f"Jupyter server in {shown}",
        "description": f"The Jupyter server of image {r.image_requested or 'unknown'}, with all the image holds.",
    }
    version = labels.get(_OCI + "version") or (requested.tag if requested else None)
    if version:
        entity["softwareVersion"] = version
    url = labels.get(_OCI + "url") or labels.get(_OCI + "source") or labels.get(_OCI + "documentation")
    if url:
        entity["url"] = url
    return entity


def _action_entities(r: AuditRecord, *, image_id: str, software_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    action_id = f"#server-{_fragment(r.id)}"
    status = _ACTION_STATUS[r.outcome]
    action: dict[str, Any] = {
        "@id": action_id, "@type": "CreateAction",
        "name": f"Jupyter server {r.user}/{r.server}" if r.server else f"Jupyter server of {r.user}",
        "description": _describe(r),
        "instrument": {"@id": software_id}, "containerImage": {"@id": image_id}, "agent": {"@id": _person_id(r.user)},
        "startTime": r.started_at or r.requested_at,
        # The IRI as a plain string: what the RO-Crate validator (crs4/rocrate-validator) checks for.
        "actionStatus": status,
    }
    if r.stopped_at:
        action["endTime"] = r.stopped_at
    if r.error and status == FAILED:  # the profile: error only with FailedActionStatus
        action["error"] = r.error
    environment = [
        {"@id": f"{action_id}-env-{_fragment(name)}", "@type": "PropertyValue", "name": name, "value": value}
        for name, value in sorted(without_secrets(r.environment).items())
    ]
    facts = _facts(r, action_id)
    if environment:
        action["environment"] = _one_or_list([{"@id": e["@id"]} for e in environment])
    if facts:
        action["additionalProperty"] = _one_or_list([{"@id": f["@id"]} for f in facts])
    return action, environment + facts


def _one_or_list(refs: list[dict[str, str]]) -> dict[str, str] | list[dict[str, str]]:
    """RO-Crate 1.1 writes a single value, not a list of one."""
    return refs[0] if len(refs) == 1 else refs


def _facts(r: AuditRecord, action_id: str) -> list[dict[str, Any]]:
    """The run's facts as PropertyValues; propertyID names the audit record's field."""
    facts: list[dict[str, Any]] = []

    def fact(key: str, name: str, value: Any, field: str, **more: Any) -> None:
        if value is not None:
            facts.append({"@id": f"{action_id}-{key}", "@type": "PropertyValue", "name": name, "value": value,
                          "propertyID": field, **more})

    for i, d in enumerate(r.devices):
        which = {"description": f"GPU {i + 1} of {len(r.devices)}"}
        fact(f"gpu{i}-uuid", "GPU UUID", d.uuid, "devices.uuid", **which)
        fact(f"gpu{i}-model", "GPU model", d.model, "devices.model", **which)
        fact(f"gpu{i}-memory", "GPU memory", d.memory_total, "devices.memory_total", unitCode=BYTES, **which)
        fact(f"gpu{i}-mig-parent", "MIG parent GPU UUID", d.mig_parent, "devices.mig_parent", **which)
        fact(f"gpu{i}-mig-profile", "MIG profile", d.mig_profile, "devices.mig_profile", **which)
    if r.devices:
        fact("driver", "NVIDIA driver version", r.driver_version, "driver_version")
        fact("cuda", "CUDA driver version", r.cuda_driver_version, "cuda_driver_version")
        fact("cuda-requirement", "CUDA requirement of the image that the driver met", r.cuda_requirement,
             "cuda_requirement")
    fact("image-id", "Docker image ID", r.image_id, "image_id")
    fact("container-image-id", "Image ID of the container", r.container_image_id, "container_image_id")
    fact("exit-code", "Container exit code", r.exit_code, "exit_code")
    fact("oom-killed", "Killed for lack of memory", r.oom_killed, "oom_killed")
    for i, group in enumerate(r.groups):
        fact(f"group{i}", "JupyterHub group of the user", group, "groups")
    fact("idle-gpu-seconds", "Idle GPU-seconds", r.idle_gpu_seconds, "idle_gpu_seconds", unitCode=SECONDS,
         description="GPU-seconds the hub's samples saw the server's GPUs idle; a MIG slice counts its share")
    return facts


def _describe(r: AuditRecord) -> str:
    # Record text is shown as shell words: a value with a line break cannot fake a second
    # "To run it again" block for a reader to copy.
    gpus = ", ".join(f"{shell_word(d.model)} ({shell_word(d.uuid)})" for d in r.devices) or "no GPU"
    parts = [
        f"Profile {shell_word(r.profile) if r.profile else '(none)'}; {gpus}",
        f"{r.cpu_limit:g} CPUs" if r.cpu_limit else "",
        f"{r.mem_limit} bytes of memory" if r.mem_limit else "",
    ]
    text = "; ".join(p for p in parts if p) + f". Outcome: {r.outcome}."
    if r.error and _ACTION_STATUS[r.outcome] != FAILED:
        text += f" Note: {shell_word(r.error)}"
    return text + "\nTo run it again:\n" + reproduce_command(r)


# --- docker run -------------------------------------------------------------------------------

# What a variable's name must look like to reach the command (POSIX: a name a shell can set).
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
# parse_image takes any text with a "." or ":" before the first "/" for a registry; the command takes
# only a host name, an IPv4 or a bracketed IPv6 address, and a port.
_REGISTRY = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")
UNKNOWN_IMAGE = "<unknown image>"


def shell_word(text: str) -> str:
    """`text` as one shell word that bash reads back exactly, written as one line of printable text.

    Printable text is quoted as :func:`shlex.quote` does (a plain word stays bare). Text holding a
    line break, a carriage return or any other character that does not print (an escape sequence
    a terminal would act on, a bidi override) becomes bash's ``$'…'`` with each such character as
    its UTF-8 bytes, ``\\xHH``: in a comment it cannot start a new line, and on screen it shows.
    (``$'…'`` is read by bash, zsh and ksh, and by POSIX shells since POSIX.1-2024; ordinary values
    never need it.)
    """
    if text.isprintable():
        return shlex.quote(text)
    return "$'" + "".join(_ansi_c(ch) for ch in text) + "'"


def _ansi_c(ch: str) -> str:
    if ch in "\\'":
        return "\\" + ch
    if ch.isprintable():
        return ch
    return "".join(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))


def reproduce_command(record: AuditRecord, *, extra_names: Iterable[str] = ()) -> str:
    """One ``docker run`` that recreates the record's environment on another host.

    The image by repository digest, the same number of GPUs, the same limits and the same
    environment. A redacted variable is passed as ``-e NAME``, so docker takes its value from
    the shell that runs the command; a comment line says which. An image that was never
    pushed cannot be pulled elsewhere: the command then names the image ID and says so.

    The text is safe to paste into a shell whatever the record holds: every value from the
    record is one :func:`shell_word`, in the command and in the ``#`` comment lines before it,
    and no line holds a character that does not print. A value docker would misread rather
    than refuse is left out and a comment shows it: a variable whose name is not a shell
    variable name, an image reference docker does not accept (one starting with ``-`` would
    be read as an option), a limit that is not a number.
    """
    image, image_notes = _image(record)
    limits, limit_notes = _limits(record)
    environment, environment_notes = _environment(record, extra_names=extra_names)
    args = ["docker", "run", "--rm", "-it", "-p", "8888:8888", *limits, *environment, image,
            "jupyter", "server", "--ip=0.0.0.0", "--port=8888"]
    comments = [*image_notes, *environment_notes, *limit_notes]
    return "".join(f"# {c}\n" for c in comments) + " ".join(shell_word(a) for a in args)


def _image(record: AuditRecord) -> tuple[str, list[str]]:
    """The image the command names, and what the comments say about it: by repository digest where
    the record has a usable one; else the image ID, which only a host holding it can run; else the
    image as requested."""
    pushed = _reference(record.repo_digest)
    if pushed and pushed.digest:
        return pushed.by_digest(), []
    notes = []
    if record.repo_digest:
        notes.append(f"The record's repository digest {shell_word(record.repo_digest)} is not a reference by digest "
                     "(name@sha256:…) that docker accepts, so it is left out.")
    if record.image_id and _IMAGE_ID.fullmatch(record.image_id):
        where = "Only" if record.repo_digest else "This image was never pushed to a registry, so only"
        return record.image_id, [*notes, f"{where} a host that has image {record.image_id} can run it."]
    if record.image_id:
        notes.append(f"The record's image ID {shell_word(record.image_id)} is not an image ID (sha256: and 64 hex "
                     "digits), so it is left out.")
    requested = record.image_requested
    if requested and _reference(requested):
        return requested, [*notes, "The record names this image only as requested: that name may now point to "
                                   "a different image."]
    if requested:
        notes.append(f"The record's requested image {shell_word(requested)} is not an image reference docker "
                     "accepts, so it is left out.")
    return UNKNOWN_IMAGE, notes or ["The record names no image."]


def _reference(text: str | None) -> ImageRef | None:
    """`text` parsed, or None where docker would refuse or misread it (a registry part that is no host)."""
    ref = _parse(text)
    return ref if ref and _REGISTRY.fullmatch(ref.registry) else None


def _limits(record: AuditRecord) -> tuple[list[str], list[str]]:
    """The GPU count and the CPU and memory limits as options, and a comment for a limit that is not
    a number (only a tampered record holds one)."""
    args = ["--gpus", str(len(record.devices))] if record.devices else []
    notes = []
    cpus, memory = record.cpu_limit, record.mem_limit
    if cpus and isinstance(cpus, (int, float)) and not isinstance(cpus, bool):
        args += ["--cpus", f"{cpus:g}"]
    elif cpus:
        notes.append(f"The record's CPU limit {shell_word(str(cpus))} is not a number, so it is left out.")
    if memory and isinstance(memory, int) and not isinstance(memory, bool):
        args += ["--memory", str(memory)]
    elif memory:
        notes.append(f"The record's memory limit {shell_word(str(memory))} is not a number of bytes, "
                     "so it is left out.")
    return args, notes


def _environment(record: AuditRecord, *, extra_names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The ``-e`` options, and comments on the variables the caller must set and those left out."""
    # Redacted again here: records written before redaction was broadened may still hold secrets.
    environment = sorted(without_secrets(record.environment, extra_names=extra_names).items())
    kept = [(name, value) for name, value in environment if _SHELL_NAME.fullmatch(name)]
    args = []
    for name, value in kept:
        args += ["-e", name if is_redacted(value) else f"{name}={value}"]
    notes = []
    redacted = [name for name, value in kept if is_redacted(value)]
    if redacted:
        was, them = ("was", "it") if len(redacted) == 1 else ("were", "them")
        notes.append(f"{_and(redacted)} {was} redacted in the audit record: set {them} in your shell first; "
                     "docker run -e NAME takes the value from there.")
    left_out = [shell_word(name) for name, _ in environment if not _SHELL_NAME.fullmatch(name)]
    if left_out:
        which = ("variable", "its name is not a shell variable name") if len(left_out) == 1 else (
            "variables", "their names are not shell variable names")
        notes.append(f"Left out: {which[0]} {_and(left_out)}: {which[1]} (letters, digits and _, not starting "
                     "with a digit).")
    return args, notes


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
