"""Audit records: sealed into a hash chain; exported as CSV, JSONL and RO-Crate; reproduced."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace

import pytest

from gpuspawner.audit import GENESIS, AuditRecord, RecordedDevice, seal, verify_chain, without_secrets
from gpuspawner.export import csv_lines, jsonl_lines, reproduce_command, ro_crate_chunks

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


def chain(n: int) -> list[AuditRecord]:
    sealed, prev = [], GENESIS
    for i in range(1, n + 1):
        r = seal(record(i), seq=i, prev_hash=prev)
        sealed.append(r)
        prev = r.hash
    return sealed


def test_an_intact_chain_verifies() -> None:
    result = verify_chain(chain(5))
    assert result.ok and result.checked == 5
    assert result.message() == "OK: 5 sealed records, chain intact."


@pytest.mark.parametrize(
    ("tamper", "first_bad", "reason"),
    [
        (lambda rs: rs.__setitem__(2, replace(rs[2], image_id="sha256:" + "e" * 64)), "r3", "its content does not match its seal"),
        (lambda rs: rs.__setitem__(2, replace(rs[2], user="mallory")), "r3", "its content does not match its seal"),
        (lambda rs: rs.__setitem__(1, replace(rs[1], outcome="failed")), "r2", "its content does not match its seal"),
        (lambda rs: rs.__delitem__(1), "r3", "sequence number 3, expected 2"),
        (lambda rs: rs.insert(1, rs.pop(2)), "r3", "sequence number 3, expected 2"),
    ],
    ids=["image-changed", "user-changed", "outcome-changed", "record-deleted", "order-swapped"],
)
def test_verify_names_the_first_record_whose_content_or_order_changed(tamper, first_bad: str, reason: str) -> None:
    records = chain(5)
    tamper(records)
    result = verify_chain(records)
    assert (result.ok, result.first_bad, result.reason) == (False, first_bad, reason)


def test_a_resealed_record_still_breaks_the_link_of_the_next() -> None:
    records = chain(4)
    forged = seal(replace(records[1], user="mallory", seq=None, prev_hash=None, hash=None), seq=2, prev_hash=records[0].hash)
    records[1] = forged
    result = verify_chain(records)
    assert (result.first_bad, result.reason) == ("r3", "its link to the previous record does not match")


def test_only_final_records_are_sealed() -> None:
    with pytest.raises(ValueError):
        seal(record(1, outcome="running"), seq=1, prev_hash=GENESIS)


def test_secrets_never_leave() -> None:
    env = {"OMP_NUM_THREADS": "8", "JUPYTERHUB_API_TOKEN": "t", "JPY_API_TOKEN": "t", "WANDB_API_KEY": "k",
           "DB_PASSWORD": "p", "AWS_SECRET_ACCESS_KEY": "s"}
    assert without_secrets(env) == {"OMP_NUM_THREADS": "8"}


def test_csv_has_a_header_and_one_row_per_record() -> None:
    rows = list(csv.DictReader(io.StringIO("".join(csv_lines(chain(3))))))
    assert [r["id"] for r in rows] == ["r1", "r2", "r3"]
    assert rows[0]["repo_digest"] == f"127.0.0.1:5000/lab/pytorch@{DIGEST}"
    assert rows[0]["devices"] == "GPU-1" and rows[0]["device_models"] == "NVIDIA A100-SXM4-80GB"
    assert rows[0]["seq"] == "1" and len(rows[0]["hash"]) == 64


def test_jsonl_is_one_full_record_per_line() -> None:
    lines = list(jsonl_lines(chain(2)))
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["devices"][0]["uuid"] == "GPU-1" and first["environment"] == {"OMP_NUM_THREADS": "8"}


def test_ro_crate_follows_the_process_run_crate_profile() -> None:
    crate = json.loads("".join(ro_crate_chunks([record(1), record(2, user="bob", outcome="failed", error="boom")])))
    graph = {e["@id"]: e for e in crate["@graph"]}
    assert {"@id": "https://w3id.org/ro/wfrun/process/0.5"} in graph["ro-crate-metadata.json"]["conformsTo"]
    action = graph["#server-r2"]
    assert action["@type"] == "CreateAction"
    assert action["agent"] == {"@id": "#user-bob"} and graph["#user-bob"]["@type"] == "Person"
    assert action["actionStatus"] == {"@id": "http://schema.org/FailedActionStatus"} and action["error"] == "boom"
    assert (action["startTime"], action["endTime"]) == ("2026-11-21T10:01:02+00:00", "2026-11-21T11:00:02+00:00")
    image = graph[action["instrument"]["@id"]]
    assert image["@type"] == "ContainerImage"
    assert (image["registry"], image["name"], image["tag"], image["sha256"]) == ("127.0.0.1:5000", "lab/pytorch", "2024.10", "c" * 64)
    assert graph["#server-r1"]["instrument"] == action["instrument"]  # one image entity, shared


def test_reproduce_is_one_docker_run_by_digest_with_the_same_gpus_limits_and_environment() -> None:
    r = record(1, environment={"OMP_NUM_THREADS": "8", "JUPYTERHUB_API_TOKEN": "secret"},
               devices=(RecordedDevice("GPU-1", "A100", 1), RecordedDevice("GPU-2", "A100", 1)))
    assert reproduce_command(r) == (
        "docker run --rm -it -p 8888:8888 --gpus 2 --cpus 8 --memory 68719476736 -e OMP_NUM_THREADS=8 "
        f"127.0.0.1:5000/lab/pytorch@{DIGEST} jupyter server --ip=0.0.0.0 --port=8888"
    )


def test_reproduce_a_never_pushed_image_says_it_cannot_be_pulled() -> None:
    r = record(1, repo_digest=None, devices=(), cpu_limit=None, mem_limit=None, environment={})
    command = reproduce_command(r)
    assert command.startswith("# This image was never pushed to a registry")
    assert command.endswith(f"docker run --rm -it -p 8888:8888 {r.image_id} jupyter server --ip=0.0.0.0 --port=8888")
