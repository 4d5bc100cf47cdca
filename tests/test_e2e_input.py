"""End to end: what users send is bounded before it reaches a message, a container or the audit
store, whose sealed records can never be deleted (real hub, real engine).

Options over ``GPUSpawner.max_user_options_bytes`` are refused with a 400 before the spawn is
recorded: the attempt decided nothing, so there is nothing to reproduce, and a record of it
would keep the user's bytes for good (and let anyone with a token grow the store at will).
Smaller refusals are recorded as failed spawns, quoting only a short prefix of what was sent.
"""

from __future__ import annotations

import html
import re
import sqlite3
from collections.abc import Callable

import pytest
import requests

from testbed import DockerBed
from testbed.hub import RunningHub

pytestmark = pytest.mark.docker

HUGE = 25 * 2**20  # the incident: 25 MB of options in one request
SHORT_MESSAGE = 300  # characters: a sentence and a 40-character quote, not the user's bytes
RECORD_BOUND = 16 * 1024  # bytes: a real spawn's record (image labels, environment) is a few KiB


def cpu_profiles(image: str) -> str:
    profiles = [{"slug": "cpu", "display_name": "CPU only", "image": image, "default": True}]
    return f"c.JupyterHub.allow_named_servers = True\nc.GPUSpawner.profiles = {profiles!r}\n"


@pytest.fixture
def hub(start_hub: Callable[..., RunningHub], singleuser_image: str) -> RunningHub:
    return start_hub(extra=cpu_profiles(singleuser_image))


def audit_rows(hub: RunningHub) -> list[tuple[str, str, int, str]]:
    """(user, outcome, bytes of the record, the record) of every record in the hub's audit log: a record's
    entries' bodies, all of them, as the log keeps them for good."""
    path = hub.settings.workdir / "gpuspawner-audit.sqlite"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        entries = db.execute("SELECT record_id, kind, user, outcome, body FROM gpuspawner_audit_log WHERE kind != 'genesis' ORDER BY n").fetchall()
    records: dict[str, list[str]] = {}
    for rid, kind, user, outcome, body in entries:
        found = records.setdefault(rid, ["", "", ""])
        found[0] = user or found[0]
        found[1] = outcome if kind in ("opened", "ended") else found[1]
        found[2] += body
    return [(user, outcome, len(data.encode()), data) for user, outcome, data in records.values()]


def hub_containers(hub: RunningHub, docker_bed: DockerBed) -> list[dict]:
    return docker_bed.containers_labelled(f"gpuspawner.hub={hub.settings.hub_id}")


@pytest.mark.parametrize("server", ["", "big"], ids=["default-server", "named-server"])
def test_huge_options_are_refused_before_anything_is_recorded(hub: RunningHub, docker_bed: DockerBed, server: str) -> None:
    hub.create_user("ada")
    route = f"/users/ada/servers/{server}" if server else "/users/ada/server"
    r = hub.api("POST", route, json={"profile": "x" * HUGE}, timeout=120)
    assert r.status_code == 400, r.text[:500]
    message = r.json()["message"]
    assert message.startswith(
        "Your server options are larger than this hub takes (4096 bytes, GPUSpawner.max_user_options_bytes); "
        "they begin {'profile': 'xxxxxxxxxxxxxxxxx…"
    ), message[:500]
    assert len(message) < SHORT_MESSAGE
    assert hub.server_model("ada", server) is None
    assert hub_containers(hub, docker_bed) == []
    assert [row for row in audit_rows(hub) if row[0] == "ada"] == []
    assert all(size < RECORD_BOUND and "x" * 41 not in data for _, _, size, data in audit_rows(hub))


def test_after_a_refusal_a_plain_start_works_and_only_it_is_recorded(hub: RunningHub, docker_bed: DockerBed) -> None:
    assert hub.spawn("ada", options={"profile": "x" * HUGE}).status_code == 400
    # No options: JupyterHub reuses the server's last options, and the refused ones were not kept.
    r = hub.spawn("ada")
    assert r.status_code in (201, 202), r.text[:500]
    assert hub.wait_ready("ada")["state"]["profile"] == "cpu"
    assert len(hub_containers(hub, docker_bed)) == 1
    assert [user for user, _, _, _ in audit_rows(hub)] == ["ada"]
    assert all(size < RECORD_BOUND and "x" * 41 not in data for _, _, size, data in audit_rows(hub))


def logged_in(hub: RunningHub, user: str) -> requests.Session:
    """A browser's session: logged in through the login form (any password: DummyAuthenticator)."""
    browser = requests.Session()
    browser.get(f"{hub.url}/hub/login", timeout=30)
    r = browser.post(
        f"{hub.url}/hub/login", timeout=30,
        data={"username": user, "password": "any", "_xsrf": browser.cookies.get("_xsrf", path="/hub/")},
    )
    assert r.status_code == 200, r.text[:500]
    return browser


def test_huge_form_fields_are_refused_too(hub: RunningHub, docker_bed: DockerBed) -> None:
    browser = logged_in(hub, "ada")
    form = browser.get(f"{hub.url}/hub/spawn", timeout=30)
    assert 'value="cpu"' in form.text
    xsrf = re.search(r'xsrf_token: "([^"]+)"', form.text)
    assert xsrf, form.text[:500]
    r = browser.post(f"{hub.url}/hub/spawn", data={"profile": "x" * 2**20, "_xsrf": html.unescape(xsrf[1])}, timeout=120)
    assert r.status_code == 400, r.text[:500]
    assert "GPUSpawner.max_user_options_bytes" in r.text
    assert "x" * 41 not in r.text
    assert hub_containers(hub, docker_bed) == []
    assert audit_rows(hub) == []


def test_a_refusal_under_the_limit_is_recorded_quoting_a_short_prefix(hub: RunningHub, docker_bed: DockerBed) -> None:
    r = hub.spawn("ada", options={"profile": "y" * 3000})
    assert r.status_code == 400, r.text[:500]
    message = r.json()["message"]
    assert message == "Unknown profile '" + "y" * 40 + "'…; the profiles you may use: 'cpu'."
    assert hub_containers(hub, docker_bed) == []
    ((user, outcome, _, data),) = audit_rows(hub)
    assert (user, outcome) == ("ada", "failed")
    assert "y" * 41 not in data


def test_a_refused_image_option_is_quoted_short(
    start_hub: Callable[..., RunningHub], singleuser_image: str, docker_bed: DockerBed
) -> None:
    # Without profiles, DockerSpawner's allowed_images lets users name an image from a list.
    hub = start_hub(extra=f"c.DockerSpawner.allowed_images = {{'lab': {singleuser_image!r}}}\n")
    r = hub.spawn("ada", options={"image": "z" * 3000})
    assert r.status_code == 400, r.text[:500]
    message = r.json()["message"]
    assert message == "Image '" + "z" * 40 + "'… not in allowed list: lab", message[:500]
    assert hub_containers(hub, docker_bed) == []
    ((_, outcome, _, data),) = audit_rows(hub)
    assert outcome == "failed" and "z" * 41 not in data


def test_a_bad_limit_stops_the_hub(start_hub: Callable[..., RunningHub], singleuser_image: str) -> None:
    with pytest.raises(RuntimeError) as e:
        start_hub(extra="c.GPUSpawner.max_user_options_bytes = 10\n")
    assert (
        "Bad configuration: GPUSpawner.max_user_options_bytes is 10; allowed: a whole number of bytes "
        "from 256 to 1048576 (1 MiB), such as 4096."
    ) in str(e.value)
