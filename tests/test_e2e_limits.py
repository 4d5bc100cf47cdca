"""End to end: time limits with a real hub, real containers and simulated GPUs whose utilisation the
test edits while the hub runs. A server is warned on the home page first, then stopped through the
normal stop path; its record and the home page say why; a busy server is kept."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

import simnvml
from gpuspawner.store import AuditStore
from helpers import container_of, gpus_cli, login, sim_config
from testbed import DockerBed, wait_for
from testbed.hub import RunningHub

pytestmark = pytest.mark.docker

NOTICES = """
from gpuspawner.reclaim import HUB_TEMPLATES, page_notices
c.JupyterHub.template_paths = [HUB_TEMPLATES]
c.JupyterHub.template_vars = {"gpuspawner_notices": page_notices}
c.GPUSpawner.gpu_request = 1
c.GPUSpawner.gpu_sample_seconds = 1
"""


def record_of(hub: RunningHub, user: str) -> object:
    store = AuditStore(f"sqlite:///{hub.settings.workdir / 'gpuspawner-audit.sqlite'}")
    return wait_for(lambda: next((r for r in store.iter_records() if r.user == user and r.sealed), None),
                    timeout=60, interval=0.3, what=f"{user}'s record to be closed")


def home(hub: RunningHub, user: str) -> str:
    return login(hub, user, then="/hub/home").get(f"{hub.url}/hub/home", timeout=60).text


def set_utilization(spec: Path, percent: dict[str, int], *, others: int = 0) -> None:
    """Two GPUs; those named in `percent` at that utilisation, the others at `others`."""
    gpus = [simnvml.gpu(0), simnvml.gpu(1)]
    for g in gpus:
        g["utilization"] = percent.get(g["uuid"], others)
    simnvml.write_spec(spec, gpus)


def idle_hub(start_hub: Callable[..., RunningHub], spec: Path, *, timeout: int, warning: int) -> RunningHub:
    """A hub with two idle GPUs (0 %) that stops servers idle for `timeout` seconds, warning `warning` before."""
    set_utilization(spec, {})
    return start_hub(extra=sim_config(spec, NOTICES + f"""
c.GPUSpawner.gpu_idle_timeout = {timeout}
c.GPUSpawner.limit_warning_seconds = {warning}
"""))


def test_an_idle_gpu_server_is_warned_then_stopped_and_a_busy_one_is_kept(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    spec = tmp_path / "gpus.json"
    hub = idle_hub(start_hub, spec, timeout=20, warning=17)
    for user in ("ada", "bob"):
        assert hub.spawn(user).status_code in (201, 202)
        hub.wait_ready(user)
    bob_gpu = container_of(docker_bed, hub, "bob")["Labels"]["gpuspawner.devices"]
    set_utilization(spec, {bob_gpu: 90})  # bob's notebook trains; ada's GPU sits at 0 %
    # an admin sees each held GPU's idle time (the hub's clock, kept in its data folder)
    rows = wait_for(lambda: (r := {d["holder"]: d["limits"] for d in gpus_cli(hub)["devices"] if d["holder"]})
                    and "idle" in (r.get("ada") or "") and (r.get("bob") or "").startswith("busy") and r, timeout=30, interval=0.5, what="ada's idle time in `gpuspawner gpus`")
    assert rows["ada"].endswith("(stopped after 20 s idle)") and rows["bob"] == "busy (stopped after 20 s idle)"

    page = wait_for(lambda: (p := home(hub, "ada")) and "data-gpuspawner-notice=\"warning\"" in p and p,
                    timeout=60, interval=0.5, what="the warning on ada's home page")
    assert "This server stops in" in page and "its GPU has been idle (under 5 %)" in page
    assert hub.server_model("ada") is not None  # warned, not yet stopped

    wait_for(lambda: hub.server_model("ada") is None, timeout=60, interval=0.5, what="ada's server to be stopped")
    ada = record_of(hub, "ada")
    assert (ada.outcome, ada.error) == ("stopped", "Stopped by the hub: its GPU was idle (under 5 %) for 20 s.")
    page = home(hub, "ada")
    assert 'data-gpuspawner-notice="stopped"' in page and "its GPU was idle (under 5 %) for 20 s" in page

    time.sleep(3)  # well past ada's stop: bob's busy GPU keeps his server
    assert hub.server_model("bob")["ready"] and 'data-gpuspawner-notice' not in home(hub, "bob")


def test_max_runtime_stops_a_busy_server_at_its_limit_after_a_warning(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    spec = tmp_path / "gpus.json"
    set_utilization(spec, {}, others=99)
    hub = start_hub(extra=sim_config(spec, NOTICES + """
c.GPUSpawner.max_runtime = 12
c.GPUSpawner.limit_warning_seconds = 9
"""))
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    started = time.monotonic()
    (held,) = [d for d in gpus_cli(hub)["devices"] if d["holder"] == "ada"]
    assert held["limits"].endswith("of 12 s left") and "; " + held["limits"] in held["where"]
    page = wait_for(lambda: (p := home(hub, "ada")) and "data-gpuspawner-notice=\"warning\"" in p and p,
                    timeout=60, interval=0.5, what="the warning on ada's home page")
    assert "its 12 s time limit ends" in page
    wait_for(lambda: hub.server_model("ada") is None, timeout=60, interval=0.5, what="ada's server to be stopped")
    assert time.monotonic() - started >= 8  # not before its limit (less the time it took to answer)
    ada = record_of(hub, "ada")
    assert (ada.outcome, ada.error) == ("stopped", "Stopped by the hub: it reached its 12 s time limit.")


def test_the_idle_clock_survives_a_hub_kill(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, tmp_path: Path
) -> None:
    hub = idle_hub(start_hub, tmp_path / "gpus.json", timeout=24, warning=1)
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    idle_from = time.time()  # its GPU is at 0 % from the start: the hub's first sample starts the clock
    clocks = tmp_path / "gpuspawner-clocks.json"
    wait_for(lambda: clocks.exists() and clocks.read_text() not in ("", "{}"), timeout=30, interval=0.5,
             what="the idle clock to be kept in the data folder")
    time.sleep(max(0.0, idle_from + 10 - time.time()))
    hub.kill()  # SIGKILL, mid-way through the idle time
    hub.start()
    restarted = time.time()
    wait_for(lambda: hub.server_model("ada") is None, timeout=90, interval=0.5, what="ada's server to be stopped")
    # stopped when 24 s of idleness had passed since before the kill, not 24 s after the restart
    assert time.time() < restarted + 20, f"stopped {time.time() - restarted:.0f} s after the restart"
    ada = record_of(hub, "ada")
    assert (ada.outcome, ada.error) == ("stopped", "Stopped by the hub: its GPU was idle (under 5 %) for 24 s.")
