"""The audit log as pure code: entries made, chained, folded back into records, and verified.

The properties (Hypothesis): any sequence of appends verifies; any single change to any stored
value of any entry (a character of a text, a number, a type, a value where there was none)
makes verify fail. The store's own tests (tests/test_store.py) and the attacks
(tests/test_tampering.py) run the same checks through the database.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuspawner import auditlog
from gpuspawner.audit import AuditRecord, RecordedDevice
from gpuspawner.auditlog import Entry, Head, Witness

KEY = bytes(range(32))
AT = "2026-11-21T10:00:00.000000+00:00"

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12)
times = st.sampled_from(["2026-11-21T10:00:00+00:00", "2026-11-21T11:30:00.5+00:00", "2026-12-01T00:00:00+00:00"])
devices = st.lists(
    st.builds(RecordedDevice, uuid=st.from_regex(r"GPU-[0-9a-f]{8}", fullmatch=True), model=st.sampled_from(["A100", "H100"]),
              memory_total=st.integers(0, 2**40), mig_profile=st.sampled_from([None, "1g.10gb", "3g.40gb"])),
    max_size=3,
).map(tuple)
changes = st.fixed_dictionaries({}, optional={
    "profile": names, "image_id": names, "devices": devices, "started_at": times, "outcome": st.sampled_from(["starting", "running"]),
    "environment": st.dictionaries(names, names, max_size=3), "cpu_limit": st.none() | st.floats(0, 64),
    "mem_limit": st.none() | st.integers(0, 2**40), "groups": st.lists(names, max_size=3).map(tuple),
    "cuda_requirement": st.none() | names,
})
endings = st.fixed_dictionaries({"outcome": st.sampled_from(["stopped", "died", "failed", "abandoned"])}, optional={
    "stopped_at": times, "error": names, "exit_code": st.none() | st.integers(-255, 255), "idle_gpu_seconds": st.none() | st.floats(0, 1e6),
})


@st.composite
def lives(draw: st.DrawFn) -> list[Entry]:
    """The unsealed entries of a few servers' lives, interleaved as a hub writes them."""
    count = draw(st.integers(1, 4))
    queues: list[list[Entry]] = []
    for i in range(count):
        rid = f"r{i}"
        opened = AuditRecord(id=rid, hub_id="hub-1", user=draw(names), server=draw(names), requested_at=draw(times))
        life = [auditlog.opening(opened, at=AT)]
        record = opened
        for change in draw(st.lists(changes, max_size=3)):
            life.append(auditlog.change(rid, change, at=AT))
            record = replace(record, **change)
        if draw(st.booleans()):
            life.append(auditlog.closing(replace(record, **draw(endings)), at=AT))
        queues.append(life)
    order = draw(st.permutations([i for i, life in enumerate(queues) for _ in life]))
    return [queues[i].pop(0) for i in order]


def sealed_log(entries: list[Entry]) -> list[Entry]:
    return auditlog.chain([auditlog.genesis(key=KEY, at=AT), *entries], after=Head(), key=KEY)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(lives())
def test_any_sequence_of_appends_verifies_and_folds_back(entries: list[Entry]) -> None:
    log = sealed_log(entries)
    result = auditlog.verify_log(log, key=KEY, witnesses=[Witness(Head(log[-1].n, log[-1].mac), "a witness")])
    assert result.ok, result.problems
    assert (result.entries, result.head) == (len(log), Head(log[-1].n, log[-1].mac))
    for rid in {e.record_id for e in entries}:
        mine = [e for e in log if e.record_id == rid]
        record = auditlog.fold(mine)
        assert record is not None and record.id == rid
        assert record.sealed == (mine[-1].kind == "ended")


def _mutations(value: Any) -> list[Any]:
    """Other values a database writer could leave in a column that held `value`."""
    if value is None:
        return [0, "", "x"]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, str(value), float(value)]
    if isinstance(value, float):
        return [value + 0.5, str(value), None]
    text = str(value)
    options: list[Any] = [None, text + " "]
    if text:
        options.append(text[:-1] + ("a" if text[-1] != "a" else "b"))
        options.append(("a" if text[0] != "a" else "b") + text[1:])
    return options


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(lives(), st.data())
def test_any_single_change_to_any_stored_value_makes_verify_fail(entries: list[Entry], data: st.DataObject) -> None:
    log = sealed_log(entries)
    i = data.draw(st.integers(0, len(log) - 1), label="entry")
    column = data.draw(st.sampled_from(auditlog.COLUMNS), label="column")
    changed = data.draw(st.sampled_from(_mutations(getattr(log[i], column))), label="to")
    tampered = [*log[:i], replace(log[i], **{column: changed}), *log[i + 1:]]
    witness = Witness(Head(log[-1].n, log[-1].mac), "a witness")
    assert not auditlog.verify_log(tampered, key=KEY, witnesses=[witness]).ok


