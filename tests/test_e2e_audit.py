"""End to end: every server's environment recorded, against a real registry, hub and engine."""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import docker.errors
import pytest
import requests

import simnvml
from gpuspawner.audit import AuditRecord
from gpuspawner.store import AuditStore
from helpers import container_of, login, records_of, sim_config
from testbed import DockerBed, Registry, free_port, wait_for
from testbed.hub import BIN, RunningHub

pytestmark = pytest.mark.docker


def gpuspawner_cli(hub: RunningHub, *args: str) -> subprocess.CompletedProcess[str]:
    """The admin command, run as an admin would, against the test hub's configuration."""
    return subprocess.run(
        [str(BIN / "gpuspawner"), *args, "-f", str(hub.config_file)],
        capture_output=True, text=True, timeout=120,
    )


def audit_store(hub: RunningHub) -> AuditStore:
    return AuditStore(f"sqlite:///{hub.settings.workdir / 'gpuspawner-audit.sqlite'}")


def wait_outcome(hub: RunningHub, user: str, outcome: str, timeout: float = 60) -> AuditRecord:
    def found() -> AuditRecord | None:
        return next((r for r in records_of(hub, user) if r.outcome == outcome), None)

    return wait_for(found, timeout=timeout, interval=0.3, what=f"{user}'s record to be {outcome}")  # type: ignore[no-any-return]


@pytest.fixture
def pushed_image(docker_bed: DockerBed, registry: Registry, singleuser_image: str) -> Iterator[dict[str, str]]:
    """An image of its own (so removing it removes it), pushed to the local registry."""
    repo = f"{registry.address}/gpuspawner-test/audit"
    tag = "v" + secrets.token_hex(3)
    dockerfile = f"FROM {singleuser_image}\nLABEL org.opencontainers.image.revision={tag}\n"
    image, _ = docker_bed.client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=f"{repo}:{tag}", rm=True)
    for line in docker_bed.api.push(repo, tag, stream=True, decode=True):
        assert "error" not in line, line
    digest = registry.manifest_digest("gpuspawner-test/audit", tag)
    yield {"repo": repo, "tag": tag, "ref": f"{repo}:{tag}", "digest": digest, "image_id": image.id}
    try:
        docker_bed.api.remove_image(image.id, force=True)
    except docker.errors.NotFound:
        pass


def profile_hub(start_hub: Callable[..., RunningHub], image: str, tmp_path: Path, extra: str = "") -> RunningHub:
    spec = simnvml.write_spec(tmp_path / "gpus.json", [simnvml.gpu(0)])
    profiles = [{"slug": "gpu", "display_name": "One GPU", "image": image, "gpus": 1, "default": True,
                 "environment": {"OMP_NUM_THREADS": "4"}}]
    return start_hub(extra=sim_config(spec, f"c.GPUSpawner.profiles = {profiles!r}\n{extra}"))


def ada_running(start_hub: Callable[..., RunningHub], image: str, tmp_path: Path) -> tuple[RunningHub, AuditRecord]:
    """A hub of :func:`profile_hub` with ada's server running, and its record."""
    hub = profile_hub(start_hub, image, tmp_path)
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    return hub, wait_outcome(hub, "ada", "running")


