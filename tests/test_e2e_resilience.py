"""End to end: a GPU is never held twice and every record ends truly, whatever happens to a spawn.

Real hub, real engine, real containers; GPUs from the simulated NVML. Each test is one event
that used to break a guarantee: an interrupted spawn, a hub whose host name changed, a GPU
held by a container this hub did not make, a container that died, a server that never
answered, a hub killed while a server started, a locked audit database, settings that changed
between spawns, an admin setting that would add devices, a hung NVML.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import simnvml
from gpuspawner import reconcile, seams
from gpuspawner.audit import AuditRecord
from gpuspawner.store import AuditStore, load_key
from helpers import container_of, one_gpu_hub_with_ada, records_of, sealed_record, sim_config
from testbed import TESTBED_DIR, DockerBed, wait_for
from testbed.hub import RunningHub

pytestmark = pytest.mark.docker


def writing_store(hub: RunningHub) -> AuditStore:
    """The hub's audit store with its sealing key, to write records as the hub would have."""
    key_file = hub.settings.workdir / "gpuspawner-audit.key"
    wait_for(key_file.exists, timeout=30, what="the hub to make its sealing key")
    return AuditStore(f"sqlite:///{hub.settings.workdir / 'gpuspawner-audit.sqlite'}", key=load_key(key_file),
                      head_file=hub.settings.workdir / "gpuspawner-audit.head")


def spawn_until_waiting_for_answer(hub: RunningHub, user: str) -> None:
    """Spawn `user`'s server and return once JupyterHub has stored it and waits for it to answer."""
    assert hub.spawn(user).status_code == 202
    wait_for(lambda: any(r.outcome == "starting" for r in records_of(hub, user)), timeout=60,
             what=f"{user}'s container to be starting")
    time.sleep(1)


def hub_containers(bed: DockerBed, hub_id: str, user: str) -> list[dict]:
    return [c for c in bed.containers_labelled(f"gpuspawner.hub={hub_id}") if c["Labels"]["gpuspawner.user"] == user]


# --- 1. an interrupted spawn --------------------------------------------------------------


