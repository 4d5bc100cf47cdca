"""The witness's decisions (gpuspawner.witness), on logs built in memory: does the log still extend
the head the witness has seen, what is the verdict, what is logged and what the page says.

The same checks against a real store, through the audit service's witness loop, are in
``test_service.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from gpuspawner import audit, auditlog, witness
from gpuspawner.audit import AuditRecord
from gpuspawner.auditlog import Entry, Head, Witness
from gpuspawner.witness import Check, Verdict, WitnessState, check_extension

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
AT = "2026-11-21T10:00:00+00:00"
T = 1_795_000_000.0  # 2026-11-18T11:06:40Z


def record(i: int) -> AuditRecord:
    return AuditRecord(id=f"r{i:03d}", hub_id="hub-1", user="ada", server="", requested_at=AT)


def make_log(length: int) -> list[Entry]:
    """A log of `length` entries: the genesis entry, then one record opened per entry."""
    unsealed = [auditlog.genesis(key=KEY, at=AT), *(auditlog.opening(record(i), at=AT) for i in range(2, length + 1))]
    return auditlog.chain(unsealed, after=Head(), key=KEY)


LOG = make_log(8)


def head(n: int, log: list[Entry] = LOG) -> Head:
    return Head(n, log[n - 1].mac)


def from_(n: int, log: list[Entry]) -> list[Entry]:
    """The rows a poll reads for a witness at #n: those numbered n and above."""
    return [e for e in log if type(e.n) is not int or e.n >= n]


def resealed(entry: Entry, key: bytes, **changes: object) -> Entry:
    changed = replace(entry, **changes).with_body_digest()
    return replace(changed, mac=auditlog.entry_mac(key, changed))


def forged_after(log: list[Entry]) -> list[Entry]:
    """A row appended after the log's end by someone without the key: linked right, sealed with another."""
    (extra,) = auditlog.chain([auditlog.opening(record(99), at=AT)], after=Head(log[-1].n, log[-1].mac), key=OTHER_KEY)
    return [*log, extra]


def changed_at(number: int, **changes: object) -> Callable[[list[Entry]], list[Entry]]:
    return lambda log: [replace(e, **changes).with_body_digest() if e.n == number else e for e in log]


def resealed_at(n: int, key: bytes) -> Callable[[list[Entry]], list[Entry]]:
    return lambda log: [resealed(e, key, user="mallory") if e.n == n else e for e in log]


def without(*numbers: int) -> Callable[[list[Entry]], list[Entry]]:
    return lambda log: [e for e in log if e.n not in numbers]


# --- Does the log still extend the witnessed head? ------------------------------------------------


@pytest.mark.parametrize(
    ("tamper", "key", "found"),
    [
        (lambda log: log, KEY, []),
        (lambda log: log, None, []),
        (without(7, 8), KEY, ["the log ends at entry #6, but the audit service's witness has seen #8: entries #7-#8 are gone "
                              "(the store was rolled back or replaced)"]),
        (without(8), None, ["the log ends at entry #7, but the audit service's witness has seen #8: entry #8 is gone "
                            "(the store was rolled back or replaced)"]),
        (resealed_at(8, OTHER_KEY), KEY, ["entry #8 (opened of record r008): its content does not match its seal",
                                          "entry #8 is not the one the audit service's witness has seen: the log was rewritten"]),
        (resealed_at(8, OTHER_KEY), None, ["entry #8 is not the one the audit service's witness has seen: the log was rewritten"]),
        (resealed_at(8, KEY), KEY, ["entry #8 is not the one the audit service's witness has seen: the log was rewritten"]),
        (changed_at(8, user="mallory"), KEY, ["entry #8 (opened of record r008): its content does not match its seal"]),
        (changed_at(8, user="mallory"), None, []),  # the seal is the same: only the key tells
        (without(8), KEY, ["the log ends at entry #7, but the audit service's witness has seen #8: entry #8 is gone "
                           "(the store was rolled back or replaced)"]),
    ],
    ids=["extends", "extends-no-key", "rolled-back", "rolled-back-no-key", "rewritten-other-key",
         "rewritten-no-key", "rewritten-with-the-key", "content-changed-seal-kept", "content-changed-no-key",
         "newest-deleted"],
)
def test_the_witnessed_entry_must_still_be_there_as_it_was_seen(
    tamper: Callable[[list[Entry]], list[Entry]], key: bytes | None, found: list[str]
) -> None:
    log = tamper(LOG)
    end = max(e.n for e in log)
    check = check_extension(head(8), from_(8, log), key=key, at=T, end=end)
    assert list(check.problems) == found
    assert check.ok is (not found) and check.seals_checked is (key is not None)


