"""The gpuspawner command as an admin runs it: paths mean what they mean where the admin stands,
times are read as times whatever their zone, and every failure is one line and an exit status."""

from __future__ import annotations

import csv
import inspect
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import simnvml
from gpuspawner import labels, seams
from gpuspawner.audit import AuditRecord
from gpuspawner.cli import format_table, main, not_counted, swarm_report, swarm_summary
from gpuspawner.devices import Inventory
from gpuspawner.store import AuditStore
from gpuspawner.times import TimeError, parse_time, stored_time
from helpers import unavailable
from testbed import docker_problem, wait_for

# Stored as the hub stores them (seams.now_iso): UTC, microseconds.
REQUESTED = {
    "r1": "2026-11-21T09:59:59.999999+00:00",
    "r2": "2026-11-21T10:00:00.000000+00:00",
    "r3": "2026-11-21T10:30:00.000000+00:00",
    "r4": "2026-11-21T11:00:00.000000+00:00",
}


def open_store(url: str) -> AuditStore:
    """A store that may write records: with a sealing key where the store takes one."""
    if "key" in inspect.signature(AuditStore).parameters:
        return AuditStore(url, key=bytes(range(32)))
    return AuditStore(url)


@pytest.fixture
def hub_config(tmp_path: Path) -> Path:
    """A hub's folder, apart from the admin's: its config and an audit store with four records."""
    folder = tmp_path / "hub"
    folder.mkdir()
    url = f"sqlite:///{folder / 'audit.sqlite'}"
    store = open_store(url)
    for record_id, requested_at in REQUESTED.items():
        store.insert(AuditRecord(id=record_id, hub_id="hub-1", user="ada", server="", requested_at=requested_at))
    store.dispose()
    config = folder / "jupyterhub_config.py"
    config.write_text(f'c = get_config()  # noqa\nc.GPUSpawner.hub_id = "hub-1"\nc.GPUSpawner.audit_db_url = {url!r}\n')
    return config


@pytest.fixture
def admin_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "admin"
    folder.mkdir()
    return folder


def gpuspawner(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command in a process of its own (it loads the hub's configuration into JupyterHub's singleton), with
    `env` added to this process's environment."""
    return subprocess.run([sys.executable, "-m", "gpuspawner.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def exported_ids(text: str) -> list[str]:
    return [row["id"] for row in csv.DictReader(io.StringIO(text))]


def test_output_is_written_where_the_admin_stands_not_beside_the_config(hub_config: Path, admin_dir: Path) -> None:
    result = gpuspawner("audit", "export", "-f", "../hub/jupyterhub_config.py", "-o", "out.csv", cwd=admin_dir)
    assert result.returncode == 0, result.stderr
    assert exported_ids((admin_dir / "out.csv").read_text()) == ["r1", "r2", "r3", "r4"]
    assert not (hub_config.parent / "out.csv").exists()


@pytest.mark.parametrize(
    ("since", "until", "ids"),
    [
        ("2026-11-21T12:00+02:00", None, ["r2", "r3", "r4"]),
        ("2026-11-21T10:00:00Z", None, ["r2", "r3", "r4"]),
        ("2026-11-21 10:00", None, ["r2", "r3", "r4"]),
        ("2026-11-21T05:00-05:00", "2026-11-21T11:00", ["r2", "r3"]),
        (None, "2026-11-21T12:30+02:00", ["r1", "r2"]),
        ("2026-11-21", "2026-11-22", ["r1", "r2", "r3", "r4"]),
    ],
    ids=["other-zone", "utc-z", "no-zone-is-utc", "window-across-zones", "until-other-zone", "dates"],
)
def test_since_and_until_compare_as_times_whatever_their_zone(
    hub_config: Path, admin_dir: Path, since: str | None, until: str | None, ids: list[str]
) -> None:
    window = [*(["--since", since] if since else []), *(["--until", until] if until else [])]
    result = gpuspawner("audit", "export", "-f", str(hub_config), *window, cwd=admin_dir)
    assert result.returncode == 0, result.stderr
    assert exported_ids(result.stdout) == ids


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "argument --since: 'yesterday' is not a time; allowed: an ISO 8601 date or time"),
        (["--until", "2026-13-01"], "argument --until: '2026-13-01' is not a time"),
        (["--since", "x" * 500], "argument --since: '" + "x" * 40 + "'… is not a time"),
        (["--since", "2026-11-22", "--until", "2026-11-21"], "is not before --until"),
    ],
    ids=["word", "no-such-month", "long-garbage-quoted-short", "empty-window"],
)
def test_a_bad_time_is_a_usage_error(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["audit", "export", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err) < 1000


def test_help_says_a_time_without_zone_is_utc(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["audit", "export", "--help"])
    assert "without a zone, UTC" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("config_text", "output", "message"),
    [
        (None, "no-such-folder/out.csv", "gpuspawner audit: cannot write {admin}/no-such-folder/out.csv: No such file or directory"),
        (None, ".", "gpuspawner audit: cannot write {admin}: Is a directory"),
        ("c = get_config()\nc.GPUSpawner.hub_id = (\n", None,
         "gpuspawner audit: the configuration file {config} has a syntax error at line 2: '(' was never closed"),
        ("c = get_config()\nimport no_such_module_here\n", None,
         "gpuspawner audit: the configuration file {config} failed at line 2: "
         "ModuleNotFoundError: No module named 'no_such_module_here'"),
        ("c = get_config()\n\nraise RuntimeError('the lab is closed\\nsecond line')\n", None,
         "gpuspawner audit: the configuration file {config} failed at line 3: RuntimeError: the lab is closed"),
    ],
    ids=["output-folder-missing", "output-is-a-folder", "config-syntax-error", "config-import-fails", "config-raises"],
)
def test_failures_are_one_line_and_a_nonzero_status(
    hub_config: Path, admin_dir: Path, config_text: str | None, output: str | None, message: str
) -> None:
    if config_text is not None:
        hub_config.write_text(config_text)
    result = gpuspawner("audit", "export", "-f", str(hub_config), *(["-o", output] if output else []), cwd=admin_dir)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [message.format(admin=admin_dir, config=hub_config)], result.stderr
    assert result.stdout == ""


