"""The audit log: entries appended one after another, each sealed when it is written.

A server's life is a run of entries (opened, devices granted, image resolved, container
created, started, running, ended), each appended to one log shared by every server. Entry
number ``n`` carries an HMAC-SHA256, with the hub's sealing key (which the database never
holds), over everything stored in its row and over the seal of entry ``n - 1``. Nothing in the
log is ever changed in place, and the hub reads back only entries whose seal holds, so there
is no moment at which the hub seals content that someone else wrote.

Entry 1 is the log's *genesis*: it names the key (by :func:`key_id`) and, for a store carried
over from a gpuspawner that sealed whole records, what the carried store held. The newest
entry's number and seal, the *head* (:class:`Head`), is kept outside the database too (the
hub's head file, the audit service's witness, any copy an admin keeps): a log that no longer
contains a head it once had was rolled back or rewritten.

A record is a view over its entries (:func:`fold`); its ``ended`` entry also carries the whole
final record, and the columns usage adds up (:class:`UsageColumns`), so exports and usage read
one row per ended server.

:func:`verify_log` reads every row of the log and names each problem: a row outside the
numbering (none, zero, negative, text, duplicated), a gap, a broken link, a seal that does not
hold, a head kept elsewhere that the log no longer contains.

Pure code: no docker, pynvml, jupyterhub or database imports.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from . import usage
from .audit import (
    FINAL_OUTCOMES,
    GENESIS,
    AuditRecord,
    Problems,
    canonical_json,
    failed_lines,
    key_id,
    record_from_dict,
    record_to_dict,
)
from .times import parse_time

FORMAT = 3  # the log's format; 1 and 2 sealed whole records (gpuspawner.audit's SealingStart)

# What an entry may be. "genesis" is entry 1; "adopted" carries a record over from a store of
# an earlier format; the rest are one server's life, "opened" first and "ended" last.
KINDS = ("genesis", "adopted", "opened", "requested", "devices", "image", "container", "started", "running", "noted", "ended")
OPENING_KINDS = frozenset({"opened", "adopted"})


@dataclass(frozen=True)
class UsageColumns:
    """What usage adds up, kept in columns of a record's closing entry: epoch seconds, the GPUs the
    devices are worth (a MIG slice its share), their count, ``[[model, share], …]`` and the groups as
    canonical JSON. None where the record held no devices or never started."""

    started: float | None = None
    stopped: float | None = None
    gpus: float | None = None
    device_count: int | None = None
    idle: float | None = None
    models: str | None = None
    groups: str | None = None

    @classmethod
    def of(cls, record: AuditRecord) -> UsageColumns:
        shares = [usage.gpu_share(d) for d in record.devices]
        models = [[usage.model_label(d), share] for d, share in zip(record.devices, shares, strict=True)]
        return cls(
            started=_epoch(record.started_at), stopped=_epoch(record.stopped_at),
            gpus=float(sum(shares)), device_count=len(models),
            idle=None if record.idle_gpu_seconds is None else float(record.idle_gpu_seconds),
            models=canonical_json(models), groups=canonical_json(list(record.groups)),
        )


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return parse_time(text).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class Entry:
    """One row of the log, exactly as stored (so ``n`` may be text or None in a forged row).

    ``body`` is canonical JSON: the record's content for "opened", "adopted" and "ended", the
    changed fields otherwise; ``body_sha256`` its digest, so a seal can be checked from the
    row's columns without reading the body. The record's who/what/when columns are set on
    opening and closing entries, the usage columns on closing ones.
    """

    n: Any
    prev: Any
    mac: Any
    record_id: Any
    kind: Any
    at: Any
    body: Any
    body_sha256: Any
    hub_id: Any = None
    user: Any = None
    server: Any = None
    profile: Any = None
    outcome: Any = None
    requested_at: Any = None
    started: Any = None
    stopped: Any = None
    gpus: Any = None
    device_count: Any = None
    idle: Any = None
    models: Any = None
    groups: Any = None
    usage_mac: Any = None

    def sealed_columns(self) -> list[Any]:
        """Every column but the seal, the body by its digest: what the seal covers."""
        return [FORMAT, *(getattr(self, name) for name in SEALED_COLUMNS)]

    def with_body_digest(self) -> Entry:
        return replace(self, body_sha256=hashlib.sha256(str(self.body).encode()).hexdigest())

    @property
    def body_matches(self) -> bool:
        return isinstance(self.body, str) and hashlib.sha256(self.body.encode()).hexdigest() == self.body_sha256


COLUMNS = tuple(f.name for f in fields(Entry))
SEALED_COLUMNS = tuple(name for name in COLUMNS if name not in ("mac", "body"))
_RECORD_COLUMNS = ("hub_id", "user", "server", "profile", "outcome", "requested_at")
# What a closing entry's usage seal covers: what usage adds up, and where the entry stands in the log.
USAGE_COLUMNS = ("n", "record_id", "kind", "user", "server", "profile", "outcome", "requested_at", "started", "stopped",
                 "gpus", "device_count", "idle", "models", "groups")


def entry_mac(key: bytes, entry: Entry) -> str:
    """The seal of `entry`: HMAC-SHA256 over its columns (types included: 5 and "5" differ) and
    its body's digest, which holds its link to the entry before it."""
    return hmac.new(key, canonical_json(entry.sealed_columns()).encode(), hashlib.sha256).hexdigest()