@pytest.mark.parametrize(
    ("tamper", "key", "found"),
    [
        (lambda log: log, KEY, []),
        (forged_after, KEY, ["entry #9 (opened of record r099): its content does not match its seal"]),
        (forged_after, None, []),  # linked right; only the key tells a forged seal
        (without(6), KEY, ["entry #6 is missing (deleted)"]),
        (without(6), None, ["entry #6 is missing (deleted)"]),
        (without(4), KEY, ["entry #4 is missing (deleted); the audit service's witness has seen #4"]),
        (changed_at(7, prev="f" * 64), None, ["entry #7: its link to the entry before it does not match (a row moved or replaced)"]),
        (changed_at(6, n="6"), KEY, ["a row of record r006 has entry number '6': it is outside the log's numbering",
                                     "entry #6 is missing (deleted)"]),
        (lambda log: [*log[:6], log[5], *log[6:]], KEY, ["entry #6 appears again after #6 (a duplicated or moved row)"]),
    ],
    ids=["new-entries-hold", "forged-entry-after", "forged-entry-after-no-key", "gap-after", "gap-after-no-key",
         "witnessed-entry-deleted", "broken-link-no-key", "number-as-text", "duplicated-row"],
)
def test_the_entries_after_it_must_number_link_and_seal_as_the_hub_writes_them(
    tamper: Callable[[list[Entry]], list[Entry]], key: bytes | None, found: list[str]
) -> None:
    check = check_extension(head(4), sorted(from_(4, tamper(LOG)), key=lambda e: (type(e.n) is int, e.n)), key=key, at=T)
    assert list(check.problems) == found
    assert check.ok is (not found)


def test_a_passing_check_moves_to_the_logs_end_and_a_failing_one_stays_where_the_witness_was() -> None:
    assert check_extension(head(4), from_(4, LOG), key=KEY, at=T).head == head(8)
    assert check_extension(head(8), from_(8, LOG), key=KEY, at=T).head == head(8)  # nothing new
    assert check_extension(head(4), from_(4, forged_after(LOG)), key=KEY, at=T).head == head(4)


def test_without_the_end_the_message_says_the_log_ends_before_the_witnessed_entry() -> None:
    check = check_extension(head(8), [], key=KEY, at=T)
    assert check.problems == ("the log ends at entry #7, but the audit service's witness has seen #8: entry #8 is gone "
                              "(the store was rolled back or replaced)",)


def test_a_witness_that_has_seen_nothing_reads_the_log_from_its_genesis() -> None:
    assert check_extension(Head(), LOG, key=KEY, at=T).head == head(8)
    assert check_extension(Head(), LOG[1:], key=KEY, at=T).problems == ("entry #1 is missing (deleted)",)
    assert check_extension(Head(), [], key=KEY, at=T).problems == (
        "the log has no entries, not even its genesis entry (its rows were deleted)",)
    not_genesis = auditlog.chain([auditlog.opening(record(1), at=AT)], after=Head(), key=KEY)
    assert check_extension(Head(), not_genesis, key=KEY, at=T).problems == ("entry #1 is not the log's genesis entry",)


def test_a_full_check_without_the_key_reads_the_whole_log_for_the_witnessed_head_and_the_hubs() -> None:
    hub = Witness(head(6), "the hub's head file (/srv/data/gpuspawner-audit.head)")
    check = check_extension(head(8), without(5, 6, 7, 8)(LOG), key=None, at=T, kind="full", start=Head(), also=[hub])
    assert check.kind == "full" and not check.seals_checked
    assert check.problems == (
        "the log ends at entry #4, but the audit service's witness has seen #8: entries #5-#8 are gone (the store was rolled back or replaced)",
        "the log ends at entry #4, but the hub's head file (/srv/data/gpuspawner-audit.head) has seen #6: entries #5-#6 are gone "
        "(the store was rolled back or replaced)",
    )