# --- The time parser the CLI and the audit service share --------------------------------------


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("2026-11-21", "2026-11-21T00:00:00.000000+00:00"),
        ("2026-11-21T12:00", "2026-11-21T12:00:00.000000+00:00"),
        ("2026-11-21T12:00+02:00", "2026-11-21T10:00:00.000000+00:00"),
        ("2026-11-21T12:00Z", "2026-11-21T12:00:00.000000+00:00"),
        ("2026-11-21 00:30:00.5-01:00", "2026-11-21T01:30:00.500000+00:00"),
        (" 2026-11-21T10:00:01+00:00 ", "2026-11-21T10:00:01.000000+00:00"),
    ],
    ids=["date", "no-zone", "plus-two", "z", "space-fraction-minus-one", "stored-without-fraction"],
)
def test_times_are_normalised_to_the_stored_form(text: str, stored: str) -> None:
    assert stored_time(text) == stored


def test_a_time_the_hub_stored_reads_back_unchanged() -> None:
    now = seams.now_iso()
    assert stored_time(now) == now
    assert parse_time(now).isoformat(timespec="microseconds") == now


@pytest.mark.parametrize("text", ["yesterday", "", "2026-02-30", "0001-01-01T00:00+05:00", "9" * 10_000])
def test_what_is_not_a_time_is_refused_quoting_a_short_prefix(text: str) -> None:
    with pytest.raises(TimeError) as e:
        stored_time(text, where="since")
    assert str(e.value).startswith("since is ")
    assert "which is not a time; allowed: an ISO 8601 date or time" in str(e.value)
    assert len(str(e.value)) < 250


