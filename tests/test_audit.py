"""The earlier store format's whole-record seals and its verify, which a store is checked with before it is
carried over into the append-only log (the log itself: tests/test_auditlog.py; exports: tests/test_export.py,
redaction: tests/test_redaction.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpuspawner.audit import (
    GENESIS,
    AuditRecord,
    ChainHead,
    OpenedEntry,
    RecordedDevice,
    SealingStart,
    Verification,
    canonical_json,
    key_id,
    opening_digest,
    opening_json,
    seal,
    seal_digest,
    verify_store,
)

DIGEST = "sha256:" + "c" * 64


def record(n: int, **kw: object) -> AuditRecord:
    fields: dict = dict(
        id=f"r{n}", hub_id="hub-1", user="ada", server="", requested_at=f"2026-11-21T10:00:{n:02d}+00:00",
        outcome="stopped", profile="a100-1", image_requested="127.0.0.1:5000/lab/pytorch:2024.10",
        repo_digest=f"127.0.0.1:5000/lab/pytorch@{DIGEST}", image_id="sha256:" + "d" * 64,
        devices=(RecordedDevice(uuid="GPU-1", model="NVIDIA A100-SXM4-80GB", memory_total=80 * 2**30),),
        environment={"OMP_NUM_THREADS": "8"}, cpu_limit=8.0, mem_limit=64 * 2**30,
        started_at=f"2026-11-21T10:01:{n:02d}+00:00", stopped_at=f"2026-11-21T11:00:{n:02d}+00:00",
    )
    fields.update(kw)
    return AuditRecord(**fields)


KEY = bytes(range(32))


def verify_chain(entries: list[AuditRecord], *, key: bytes) -> Verification:
    """Sealed records alone (no opening seals, no head): a chain made with `key` from its start."""
    start = SealingStart(key_id=key_id(key), introduced_at="").signed(key)
    return verify_store(key=key, start=start, sealed=entries, head_file=ChainHead())

def chain(n: int, *, key: bytes = KEY) -> list[AuditRecord]:
    sealed, prev = [], GENESIS
    for i in range(1, n + 1):
        r = seal(record(i), seq=i, prev_hash=prev, key=key)
        sealed.append(r)
        prev = r.hash
    return sealed


def test_an_intact_chain_verifies() -> None:
    result = verify_chain(chain(5), key=KEY)
    assert result.ok and result.checked == 5
    assert result.message().splitlines()[0] == "OK: 5 sealed records, 0 open; chain intact."


@pytest.mark.parametrize(
    ("tamper", "problems"),
    [
        (lambda rs: rs.__setitem__(2, replace(rs[2], image_id="sha256:" + "e" * 64)), ["record r3 (#3): its content does not match its seal"]),
        (lambda rs: rs.__setitem__(2, replace(rs[2], user="mallory")), ["record r3 (#3): its content does not match its seal"]),
        (lambda rs: rs.__setitem__(1, replace(rs[1], outcome="failed")), ["record r2 (#2): its content does not match its seal"]),
        (lambda rs: rs.__delitem__(1), ["sealed record #2 is missing (deleted)"]),
        (lambda rs: rs.__delitem__(slice(1, 3)), ["sealed records #2-#3 are missing (deleted)"]),
    ],
    ids=["image-changed", "user-changed", "outcome-changed", "record-deleted", "two-deleted"],
)
def test_verify_names_every_record_whose_content_changed_or_that_is_gone(tamper, problems: list[str]) -> None:
    records = chain(5)
    tamper(records)
    result = verify_chain(records, key=KEY)
    assert (result.ok, list(result.problems)) == (False, problems)


def test_a_record_resealed_without_the_key_is_caught() -> None:
    """Plain SHA-256, as gpuspawner 0.1 sealed: anyone who can write the database can compute it."""
    records = chain(3)
    forged = replace(records[1], user="mallory")
    content = canonical_json(forged.content())
    records[1] = replace(forged, hash=seal_digest(seq=2, prev_hash=records[0].hash, content_json=content, key=None))
    assert verify_chain(records, key=KEY).problems == (
        "record r2 (#2): its content does not match its seal",
        "record r3 (#3): its link to the previous sealed record does not match",
    )


def test_a_chain_resealed_with_another_key_fails_with_the_hubs() -> None:
    result = verify_chain(chain(3, key=b"m" * 32), key=KEY)
    assert not result.ok and len(result.problems) == 3


def test_a_record_resealed_with_the_key_still_breaks_the_link_of_the_next() -> None:
    records = chain(4)
    forged = seal(replace(records[1], user="mallory", seq=None, prev_hash=None, hash=None), seq=2, prev_hash=records[0].hash, key=KEY)
    records[1] = forged
    result = verify_chain(records, key=KEY)
    assert result.problems == ("record r3 (#3): its link to the previous sealed record does not match",)


def _opened(records: list[AuditRecord], *, key: bytes = KEY) -> list[OpenedEntry]:
    out = []
    for n, r in enumerate(records, 1):
        opening = opening_json(r.content())
        out.append(OpenedEntry(r.id, n, opening_digest(key=key, opened=n, opening=opening), opening, r.seq, r.hash))
    return out


def _store(records: list[AuditRecord], opened: list[OpenedEntry], **kw: object) -> Verification:
    start = SealingStart(key_id=key_id(KEY), introduced_at="2026-12-01T00:00:00+00:00").signed(KEY)
    sealed = [r for r in records if r.sealed]
    last = sealed[-1] if sealed else None
    numbered = sum(1 for o in opened if o.opened)
    kw.setdefault("head_file", ChainHead(last.seq if last else 0, last.hash if last else GENESIS, numbered))
    return verify_store(key=KEY, start=start, sealed=sealed, opened=opened, **kw)


def test_a_whole_store_verifies_and_names_its_head() -> None:
    records = chain(3) + [record(4, outcome="running")]
    result = _store(records, _opened(records))
    assert result.ok, result.problems
    lines = result.message().splitlines()
    assert lines[0] == "OK: 3 sealed records, 1 open; chain intact."
    assert lines[1] == f"Head: 3:{records[2].hash} (4 records opened)"
    assert lines[2] == f"Sealing key {key_id(KEY)}, used since 2026-12-01T00:00:00+00:00."


def test_the_newest_records_deleted_are_seen_against_the_head_kept_outside() -> None:
    records = chain(5)
    head = ChainHead(5, records[4].hash, 5)
    kept = records[:3]
    result = _store(kept, _opened(kept), head_file=head)
    assert result.problems == (
        "the store ends at sealed record #3, but the head kept outside the database is #5: records #4-#5 were deleted",
        "the store holds records opened up to #3, but the head kept outside the database counts 5: records opened as #4-#5 were deleted",
    )


def test_an_open_record_deleted_leaves_a_gap_in_the_opening_numbers() -> None:
    records = chain(2) + [record(3, outcome="running"), record(4, outcome="running")]
    opened = _opened(records)
    del opened[2]
    assert _store(records, opened).problems == ("record opened as #3 is missing (deleted)",)


def test_a_row_with_a_seal_but_no_number_or_no_opening_seal_is_named() -> None:
    records = chain(2)
    opened = _opened(records)
    forged = replace(record(9), hash="f" * 64)
    opened.append(OpenedEntry(forged.id, None, None, opening_json(forged.content()), None, forged.hash))
    assert _store(records, opened).problems == (
        "record r9 carries a seal but no sequence number: the hub did not seal it",
        "record r9 has no opening seal: the hub did not write it",
    )


def test_an_expected_head_kept_elsewhere_catches_a_rewritten_chain() -> None:
    original = chain(3)
    rewritten = chain(3, key=b"m" * 32)  # as if re-sealed with a swapped key, head file rewritten too
    assert _store(original, _opened(original), expected_head=(3, original[2].hash)).ok
    result = verify_store(
        key=b"m" * 32, start=SealingStart(key_id=key_id(b"m" * 32), introduced_at="x").signed(b"m" * 32),
        sealed=rewritten, opened=_opened(rewritten, key=b"m" * 32), head_file=ChainHead(3, rewritten[2].hash, 3),
        expected_head=(3, original[2].hash),
    )
    assert result.problems == (f"sealed record #3 is not the expected head 3:{original[2].hash[:12]}…: the chain was rewritten",)


def test_records_sealed_before_the_key_are_checked_as_before_and_held_by_the_first_keyed_one() -> None:
    legacy, prev = [], GENESIS
    for i in (1, 2):
        content = canonical_json(record(i).content())
        digest = seal_digest(seq=i, prev_hash=prev, content_json=content, key=None)
        legacy.append(replace(record(i), seq=i, prev_hash=prev, hash=digest))
        prev = digest
    keyed = seal(record(3), seq=3, prev_hash=prev, key=KEY)
    start = SealingStart(key_id=key_id(KEY), introduced_at="x", legacy_sealed=2, legacy_head=prev).signed(KEY)
    records = [*legacy, keyed]
    args = dict(key=KEY, opened=_opened(records), head_file=ChainHead(3, keyed.hash, 3))
    assert verify_store(start=start, sealed=records, **args).ok
    # the boundary moved (to pass off keyed records as legacy ones): the start's MAC breaks
    moved = replace(start, legacy_sealed=3)
    assert "does not match this key" in verify_store(start=moved, sealed=records, **args).problems[0]
    # the old records re-sealed consistently with SHA-256: the first keyed record's link breaks
    changed = replace(record(2), user="mallory")
    digest = seal_digest(seq=2, prev_hash=legacy[0].hash, content_json=canonical_json(changed.content()), key=None)
    resealed = [legacy[0], replace(changed, seq=2, prev_hash=legacy[0].hash, hash=digest), keyed]
    problems = verify_store(start=start, sealed=resealed, **args).problems
    assert "record r3 (#3): its link to the previous sealed record does not match" in problems
    assert "record r2 (#2): the records sealed before the key changed after the key took them over" in problems


def test_a_missing_or_foreign_sealing_record_is_a_problem() -> None:
    records = chain(1)
    args = dict(key=KEY, sealed=records, opened=_opened(records), head_file=ChainHead(1, records[0].hash, 1))
    assert verify_store(start=None, **args).problems[0].startswith("the store has no record of its sealing key")
    other = SealingStart(key_id=key_id(b"m" * 32), introduced_at="x").signed(b"m" * 32)
    assert "does not match this key" in verify_store(start=other, **args).problems[0]


def test_only_final_records_are_sealed() -> None:
    with pytest.raises(ValueError):
        seal(record(1, outcome="running"), seq=1, prev_hash=GENESIS, key=KEY)