def usage_text(values: Iterable[Any]) -> bytes:
    """What a usage seal covers: the :data:`USAGE_COLUMNS` values in order, as text (quick to build
    for a million rows; the entry's own seal holds their types)."""
    return "\x1f".join(map(str, values)).encode()


def usage_mac(key: bytes, values: Iterable[Any]) -> str:
    """A closing entry's usage seal: lets ``gpuspawner usage`` check each row it adds up from its
    columns alone. The entry's seal covers this one too."""
    return hmac.digest(key, usage_text(values), "sha256").hex()


def seal_holds(key: bytes, entry: Entry) -> bool:
    """Whether the entry's seal, and a closing entry's usage seal, hold (a non-closing entry has none)."""
    if not isinstance(entry.mac, str) or not hmac.compare_digest(entry_mac(key, entry), entry.mac):
        return False
    expected = usage_mac(key, (getattr(entry, name) for name in USAGE_COLUMNS)) if is_closing(entry) else None
    return bool(entry.usage_mac == expected)


def is_number(value: Any) -> bool:
    """An entry number as the log numbers them: a whole number from 1 (never text, a bool or 0)."""
    return type(value) is int and value > 0


@dataclass(frozen=True)
class Head:
    """The newest entry of a log: its number and seal. ``n == 0`` is a log with nothing in it."""

    n: int = 0
    mac: str = GENESIS

    def text(self) -> str:
        return f"{self.n}:{self.mac}"

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "n": self.n, "mac": self.mac})

    @classmethod
    def from_json(cls, text: str) -> Head:
        """A head as a head file holds it; ValueError, saying what is wrong, for anything else."""
        try:
            data = json.loads(text)
        except ValueError:
            raise ValueError("not JSON") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a head of an audit log of format {FORMAT} (an older head file, or another file)")
        n, mac = data.get("n"), data.get("mac")
        if type(n) is not int or n < 0 or not isinstance(mac, str) or not _HEX64.match(mac):
            raise ValueError(f"no entry number and seal in it ({data!r:.120})")
        return cls(n, mac)


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEAD_TEXT = re.compile(r"^(\d+):([0-9a-f]{64})$")


def parse_head(text: str) -> Head:
    """``N:SEAL`` as ``gpuspawner audit verify`` prints it, e.g. ``12:3fa2…`` (64 hex digits)."""
    m = _HEAD_TEXT.match(text.strip().lower())
    if not m:
        raise ValueError(f"{text!r:.80} is not a head; expected N:SEAL as `gpuspawner audit verify` prints it, e.g. 12:{'3f' * 32}")
    return Head(int(m.group(1)), m.group(2))