def test_many_problems_are_listed_up_to_a_limit_and_the_rest_counted() -> None:
    log = make_log(40)
    check = check_extension(Head(), [replace(e, mac="0" * 64) if e.n > 1 else e for e in log], key=KEY, at=T)
    assert len(check.problems) == audit.MAX_PROBLEMS + 1 and check.problems[-1].startswith("… and ")


def test_a_full_check_with_the_key_is_what_verify_log_says() -> None:
    result = auditlog.verify_log(without(8)(LOG), key=KEY, witnesses=[Witness(head(8), witness.NAME)])
    check = witness.from_verification(result, at=T)
    assert check.kind == "full" and not check.ok and check.head == head(7)
    # the same words as the poll's, so the page lists the finding once
    assert check.problems == check_extension(head(8), [], key=KEY, at=T, end=7).problems


@pytest.mark.parametrize(("witnessed", "failure"), [(Head(), False), (head(3), True)], ids=["never-seen", "seen"])
def test_a_store_that_is_not_there_fails_once_the_witness_has_seen_it(witnessed: Head, failure: bool) -> None:
    check = witness.store_missing(witnessed, "no audit store at /srv/data/gpuspawner-audit.sqlite", at=T)
    if not failure:
        assert check is None  # the hub has not made it yet
        return
    assert check is not None and not check.ok and check.problems == (
        "there is no audit log any more (no audit store at /srv/data/gpuspawner-audit.sqlite), but the audit service's "
        "witness has seen entry #3: the store was deleted or replaced",)


# --- What the witness knows, and what it means ------------------------------------------------------


def poll(ok: bool, *, at: float, n: int = 8, problem: str = "entry #8 is gone") -> Check:
    return Check("poll", ok, () if ok else (problem,), head(n), True, at)


def full(ok: bool, *, at: float, problem: str = "entry #2 does not match its seal") -> Check:
    return Check("full", ok, () if ok else (problem,), head(8), True, at)


def test_the_witnessed_head_moves_forward_only_with_checks_that_pass() -> None:
    state = witness.record(WitnessState(), poll(True, at=T, n=5))
    assert state.witnessed == head(5)
    assert witness.record(state, poll(True, at=T + 30, n=8)).witnessed == head(8)
    assert witness.record(state, poll(True, at=T + 30, n=3)).witnessed == head(5)  # never back
    assert witness.record(state, replace(poll(False, at=T + 30), head=head(8))).witnessed == head(5)


def test_a_failure_stands_until_a_check_finds_the_store_good_again() -> None:
    state = witness.record(WitnessState(witnessed=head(8)), poll(True, at=T))
    state = witness.record(state, poll(False, at=T + 30))
    state = witness.record(state, poll(False, at=T + 60))
    found = witness.verdict(state)
    assert (found.ok, found.problems, found.since, found.checked_at, state.failures) == (False, ("entry #8 is gone",), T + 30, T + 60, 2)
    state = witness.record(state, poll(True, at=T + 90))
    assert witness.verdict(state) == Verdict(ok=True, since=None, checked_at=T + 90, seals_checked=True)
    assert state.failures == 2


def test_a_failed_full_check_stands_until_a_full_check_passes_and_a_passing_one_settles_a_poll() -> None:
    state = witness.record(WitnessState(witnessed=head(8)), full(False, at=T))
    state = witness.record(state, poll(True, at=T + 30))
    assert witness.verdict(state).ok is False and witness.verdict(state).since == T
    state = witness.record(state, poll(False, at=T + 60))
    assert witness.verdict(state).problems == ("entry #8 is gone", "entry #2 does not match its seal")
    state = witness.record(state, full(True, at=T + 90))
    assert witness.verdict(state).ok is True and state.poll is None


@pytest.mark.parametrize(
    ("last_full", "now", "due"),
    [(None, T, True), (full(True, at=T), T + 599, False), (full(True, at=T), T + 600, True), (full(False, at=T), T + 30, True)],
    ids=["at-start", "not-yet", "every-600-s", "again-while-failed"],
)
def test_when_a_full_check_is_due(last_full: Check | None, now: float, due: bool) -> None:
    assert witness.full_check_due(WitnessState(full=last_full), now=now, every=600) is due