def test_an_interrupted_spawn_keeps_its_gpu_until_its_container_is_gone(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    spec = simnvml.write_spec(tmp_path / "gpus.json", [simnvml.gpu(0)])
    gpu0 = simnvml.gpu(0)["uuid"]
    # ada's `docker start` takes 8 s (the stand-in hook waits), so her spawn is interrupted mid-start
    hub = start_hub(extra=sim_config(spec, """
c.GPUSpawner.gpu_request = 1
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
c.GPUSpawner.reconcile_interval = 2
c.Spawner.environment = {"GPUSPAWNER_TESTBED_HOOK_SLEEP": lambda spawner: "8" if spawner.user.name == "ada" else "0"}
"""))
    seen_before = set((TESTBED_DIR / "hook-records").glob("*.starting"))
    assert hub.spawn("ada").status_code == 202
    starting = wait_for(lambda: set((TESTBED_DIR / "hook-records").glob("*.starting")) - seen_before,
                        timeout=60, what="ada's container to be starting")
    (ada_container_id,) = [p.name.split(".")[0] for p in starting]

    deleting = threading.Thread(target=lambda: hub.api("DELETE", "/users/ada/server", timeout=60))
    deleting.start()
    time.sleep(2)  # JupyterHub has cancelled ada's spawn; the engine is still starting her container
    assert hub.spawn("bob").status_code == 202
    refused = sealed_record(hub, "bob")  # the GPU is not free while ada's container may run
    assert refused.outcome == "failed" and "HTTP 503" in (refused.error or ""), refused
    deleting.join()

    wait_for(lambda: not hub_containers(docker_bed, hub.settings.hub_id, "ada"), timeout=60,
             what="ada's interrupted container to be removed")
    record = sealed_record(hub, "ada")
    assert record.outcome == "failed" and "cancelled" in (record.error or ""), record
    assert record.container_id == ada_container_id  # the container it made, though cut short mid-start
    wait_for(lambda: hub.server_model("bob") is None, timeout=30, what="bob's refused spawn to end")
    assert hub.spawn("bob").status_code in (201, 202)
    hub.wait_ready("bob")
    bob_container = container_of(docker_bed, hub, "bob")
    assert docker_bed.hook_record(bob_container["Id"])["devices"] == [gpu0]
    # the engine's own log: bob's container started only after ada's had died
    events = list(docker_bed.api.events(
        since=int(time.time()) - 300, until=int(time.time()) + 1,
        decode=True, filters={"type": "container", "event": ["start", "die", "destroy"]},
    ))
    ada_end = [e["timeNano"] for e in events if e["id"] == ada_container_id and e["Action"] in ("die", "destroy")]
    bob_start = [e["timeNano"] for e in events if e["id"] == bob_container["Id"] and e["Action"] == "start"]
    assert bob_start and (not ada_end or min(ada_end) < min(bob_start)), (ada_end, bob_start)


# --- 2. the hub's identity and other containers' devices ------------------------------------


def test_a_hub_recreated_with_another_host_name_keeps_its_identity_and_its_servers_gpus(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    spec = simnvml.write_spec(tmp_path / "gpus.json", [simnvml.gpu(0)])
    extra = sim_config(spec, "c.GPUSpawner.gpu_request = 1\nc.JupyterHub.cleanup_servers = False\n")
    hub = start_hub(extra=extra, configure_hub_id=False, hostname="hub-container-1")
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    hub_id = (tmp_path / "gpuspawner-hub-id").read_text().strip()
    (ada,) = hub_containers(docker_bed, hub_id, "ada")

    hub.kill()  # `docker compose up -d --build`: the hub's container is replaced, its data volume kept
    hub.settings.hostname = "hub-container-2"
    hub.start()
    assert (tmp_path / "gpuspawner-hub-id").read_text().strip() == hub_id
    refused = hub.spawn("bob")
    assert refused.status_code == 503, refused.text
    assert "1 held by other servers" in refused.json()["message"]
    assert hub.server_model("ada")["ready"]
    assert docker_bed.api.inspect_container(ada["Id"])["State"]["Running"]


def test_a_gpu_held_by_a_container_this_hub_did_not_make_is_never_granted(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path, light_image: str
) -> None:
    gpus = [simnvml.gpu(0), simnvml.gpu(1), simnvml.gpu(2)]
    spec = simnvml.write_spec(tmp_path / "gpus.json", gpus)
    # another hub's server by UUID, and a `docker run --gpus 1` (the first GPU by index)
    made = []
    for requests in (
        [{"Driver": "nvidia", "DeviceIDs": [gpus[1]["uuid"]], "Capabilities": [["gpu"]]}],
        [{"Driver": "nvidia", "Count": 1, "Capabilities": [["gpu"]]}],
    ):
        c = docker_bed.api.create_container(
            light_image, host_config=docker_bed.api.create_host_config(device_requests=requests),
            labels={"gpuspawner.hub": "some-other-hub", "test": "foreign"},
        )
        docker_bed.api.start(c["Id"])
        made.append(c["Id"])
    try:
        hub = start_hub(extra=sim_config(spec, "c.GPUSpawner.gpu_request = 1"))
        assert hub.spawn("ada").status_code in (201, 202)
        hub.wait_ready("ada")
        assert docker_bed.hook_record(container_of(docker_bed, hub, "ada")["Id"])["devices"] == [gpus[2]["uuid"]]
        refused = hub.spawn("bob")
        assert refused.status_code == 503
        assert "3 held by other servers" in refused.json()["message"], refused.text
    finally:
        for cid in made:
            docker_bed.api.remove_container(cid, force=True)


# --- 3. every record gets a true final state ----------------------------------------------


def test_a_container_killed_behind_the_hubs_back_closes_its_record_with_the_exit_code(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    hub = one_gpu_hub_with_ada(start_hub, tmp_path, "c.Spawner.poll_interval = 1")
    docker_bed.api.kill(container_of(docker_bed, hub, "ada")["Id"])

    record = sealed_record(hub, "ada")
    assert (record.outcome, record.exit_code, record.oom_killed) == ("died", 137, False), record
    assert "exit code 137" in (record.error or "")
    wait_for(lambda: hub.server_model("ada") is None, timeout=30, what="the hub to see ada's server gone")
    assert not hub_containers(docker_bed, hub.settings.hub_id, "ada")  # removed once its end was read
    assert hub.spawn("bob").status_code in (201, 202)  # and the GPU is free again


def test_a_server_that_never_answers_is_recorded_as_failed(
    start_hub: Callable[..., RunningHub], tmp_path: Path
) -> None:
    hub = start_hub(extra="""
c.Spawner.http_timeout = 5
c.DockerSpawner.cmd = ["sleep", "600"]
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
""")
    hub.spawn("ada")
    record = sealed_record(hub, "ada", timeout=90)
    assert record.outcome == "failed", record
    assert record.error == "The server did not answer within 5 s, so the hub stopped it."


def test_a_server_starting_when_the_hub_was_killed_is_resumed_and_recorded_running(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    extra = """
c.JupyterHub.cleanup_servers = False
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
c.GPUSpawner.reconcile_interval = 2
c.DockerSpawner.cmd = ["sh", "-c", 'sleep 8; exec jupyterhub-singleuser "$@"', "sh"]
"""
    hub = start_hub(extra=extra)
    spawn_until_waiting_for_answer(hub, "ada")
    hub.kill()
    hub.start()
    hub.wait_ready("ada")
    wait_for(lambda: records_of(hub, "ada")[-1].outcome == "running", timeout=30,
             what=f"ada's record to say running: {records_of(hub, 'ada')}")
    (record,) = records_of(hub, "ada")
    assert not record.sealed and record.ready_at
    hub.stop_server("ada")
    assert sealed_record(hub, "ada").outcome == "stopped"


def test_a_server_resumed_after_a_hub_kill_that_never_answers_is_recorded_failed_with_its_container(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    """JupyterHub resumes a server killed mid-spawn, waits for it, gives up and stops it: the
    record of the spawn that made that container (the hub never saved it in the server's state)
    must say so, and name the container, not be left for a later reconciliation to guess."""
    extra = """
c.JupyterHub.cleanup_servers = False
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
c.GPUSpawner.reconcile_interval = 3600
c.Spawner.http_timeout = 8
c.DockerSpawner.cmd = ["sh", "-c", "sleep 3600", "sh"]
"""
    hub = start_hub(extra=extra)
    spawn_until_waiting_for_answer(hub, "ada")
    container = container_of(docker_bed, hub, "ada")
    hub.kill()
    hub.start()
    record = sealed_record(hub, "ada", timeout=60)
    assert (record.outcome, record.container_id) == ("failed", container["Id"]), record
    assert record.error == "The server was stopped before it ever answered the hub."


def test_a_container_of_this_hub_that_no_server_owns_is_stopped_as_an_orphan(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path, light_image: str
) -> None:
    spec = simnvml.write_spec(tmp_path / "gpus.json", [simnvml.gpu(0)])
    gpu0 = simnvml.gpu(0)["uuid"]
    hub = start_hub(extra=sim_config(spec, "c.GPUSpawner.gpu_request = 1\nc.GPUSpawner.reconcile_interval = 2\n"))
    # what a hub that died between `docker start` and storing the server leaves: a labelled
    # container on the GPU that the hub's database knows nothing of, and an open record that
    # never learnt the container's id
    store = writing_store(hub)
    store.insert(AuditRecord(id="orphan-record", hub_id=hub.settings.hub_id, user="ada", server="",
                             requested_at=seams.now_iso(), outcome="starting"))
    orphan = docker_bed.api.create_container(
        light_image, labels={"gpuspawner.hub": hub.settings.hub_id, "gpuspawner.user": "ada",
                             "gpuspawner.server": "", "gpuspawner.devices": gpu0, "gpuspawner.record": "orphan-record"},
        host_config=docker_bed.api.create_host_config(
            device_requests=[{"Driver": "nvidia", "DeviceIDs": [gpu0], "Capabilities": [["gpu"]]}]),
    )
    docker_bed.api.start(orphan["Id"])
    wait_for(lambda: not hub_containers(docker_bed, hub.settings.hub_id, "ada"), timeout=30,
             what="the orphan to be stopped and removed")
    assert "Stopping orphan container" in hub.log_tail(200)
    closed = wait_for(lambda: (r := store.get("orphan-record")) and r.sealed and r, timeout=30, what="the record to close")
    assert (closed.outcome, closed.error, closed.container_id) == ("abandoned", reconcile.ORPHAN_STOPPED, orphan["Id"])
    assert hub.spawn("bob").status_code in (201, 202)  # its GPU is free again
    hub.wait_ready("bob")
    assert docker_bed.hook_record(container_of(docker_bed, hub, "bob")["Id"])["devices"] == [gpu0]


def test_a_leftover_container_of_a_lost_spawn_is_replaced_and_its_record_closed_at_once(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, light_image: str
) -> None:
    """A hub killed mid-spawn leaves the server's container and an open record; the server's next
    spawn removes that container, and must close its record then, not a reconciliation later."""
    hub = start_hub(extra="c.GPUSpawner.reconcile_interval = 3600\n")  # no reconciliation during the test
    store = writing_store(hub)
    store.insert(AuditRecord(id="lost-spawn", hub_id=hub.settings.hub_id, user="ada", server="",
                             requested_at=seams.now_iso(), outcome="starting"))
    leftover = docker_bed.api.create_container(
        light_image, name=f"t-{hub.settings.hub_id}-ada",
        labels={"gpuspawner.hub": hub.settings.hub_id, "gpuspawner.user": "ada", "gpuspawner.server": "",
                "gpuspawner.devices": "", "gpuspawner.record": "lost-spawn"},
    )
    docker_bed.api.start(leftover["Id"])
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    closed = store.get("lost-spawn")
    assert closed is not None and closed.sealed, closed
    assert (closed.outcome, closed.error, closed.container_id) == ("abandoned", reconcile.REPLACED, leftover["Id"])
    assert container_of(docker_bed, hub, "ada")["Id"] != leftover["Id"]


# --- 4. a locked audit database ----------------------------------------------------------


def test_a_stop_during_a_locked_audit_database_stops_the_server_and_seals_its_record_later(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    hub = start_hub()
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    wait_for(lambda: records_of(hub, "ada")[-1].outcome == "running", timeout=30, what="ada's record to say running")
    lock = sqlite3.connect(tmp_path / "gpuspawner-audit.sqlite", timeout=1, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        hub.stop_server("ada", timeout=60)
        assert time.monotonic() - started < 40
        assert not hub_containers(docker_bed, hub.settings.hub_id, "ada")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert sealed_record(hub, "ada", timeout=120).outcome == "stopped"


# --- 5. the record names what the container runs ------------------------------------------


def test_an_image_chosen_from_allowed_images_is_the_one_recorded(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, light_image: str, singleuser_image: str
) -> None:
    hub = start_hub(extra=f"c.DockerSpawner.allowed_images = {{'jupyter': {singleuser_image!r}, 'light': {light_image!r}}}\n"
                          "c.DockerSpawner.cmd = ['python3', '/light.py']\n")
    hub.spawn("ada", options={"image": "light"})
    record = wait_for(lambda: next((r for r in records_of(hub, "ada") if r.container_image_id), None), timeout=60,
                      what="ada's record to name her container's image")
    light_id = docker_bed.api.inspect_image(light_image)["Id"]
    # the image the engine created the container from is the one the record names
    assert (record.image_requested, record.image_id, record.container_image_id) == (light_image, light_id, light_id)


def test_a_kept_container_is_replaced_when_its_settings_changed(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    limit = tmp_path / "mem-limit"
    limit.write_text("300M")
    extra = f"""
c.DockerSpawner.remove = False
import pathlib
def read_limit(spawner):
    spawner.mem_limit = pathlib.Path({str(limit)!r}).read_text()
c.Spawner.pre_spawn_hook = read_limit
"""
    hub = start_hub(extra=extra)
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    (first,) = hub_containers(docker_bed, hub.settings.hub_id, "ada")
    hub.stop_server("ada")
    limit.write_text("400M")  # the admin's hook now gives more memory
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    (second,) = hub_containers(docker_bed, hub.settings.hub_id, "ada")
    assert second["Id"] != first["Id"]
    assert docker_bed.api.inspect_container(second["Id"])["HostConfig"]["Memory"] == 400 * 2**20
    assert records_of(hub, "ada")[-1].mem_limit == 400 * 2**20
    hub.stop_server("ada")
    assert hub.spawn("ada").status_code in (201, 202)  # nothing changed: the kept container is started
    hub.wait_ready("ada")
    assert [c["Id"] for c in hub_containers(docker_bed, hub.settings.hub_id, "ada")] == [second["Id"]]


# --- 6. one choke point for devices --------------------------------------------------------


@pytest.mark.parametrize("setting", [
    "c.DockerSpawner.extra_host_config = lambda spawner: {'privileged': True}",
    "c.DockerSpawner.extra_create_kwargs = {'host_config': {'Devices': [{'PathOnHost': '/dev/nvidia0', "
    "'PathInContainer': '/dev/nvidia0', 'CgroupPermissions': 'rwm'}]}}",
    "c.DockerSpawner.extra_host_config = lambda spawner: {'device_requests': [{'Driver': 'nvidia', 'Count': -1, "
    "'Capabilities': [['gpu']]}]}",
], ids=["callable-privileged", "create-kwargs-devices", "callable-all-gpus"])
def test_an_admin_setting_that_would_add_devices_is_refused_before_the_container_exists(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path, setting: str
) -> None:
    spec = simnvml.write_spec(tmp_path / "gpus.json", [simnvml.gpu(0), simnvml.gpu(1)])
    hub = start_hub(extra=sim_config(spec, f"c.GPUSpawner.gpu_request = 1\n{setting}\n"))
    refused = hub.spawn("ada")
    assert refused.status_code == 500, refused.text
    assert "tell an admin" in refused.json()["message"]
    assert not hub_containers(docker_bed, hub.settings.hub_id, "ada")
    record = sealed_record(hub, "ada")
    assert record.outcome == "failed" and "HTTP 500" in (record.error or "")


# --- 7. a hung NVML --------------------------------------------------------------------------


def test_a_hung_nvml_refuses_gpu_spawns_clearly_and_cpu_spawns_go_on(
    start_hub: Callable[..., RunningHub], tmp_path: Path
) -> None:
    spec = simnvml.write_spec(tmp_path / "gpus.json", [simnvml.gpu(0)])
    profiles = [
        {"slug": "cpu", "display_name": "CPU", "image": "IMAGE", "default": True},
        {"slug": "gpu", "display_name": "GPU", "image": "IMAGE", "gpus": 1},
    ]
    hub = start_hub(extra=sim_config(spec, f"""
c.GPUSpawner.nvml_timeout = 2
c.GPUSpawner.profiles = [dict(p, image=c.DockerSpawner.image) for p in {profiles!r}]
"""))
    simnvml.write_spec(spec, [simnvml.gpu(0)], hang=True)
    try:
        started = time.monotonic()
        refused = hub.spawn("ada", options={"profile": "gpu"})
        assert refused.status_code == 503, refused.text
        assert "NVML did not answer within 2 s" in refused.json()["message"]
        assert time.monotonic() - started < 15
        assert hub.spawn("bob", options={"profile": "cpu"}).status_code in (201, 202)
        hub.wait_ready("bob")
    finally:
        simnvml.write_spec(spec, [simnvml.gpu(0)])
    wait_for(lambda: hub.spawn("ada", options={"profile": "gpu"}).status_code in (201, 202), timeout=60,
             what="a GPU spawn to succeed once NVML answers again")
    hub.wait_ready("ada")