def head_from_text(text: str) -> Head:
    """A head from a file kept anywhere: a head file's JSON, or text whose last ``N:SEAL`` (such as
    verify's ``Head:`` line) names it. ValueError, saying what it expected, for anything else."""
    stripped = text.strip()
    if stripped.startswith("{"):
        return Head.from_json(stripped)
    found = re.findall(r"(?<![0-9a-f:])(\d+:[0-9a-f]{64})(?![0-9a-f])", stripped.lower())
    if not found:
        raise ValueError("no head in it: expected a head file's JSON or an N:SEAL line as `gpuspawner audit verify` prints it")
    return parse_head(found[-1])


# --- Making entries ------------------------------------------------------------------------------


def _record_columns(record: AuditRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in _RECORD_COLUMNS}


def _content(record: AuditRecord) -> str:
    """A record's content as an entry holds it: the fields it has (an unset one reads back as its default)."""
    return canonical_json({k: v for k, v in record.content().items() if v not in (None, {}, [])})


def opening(record: AuditRecord, *, at: str) -> Entry:
    """The entry that opens a server's record (unsealed: :func:`chain` numbers and seals it)."""
    return _unsealed(record.id, "opened", at, _content(record), **_record_columns(record))


def change(record_id: str, changes: Mapping[str, Any], *, at: str) -> Entry:
    """An entry of changes to an open record; its kind says what happened (:func:`kind_of`)."""
    probe = record_to_dict(replace(_BLANK, **changes))
    return _unsealed(record_id, kind_of(changes), at, canonical_json({name: probe[name] for name in changes}))


def closing(record: AuditRecord, *, at: str, kind: str = "ended") -> Entry:
    """The entry that ends a record (or carries a final one over), holding the whole final record."""
    columns = {**_record_columns(record), **UsageColumns.of(record).__dict__}
    return _unsealed(record.id, kind, at, _content(record), **columns)


def genesis(*, key: bytes, at: str, adopted: Mapping[str, Any] | None = None) -> Entry:
    """Entry 1: the log's key, and what a carried-over store held (None: a new store)."""
    body = {"format": FORMAT, "key_id": key_id(key), "created_at": at, "adopted": dict(adopted) if adopted else None}
    return _unsealed("", "genesis", at, canonical_json(body))


_BLANK = AuditRecord(id="", hub_id="", user="", server="", requested_at="")


def _unsealed(record_id: str, kind: str, at: str, body: str, **columns: Any) -> Entry:
    return Entry(n=None, prev=None, mac=None, record_id=record_id, kind=kind, at=at, body=body, body_sha256=None,
                 **columns).with_body_digest()


def kind_of(changes: Mapping[str, Any]) -> str:
    """What a change says happened, for an auditor reading the log."""
    if changes.get("outcome") == "running":
        return "running"
    if changes.get("outcome") == "starting" or "started_at" in changes:
        return "started"
    for field_name, kind in (("container_id", "container"), ("image_id", "image"), ("repo_digest", "image"),
                             ("devices", "devices"), ("profile", "requested")):
        if field_name in changes:
            return kind
    return "noted"


def chain(entries: Iterable[Entry], *, after: Head, key: bytes) -> list[Entry]:
    """`entries` numbered from ``after.n + 1`` and sealed, each linked to the one before."""
    sealed = []
    n, prev = after.n, after.mac
    for entry in entries:
        n += 1
        numbered = replace(entry, n=n, prev=prev)
        if is_closing(numbered):
            numbered = replace(numbered, usage_mac=usage_mac(key, (getattr(numbered, name) for name in USAGE_COLUMNS)))
        numbered = replace(numbered, mac=entry_mac(key, numbered))
        sealed.append(numbered)
        prev = numbered.mac
    return sealed


# --- Reading records back ------------------------------------------------------------------------