def test_reproduce_hides_what_the_admins_names_now_redact_in_an_older_record(tmp_path: Path) -> None:
    """A record written before the admin added a name still holds the value; reproduce must not print it."""
    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    store = open_store(url)
    store.insert(AuditRecord(id="old", hub_id="hub-1", user="ada", server="", requested_at=REQUESTED["r1"],
                             image_id="sha256:" + "d" * 64, environment={"LICENSE_SERVER": "27000@lic.example"}))
    store.dispose()
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(
        f'c = get_config()  # noqa\nc.GPUSpawner.audit_db_url = {url!r}\n'
        'c.GPUSpawner.audit_redact_names = ["LICENSE_SERVER"]\n'
    )
    result = gpuspawner("reproduce", "old", "-f", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "27000@lic.example" not in result.stdout
    assert " -e LICENSE_SERVER " in result.stdout


# --- `gpuspawner gpus --swarm`: the swarm's devices, as its manager lists them ------------------------

TESTS = Path(__file__).resolve().parent


def api_node(availability: str, state: str, message: str = "") -> dict[str, Any]:
    """A ``GET /nodes`` entry of a GPU worker, as much of it as says where it stands."""
    return {
        "ID": "x3k9v2", "Spec": {"Role": "worker", "Availability": availability, "Labels": {}},
        "Description": {"Hostname": "gpu07", "Engine": {"EngineVersion": "20.10.24+dfsg1", "Labels": {}},
                        "Resources": {"NanoCPUs": 8_000_000_000, "MemoryBytes": 68_719_476_736, "GenericResources": [
                            {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-a"}},
                            {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-b"}},
                            {"NamedResourceSpec": {"Kind": "NVIDIA-MIG-1g.10gb", "Value": "MIG-c"}},
                            {"DiscreteResourceSpec": {"Kind": "SSD", "Value": 1}}]}},
        "Status": {"State": state, "Addr": "10.20.0.17"} | ({"Message": message} if message else {}),
    }


@pytest.mark.parametrize(
    ("availability", "state", "message", "why"),
    [("drain", "ready", "", "drained"), ("pause", "ready", "", "paused"), ("active", "down", "heartbeat failure", "down (heartbeat failure)"),
     ("drain", "down", "", "down, drained"), ("active", "disconnected", "", "disconnected"), ("active", "ready", "", None)],
    ids=["drained", "paused", "down", "down-and-drained", "disconnected", "counted"],
)
def test_a_gpu_node_the_hub_does_not_count_is_listed_with_why(availability: str, state: str, message: str, why: str | None) -> None:
    found = not_counted(api_node(availability, state, message))
    if why is None:
        assert found is None
    else:
        assert found == {"node": "gpu07", "node_id": "x3k9v2", "why": why, "advertises": {"NVIDIA-GPU": 2, "NVIDIA-MIG-1g.10gb": 1}}


def test_gpus_swarm_shows_each_device_on_a_schedulable_node_and_says_which_nodes_are_not_counted() -> None:
    active, drained = api_node("active", "ready"), api_node("drain", "ready")
    active["Spec"]["Labels"] = {"gpuspawner.gpu-model": "NVIDIA A100-SXM4-80GB", "gpuspawner.gpu-memory": str(80 * 1024**3)}
    drained |= {"ID": "d7q1w4", "Description": {**drained["Description"], "Hostname": "gpu08"}}
    ada = labels.server_labels(labels.ServerIdentity("hub-1", "ada", "train"), version="2.1.0", profile="a100")
    services = [{"ID": "s1", "Spec": {"Name": "jupyter-ada-train", "Labels": ada}}, {"ID": "s2", "Spec": {"Name": "nightly", "Labels": {}}}]
    tasks = [{"ID": "t1", "ServiceID": "s1", "NodeID": "x3k9v2", "DesiredState": "running", "Status": {"State": "running"},
              "GenericResources": [{"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-a"}}]},
             {"ID": "t2", "ServiceID": "s2", "NodeID": "x3k9v2", "DesiredState": "shutdown", "Status": {"State": "running"},
              "GenericResources": [{"NamedResourceSpec": {"Kind": "NVIDIA-MIG-1g.10gb", "Value": "MIG-c"}}]}]
    report = swarm_report([active, drained], services, tasks, hub_id="hub-1", busy_memory_threshold=1024**3)
    table = format_table(report["devices"], Inventory(problem=report["problem"]), "hub-1", summary=swarm_summary(report))
    assert table.splitlines() == [
        "NODE   UUID   MODEL                              MEMORY  STATUS",
        "gpu07  GPU-a  NVIDIA A100-SXM4-80GB              80 GiB  held by ada/train (profile a100)",
        "gpu07  GPU-b  NVIDIA A100-SXM4-80GB              80 GiB  free",
        "gpu07  MIG-c  NVIDIA A100-SXM4-80GB MIG 1g.10gb  -       held by another service (nightly)",  # still stopping
        "Swarm, hub hub-1: 1 free, 1 held by its servers, 1 held by other services.",
        "NVIDIA A100-SXM4-80GB: 2 advertised on schedulable nodes, 1 held, 1 free.",
        "NVIDIA A100-SXM4-80GB MIG 1g.10gb: 1 advertised on schedulable nodes, 1 held, 0 free.",
        "gpu08: not counted, drained (advertises 2 × NVIDIA-GPU, 1 × NVIDIA-MIG-1g.10gb).",
    ]
    assert {r["uuid"]: (r["node_id"], r["memory_used"], r["holder"]) for r in report["devices"]} == {
        "GPU-a": ("x3k9v2", None, "ada/train"), "GPU-b": ("x3k9v2", None, None), "MIG-c": ("x3k9v2", None, "nightly")}


def test_gpus_swarm_where_no_engine_answers_is_one_line_and_status_1(hub_config: Path, admin_dir: Path) -> None:
    missing = admin_dir / "no-engine.sock"
    result = gpuspawner("gpus", "--swarm", "-f", str(hub_config), cwd=admin_dir, env={"DOCKER_HOST": f"unix://{missing}"})
    assert (result.returncode, result.stdout) == (1, "")
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"gpuspawner gpus: cannot read the swarm from the Docker engine at unix://{missing}: ")


@pytest.mark.docker
def test_gpus_swarm_on_an_engine_that_is_no_swarm_manager_says_so_in_one_line(hub_config: Path, admin_dir: Path) -> None:
    problem = docker_problem()
    if problem is not None:
        unavailable(problem)
    import docker

    if docker.from_env(version="auto").info()["Swarm"]["LocalNodeState"] != "inactive":
        pytest.skip("this machine's Docker engine is part of a swarm")
    result = gpuspawner("gpus", "--swarm", "-f", str(hub_config), cwd=admin_dir)
    assert (result.returncode, result.stdout) == (1, "")
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("gpuspawner gpus: the Docker engine at ")
    assert "is not a swarm manager (This node is not a swarm manager." in result.stderr
    assert result.stderr.rstrip().endswith("run this on a manager node, or point DOCKER_HOST at one")


@pytest.mark.docker
def test_gpus_swarm_lists_each_advertised_device_with_its_node_and_holder_and_the_nodes_not_counted(
    swarm_bed: Any, hub_config: Path, admin_dir: Path,
) -> None:
    from docker.types import EndpointSpec, Resources

    bed = swarm_bed
    worker2 = bed.workers[1]
    node = bed.manager.api.inspect_node(worker2.node_id)  # paused before any service: a node update
    bed.manager.api.update_node(worker2.node_id, node["Version"]["Index"], {**node["Spec"], "Availability": "pause"})

    def service(name: str, service_labels: dict[str, str], kind: str, count: int = 1) -> str:
        return str(bed.manager.services.create(
            bed.base_ref, name=name, labels=service_labels, networks=[bed.network], endpoint_spec=EndpointSpec(mode="dnsrr"),
            resources=Resources(generic_resources={kind: count}), constraints=["node.hostname==worker1"]).id)

    ada = labels.server_labels(labels.ServerIdentity("hub-1", "ada"), version="test", profile="a100")
    bob = labels.server_labels(labels.ServerIdentity("hub-1", "bob", "big"), version="test", profile="a100-2")
    made = [service("jupyter-ada", ada, "NVIDIA-GPU")]
    seen: list[object] = []
    try:
        # ada's first, so that bob's 2-GPU server, asked for next, finds one GPU left on worker1 and waits
        wait_for(lambda: any(t["Status"]["State"] == "running" for t in bed.manager.api.tasks(filters={"service": made[0]})),
                 timeout=120, interval=0.5, what="ada's task running")
        made += [service("nightly-train", {"team": "vision"}, "NVIDIA-MIG-1g.10gb"),
                 service("jupyter-bob-big", bob, "NVIDIA-GPU", 2)]  # pending: worker1 has one GPU left
        def settled() -> dict[str, str] | None:
            tasks = {t["ServiceID"]: t for t in bed.manager.api.tasks(filters={"desired-state": "running"}) if t["ServiceID"] in made}
            states = {sid: t["Status"]["State"] for sid, t in tasks.items()}
            seen[:] = [[(t["Status"]["State"], t["Status"].get("Err", ""), t.get("GenericResources")) for t in tasks.values()]]
            ok = states.get(made[0]) == states.get(made[1]) == "running" and states.get(made[2]) == "pending"
            return {sid: t["GenericResources"][0]["NamedResourceSpec"]["Value"] for sid, t in tasks.items()
                    if t.get("GenericResources")} if ok else None

        try:
            assigned = wait_for(settled, timeout=180, interval=0.5, what="ada's and the training job's tasks running, bob's pending")
        except TimeoutError as e:
            pytest.fail(f"{e}; the tasks last seen (state, error, resources): {seen}", pytrace=False)
        ada_gpu = assigned[made[0]]
        other_gpu = ({"GPU-w1-0", "GPU-w1-1"} - {ada_gpu}).pop()
        env = {"DOCKER_HOST": bed.manager_url}

        listed = gpuspawner("gpus", "--swarm", "--json", "-f", str(hub_config), cwd=admin_dir, env=env)
        assert listed.returncode == 0, listed.stderr
        report = json.loads(listed.stdout)
        rows = {r["uuid"]: (r["node"], r["status"], r["where"]) for r in report["devices"]}
        assert rows == {
            ada_gpu: ("worker1", "held", "held by ada (profile a100)"),
            other_gpu: ("worker1", "free", "free"),
            "MIG-w1-1-0": ("worker1", "held", "held by another service (nightly-train)"),
        }  # worker2 is paused: Swarm places nothing there, so none of its GPUs count
        kinds = {k["kind"].endswith(" MIG 1g.10gb"): (k["advertised"], k["held"], k["free"]) for k in report["kinds"]}
        assert kinds == {False: (2, 1, 1), True: (1, 1, 0)}
        assert [(n["node"], n["why"], n["advertises"]) for n in report["not_counted"]] == [("worker2", "paused", {"NVIDIA-GPU": 2})]

        table = gpuspawner("gpus", "--swarm", "-f", str(hub_config), cwd=admin_dir, env=env)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["NODE", "UUID", "MODEL", "MEMORY", "STATUS"]
        assert any(line.startswith("worker1") and ada_gpu in line and line.endswith("held by ada (profile a100)") for line in lines)
        assert lines[-4] == "Swarm, hub hub-1: 1 free, 1 held by its servers, 1 held by other services."
        assert lines[-1] == "worker2: not counted, paused (advertises 2 × NVIDIA-GPU)."
    finally:
        for service_id in made:
            bed.manager.api.remove_service(service_id)
        node = bed.manager.api.inspect_node(worker2.node_id)
        bed.manager.api.update_node(worker2.node_id, node["Version"]["Index"], {**node["Spec"], "Availability": "active"})
        bed.wait_settled()  # the session's bed as it was: every node active, every GPU free


# --- `gpuspawner swarm-node-config`: what a GPU node's engine is told -----------------------------------

GPU0, GPU1, GPU3 = (simnvml.gpu(n)["uuid"] for n in (0, 1, 3))
MIG_SMALL, MIG_LARGE = simnvml.mig_device(2, 0)["uuid"], simnvml.mig_device(2, 1)["uuid"]
OURS = {
    "node-generic-resources": [f"NVIDIA-GPU={GPU0}", f"NVIDIA-GPU={GPU1}", f"NVIDIA-MIG-1g.10gb={MIG_SMALL}",
                               f"NVIDIA-MIG-3g.40gb={MIG_LARGE}"],
    "labels": ["gpuspawner.cuda=12.4", "gpuspawner.gpu-memory=85899345920", "gpuspawner.gpu-model=NVIDIA A100-SXM4-80GB",
               "gpuspawner.mig-memory.1g.10gb=10737418240", "gpuspawner.mig-memory.3g.40gb=42949672960",
               "gpuspawner.nvidia-driver=550.54.15"],
}


def gpu_node(tmp_path: Path, gpus: list[dict[str, Any]] | None = None, **extra: Any) -> Path:
    """A GPU node's driver, simulated: two A100s, one in MIG mode (a 1g.10gb and a 3g.40gb device), one lost."""
    if gpus is None:
        gpus = [simnvml.gpu(0), simnvml.gpu(1),
                simnvml.gpu(2, mig=[simnvml.mig_device(2, 0), simnvml.mig_device(2, 1, profile="3g.40gb", memory_gib=40)]),
                simnvml.gpu(3, lost=True)]
    return simnvml.write_spec(tmp_path / "gpus.json", gpus, **extra)


def node_config(spec: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`gpuspawner swarm-node-config` in a process of its own, NVML answered by the simulated driver."""
    boot = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import simnvml; simnvml.install({str(spec)!r}); "
            "from gpuspawner.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", boot, "swarm-node-config", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_a_node_config_advertises_healthy_gpus_and_mig_devices_and_says_how_to_set_the_runtime(tmp_path: Path) -> None:
    result = node_config(gpu_node(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == OURS  # GPU-2 is in MIG mode, GPU-3 is lost: neither is advertised
    assert result.stderr.splitlines()[:3] == [
        "# /etc/nvidia-container-runtime/config.toml, at the top level (before any [section]):",
        'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU,DOCKER_RESOURCE_NVIDIA-MIG-1G.10GB,DOCKER_RESOURCE_NVIDIA-MIG-3G.40GB"',
        "# A list of several variables needs NVIDIA Container Toolkit 1.12.0 or later (older ones read one name only).",
    ]
    assert 'make "nvidia" the engine\'s default runtime' in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "docker node update --label-add gpuspawner.gpu-memory=85899345920 --label-add 'gpuspawner.gpu-model=NVIDIA A100-SXM4-80GB' "
        "--label-add gpuspawner.mig-memory.1g.10gb=10737418240 --label-add gpuspawner.mig-memory.3g.40gb=42949672960 "
        f"{platform.node()}"
    )


def test_a_node_with_whole_gpus_only_names_one_variable(tmp_path: Path) -> None:
    result = node_config(gpu_node(tmp_path, [simnvml.gpu(0)]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"' in result.stderr.splitlines()
    assert "1.12.0" not in result.stderr


def test_merging_keeps_the_admins_settings_and_replaces_what_gpuspawner_wrote_before(tmp_path: Path) -> None:
    daemon_json = tmp_path / "daemon.json"
    daemon_json.write_text(json.dumps({
        "log-driver": "journald", "default-runtime": "nvidia",
        "runtimes": {"nvidia": {"path": "nvidia-container-runtime", "runtimeArgs": []}},
        "labels": ["rack=b2", "gpuspawner.gpu-model=Tesla V100-SXM2-32GB", "gpuspawner.mig-memory.2g.20gb=21474836480"],
        # a GPU since removed, one of ours under a tutorial's kind (it would be handed out twice), another resource
        "node-generic-resources": ["NVIDIA-GPU=GPU-since-removed", f"gpu={GPU0}", "SSD=nvme0"],
    }))
    result = node_config(gpu_node(tmp_path), "--merge", "daemon.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "log-driver": "journald", "default-runtime": "nvidia",
        "runtimes": {"nvidia": {"path": "nvidia-container-runtime", "runtimeArgs": []}},
        "labels": ["rack=b2", *OURS["labels"]],
        "node-generic-resources": ["SSD=nvme0", *OURS["node-generic-resources"]],
    }
    assert "default runtime" not in result.stderr  # it is already nvidia
    assert json.loads(daemon_json.read_text())["labels"][1].startswith("gpuspawner.gpu-model=Tesla")  # printed, not written


@pytest.mark.parametrize(
    ("spec_extra", "daemon_json", "message"),
    [
        ({"no_driver": True}, None,
         "gpuspawner swarm-node-config: no GPU to advertise: no NVIDIA driver is usable on this host (NVML: Driver Not Loaded)"),
        ({"gpus": [simnvml.gpu(0, lost=True)]}, None,
         "gpuspawner swarm-node-config: no GPU to advertise: this host has no healthy GPU or MIG device (see nvidia-smi)"),
        ({}, "missing", "gpuspawner swarm-node-config: cannot read {tmp}/daemon.json: No such file or directory"),
        ({}, '{"labels": ["a=b"],}', "gpuspawner swarm-node-config: {tmp}/daemon.json is not JSON: {json_error}"),
        ({}, '["a"]', "gpuspawner swarm-node-config: {tmp}/daemon.json is not a JSON object"),
        ({}, '{"labels": "rack=b2"}', "gpuspawner swarm-node-config: {tmp}/daemon.json: 'labels' is not a list"),
    ],
    ids=["no-driver", "every-gpu-lost", "merge-file-missing", "merge-file-not-json", "merge-file-not-an-object", "labels-not-a-list"],
)
def test_a_node_config_that_cannot_be_made_is_one_line_and_status_1(
    tmp_path: Path, spec_extra: dict[str, Any], daemon_json: str | None, message: str,
) -> None:
    gpus = spec_extra.pop("gpus", None)
    spec = gpu_node(tmp_path, gpus, **spec_extra)
    if daemon_json not in (None, "missing"):
        (tmp_path / "daemon.json").write_text(daemon_json)  # type: ignore[arg-type]
    result = node_config(spec, *(["--merge", str(tmp_path / "daemon.json")] if daemon_json else []), cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    try:
        json.loads(daemon_json or "{}")
        json_error = ""
    except ValueError as e:
        json_error = str(e)  # Python's own words, which differ between versions
    assert result.stderr.splitlines() == [message.format(tmp=tmp_path, json_error=json_error)]
