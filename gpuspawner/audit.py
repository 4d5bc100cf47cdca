"""A server's reproducibility record, and the whole-record seals of the earlier store format.

A record says which environment a server ran: image (as requested, by repository digest and
image ID), the profile as configured, the devices and the driver, times and outcome. The log
that holds records, entry by entry, is :mod:`gpuspawner.auditlog`.

Stores written by gpuspawner before the append-only log sealed each record whole when it
ended: an *opening seal* (opening number, MAC over who, which server and when) and a *seal* (the
next sequence number, MAC over its content and the previous seal), with the key's
:class:`SealingStart` and a :class:`ChainHead` kept outside. That format is read only when such
a store is carried over into the log: :func:`verify_store` checks it first.

Exports live in :mod:`gpuspawner.export`, redaction in :mod:`gpuspawner.redaction`.

Pure code: no docker, pynvml, jupyterhub or database imports.
"""

from __future__ import annotations

import hashlib
import hmac
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
    hostname: str | None = None  # the host the server ran on (on a swarm: its node's host name)
    node: str | None = None  # the Docker Swarm node's ID, for a server of GPUSwarmSpawner
    docker_version: str | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    # the image's CUDA requirements (NVIDIA_REQUIRE_*, CUDA_VERSION) that the driver met, as the spawn judged
    # them (gpuspawner.cudareq); None for a CPU-only server, an image with none, or a record before they were kept
    cuda_requirement: str | None = None
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
    groups: tuple[str, ...] = ()  # the user's JupyterHub groups when the server was requested
    # GPU-seconds (a MIG slice counting its share of its GPU) of the holding time during which the
    # hub's samples saw the server's GPUs under the idle threshold; None where never sampled.
    # Written when the server stops.
    idle_gpu_seconds: float | None = None
    # the seal, set once the record is final: its closing entry's number and seal, and the seal before it
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None
    # set by a reader where entries of this record failed its checks (what they were), or the
    # seals could not be checked; None for a record read whole, every seal holding
    integrity: str | None = None

    @property
    def sealed(self) -> bool:
        return self.hash is not None and self.seq is not None

    def content(self) -> dict[str, Any]:
        """Everything but the seal, as plain JSON-able data."""
        data = record_to_dict(self)
        for key in ("seq", "prev_hash", "hash", "integrity"):
            data.pop(key)
        return data


RECORD_FIELDS = tuple(f.name for f in fields(AuditRecord))


def record_to_dict(record: AuditRecord) -> dict[str, Any]:
    """The record as plain JSON-able data (a shallow walk: dataclasses.asdict deep-copies, slowly)."""
    data = {name: getattr(record, name) for name in RECORD_FIELDS}
    data["image_labels"] = dict(record.image_labels)
    data["environment"] = dict(record.environment)
    data["device_requests"] = [dict(r) for r in record.device_requests]
    data["devices"] = [dict(d.__dict__) for d in record.devices]
    data["groups"] = list(record.groups)
    return data


def record_from_dict(data: Mapping[str, Any]) -> AuditRecord:
    """A record from :func:`record_to_dict`'s data; fields an older gpuspawner did not write take their
    defaults. (Seals are checked against the stored text, so an older sealed record still verifies.)"""
    values = {k: data[k] for k in RECORD_FIELDS if k in data}
    values["devices"] = tuple(RecordedDevice(**d) for d in data.get("devices") or ())
    values["device_requests"] = tuple(data.get("device_requests") or ())
    values["image_labels"] = dict(data.get("image_labels") or {})
    values["environment"] = dict(data.get("environment") or {})
    values["groups"] = tuple(data.get("groups") or ())
    return AuditRecord(**values)


def canonical_json(data: Any) -> str:
    """One spelling per value: sorted keys, no spaces, UTF-8 kept."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def key_id(key: bytes) -> str:
    """A short public name for a sealing key: tells keys apart without revealing them."""
    return hashlib.sha256(b"gpuspawner audit key\n" + key).hexdigest()[:16]


def _mac(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def seal_digest(*, seq: int, prev_hash: str, content_json: str, key: bytes | None) -> str:
    """The seal of record number `seq`: its canonical content, chained to the previous seal.

    HMAC-SHA256 with the hub's sealing key; ``key=None`` is the plain SHA-256 of stores sealed
    before keys (gpuspawner 0.1), which anyone who can write the database could recompute.
    """
    message = f"{seq}\n{prev_hash}\n{content_json}"
    if key is None:
        return hashlib.sha256(message.encode()).hexdigest()
    return _mac(key, message)


def seal(record: AuditRecord, *, seq: int, prev_hash: str, key: bytes) -> AuditRecord:
    """The record sealed as number `seq` with `key`, chained to the previous sealed record's hash."""
    if record.outcome not in FINAL_OUTCOMES:
        raise ValueError(f"record {record.id} is {record.outcome}; only final records are sealed")
    digest = seal_digest(seq=seq, prev_hash=prev_hash, content_json=canonical_json(record.content()), key=key)
    return replace(record, seq=seq, prev_hash=prev_hash, hash=digest)