def fold(entries: Iterable[Entry]) -> AuditRecord | None:
    """A record from its entries, in log order: the opening's content, each change applied, the
    closing's content last. An ended record's ``seq`` and ``hash`` are its closing entry's number
    and seal, ``prev_hash`` the seal before it; ``integrity`` stays unset (the caller checks seals)."""
    data: dict[str, Any] | None = None
    last: Entry | None = None
    for entry in entries:
        body = json.loads(entry.body)
        if entry.kind in OPENING_KINDS or entry.kind == "ended":
            data = dict(body)
        elif data is not None:
            data.update(body)
        last = entry
    if data is None or last is None:
        return None
    if is_closing(last):
        data.update(seq=last.n, prev_hash=last.prev, hash=last.mac)
    return record_from_dict(data)


def is_closing(entry: Entry) -> bool:
    """Whether `entry` holds a final record (an "ended" entry, or a final record carried over)."""
    return entry.kind == "ended" or (entry.kind == "adopted" and entry.outcome in FINAL_OUTCOMES)


def row_problem(entry: Entry, *, key: bytes | None) -> str | None:
    """Why a reader must not take `entry` as the hub wrote it, checked on the row alone (its number
    and, with the key, its seal and body), or None."""
    if not is_number(entry.n):
        return f"entry number {entry.n!r} is outside the log's numbering"
    if key is not None and not (seal_holds(key, entry) and entry.body_matches):
        return f"entry #{entry.n} does not match its seal"
    return None


# --- Verification --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verification:
    """What :func:`verify_log` found: the verdict, the problems (the first :data:`MAX_PROBLEMS`, the rest
    counted), the log's own head, and how many records are open and closed."""

    ok: bool
    entries: int
    problems: tuple[str, ...] = ()
    more_problems: int = 0
    head: Head = Head()
    records: int = 0
    open_records: int = 0
    key: str = ""
    genesis: Mapping[str, Any] | None = None

    def message(self) -> str:
        """What ``gpuspawner audit verify`` prints: a verdict line, then the facts to keep."""
        if self.ok:
            lines = [f"OK: {self.entries} entries, {self.records} records ({self.open_records} open); every seal holds."]
        else:
            lines = failed_lines(self.problems, self.more_problems, read=f"{self.entries} entries read")
        lines.append(f"Head: {self.head.text()}")
        if self.genesis:
            adopted = self.genesis.get("adopted")
            carried = f"; carried over {adopted.get('records', 0)} records of an earlier store" if isinstance(adopted, dict) else ""
            lines.append(f"Sealing key {self.genesis.get('key_id')}, log started {self.genesis.get('created_at')}{carried}.")
        return "\n".join(lines)


def _span(first: int, last: int) -> str:
    return f"entry #{first} is" if first == last else f"entries #{first}-#{last} are"


@dataclass(frozen=True)
class Witness:
    """A head kept somewhere the database writer cannot reach, and what to call it in a problem."""

    head: Head
    name: str


