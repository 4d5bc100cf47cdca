"""The audit service's witness: heads of the audit log kept where the database's writer cannot
reach them, and the decisions about whether the log still extends them.

The witness keeps the newest head it has seen (:class:`~gpuspawner.auditlog.Head`) in storage
of its own. Every poll it reads the entries from that head's number on and asks
:func:`check_extension`: is entry ``n`` still there with the seal the witness saw, does the
log go on from it, and do the newer entries link, number and (with the key) seal as the hub
writes them? Less often a full check reads every entry (:func:`from_verification`, or
:func:`check_extension` from the start where there is no key).

:class:`WitnessState` is what the witness knows; :func:`record` folds each check into it, and
:func:`verdict`, :func:`news` and :func:`banner` say what it means for the metrics, the log
and the audit page. A failure stands until a later check finds the store good again.

Pure code: no docker, pynvml, jupyterhub, tornado or database imports.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from .auditlog import Entry, Head, LogWalk, Verification, Witness

NAME = "the audit service's witness"

CheckKind = Literal["poll", "full"]


@dataclass(frozen=True)
class Check:
    """What one check of the store found.

    ``kind``: "poll" read the entries from the witnessed head on, "full" every entry. ``head``:
    the log's newest entry as the check read it (where ``ok``, the head the witness may keep).
    ``seals_checked``: False where the check had no key, so only numbers and links were checked.
    ``at``: when the check ran, epoch seconds.
    """

    kind: CheckKind
    ok: bool
    problems: tuple[str, ...] = ()
    head: Head = Head()
    seals_checked: bool = True
    at: float = 0.0


def check_extension(
    witnessed: Head, rows: Iterable[Entry], *, key: bytes | None, at: float, kind: CheckKind = "poll",
    start: Head | None = None, also: Sequence[Witness] = (), end: int | None = None, name: str = NAME,
) -> Check:
    """Whether the log still extends the head the witness has seen.

    `rows`: the log's entries in the order of their numbers, from ``start.n`` on (``start``:
    `witnessed` by default; ``Head()`` reads the whole log, as a full check without the key
    does). Entry ``witnessed.n`` must be there with the seal the witness saw, the log must not
    end before it, and every entry read must be numbered one after another and link to the one
    before it; with `key`, every entry's seal must hold too. `also`: more heads kept elsewhere to
    find in the rows. `end`: the log's newest entry number as read apart from `rows`, for the
    message when the log ends before ``witnessed.n``.
    """
    walk = LogWalk(key, [Witness(witnessed, name), *also], start=witnessed if start is None else start)
    for entry in rows:
        walk.row(entry)
    walk.finish(end=end)
    problems, more = walk.problems.listed, walk.problems.more
    listed = tuple(problems) + ((f"… and {more} more",) if more else ())
    ok = not problems
    return Check(kind=kind, ok=ok, problems=listed, head=walk.head if ok else witnessed, seals_checked=key is not None, at=at)


def from_verification(result: Verification, *, at: float) -> Check:
    """A full check with the key, from what :func:`gpuspawner.auditlog.verify_log` found."""
    listed = result.problems + ((f"… and {result.more_problems} more",) if result.more_problems else ())
    return Check(kind="full", ok=result.ok, problems=listed, head=result.head, seals_checked=True, at=at)


def store_missing(witnessed: Head, reason: str, *, at: float, name: str = NAME) -> Check | None:
    """A check of a store that is not there: a failure once the witness has seen an entry of it,
    None before (the hub makes the log when it first starts)."""
    if witnessed.n == 0:
        return None
    return Check(kind="poll", ok=False, head=witnessed, at=at, problems=(
        f"there is no audit log any more ({reason}), but {name} has seen entry #{witnessed.n}: "
        "the store was deleted or replaced",
    ))


# --- What the witness knows, and what it means --------------------------------------------------


@dataclass(frozen=True)
class WitnessState:
    """The witness's knowledge: the newest head it has seen, its latest poll and full check, why
    the last try could not read the store (if it could not), and how many checks failed."""

    witnessed: Head = Head()
    poll: Check | None = None
    full: Check | None = None
    unreadable: str | None = None
    unreadable_at: float | None = None
    failures: int = 0
    failed_since: float | None = None


def record(state: WitnessState, check: Check) -> WitnessState:
    """`state` after `check`: a passing check moves the witnessed head forward (never back); a
    passing full check also settles a failed poll, as it read everything a poll reads."""
    witnessed = check.head if check.ok and check.head.n > state.witnessed.n else state.witnessed
    if check.kind == "full":
        poll = None if check.ok else state.poll
        new = replace(state, full=check, poll=poll)
    else:
        new = replace(state, poll=check)
    new = replace(new, witnessed=witnessed, unreadable=None, unreadable_at=None,
                  failures=state.failures + (0 if check.ok else 1))
    failing = verdict(new).ok is False
    since = (state.failed_since if state.failed_since is not None else check.at) if failing else None
    return replace(new, failed_since=since)


def unreadable(state: WitnessState, reason: str, *, at: float) -> WitnessState:
    """`state` after a try that could not read the store: no verdict changes, the reason is shown."""
    return replace(state, unreadable=reason, unreadable_at=at)


def full_check_due(state: WitnessState, *, now: float, every: float) -> bool:
    """A full check runs at start, every `every` seconds, and at every poll while one has failed."""
    full = state.full
    return full is None or not full.ok or now - full.at >= every


@dataclass(frozen=True)
class Verdict:
    """What the witness says of the store: ``ok`` None until a check has read it."""

    ok: bool | None
    problems: tuple[str, ...] = ()
    since: float | None = None
    checked_at: float | None = None
    seals_checked: bool = False


def verdict(state: WitnessState) -> Verdict:
    checks = [c for c in (state.poll, state.full) if c is not None]
    if not checks:
        return Verdict(ok=None)
    problems = tuple(dict.fromkeys(p for c in checks for p in c.problems))
    latest = max(checks, key=lambda c: c.at)
    return Verdict(ok=all(c.ok for c in checks), problems=problems, since=state.failed_since,
                   checked_at=latest.at, seals_checked=latest.seals_checked)


def news(before: Verdict, after: Verdict) -> Literal["failed", "recovered"] | None:
    """What to log once: a failure (or a failure that found something new), or the recovery."""
    if after.ok is False and (before.ok is not False or set(after.problems) - set(before.problems)):
        return "failed"
    if before.ok is False and after.ok is True:
        return "recovered"
    return None


def when(at: float | None) -> str:
    """Epoch seconds as UTC ISO 8601 text, to the second ("never" for None)."""
    if at is None:
        return "never"
    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).isoformat(timespec="seconds")


def history_line(head: Head, *, at: float) -> str:
    """One line of the witness's history: when, and the head as ``N:SEAL`` (which
    ``gpuspawner audit verify --witness`` reads from the history's last line)."""
    return f"{when(at)} {head.text()}\n"