def test_a_pushed_images_recorded_digest_is_the_registrys(
    pushed_image: dict[str, str], start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    hub, record = ada_running(start_hub, pushed_image["ref"], tmp_path)
    assert record.repo_digest == f"{pushed_image['repo']}@{pushed_image['digest']}"
    assert record.image_requested == pushed_image["ref"]
    assert record.image_id == pushed_image["image_id"]
    assert record.image_labels == {"org.opencontainers.image.revision": pushed_image["tag"],
                                   "org.opencontainers.image.source": "https://github.com/gpuspawner/gpuspawner",
                                   "org.opencontainers.image.title": "gpuspawner single-user (Debian)"}
    # pin_to_digest: the container was created from exactly the recorded digest
    info = docker_bed.api.inspect_container(container_of(docker_bed, hub, "ada")["Id"])
    assert info["Config"]["Image"] == f"{pushed_image['repo']}@{pushed_image['digest']}"
    assert info["Image"] == record.container_image_id == record.image_id
    assert record.devices[0].uuid == simnvml.gpu(0)["uuid"] and record.driver_version == "550.54.15"
    assert record.device_requests[0]["DeviceIDs"] == [simnvml.gpu(0)["uuid"]]
    assert record.environment == {"OMP_NUM_THREADS": "4"}
    assert record.docker_version and record.container_name and record.started_at and record.ready_at

    hub.stop_server("ada")
    stopped = wait_outcome(hub, "ada", "stopped")
    assert stopped.sealed and stopped.stopped_at


def exec_in(bed: DockerBed, container_id: str, *command: str) -> tuple[int, str]:
    """`docker exec` as the container's own user (the researcher's): exit code and output."""
    run = bed.api.exec_create(container_id, list(command))
    output = bed.api.exec_start(run["Id"]).decode()
    return bed.api.exec_inspect(run["Id"])["ExitCode"], output


def test_a_server_knows_its_record_image_and_gpus_as_its_audit_record_says(
    pushed_image: dict[str, str], start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    hub, record = ada_running(start_hub, pushed_image["ref"], tmp_path)
    container = container_of(docker_bed, hub, "ada")["Id"]
    code, out = exec_in(docker_bed, container, "python3", "-c", "import json, os; print(json.dumps(dict(os.environ)))")
    assert code == 0, out
    env = {k: v for k, v in json.loads(out).items() if k.startswith("GPUSPAWNER_")}
    assert env == {
        "GPUSPAWNER_SERVER_INFO": "/etc/gpuspawner/server.json", "GPUSPAWNER_RECORD_ID": record.id,
        "GPUSPAWNER_PROFILE": "gpu", "GPUSPAWNER_IMAGE": record.repo_digest,
        "GPUSPAWNER_IMAGE_DIGEST": f"{pushed_image['repo']}@{pushed_image['digest']}",
        "GPUSPAWNER_IMAGE_ID": record.image_id, "GPUSPAWNER_GPUS": simnvml.gpu(0)["uuid"],
        "GPUSPAWNER_DRIVER_VERSION": record.driver_version, "GPUSPAWNER_CUDA_DRIVER_VERSION": record.cuda_driver_version,
    }
    assert record.driver_version and record.cuda_driver_version
    assert not any(name.startswith("GPUSPAWNER_") for name in record.environment)  # the record is the source, not a copy

    code, out = exec_in(docker_bed, container, "cat", "/etc/gpuspawner/server.json")
    assert code == 0, out
    server = json.loads(out)
    assert (server["schema_version"], server["record_id"], server["profile"]) == (1, record.id, "gpu")
    assert server["image"] == {"requested": pushed_image["ref"], "reference": record.repo_digest,
                               "repo_digest": record.repo_digest, "image_id": record.image_id}
    assert server["gpus"] == [{"uuid": d.uuid, "model": d.model, "memory_total": d.memory_total,
                               "mig_parent": d.mig_parent, "mig_profile": d.mig_profile} for d in record.devices]
    assert (server["driver_version"], server["cuda_driver_version"]) == (record.driver_version, record.cuda_driver_version)
    # root's and read-only: the researcher's notebook reads it and cannot change it
    assert exec_in(docker_bed, container, "stat", "-c", "%U %a", "/etc/gpuspawner/server.json") == (0, "root 444\n")
    assert exec_in(docker_bed, container, "sh", "-c", "echo x >> /etc/gpuspawner/server.json")[0] != 0


@pytest.mark.parametrize("pull_policy", ["ifnotpresent", "always"])
def test_a_profile_pinned_by_digest_pulls_on_a_host_that_lacked_the_image(
    pushed_image: dict[str, str], start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path,
    pull_policy: str,
) -> None:
    pinned = f"{pushed_image['repo']}@{pushed_image['digest']}"
    docker_bed.api.remove_image(pushed_image["image_id"], force=True)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_bed.api.inspect_image(pinned)
    hub = profile_hub(start_hub, pinned, tmp_path, f"c.DockerSpawner.pull_policy = {pull_policy!r}")
    r = hub.spawn("ada")
    assert r.status_code in (201, 202), r.text
    hub.wait_ready("ada")
    record = wait_outcome(hub, "ada", "running")
    assert record.repo_digest == pinned
    assert record.container_image_id == record.image_id == pushed_image["image_id"]


def test_never_pull_with_a_missing_image_fails_clearly_and_is_recorded(
    pushed_image: dict[str, str], start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    pinned = f"{pushed_image['repo']}@{pushed_image['digest']}"
    docker_bed.api.remove_image(pushed_image["image_id"], force=True)
    hub = profile_hub(start_hub, pinned, tmp_path, 'c.DockerSpawner.pull_policy = "never"')
    r = hub.spawn("ada")
    assert r.status_code == 500
    assert r.json()["message"] == f"Image {pinned} is not on this host and DockerSpawner.pull_policy is 'never'."
    (record,) = records_of(hub, "ada")
    assert record.outcome == "failed" and record.sealed and "pull_policy is 'never'" in (record.error or "")


def test_a_never_pushed_image_starts_and_its_record_says_so(
    start_hub: Callable[..., RunningHub], singleuser_image: str, tmp_path: Path
) -> None:
    hub = profile_hub(start_hub, singleuser_image, tmp_path)
    assert hub.spawn("ada").status_code in (201, 202)
    record = wait_outcome(hub, "ada", "running")
    assert record.repo_digest is None and record.image_id
    assert "cannot be pulled on another host" in (record.note or "")
    command = gpuspawner_cli(hub, "reproduce", record.id).stdout
    assert command.startswith("# This image was never pushed to a registry")


def test_a_hub_killed_between_record_and_container_leaves_an_abandoned_record(
    start_hub: Callable[..., RunningHub], tmp_path: Path, singleuser_image: str
) -> None:
    marker = tmp_path / "creating"
    hub = profile_hub(start_hub, singleuser_image, tmp_path, f"""
import asyncio, pathlib
async def stall_before_create(spawner):
    pathlib.Path({str(marker)!r}).write_text(spawner.user.name)
    await asyncio.sleep(600)
    return {{}}
c.DockerSpawner.extra_create_kwargs = stall_before_create
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
""")
    assert hub.spawn("ada").status_code == 202
    wait_for(marker.exists, timeout=60, what="the spawn to reach the container's creation")
    (open_record,) = records_of(hub, "ada")
    assert not open_record.sealed and open_record.devices  # written before the container, with its GPU
    hub.kill()
    hub.start()
    abandoned = wait_outcome(hub, "ada", "abandoned", timeout=30)
    assert abandoned.id == open_record.id and abandoned.sealed
    assert abandoned.error == "The hub stopped while this server was starting."
    assert "OK:" in gpuspawner_cli(hub, "audit", "verify").stdout


def test_every_spawn_failed_or_not_has_a_record_and_a_changed_record_fails_verify(
    start_hub: Callable[..., RunningHub], singleuser_image: str, tmp_path: Path
) -> None:
    hub = profile_hub(start_hub, singleuser_image, tmp_path)
    attempts = [
        ("ada", {"profile": "nope"}, 400),
        ("ada", {"profile": "gpu", "image": "x:1"}, 400),
        ("bob", {}, 201),
        ("cyd", {}, 503),  # bob holds the only GPU
    ]
    for user, options, status in attempts:
        r = hub.spawn(user, options=options)
        assert r.status_code == status or (status == 201 and r.status_code == 202), r.text
    hub.wait_ready("bob")
    hub.stop_server("bob")
    wait_outcome(hub, "bob", "stopped")
    records = list(audit_store(hub).iter_records())
    assert sorted((r.user, r.outcome) for r in records) == [
        ("ada", "failed"), ("ada", "failed"), ("bob", "stopped"), ("cyd", "failed"),
    ]
    assert all(r.sealed for r in records)
    errors = {r.error for r in records if r.user != "bob"}
    assert any("Unknown profile 'nope'" in e for e in errors) and any("No free GPU" in e for e in errors)

    verify = gpuspawner_cli(hub, "audit", "verify")
    assert verify.returncode == 0, verify.stderr
    assert re.fullmatch(r"OK: \d+ entries, 4 records \(0 open\); every seal holds\.", verify.stdout.splitlines()[0])
    # the hub made its sealing key on first start, for its owner's eyes only, and keeps the
    # log's head beside it: the head verify prints is the one kept outside the database
    key_file = hub.settings.workdir / "gpuspawner-audit.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    head = json.loads((hub.settings.workdir / "gpuspawner-audit.head").read_text())
    assert f"Head: {head['n']}:{head['mac']}" in verify.stdout

    victim = next(r for r in records if r.user == "bob")
    import sqlite3

    with sqlite3.connect(hub.settings.workdir / "gpuspawner-audit.sqlite") as db:
        (body,) = db.execute("SELECT body FROM gpuspawner_audit_log WHERE n = ?", (victim.seq,)).fetchone()
        db.execute("UPDATE gpuspawner_audit_log SET body = ? WHERE n = ?", (body.replace('"bob"', '"eve"'), victim.seq))
    verify = gpuspawner_cli(hub, "audit", "verify")
    assert verify.returncode == 2
    assert verify.stderr.startswith("FAILED: 1 problem")
    assert f"entry #{victim.seq} (ended of record {victim.id}): its content does not match its seal" in verify.stderr
    marked = audit_store(hub).get(victim.id)
    assert marked is not None and marked.integrity == "seals not checked (no key)"  # a reader without the key
    exported = gpuspawner_cli(hub, "audit", "export", "--format", "jsonl")  # the CLI reads the key: it checks
    (row,) = [json.loads(line) for line in exported.stdout.splitlines() if victim.id in line]
    assert row["integrity"] == f"entry #{victim.seq} does not match its seal"


def test_a_restored_older_copy_of_the_store_makes_the_hub_refuse_to_spawn_and_say_why(
    start_hub: Callable[..., RunningHub], singleuser_image: str, tmp_path: Path
) -> None:
    """Roll back, then wait: the hub once numbered on from the restored copy and wrote over the gap."""
    import sqlite3

    hub = profile_hub(start_hub, singleuser_image, tmp_path, "c.JupyterHub.authenticate_prometheus = False\n")
    db, backup = hub.settings.workdir / "gpuspawner-audit.sqlite", tmp_path / "backup.sqlite"
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    with sqlite3.connect(db) as live, sqlite3.connect(backup) as copy:
        live.backup(copy)  # an admin's backup, while ada's server runs
    hub.stop_server("ada")
    wait_outcome(hub, "ada", "stopped")
    with sqlite3.connect(backup) as copy, sqlite3.connect(db) as live:
        copy.backup(live)  # restored over the live store: ada's end is gone

    refused = hub.spawn("bob")
    assert refused.status_code == 503, refused.text
    assert "audit log failed its integrity check" in refused.json()["message"]
    log = hub.log_file.read_text()
    assert re.search(r"The audit log at \S+ ends at entry #\d+, but the head kept outside it \(\S+\) has seen #\d+: "
                     r"the store was rolled back or replaced", log), hub.log_tail()
    metrics = requests.get(f"{hub.url}/hub/metrics", timeout=10).text
    assert re.search(r'^gpuspawner_audit_log_writable\{store="[^"]+"\} 0\.0$', metrics, re.MULTILINE), metrics
    assert 'gpuspawner_spawn_refusals_total{reason="audit_log"} 1.0' in metrics
    # nothing was written over the gap, and bob holds no GPU
    assert [r.user for r in audit_store(hub).iter_records()] == ["ada"]
    assert hub.api("GET", "/users/bob").json()["servers"] == {}
    verify = gpuspawner_cli(hub, "audit", "verify")
    assert verify.returncode == 2 and "the store was rolled back or replaced" in verify.stderr


def test_exports_show_and_reproduce(start_hub: Callable[..., RunningHub], singleuser_image: str, tmp_path: Path) -> None:
    hub = profile_hub(start_hub, singleuser_image, tmp_path)
    assert hub.spawn("ada").status_code in (201, 202)
    refused = hub.spawn("bob")  # ada holds the only GPU
    assert refused.status_code == 503 and refused.json()["message"].startswith("No free GPU"), refused.text
    rows = list(csv.DictReader(io.StringIO(gpuspawner_cli(hub, "audit", "export", "--format", "csv").stdout)))
    assert sorted(r["user"] for r in rows) == ["ada", "bob"]
    assert next(r for r in rows if r["user"] == "bob")["outcome"] == "failed"
    only_ada = gpuspawner_cli(hub, "audit", "export", "--format", "jsonl", "--user", "ada").stdout.splitlines()
    assert [json.loads(line)["user"] for line in only_ada] == ["ada"]
    crate_dir = tmp_path / "crate"
    crate_dir.mkdir()
    assert gpuspawner_cli(hub, "audit", "export", "--format", "ro-crate", "-o", str(crate_dir)).returncode == 0
    graph = json.loads((crate_dir / "ro-crate-metadata.json").read_text())["@graph"]
    assert sum(1 for e in graph if e["@type"] == "CreateAction") == 2
    record_id = json.loads(only_ada[0])["id"]
    shown = json.loads(gpuspawner_cli(hub, "audit", "show", record_id).stdout)
    assert shown["id"] == record_id and shown["profile"] == "gpu"
    missing = gpuspawner_cli(hub, "audit", "show", "no-such-record")
    assert missing.returncode == 1 and missing.stderr.strip() == "gpuspawner audit: no audit record no-such-record"


def test_the_audit_service_answers_admins_with_csv_and_others_with_403(
    start_hub: Callable[..., RunningHub], singleuser_image: str, tmp_path: Path
) -> None:
    port = free_port()
    hub = profile_hub(start_hub, singleuser_image, tmp_path, f"""
from gpuspawner.service import audit_service
audit_service(c, config_file=__file__, port={port})
c.Authenticator.admin_users = {{"boss"}}
c.JupyterHub.redirect_to_server = False
""")
    assert hub.spawn("ada").status_code in (201, 202)
    wait_outcome(hub, "ada", "running")
    url = f"{hub.url}/services/audit/"
    wait_for(lambda: requests.get(url, timeout=5, allow_redirects=False).status_code in (302, 403), timeout=60,
             what="the audit service to answer")

    bob = login(hub, "bob")
    assert bob.get(url, timeout=60).status_code == 403
    assert bob.get(url + "export.csv", timeout=60).status_code == 403

    boss = login(hub, "boss")
    page = boss.get(url, timeout=60)
    assert page.status_code == 200 and "<table>" in page.text and "ada" in page.text
    r = boss.get(url + "export.csv?user=ada", timeout=60)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv")
    (row,) = list(csv.DictReader(io.StringIO(r.text)))
    assert row["user"] == "ada" and row["profile"] == "gpu" and row["outcome"] == "running"
    assert boss.get(url + "export.jsonl", timeout=60).text.count("\n") == 1
    # times in any zone mean that time; a "time" that is none is a 400 saying what is allowed
    assert len(list(csv.DictReader(io.StringIO(boss.get(url + "export.csv?since=2000-01-01T02:00%2B02:00", timeout=60).text)))) == 1
    for page in ("", "export.csv"):
        bad = boss.get(url + page + "?since=yesterday", timeout=60)
        assert bad.status_code == 400 and "Since is 'yesterday', which is not a time; allowed:" in bad.text, bad.text

    # The service runs with the hub's own Python (audit_service names sys.executable), not the
    # first "python3" on PATH, which may lack gpuspawner: it is the hub's child, started with the
    # interpreter the hub itself runs on.
    assert hub.process is not None
    hub_python = command_line(hub.process.pid)[0]
    services = [c for c in children_commands(hub.process.pid) if c[1:3] == ["-m", "gpuspawner.service"]]
    assert [c[0] for c in services] == [hub_python], services


def command_line(pid: int) -> list[str]:
    return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")[:-1]


def children_commands(pid: int) -> list[list[str]]:
    """The command lines of the processes whose parent is `pid` (read from Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rpartition(")")[2].split()[1])  # "pid (comm) state ppid …"
            if parent == pid:
                found.append(command_line(int(stat.parent.name)))
        except (OSError, ValueError):  # the process ended while it was read
            continue
    return found