@settings(max_examples=100)
@given(lives(), st.data())
def test_deleting_duplicating_or_moving_any_entry_makes_verify_fail(entries: list[Entry], data: st.DataObject) -> None:
    log = sealed_log(entries)
    i = data.draw(st.integers(0, len(log) - 1))
    how = data.draw(st.sampled_from(["delete", "duplicate", "move"]))
    if how == "delete":
        tampered = log[:i] + log[i + 1:]
    elif how == "duplicate":
        tampered = log[:i + 1] + [log[i]] + log[i + 1:]
    else:
        j = data.draw(st.integers(0, len(log) - 1).filter(lambda j: j != i))
        tampered = list(log)
        tampered[i], tampered[j] = tampered[j], tampered[i]
    witness = Witness(Head(log[-1].n, log[-1].mac), "a witness")
    assert not auditlog.verify_log(tampered, key=KEY, witnesses=[witness]).ok


def test_a_log_sealed_with_another_key_names_both_keys() -> None:
    log = auditlog.chain([auditlog.genesis(key=b"k" * 32, at=AT)], after=Head(), key=b"k" * 32)
    result = auditlog.verify_log(log, key=KEY)
    assert not result.ok
    assert result.problems[0].startswith(f"the log was started with key {auditlog.key_id(b'k' * 32)}, not this key")


@pytest.mark.parametrize(
    ("changes", "kind"),
    [
        ({"outcome": "running", "ready_at": AT}, "running"),
        ({"outcome": "starting", "started_at": AT}, "started"),
        ({"container_id": "c1", "container_name": "jupyter-ada"}, "container"),
        ({"image_id": "sha256:" + "a" * 64, "repo_digest": None}, "image"),
        ({"devices": (), "driver_version": "550.54"}, "devices"),
        ({"profile": "gpu-1", "environment": {}}, "requested"),
        ({"note": "x"}, "noted"),
    ],
    ids=["running", "started", "container", "image", "devices", "requested", "other"],
)
def test_each_change_is_named_for_what_happened(changes: dict[str, Any], kind: str) -> None:
    assert auditlog.change("r1", changes, at=AT).kind == kind


@pytest.mark.parametrize(
    ("text", "head"),
    [
        ('{"format": 3, "n": 12, "mac": "' + "ab" * 32 + '"}', Head(12, "ab" * 32)),
        ("Head: 12:" + "ab" * 32 + "\n", Head(12, "ab" * 32)),
        ("7:" + "cd" * 32 + "\nlater\n12:" + "ab" * 32, Head(12, "ab" * 32)),
    ],
    ids=["head-file", "verify-line", "last-of-several"],
)
def test_a_head_is_read_from_a_head_file_or_from_verifys_line(text: str, head: Head) -> None:
    assert auditlog.head_from_text(text) == head


@pytest.mark.parametrize(
    "text",
    ['{"seq": 4, "hash": "' + "ab" * 32 + '", "opened": 5}', '{"format": 3, "n": -1, "mac": "' + "ab" * 32 + '"}',
     '{"format": 3, "n": "12", "mac": "x"}', "", "12:abc"],
    ids=["earlier-format", "negative", "text-number", "empty", "short-seal"],
)
def test_anything_else_is_not_a_head(text: str) -> None:
    with pytest.raises(ValueError):
        auditlog.head_from_text(text)


def test_a_record_written_before_cuda_requirements_were_kept_still_verifies_and_reads_back_without_one() -> None:
    opened = AuditRecord(id="r1", hub_id="hub-1", user="ada", server="", requested_at=AT)
    ended = replace(opened, outcome="stopped", stopped_at=AT)
    # what a gpuspawner before the field wrote: the same entry bodies, none naming cuda_requirement
    old = sealed_log([auditlog.opening(opened, at=AT), auditlog.closing(ended, at=AT)])
    assert all("cuda_requirement" not in e.body for e in old)
    assert auditlog.verify_log(old, key=KEY).ok
    assert auditlog.fold(old[1:]).cuda_requirement is None  # type: ignore[union-attr]
    met = 'NVIDIA_REQUIRE_CUDA="cuda>=12.4"'
    new = sealed_log([auditlog.opening(opened, at=AT), auditlog.change("r1", {"cuda_requirement": met}, at=AT),
                      auditlog.closing(replace(ended, cuda_requirement=met), at=AT)])
    assert auditlog.verify_log(new, key=KEY).ok
    assert auditlog.fold(new[1:]).cuda_requirement == met  # type: ignore[union-attr]