@dataclass(frozen=True)
class Banner:
    """What the audit page says of the witness, at its top: ``level`` "failed", "warning" or "ok"."""

    level: Literal["failed", "warning", "ok"]
    title: str
    lines: tuple[str, ...] = ()


def banner(state: WitnessState, *, kept_in: str | None, key_file: str | None) -> Banner:
    """The audit page's banner. `kept_in`: the witness file (None: heads kept in memory only);
    `key_file`: the sealing key the witness reads, named where it could not."""
    found = verdict(state)
    lines: list[str] = []
    if found.ok is False:
        lines += [f"Found: {p}" for p in found.problems]
        lines.append(f"First found {when(found.since)}; last checked {when(found.checked_at)}. Until the store holds "
                     f"entry #{state.witnessed.n} again as the witness saw it, nothing it says can be trusted: check it "
                     "with `gpuspawner audit verify --witness` and restore it from a backup.")
        return Banner("failed", "The audit log fails the witness's check: it was rolled back or rewritten.", tuple(lines))
    if state.unreadable is not None:
        lines.append(f"The last try, {when(state.unreadable_at)}, could not read the store: {state.unreadable}")
    if found.ok is None:
        return Banner("warning", "The witness has not checked the audit log yet.", tuple(lines))
    if not found.seals_checked:
        lines.append(f"Seals are not checked: this service cannot read the sealing key{f' ({key_file})' if key_file else ''}. "
                     "A rollback, a deleted entry or a broken link is still found.")
    if kept_in is None:
        lines.append("The witnessed heads are kept in memory only, and forgotten when this service restarts "
                     "(start it with --witness-file).")
    level: Literal["warning", "ok"] = "warning" if lines else "ok"
    title = (f"The audit log extends entry #{state.witnessed.n} that the witness has seen; "
             f"last checked {when(found.checked_at)}.")
    return Banner(level, title, tuple(lines))