OK = Verdict(ok=True)
FAILED = Verdict(ok=False, problems=("entry #8 is gone",))


@pytest.mark.parametrize(
    ("before", "after", "said"),
    [
        (Verdict(ok=None), OK, None),
        (OK, OK, None),
        (OK, FAILED, "failed"),
        (Verdict(ok=None), FAILED, "failed"),
        (FAILED, FAILED, None),
        (FAILED, replace(FAILED, problems=("entry #8 is gone", "entry #9 is missing (deleted)")), "failed"),
        (FAILED, OK, "recovered"),
    ],
    ids=["first-check-ok", "still-ok", "fails", "fails-at-start", "still-failing", "finds-more", "recovers"],
)
def test_a_failure_is_logged_once_and_so_is_the_recovery(before: Verdict, after: Verdict, said: str | None) -> None:
    assert witness.news(before, after) == said


def test_a_try_that_cannot_read_the_store_changes_no_verdict() -> None:
    state = witness.record(WitnessState(), poll(True, at=T))
    later = witness.unreadable(state, "database is locked", at=T + 30)
    assert witness.verdict(later) == witness.verdict(state) and later.unreadable_at == T + 30
    assert witness.record(later, poll(True, at=T + 60)).unreadable is None


def test_each_line_of_the_history_names_its_head_as_verify_reads_it() -> None:
    line = witness.history_line(head(8), at=T)
    assert line == f"2026-11-18T11:06:40+00:00 8:{LOG[7].mac}\n"
    assert auditlog.head_from_text("".join([witness.history_line(head(5), at=T - 30), line])) == head(8)


# --- The audit page's banner --------------------------------------------------------------------------


def test_a_failure_is_said_at_the_top_with_what_was_found_and_when() -> None:
    state = witness.record(witness.record(WitnessState(witnessed=head(8)), poll(False, at=T)), poll(False, at=T + 30))
    shown = witness.banner(state, kept_in="/srv/witness/head.json", key_file="/srv/secrets/gpuspawner-audit.key")
    assert shown.level == "failed" and "rolled back or rewritten" in shown.title
    assert shown.lines[0] == "Found: entry #8 is gone"
    assert shown.lines[1].startswith("First found 2026-11-18T11:06:40+00:00; last checked 2026-11-18T11:07:10+00:00. "
                                     "Until the store holds entry #8 again")


@pytest.mark.parametrize(
    ("state", "kept_in", "level", "said"),
    [
        (witness.record(WitnessState(), poll(True, at=T)), "/w/head.json", "ok", None),
        (witness.record(WitnessState(), replace(poll(True, at=T), seals_checked=False)), "/w/head.json", "warning",
         "Seals are not checked: this service cannot read the sealing key (/k/audit.key). A rollback, a deleted entry "
         "or a broken link is still found."),
        (witness.record(WitnessState(), poll(True, at=T)), None, "warning",
         "The witnessed heads are kept in memory only, and forgotten when this service restarts (start it with --witness-file)."),
        (witness.unreadable(WitnessState(), "no audit store at /d/a.sqlite; the hub makes it when it first starts", at=T),
         "/w/head.json", "warning",
         "The last try, 2026-11-18T11:06:40+00:00, could not read the store: no audit store at /d/a.sqlite; the hub makes "
         "it when it first starts"),
    ],
    ids=["ok", "no-key", "memory-only", "not-checked-yet"],
)
def test_what_the_banner_says_while_nothing_has_failed(state: WitnessState, kept_in: str | None, level: str, said: str | None) -> None:
    shown = witness.banner(state, kept_in=kept_in, key_file="/k/audit.key")
    assert shown.level == level
    assert list(shown.lines) == ([said] if said else [])
    if witness.verdict(state).ok:
        assert shown.title == "The audit log extends entry #8 that the witness has seen; last checked 2026-11-18T11:06:40+00:00."
    else:
        assert shown.title == "The witness has not checked the audit log yet."
