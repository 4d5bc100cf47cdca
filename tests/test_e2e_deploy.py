"""The deploy kit for real: the hub image builds from a locally made base and its hub answers;
the compose file validates and keeps the audit log's parts apart; the compose deployment gives each
person an account of their own, its audit page shows the hub's own records, and its audit service,
in a container of its own, flags a rollback of the hub's store."""

from __future__ import annotations

import html
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

import simnvml
from helpers import ROOT, TESTS, unavailable
from testbed import DockerBed, free_port, wait_for

pytestmark = pytest.mark.docker
COMPOSE = ROOT / "docker/docker-compose.yml"


@pytest.fixture(scope="module")
def hub_image(docker_bed: DockerBed) -> str:
    out = subprocess.run(
        [str(ROOT / "docker/hub/build.sh"), "gpuspawner-test/hub:ci"],
        env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture
def network(docker_bed: DockerBed) -> Iterator[str]:
    name = "gpst-" + secrets.token_hex(4)
    docker_bed.api.create_network(name)
    yield name
    docker_bed.api.remove_network(name)


def test_the_hub_image_starts_a_hub_that_answers(docker_bed: DockerBed, hub_image: str, network: str) -> None:
    port = free_port()
    container = docker_bed.client.containers.run(
        hub_image, detach=True, name=network + "-hub", network=network,
        ports={"8000/tcp": ("127.0.0.1", port)},
        volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"}},
        environment={"GPUSPAWNER_NETWORK": network, "GPUSPAWNER_HUB_CONNECT_IP": network + "-hub"},
    )
    try:
        def answers() -> dict | None:
            try:
                r = requests.get(f"http://127.0.0.1:{port}/hub/api/", timeout=2)
            except requests.ConnectionError:
                return None
            return r.json() if r.status_code == 200 else None

        try:
            info = wait_for(answers, timeout=90, what="the hub in the image to answer")
        except TimeoutError:
            raise AssertionError(container.logs()[-3000:].decode(errors="replace")) from None
        assert "version" in info
        image = docker_bed.api.inspect_image(hub_image)
        assert image["Config"]["Labels"]["org.opencontainers.image.title"] == "gpuspawner hub"
        # the shipped config ran: people sign up for their own accounts; no shared password
        assert requests.get(f"http://127.0.0.1:{port}/hub/signup", timeout=10).status_code == 200
        listing = container.exec_run(["ls", "/srv/jupyterhub/data"]).output.decode().split()
        assert "jupyterhub.sqlite" in listing and "user-password" not in listing
    finally:
        container.remove(force=True)


def test_the_compose_file_validates_and_is_safe_by_default() -> None:
    if shutil.which("docker-compose") is None:
        unavailable("docker-compose is not installed (Debian package docker-compose)")
    out = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    hub = yaml.safe_load(out.stdout)["services"]["hub"]
    assert hub["ports"] == ["127.0.0.1:8000:8000/tcp"]  # not reachable from other machines
    assert "/var/run/docker.sock:/var/run/docker.sock:rw" in hub["volumes"]
    assert any(v.startswith("hub-data:/srv/jupyterhub/data") for v in hub["volumes"])
    assert hub["environment"]["GPUSPAWNER_NETWORK"] in hub["networks"]
    assert hub["build"]["dockerfile"] == "docker/hub/Dockerfile"
    assert "GPUSPAWNER_AUTH" not in hub["environment"]  # each person's own account (the config's default)
    # the hub gets every GPU's device node and NVML, not CUDA; it and the audit service are marked as services
    (device,) = hub["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu", "utility"]}
    assert hub["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    assert hub["labels"] == {"org.gpuspawner.role": "hub"}
    assert (ROOT / "docker/.env").read_text().strip() == "COMPOSE_PROJECT_NAME=gpuspawner"


def test_the_compose_file_keeps_the_audit_logs_key_and_witness_apart_from_its_database() -> None:
    if shutil.which("docker-compose") is None:
        unavailable("docker-compose is not installed (Debian package docker-compose)")
    out = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    hub, audit = services["hub"], services["audit"]
    # the hub writes the data and the key; the audit service reads them and alone holds the witness
    assert {"hub-data:/srv/jupyterhub/data:rw", "audit-key:/srv/secrets:rw"} <= set(hub["volumes"])
    assert not any(v.startswith("audit-witness:") for v in hub["volumes"])
    assert set(audit["volumes"]) == {"hub-data:/srv/jupyterhub/data:ro", "audit-key:/srv/secrets:ro",
                                     "audit-witness:/srv/witness:rw"}
    assert hub["environment"]["GPUSPAWNER_AUDIT_KEY_FILE"] == audit["environment"]["GPUSPAWNER_AUDIT_KEY_FILE"]
    assert hub["environment"]["GPUSPAWNER_AUDIT_KEY_FILE"].startswith("/srv/secrets/")
    assert hub["environment"]["GPUSPAWNER_AUDIT_SERVICE_URL"] == "http://audit:10101"
    assert audit["command"][:7] == ["python", "-m", "gpuspawner.service", "-f", "/srv/jupyterhub/jupyterhub_config.py",
                                    "--witness-file", "/srv/witness/head.json"]
    assert audit["image"] == hub["image"] and "ports" not in audit  # reached through the hub's proxy only
    assert "deploy" in hub and "deploy" not in audit


# --- The compose deployment, as an admin brings it up and people use it -------------------------


@dataclass
class Deployment:
    """A compose project from docker/docker-compose.yml, up, on a throwaway port, network and volume."""

    url: str
    hub: str  # the hub's container name
    audit: str  # the audit service's container name
    admin: str  # its GPUSPAWNER_ADMIN_USERS
    network: str
    suffix: str  # in the names of this test's users, so their volumes are found and removed
    metrics_token: str  # its GPUSPAWNER_METRICS_TOKEN
    gpus: tuple[str, ...]  # the UUIDs of the stand-in GPUs its hub reads


@pytest.fixture
def deployment(docker_bed: DockerBed, hub_image: str, singleuser_image: str, tmp_path: Path) -> Iterator[Deployment]:
    """`docker-compose up` of the shipped compose file, with a test override; all of it goes afterwards."""
    with deployed(docker_bed, hub_image, singleuser_image, tmp_path) as dep:
        yield dep


def as_admins_write_it(hub: dict[str, Any]) -> None:
    """The hub's GPU request as NVIDIA's examples write it, in a compose file of an admin's own: every
    GPU, no `utility`, no role label (the hub finds its own container all the same)."""
    hub["deploy"]["resources"]["reservations"]["devices"] = [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    del hub["labels"], hub["environment"]["NVIDIA_DRIVER_CAPABILITIES"]


@contextmanager
def deployed(
    docker_bed: DockerBed, hub_image: str, singleuser_image: str, tmp_path: Path, *,
    edit_hub: Callable[[dict[str, Any]], None] = lambda hub: None,
) -> Iterator[Deployment]:
    """The shipped compose file up, its hub (after `edit_hub`) reading two stand-in GPUs; all of it goes afterwards."""
    if shutil.which("docker-compose") is None:
        unavailable("docker-compose is not installed (Debian package docker-compose)")
    project = "gpst" + secrets.token_hex(4)
    suffix = secrets.token_hex(3)
    dep = Deployment(
        url=f"http://127.0.0.1:{free_port()}", hub=project + "-hub", audit=project + "-audit", admin="boss" + suffix,
        network=project + "-net", suffix=suffix, metrics_token=secrets.token_hex(32),
        gpus=tuple(simnvml.gpu(n)["uuid"] for n in (0, 1)),
    )
    # The hub's NVML answers from a spec file: every Python process of its container installs the stand-in.
    sim = tmp_path / "sim"
    sim.mkdir()
    shutil.copy(TESTS / "simnvml.py", sim)
    simnvml.write_spec(sim / "gpus.json", [simnvml.gpu(n) for n in (0, 1)])
    (sim / "sitecustomize.py").write_text("import simnvml\nsimnvml.install('/srv/sim/gpus.json')\n")
    # What differs from a lab's deployment: the image built here, names of this test's own.
    override = tmp_path / "docker-compose.test.yml"
    override.write_text(yaml.safe_dump({
        "services": {
            "hub": {
                "image": hub_image,
                "container_name": dep.hub,
                "environment": {"GPUSPAWNER_NETWORK": dep.network, "GPUSPAWNER_HUB_CONNECT_IP": dep.hub},
            },
            "audit": {"image": hub_image, "container_name": dep.audit, "environment": {"GPUSPAWNER_NETWORK": dep.network}},
        },
        "networks": {"gpuspawner": {"name": dep.network}},
    }))
    # Set as a lab's admin sets them: in the environment of docker-compose. The witness checks every second.
    env = dict(os.environ, GPUSPAWNER_ADMIN_USERS=dep.admin, GPUSPAWNER_IMAGE=singleuser_image, GPUSPAWNER_IDLE_TIMEOUT="0",
               GPUSPAWNER_GPU_IMAGE=singleuser_image, GPUSPAWNER_METRICS_TOKEN=dep.metrics_token,
               GPUSPAWNER_AUDIT_WITNESS_SECONDS="1")
    merged = subprocess.run(
        ["docker-compose", "-p", project, "-f", str(COMPOSE), "-f", str(override), "config"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert merged.returncode == 0, merged.stderr
    # An override file can only add to `ports` (compose v1), and port 8000 may be taken. The hub's
    # `deploy:` GPU request stays: the test bed's engine accepts it (the stand-in hook records it).
    config = yaml.safe_load(merged.stdout)
    hub = config["services"]["hub"]
    hub["ports"] = [f"127.0.0.1:{dep.url.rsplit(':', 1)[1]}:8000"]
    hub["volumes"].append(f"{sim}:/srv/sim:ro")
    hub["environment"]["PYTHONPATH"] = "/srv/sim"
    edit_hub(hub)
    resolved = tmp_path / "docker-compose.resolved.yml"
    resolved.write_text(yaml.safe_dump(config))
    compose = ["docker-compose", "-p", project, "-f", str(resolved)]
    try:
        up = subprocess.run([*compose, "up", "-d", "--no-build"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stderr[-3000:]

        def answers() -> bool:
            try:
                return requests.get(dep.url + "/hub/api/", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        try:
            wait_for(answers, timeout=120, interval=0.5, what="the compose deployment's hub to answer")
        except TimeoutError:
            raise AssertionError(hub_logs(compose)) from None
        yield dep
    finally:
        print(hub_logs(compose))  # shown when the test failed
        # The users' containers are the hub's, not compose's: they go first, or the network stays.
        for c in docker_bed.api.containers(all=True, filters={"network": dep.network}):
            if c["Names"] not in (["/" + dep.hub], ["/" + dep.audit]):
                docker_bed.api.remove_container(c["Id"], force=True)
        subprocess.run([*compose, "down", "--volumes", "--remove-orphans", "--timeout", "5"],
                       env=env, capture_output=True, timeout=120)
        for v in docker_bed.api.volumes(filters={"name": dep.suffix}).get("Volumes") or []:
            if v["Name"].startswith("gpuspawner-"):
                docker_bed.api.remove_volume(v["Name"], force=True)


def hub_logs(compose: list[str]) -> str:
    """The last lines of each container's log: the hub's, then the audit service's."""
    logs = []
    for service in ("hub", "audit"):
        out = subprocess.run([*compose, "logs", "--no-color", "--tail", "80", service], capture_output=True, text=True, timeout=60)
        logs.append(out.stdout[-6000:])
    return "\n".join(logs)


class Person:
    """Someone with a browser: the hub's forms and the links they follow, over HTTP."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = requests.Session()

    def form(self, path: str, data: dict[str, str], *, follow: bool = True) -> requests.Response:
        """Load the page at `path`, then submit its form with `data`, as a browser would."""
        page = self.http.get(self.url + path, timeout=30)
        page.raise_for_status()
        form = re.search(r'<form[^>]*?action="([^"]*)"', page.text)
        assert form, f"no form on {path}: {page.text[-1000:]}"
        hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
        return self.http.post(urljoin(page.url, html.unescape(form.group(1))), data={**hidden, **data}, timeout=60,
                              allow_redirects=follow)

    def sign_up(self, name: str, password: str) -> str:
        r = self.form("/hub/signup", {"username": name, "signup_password": password,
                                      "signup_password_confirmation": password})
        r.raise_for_status()
        (message,) = re.findall(r'<div class="alert[^"]*"[^>]*>\s*(.*?)\s*</div>', r.text, re.S) or [r.text[-500:]]
        return message

    def log_in(self, name: str, password: str) -> bool:
        r = self.form("/hub/login", {"username": name, "password": password}, follow=False)
        return r.status_code == 302 and "jupyterhub-hub-login" in r.cookies

    def api(self, method: str, path: str, *, json: dict[str, Any] | None = None) -> requests.Response:
        xsrf = self.http.cookies.get("_xsrf", path="/hub/")
        return self.http.request(method, self.url + "/hub/api" + path, headers={"X-XSRFToken": xsrf}, json=json,
                                 timeout=60)

    def start_server(self, name: str, profile: str) -> None:
        r = self.form(f"/hub/spawn/{name}", {"profile": profile})
        assert r.status_code == 200, r.text[-2000:]

        def ready() -> bool:
            server = self.api("GET", f"/users/{name}").json()["servers"].get("")
            return bool(server and server["ready"])

        wait_for(ready, timeout=180, interval=1, what=f"{name}'s server to be ready")
        # the single-user server itself answers, through the proxy
        assert "version" in self.http.get(f"{self.url}/user/{name}/api", timeout=30).json()

    def stop_server(self, name: str) -> None:
        assert self.api("DELETE", f"/users/{name}/server").status_code in (202, 204)
        wait_for(lambda: not self.api("GET", f"/users/{name}").json()["servers"], timeout=120, interval=1,
                 what=f"{name}'s server to stop")


def audit_rows(html: str) -> list[tuple[str, str]]:
    """(record id, user) of each row of the audit page's table."""
    body = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td>", body)


def test_the_compose_deployment_gives_each_person_their_own_account_audits_their_servers_and_witnesses_the_log(
    docker_bed: DockerBed, deployment: Deployment
) -> None:
    dep = deployment
    admin, ada, bob, mallory = (Person(dep.url) for _ in range(4))
    a, b = "ada" + dep.suffix, "bob" + dep.suffix
    passwords = {name: name + " " + secrets.token_hex(8) for name in (dep.admin, a, b)}

    # The first admin gets in by signing up under the name the deployment lists.
    assert "successful" in admin.sign_up(dep.admin, passwords[dep.admin])
    assert admin.log_in(dep.admin, passwords[dep.admin])
    # Everyone else signs up and waits for an admin.
    assert "sent to the admin" in ada.sign_up(a, passwords[a])
    assert "sent to the admin" in bob.sign_up(b, passwords[b])
    assert "Something went wrong" in mallory.sign_up("=1+2", "mallory " + secrets.token_hex(8))
    assert not ada.log_in(a, passwords[a])  # not authorised yet
    waiting = admin.http.get(dep.url + "/hub/authorize", timeout=30)
    assert waiting.status_code == 200 and a in waiting.text and "=1+2" not in waiting.text
    for name in (a, b):
        assert admin.http.get(f"{dep.url}/hub/authorize/{name}", timeout=30).status_code == 200
    # Nobody can be somebody else.
    assert not mallory.log_in(a, passwords[b])
    assert not mallory.log_in(b, "")
    assert not mallory.log_in(dep.admin, passwords[a])
    assert ada.log_in(a, passwords[a]) and bob.log_in(b, passwords[b])
    # A stale login form (no XSRF token) gets the login form back, not a server error.
    stale = mallory.http.post(dep.url + "/hub/login", data={"username": a, "password": passwords[a]}, timeout=30)
    assert stale.status_code == 403 and 'id="login_submit"' in stale.text

    for person, name in ((ada, a), (bob, b)):
        person.start_server(name, "cpu")
        if person is ada:
            knows_itself(docker_bed, name)
        person.stop_server(name)
    gets_a_gpu(docker_bed, dep, ada, a)

    # The audit page shows the records the hub wrote into the data volume.
    page = admin.http.get(dep.url + "/services/audit/", timeout=60)
    assert page.status_code == 200, page.text[-2000:]
    shown = audit_rows(page.text)
    exec_ = docker_bed.client.containers.get(dep.hub).exec_run(
        ["gpuspawner", "audit", "export", "--format", "jsonl"], demux=True
    )
    assert exec_.exit_code == 0, exec_.output
    stored = [json.loads(line) for line in exec_.output[0].decode().splitlines()]
    assert {user for _, user in shown} == {a, b}
    assert sorted(shown) == sorted((r["id"], r["user"]) for r in stored)
    # a person who is not an admin reads the records of their own servers there, and nobody else's
    own = bob.http.get(dep.url + "/services/audit/", timeout=60)
    assert own.status_code == 200 and {user for _, user in audit_rows(own.text)} == {b}, own.text[-2000:]
    adas = next(r["id"] for r in stored if r["user"] == a)
    assert bob.http.get(f"{dep.url}/services/audit/records/{adas}/ro-crate-metadata.json", timeout=60).status_code == 403

    # The audit service, in its own container, has witnessed the log; then the hub's store is rolled back.
    witness_flags_a_rollback(docker_bed, dep, admin)


def knows_itself(docker_bed: DockerBed, name: str) -> None:
    """`name`'s running server holds its record's facts in /etc/gpuspawner/server.json, which the hub, itself in a
    container, put there through the engine (no file of the hub's is mounted)."""
    (server,) = docker_bed.api.containers(filters={"label": f"gpuspawner.user={name}"})
    run = docker_bed.api.exec_create(server["Id"], ["cat", "/etc/gpuspawner/server.json"])
    facts = json.loads(docker_bed.api.exec_start(run["Id"]))
    assert (facts["user"], facts["record_id"], facts["gpus"]) == (name, server["Labels"]["gpuspawner.record"], [])


def gets_a_gpu(docker_bed: DockerBed, dep: Deployment, person: Person, name: str) -> None:
    """`name` starts a server of the GPU profile and its container gets one GPU, though the hub's own
    container was given every GPU (to read them); then the server stops."""
    hub = docker_bed.api.inspect_container(dep.hub)
    assert [r["Count"] for r in hub["HostConfig"]["DeviceRequests"]] == [-1]
    assert docker_bed.hook_record(hub["Id"])["nvidia_visible_devices"] == "all"

    r = person.api("POST", f"/users/{name}/server", json={"profile": "gpu-1"})
    assert r.status_code in (201, 202), r.text[-2000:]
    wait_for(lambda: (person.api("GET", f"/users/{name}").json()["servers"].get("") or {}).get("ready"),
             timeout=180, interval=1, what=f"{name}'s GPU server to be ready")
    (server,) = docker_bed.api.containers(filters={"label": [f"gpuspawner.user={name}", "gpuspawner.profile=gpu-1"]})
    given = docker_bed.hook_record(server["Id"])["devices"]
    assert len(given) == 1 and given[0] in dep.gpus
    assert server["Labels"]["gpuspawner.devices"] == given[0]
    # the spawn form counts only the user's server as holding one
    form = person.http.get(f"{dep.url}/hub/spawn/{name}/second", timeout=60)
    assert form.status_code == 200 and "1 of 2 NVIDIA A100-SXM4-80GB free" in form.text, form.text[-3000:]
    person.stop_server(name)


def test_a_hub_whose_own_container_holds_every_gpu_as_admins_write_it_still_hands_them_out(
    docker_bed: DockerBed, hub_image: str, singleuser_image: str, tmp_path: Path
) -> None:
    with deployed(docker_bed, hub_image, singleuser_image, tmp_path, edit_hub=as_admins_write_it) as dep:
        admin, ada = Person(dep.url), Person(dep.url)
        a = "ada" + dep.suffix
        passwords = {name: name + " " + secrets.token_hex(8) for name in (dep.admin, a)}
        assert "successful" in admin.sign_up(dep.admin, passwords[dep.admin])
        assert admin.log_in(dep.admin, passwords[dep.admin])
        assert "sent to the admin" in ada.sign_up(a, passwords[a])
        assert admin.http.get(f"{dep.url}/hub/authorize/{a}", timeout=30).status_code == 200
        assert ada.log_in(a, passwords[a])
        hub = docker_bed.api.inspect_container(dep.hub)
        assert "org.gpuspawner.role" not in hub["Config"]["Labels"]
        assert hub["HostConfig"]["DeviceRequests"][0]["Capabilities"] == [["gpu"]]
        gets_a_gpu(docker_bed, dep, ada, a)


def scrape(dep: Deployment, *, token: str | None = None) -> dict[str, float]:
    """The audit service's metrics, as Prometheus scrapes them through the hub's proxy."""
    headers = {"Authorization": f"Bearer {token or dep.metrics_token}"}
    r = requests.get(dep.url + "/services/audit/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text[-1000:]
    return {s.name: s.value for family in text_string_to_metric_families(r.text) for s in family.samples}


def newest_entry(hub: Any) -> int:
    run = hub.exec_run(["python", "-c", "import sqlite3; print(sqlite3.connect('/srv/jupyterhub/data/gpuspawner-audit.sqlite')"
                                        ".execute('SELECT max(n) FROM gpuspawner_audit_log').fetchone()[0])"])
    assert run.exit_code == 0, run.output
    return int(run.output.decode().strip())


def witness_flags_a_rollback(docker_bed: DockerBed, dep: Deployment, admin: Person) -> None:
    hub, audit = (docker_bed.client.containers.get(name) for name in (dep.hub, dep.audit))
    # What each container mounts: the witness's volume is the audit service's alone; it reads the key
    # and the data, and writes neither.
    hub_mounts = {m["Destination"]: m for m in hub.attrs["Mounts"]}
    audit_mounts = {m["Destination"]: m for m in audit.attrs["Mounts"]}
    assert "/srv/witness" not in hub_mounts and not any("audit-witness" in m.get("Name", "") for m in hub_mounts.values())
    assert audit_mounts["/srv/witness"]["Name"].endswith("_audit-witness") and audit_mounts["/srv/witness"]["RW"]
    assert not audit_mounts["/srv/secrets"]["RW"] and not audit_mounts["/srv/jupyterhub/data"]["RW"]
    assert audit_mounts["/srv/secrets"]["Name"] == hub_mounts["/srv/secrets"]["Name"] and hub_mounts["/srv/secrets"]["RW"]
    tried = audit.exec_run(["sh", "-c", "echo 00 >> /srv/secrets/gpuspawner-audit.key"])
    assert tried.exit_code != 0 and b"Read-only file system" in tried.output
    assert requests.get(dep.url + "/services/audit/metrics", timeout=30).status_code == 403  # no token, no metrics

    newest = newest_entry(hub)
    assert newest >= 5  # the genesis entry, and two servers' lives

    def witnessed() -> dict[str, float] | None:
        found = scrape(dep)
        return found if found.get("gpuspawner_audit_witnessed_entry") == newest else None

    seen = wait_for(witnessed, timeout=60, interval=0.5, what="the witness to see the newest entry")
    assert seen["gpuspawner_audit_verified"] == 1 and seen["gpuspawner_audit_seals_checked"] == 1

    # Someone who can write the hub's store deletes its newest entries, with both containers running.
    rolled = hub.exec_run(["python", "-c", "import sqlite3; c = sqlite3.connect('/srv/jupyterhub/data/gpuspawner-audit.sqlite'); "
                                           f"c.execute('DELETE FROM gpuspawner_audit_log WHERE n > {newest - 2}'); c.commit()"])
    assert rolled.exit_code == 0, rolled.output
    def failed() -> dict[str, float] | None:
        found = scrape(dep)
        return found if found["gpuspawner_audit_verified"] == 0 else None

    flagged = wait_for(failed, timeout=30, interval=0.5, what="the witness to flag the rollback")
    assert flagged["gpuspawner_audit_witnessed_entry"] == newest and flagged["gpuspawner_audit_check_failures_total"] >= 1

    page = admin.http.get(dep.url + "/services/audit/", timeout=60)
    assert page.status_code == 200, page.text[-2000:]
    banner = page.text.split('<div id="witness"', 1)[1].split("</div>", 1)[0]
    assert 'class="witness failed"' in banner
    assert html.unescape(f"the log ends at entry #{newest - 2}, but the audit service&#39;s witness has seen #{newest}") in html.unescape(banner)

    verify = audit.exec_run(["gpuspawner", "audit", "verify", "--witness", "/srv/witness/head.json"])
    said = verify.output.decode()
    assert verify.exit_code == 2, said
    assert said.startswith("FAILED") and f"the witness /srv/witness/head.json has seen #{newest}" in said
    assert "rolled back" in said