class LogWalk:
    """One pass over the log's rows in the order of their numbers, checking each against the one before.

    From the genesis entry (`start` ``Head()``), or from entry ``start.n`` on (a witness that has seen it:
    that entry's own link is left to its seal and the witness's check of it). Without a `key` the seals
    go unchecked; the numbering, the links and each of `witnesses` are checked all the same. Feed it with
    :meth:`row`, then :meth:`finish`; ``problems`` says what it found.
    """

    def __init__(self, key: bytes | None, witnesses: Iterable[Witness] = (), *, start: Head = Head()) -> None:
        self.key = key
        self.start = start
        self.problems = Problems()
        self.expected = max(start.n, 1)
        self.prev = GENESIS if start.n == 0 else start.mac
        self.head = start
        self.entries = 0  # rows read
        self.numbered = 0  # rows read in their place in the numbering
        self.witnesses = [w for w in witnesses if w.head.n > 0]
        self.seen: set[int] = set()
        self.genesis: dict[str, Any] | None = None
        self.open: set[str] = set()
        self.closed = 0

    def row(self, entry: Entry) -> None:
        self.entries += 1
        n = entry.n
        if not is_number(n):
            self.problems.add(f"a row of record {entry.record_id!s:.80} has entry number {n!r:.40}: it is outside the log's numbering")
            return
        if n < self.expected:
            self.problems.add(f"entry #{n} appears again after #{self.expected - 1} (a duplicated or moved row)")
            return
        if n > self.expected:
            self.problems.add(f"{_span(self.expected, n - 1)} missing (deleted){self._seen_among(self.expected, n - 1)}")
        elif n == 1 and entry.kind != "genesis":
            self.problems.add("entry #1 is not the log's genesis entry")
        elif n != self.start.n and entry.prev != self.prev:
            self.problems.add(f"entry #{n}: its link to the entry before it does not match (a row moved or replaced)")
        if self.key is not None and not (seal_holds(self.key, entry) and entry.body_matches):
            self.problems.add(self._broken_seal(entry))
        elif n == 1:
            self.genesis = _json_object(entry.body) if entry.kind == "genesis" else None
        else:
            self._record(entry)
        for witness in self.witnesses:
            if witness.head.n == n:
                self.seen.add(n)
                if entry.mac != witness.head.mac:
                    self.problems.add(f"entry #{n} is not the one {witness.name} has seen: the log was rewritten")
        self.numbered += 1
        self.expected, self.prev, self.head = n + 1, str(entry.mac), Head(n, str(entry.mac))

    def _seen_among(self, first: int, last: int) -> str:
        return "".join(f"; {w.name} has seen #{w.head.n}" for w in self.witnesses if first <= w.head.n <= last)

    def _broken_seal(self, entry: Entry) -> str:
        if entry.n == 1 and entry.kind == "genesis" and self.key is not None:
            named = _json_object(entry.body).get("key_id")
            if named and named != key_id(self.key):
                return (f"the log was started with key {named!s:.20}, not this key ({key_id(self.key)}): "
                        "the key file was replaced, or this is another hub's log")
        return f"entry #{entry.n} ({entry.kind!s:.20} of record {entry.record_id!s:.80}): its content does not match its seal"

    def _record(self, entry: Entry) -> None:
        rid = str(entry.record_id)
        if entry.kind in OPENING_KINDS:
            self.open.add(rid)
        if is_closing(entry):
            self.open.discard(rid)
            self.closed += 1

    def finish(self, *, end: int | None = None) -> None:
        """The checks only the whole pass can make: a log read from its start has its genesis entry, and the
        log does not end before any witness's head. `end`: the log's newest entry number as read apart from
        the rows, for the message where no row from ``start.n`` on was there."""
        if self.numbered:
            last = self.head.n
        else:  # nothing from start.n on: the log ends before it
            last = max(0, self.start.n - 1 if end is None else min(end, self.start.n - 1))
        if self.start.n == 0 and not self.entries:
            self.problems.add("the log has no entries, not even its genesis entry (its rows were deleted)")
        elif self.start.n == 0 and self.genesis is None and not self.problems.listed:
            self.problems.add("the log has no genesis entry (its first rows were deleted, or this is not a gpuspawner log)")
        for witness in self.witnesses:
            n = witness.head.n
            if n not in self.seen and last < n:
                self.problems.add(f"the log ends at entry #{last}, but {witness.name} has seen #{n}: "
                                  f"{_span(last + 1, n)} gone (the store was rolled back or replaced)")


def _json_object(text: Any) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def verify_log(rows: Iterable[Entry], *, key: bytes, witnesses: Iterable[Witness] = ()) -> Verification:
    """Check every row of a log, read in the order of their entry numbers (rows without a number
    first), against `key`, and that the log still contains each witness's head.

    The genesis entry must name `key`: a log started with another key fails at its first entry.
    """
    walk = LogWalk(key, witnesses)
    for entry in rows:
        walk.row(entry)
    walk.finish()
    return Verification(
        ok=not walk.problems.listed, entries=walk.entries, problems=tuple(walk.problems.listed),
        more_problems=walk.problems.more, head=walk.head, records=walk.closed + len(walk.open),
        open_records=len(walk.open), key=key_id(key), genesis=walk.genesis,
    )
