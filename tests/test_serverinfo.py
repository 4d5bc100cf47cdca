"""What a server knows about itself: the variables and the file built from a spawn's values (pure)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from gpuspawner.audit import RecordedDevice
from gpuspawner.facts import DeviceFacts, ResolvedImage
from gpuspawner.injection import gpu_environment
from gpuspawner.serverinfo import (
    NAMES,
    SCHEMA_VERSION,
    SERVER_INFO_PATH,
    ReservedName,
    ServerInfo,
    check_create_environment,
    check_names,
    server_archive,
    server_document,
    server_environment,
    server_info,
    server_json,
)

DIGEST = "sha256:" + "a" * 64
IMAGE_ID = "sha256:" + "b" * 64
PINNED = f"registry.lab:5000/lab/torch@{DIGEST}"
PUSHED = ResolvedImage(requested="registry.lab:5000/lab/torch:2.5", image_id=IMAGE_ID, repo_digest=PINNED)
LOCAL = ResolvedImage(requested="lab/notebook:1", image_id=IMAGE_ID, repo_digest=None, note="never pushed")
MIG = RecordedDevice(uuid="MIG-11111111-2222", model="NVIDIA A100-SXM4-80GB MIG 1g.10gb", memory_total=10 * 2**30,
                     mig_parent="GPU-aaaa", mig_profile="1g.10gb")
A100 = RecordedDevice(uuid="GPU-bbbb", model="NVIDIA A100-SXM4-80GB", memory_total=80 * 2**30)
TWO = DeviceFacts(devices=(A100, MIG), driver_version="550.54.15", cuda_driver_version="12.4")


def info(resolved: ResolvedImage = PUSHED, devices: DeviceFacts | None = TWO, image: str = PINNED) -> ServerInfo:
    return server_info(record_id="20261208T010000-abc", hub_id="hub-1", user="ada", server="big", profile="a100-1",
                       image=image, resolved=resolved, devices=devices, version="1.2.3")


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        (info(), {
            "GPUSPAWNER_SERVER_INFO": SERVER_INFO_PATH, "GPUSPAWNER_RECORD_ID": "20261208T010000-abc",
            "GPUSPAWNER_PROFILE": "a100-1", "GPUSPAWNER_IMAGE": PINNED, "GPUSPAWNER_IMAGE_DIGEST": PINNED,
            "GPUSPAWNER_IMAGE_ID": IMAGE_ID, "GPUSPAWNER_GPUS": "GPU-bbbb,MIG-11111111-2222",
            "GPUSPAWNER_DRIVER_VERSION": "550.54.15", "GPUSPAWNER_CUDA_DRIVER_VERSION": "12.4",
        }),
        (info(LOCAL, None, image="lab/notebook:1"), {
            "GPUSPAWNER_SERVER_INFO": SERVER_INFO_PATH, "GPUSPAWNER_RECORD_ID": "20261208T010000-abc",
            "GPUSPAWNER_PROFILE": "a100-1", "GPUSPAWNER_IMAGE": "lab/notebook:1", "GPUSPAWNER_IMAGE_DIGEST": "",
            "GPUSPAWNER_IMAGE_ID": IMAGE_ID, "GPUSPAWNER_GPUS": "", "GPUSPAWNER_DRIVER_VERSION": "",
            "GPUSPAWNER_CUDA_DRIVER_VERSION": "",
        }),
    ],
    ids=["gpus-and-a-pushed-image", "cpu-only-never-pushed-every-variable-still-set"],
)
def test_the_variables_say_the_record_image_and_gpus(server: ServerInfo, expected: dict[str, str]) -> None:
    assert server_environment(server) == expected


def test_a_container_started_again_by_later_spawns_has_its_record_id_in_its_file_only() -> None:
    kept = server_environment(info(), with_record=False)
    assert "GPUSPAWNER_RECORD_ID" not in kept
    assert kept == {k: v for k, v in server_environment(info()).items() if k != "GPUSPAWNER_RECORD_ID"}


def test_the_file_holds_every_fact_with_its_schema_version() -> None:
    document = json.loads(server_json(info()))
    assert document == server_document(info())
    assert document == {
        "schema_version": SCHEMA_VERSION, "record_id": "20261208T010000-abc", "hub_id": "hub-1", "user": "ada",
        "server": "big", "profile": "a100-1",
        "image": {"requested": "registry.lab:5000/lab/torch:2.5", "reference": PINNED, "repo_digest": PINNED,
                  "image_id": IMAGE_ID},
        "gpus": [
            {"uuid": "GPU-bbbb", "model": "NVIDIA A100-SXM4-80GB", "memory_total": 80 * 2**30, "mig_parent": None,
             "mig_profile": None},
            {"uuid": "MIG-11111111-2222", "model": "NVIDIA A100-SXM4-80GB MIG 1g.10gb", "memory_total": 10 * 2**30,
             "mig_parent": "GPU-aaaa", "mig_profile": "1g.10gb"},
        ],
        "driver_version": "550.54.15", "cuda_driver_version": "12.4", "gpuspawner_version": "1.2.3",
    }


def test_a_cpu_servers_file_has_no_gpus_and_no_driver() -> None:
    document = server_document(info(LOCAL, None, image="lab/notebook:1"))
    assert (document["gpus"], document["driver_version"], document["image"]["repo_digest"]) == ([], None, None)


def test_the_archive_holds_the_file_read_only_and_roots_own_it() -> None:
    archive = tarfile.open(fileobj=io.BytesIO(server_archive(info(), mtime=1_795_000_000)))
    folder, file = archive.getmembers()
    assert (folder.name, folder.isdir(), folder.mode, folder.uid) == ("etc/gpuspawner", True, 0o755, 0)
    assert (file.name, file.isfile(), file.mode, file.uid, file.gid, file.mtime) == (
        SERVER_INFO_PATH.lstrip("/"), True, 0o444, 0, 0, 1_795_000_000)
    extracted = archive.extractfile(file)
    assert extracted is not None and extracted.read().decode() == server_json(info())


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["OMP_NUM_THREADS", "GPUSPAWNER_GPUS"], "P: 'GPUSPAWNER_GPUS' is a variable of gpuspawner's own, which it sets "
         "in every server to what its audit record says; allowed: any name but GPUSPAWNER_SERVER_INFO, GPUSPAWNER_RECORD_ID"),
        (["GPUSPAWNER_RECORD_ID", "GPUSPAWNER_IMAGE"], "P: 'GPUSPAWNER_IMAGE', 'GPUSPAWNER_RECORD_ID' are variables of gpuspawner's"),
        (["OMP_NUM_THREADS", "gpuspawner_gpus", "GPUSPAWNER_TESTBED_HOOK_SLEEP"], None),
    ],
    ids=["one", "several", "others-are-fine"],
)
def test_configured_variables_may_not_be_named_as_gpuspawners(names: list[str], message: str | None) -> None:
    if message is None:
        check_names(names, where="P")
        return
    with pytest.raises(ReservedName) as e:
        check_names(names, where="P")
    assert str(e.value).startswith(message)


EXPECTED = server_environment(info())


@pytest.mark.parametrize(
    ("variables", "refused"),
    [
        ([(k, v) for k, v in EXPECTED.items()] + [("OMP_NUM_THREADS", "4")], []),
        ([("GPUSPAWNER_GPUS", "GPU-bbbb")], ["Refused GPUSPAWNER_GPUS='GPU-bbbb': GPUSPAWNER_GPUS is gpuspawner's own "
                                             "variable, and it must be 'GPU-bbbb,MIG-11111111-2222'."]),
        ([("GPUSPAWNER_RECORD_ID", None)], ["Refused GPUSPAWNER_RECORD_ID without a value"]),
        ([("GPUSPAWNER_GPUS", "")], ["Refused GPUSPAWNER_GPUS=''"]),
        ([("GPUSPAWNER_TESTBED_HOOK_SLEEP", "8")], []),
    ],
    ids=["as-set", "another-value", "no-value", "emptied", "not-gpuspawners"],
)
def test_the_create_request_may_not_say_otherwise(variables: list[tuple[str, str | None]], refused: list[str]) -> None:
    problems = check_create_environment(variables, expected=EXPECTED)
    assert len(problems) == len(refused)
    for problem, start in zip(problems, refused, strict=True):
        assert problem.startswith(start), problem


def test_a_variable_gpuspawner_leaves_out_may_not_be_set_either() -> None:
    kept = server_environment(info(), with_record=False)  # a kept container's: no record id
    (problem,) = check_create_environment([("GPUSPAWNER_RECORD_ID", "r1")], expected=kept)
    assert problem.startswith("Refused GPUSPAWNER_RECORD_ID='r1': GPUSPAWNER_RECORD_ID is gpuspawner's own variable, "
                              "and gpuspawner leaves it out of this server.")
    assert check_create_environment([("GPUSPAWNER_GPUS", "")], expected={}) != []


def test_the_reserved_names_are_the_variables_set() -> None:
    assert set(NAMES) == set(server_environment(info()))


# --- The spawner's last check of its create request --------------------------------------------------


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ({}, None),
        ({"GPUSPAWNER_GPUS": "GPU-bbbb,GPU-cccc"}, "Refused GPUSPAWNER_GPUS='GPU-bbbb,GPU-cccc'"),
        ({"GPUSPAWNER_DRIVER_VERSION": "999.0"}, "Refused GPUSPAWNER_DRIVER_VERSION='999.0'"),
    ],
    ids=["as-gpuspawner-set-them", "another-value", "another-driver"],
)
def test_a_create_request_that_says_otherwise_than_the_record_is_refused(
    monkeypatch: pytest.MonkeyPatch, change: dict[str, str], refused: str | None
) -> None:
    from tornado import web

    from gpuspawner import GPUSpawner

    spawner = GPUSpawner(remove=True)
    monkeypatch.setattr(spawner, "container_labels", lambda: {})
    monkeypatch.setattr(spawner, "_this_server", info())
    spawner.gpu_devices = ("GPU-bbbb", "MIG-11111111-2222")
    environment = {**gpu_environment(spawner.gpu_devices), **spawner.server_environment(), **change}
    request = {"image": PINNED, "environment": environment, "host_config": {}}
    if refused is None:
        assert spawner._checked_create_request(request)["environment"] == environment
        assert spawner.server_environment() == server_environment(info())  # the record id too: a new container each spawn
        return
    with pytest.raises(web.HTTPError) as e:
        spawner._checked_create_request(request)
    assert e.value.status_code == 500 and refused in (e.value.log_message or "")


@pytest.mark.parametrize(("remove", "has_record_id"), [(True, True), (False, False)], ids=["removed", "kept"])
def test_a_kept_containers_environment_leaves_the_record_id_to_the_file(
    monkeypatch: pytest.MonkeyPatch, remove: bool, has_record_id: bool
) -> None:
    from gpuspawner import GPUSpawner

    spawner = GPUSpawner(remove=remove)
    assert spawner.server_environment() == {}  # no spawn yet: no facts to state
    monkeypatch.setattr(spawner, "_this_server", info())
    assert ("GPUSPAWNER_RECORD_ID" in spawner.server_environment()) is has_record_id