# What a record's opening seal covers: who asked, for which server, of which hub, when. The
# rest of an open record still changes as the server starts; it is sealed when it ends.
OPENING_FIELDS = ("id", "hub_id", "user", "server", "requested_at")


def opening_json(data: Mapping[str, Any]) -> str:
    return canonical_json({name: data.get(name) for name in OPENING_FIELDS})


def opening_digest(*, key: bytes, opened: int, opening: str) -> str:
    """The opening seal of the `opened`-th record written to the store: every record gets one
    when it is inserted, so a record deleted before it was sealed leaves a gap in the numbers."""
    return _mac(key, f"open\n{opened}\n{opening}")


@dataclass(frozen=True)
class SealingStart:
    """When a store began to be sealed with a key, and what it held then; kept in the store,
    under its own MAC, so that neither the key nor the boundary can be changed unseen.

    Records 1..``legacy_sealed`` were sealed with plain SHA-256 before (the chain's link from
    record ``legacy_sealed + 1`` to ``legacy_head`` holds them fast from then on); the
    ``opened_before`` records already in the store got opening numbers 1..``opened_before``.
    """

    key_id: str
    introduced_at: str
    legacy_sealed: int = 0
    legacy_head: str = GENESIS
    opened_before: int = 0
    mac: str = ""

    def body(self) -> str:
        return canonical_json({k: v for k, v in self.__dict__.items() if k != "mac"})

    def signed(self, key: bytes) -> SealingStart:
        return replace(self, mac=_mac(key, "start\n" + self.body()))

    def valid_for(self, key: bytes) -> bool:
        return self.key_id == key_id(key) and hmac.compare_digest(self.mac, _mac(key, "start\n" + self.body()))

    def to_json(self) -> str:
        return canonical_json(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> SealingStart:
        data = json.loads(text)
        return cls(**{k: data[k] for k in ("key_id", "introduced_at", "legacy_sealed", "legacy_head", "opened_before", "mac")})


@dataclass(frozen=True)
class ChainHead:
    """The newest sealed record (number and seal) and how many records were opened: kept
    outside the database too, so deleting the newest records is seen."""

    seq: int = 0
    hash: str = GENESIS
    opened: int = 0

    def text(self) -> str:
        return f"{self.seq}:{self.hash}"


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
class OpenedEntry:
    """Any record as stored, sealed or not: its opening number and seal, and what they cover."""

    id: str
    opened: int | None
    open_mac: str | None
    opening: str
    seq: int | None
    hash: str | None


MAX_PROBLEMS = 20  # listed one by one; more are counted


@dataclass(frozen=True)
class Verification:
    ok: bool
    checked: int  # sealed records checked
    problems: tuple[str, ...] = ()
    more_problems: int = 0
    open_records: int = 0
    head: ChainHead | None = None  # the store's own head: newest sealed record, records opened
    start: SealingStart | None = None
    key: str | None = None  # the id of the key checked with

    @property
    def first_problem(self) -> str | None:
        return self.problems[0] if self.problems else None

    def message(self) -> str:
        """What ``gpuspawner audit verify`` prints: a verdict line, then the facts to keep."""
        if self.ok:
            lines = [f"OK: {self.checked} sealed records, {self.open_records} open; chain intact."]
        else:
            lines = failed_lines(self.problems, self.more_problems, read=f"{self.checked} sealed records checked")
        if self.head is not None:
            lines.append(f"Head: {self.head.text()} ({self.head.opened} records opened)")
        if self.start is not None:
            legacy = (
                f"; records 1-{self.start.legacy_sealed} were sealed with plain SHA-256 before it"
                if self.start.legacy_sealed else ""
            )
            lines.append(f"Sealing key {self.start.key_id}, used since {self.start.introduced_at}{legacy}.")
        return "\n".join(lines)


class Problems:
    """What a check found: the first :data:`MAX_PROBLEMS` listed one by one, the rest counted."""

    def __init__(self) -> None:
        self.listed: list[str] = []
        self.more = 0

    def add(self, text: str) -> None:
        if len(self.listed) < MAX_PROBLEMS:
            self.listed.append(text)
        else:
            self.more += 1


def failed_lines(problems: tuple[str, ...], more: int, *, read: str) -> list[str]:
    """A failed check's verdict line and its problems, as ``verify`` prints them; `read` says how much it read."""
    count = len(problems) + more
    lines = [f"FAILED: {count} problem{'s' if count != 1 else ''} ({read}):"]
    lines += [f"  - {p}" for p in problems]
    if more:
        lines.append(f"  - … and {more} more")
    return lines


def _span(first: int, last: int, *, what: str = "records", verb: str = "are") -> str:
    """ "records #3-#5 are", or "record #3 is" for one."""
    if first == last:
        return f"{what.replace('records', 'record')} #{first} {dict(are='is', were='was').get(verb, verb)}"
    return f"{what} #{first}-#{last} {verb}"


def verify_store(
    *,
    key: bytes,
    start: SealingStart | None,
    sealed: Iterable[SealedEntry | AuditRecord],
    opened: Iterable[OpenedEntry] = (),
    head_file: ChainHead | None = None,
    head_file_name: str = "",
    head_required: bool = True,
    expected_head: tuple[int, str] | None = None,
) -> Verification:
    """Check a whole store: every problem found, not only the first.

    ``sealed``: the sealed records in sequence order; ``opened``: every record in opening
    order, then those without an opening number. ``head_file``: the head kept outside the
    database (None: missing, itself a problem once a store has a key); ``expected_head``: a
    head kept elsewhere that this chain must still contain.
    """
    problems = Problems()
    if start is None:
        problems.add("the store has no record of its sealing key (deleted, or the store was replaced)")
        start_checked = SealingStart(key_id="", introduced_at="")
    else:
        start_checked = start
        if not start.valid_for(key):
            problems.add(
                f"the store's sealing-key record does not match this key ({key_id(key)}; the record names "
                f"{start.key_id}): the key or the record was swapped or changed"
            )
    wanted: set[int] = set()
    if head_file is not None and head_file.seq:
        wanted.add(head_file.seq)
    if expected_head is not None:
        wanted.add(expected_head[0])
    found: dict[int, str | None] = {}

    prev, expected_seq, checked, last_seq, last_hash = GENESIS, 1, 0, 0, GENESIS
    for item in sealed:
        entry = item if isinstance(item, SealedEntry) else SealedEntry.of(item)
        seq = entry.seq or 0
        if seq > expected_seq:
            problems.add(f"{_span(expected_seq, seq - 1, what='sealed records')} missing (deleted)")
            prev = entry.prev_hash or ""
        elif entry.prev_hash != prev:
            problems.add(f"record {entry.id} (#{seq}): its link to the previous sealed record does not match")
        legacy = seq <= start_checked.legacy_sealed
        digest = seal_digest(seq=seq, prev_hash=entry.prev_hash or "", content_json=entry.content_json, key=None if legacy else key)
        if not hmac.compare_digest(digest, entry.hash or ""):
            problems.add(f"record {entry.id} (#{seq}): its content does not match its seal")
        if legacy and seq == start_checked.legacy_sealed and entry.hash != start_checked.legacy_head:
            problems.add(f"record {entry.id} (#{seq}): the records sealed before the key changed after the key took them over")
        if seq in wanted:
            found[seq] = entry.hash
        prev, expected_seq, checked, last_seq, last_hash = entry.hash or "", seq + 1, checked + 1, seq, entry.hash or ""
    if start_checked.legacy_sealed > last_seq:
        problems.add(f"{_span(last_seq + 1, start_checked.legacy_sealed, what='sealed records')} missing (deleted; sealed before the key)")

    expected_open, open_records, last_opened = 1, 0, 0
    for o in opened:
        if o.hash is not None and o.seq is None:
            problems.add(f"record {o.id} carries a seal but no sequence number: the hub did not seal it")
        elif o.hash is None:
            open_records += 1
        if o.opened is None:
            problems.add(f"record {o.id} has no opening seal: the hub did not write it")
            continue
        if o.opened > expected_open:
            problems.add(f"{_span(expected_open, o.opened - 1, what='records opened as')} missing (deleted)")
        if not hmac.compare_digest(opening_digest(key=key, opened=o.opened, opening=o.opening), o.open_mac or ""):
            problems.add(f"record {o.id}: its user, server, hub or request time does not match its opening seal")
        expected_open, last_opened = o.opened + 1, o.opened

    if head_file is None and head_required:
        problems.add(f"the chain head kept outside the database{' (' + head_file_name + ')' if head_file_name else ''} is missing")
    elif head_file is not None:
        if head_file.seq > last_seq:
            problems.add(
                f"the store ends at sealed record #{last_seq}, but the head kept outside the database is "
                f"#{head_file.seq}: {_span(last_seq + 1, head_file.seq, verb='were')} deleted"
            )
        elif head_file.seq and found.get(head_file.seq) != head_file.hash:
            problems.add(f"sealed record #{head_file.seq} is not the one the head kept outside the database names")
        if head_file.opened > last_opened:
            problems.add(
                f"the store holds records opened up to #{last_opened}, but the head kept outside the database "
                f"counts {head_file.opened}: {_span(last_opened + 1, head_file.opened, what='records opened as', verb='were')} deleted"
            )
    if expected_head is not None:
        seq, digest = expected_head
        if seq > last_seq:
            problems.add(f"the store ends at sealed record #{last_seq}, before the expected head #{seq}")
        elif found.get(seq) != digest:
            problems.add(f"sealed record #{seq} is not the expected head {seq}:{digest[:12]}…: the chain was rewritten")
    return Verification(
        ok=not problems.listed,
        checked=checked,
        problems=tuple(problems.listed),
        more_problems=problems.more,
        open_records=open_records,
        head=ChainHead(last_seq, last_hash, last_opened),
        start=start,
        key=key_id(key),
    )
