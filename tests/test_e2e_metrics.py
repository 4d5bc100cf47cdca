"""End to end: a real Prometheus (Debian's `prometheus`) scrapes a real hub's /hub/metrics with a token
holding read:metrics; after a GPU spawn, PromQL through Prometheus's HTTP API finds the holder series
with the right user, server, profile and UUID, the free/held counts agree with `gpuspawner gpus`, and every query of the Grafana
dashboard in docker/grafana runs."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

import simnvml
from gpuspawner.store import AuditStore
from helpers import ROOT, gpus_cli, sim_config, unavailable
from testbed import wait_for
from testbed.hub import RunningHub
from testbed.prometheus import PrometheusServer, find_prometheus

pytestmark = pytest.mark.docker

TOKEN = secrets.token_hex(16)


@pytest.fixture
def prometheus_for() -> Iterator[Callable[[RunningHub], PrometheusServer]]:
    """Start a Prometheus that scrapes a hub every second, as a lab's would; stopped at the end."""
    binary = find_prometheus()
    if binary is None:
        unavailable("Prometheus is not installed (Debian package prometheus; docker/host/system-deps.sh test)")
    started: list[PrometheusServer] = []

    def start(hub: RunningHub) -> PrometheusServer:
        assert binary is not None
        started.append(PrometheusServer.start(binary, target=f"127.0.0.1:{hub.settings.proxy_port}",
                                              metrics_path="/hub/metrics", token=TOKEN))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def metrics_hub(start_hub: Callable[..., RunningHub], tmp_path: Path, image: str) -> RunningHub:
    """Three simulated GPUs, a 1-GPU profile, samples every second, and a service token for Prometheus."""
    spec = tmp_path / "gpus.json"
    simnvml.write_spec(spec, [simnvml.gpu(0), simnvml.gpu(1), simnvml.gpu(2)])
    profiles = [{"slug": "one-a100", "display_name": "1 A100", "image": image, "gpus": 1, "default": True}]
    return start_hub(extra=sim_config(spec, f"""
c.GPUSpawner.profiles = {profiles!r}
c.GPUSpawner.gpu_sample_seconds = 1
c.JupyterHub.services.append({{"name": "prometheus", "api_token": {TOKEN!r}}})
c.JupyterHub.load_roles.append({{"name": "metrics", "scopes": ["read:metrics"], "services": ["prometheus"]}})
"""))


def dashboard_results(prom: PrometheusServer) -> dict[str, list[dict[str, object]]]:
    """Each panel's results (its targets' together) with Grafana's variables filled in as Grafana would."""
    dashboard = json.loads((ROOT / "docker" / "grafana" / "gpuspawner.json").read_text())
    results: dict[str, list[dict[str, object]]] = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$user", ".*")
            results.setdefault(panel["title"], []).extend(prom.query(expr))
    return results


def by_state(prom: PrometheusServer) -> dict[str, int]:
    return {r["metric"]["state"]: int(float(r["value"][1])) for r in prom.query("sum by (state) (gpuspawner_devices)")}


def test_prometheus_sees_who_holds_which_gpu_and_the_counts_gpuspawner_gpus_shows(
    start_hub: Callable[..., RunningHub], prometheus_for: Callable[[RunningHub], PrometheusServer],
    singleuser_image: str, tmp_path: Path,
) -> None:
    hub = metrics_hub(start_hub, tmp_path, singleuser_image)
    assert requests.get(f"{hub.url}/hub/metrics", timeout=10).status_code == 403  # no token, no metrics
    prom = prometheus_for(hub)
    hub.create_user("ada")
    assert hub.api("POST", "/groups/physics", json={"users": ["ada"]}).status_code == 201
    assert hub.spawn("ada", options={"profile": "one-a100"}).status_code in (201, 202)
    hub.wait_ready("ada")

    (held,) = [d for d in gpus_cli(hub)["devices"] if d["status"] == "held"]
    holder = wait_for(lambda: prom.query('gpuspawner_device_holder{user="ada",server=""}'), timeout=30, interval=0.5,
                      what="ada's holder series in Prometheus")
    assert [h["metric"] for h in holder] == [{  # Prometheus keeps no empty label: the default server has none
        "__name__": "gpuspawner_device_holder", "instance": f"127.0.0.1:{hub.settings.proxy_port}", "job": "jupyterhub",
        "uuid": held["uuid"], "user": "ada", "profile": "one-a100",
    }]
    rows = gpus_cli(hub)["devices"]
    expected = {"free": sum(r["status"] == "free" for r in rows), "held": sum(r["status"] == "held" for r in rows),
                "busy": 0, "unhealthy": 0}
    assert expected["held"] == 1 and expected["free"] == 2
    assert by_state(prom) == expected
    # the device's own series join with the holder by UUID, as DCGM exporter's would
    model = prom.query('gpuspawner_device_info * on(uuid) group_left(user) gpuspawner_device_holder')
    assert [(m["metric"]["uuid"], m["metric"]["user"], m["metric"]["model"]) for m in model] == [
        (held["uuid"], "ada", "NVIDIA A100-SXM4-80GB")]
    # every query of the Grafana dashboard runs in this Prometheus; the hub's own panels find ada
    panels = dashboard_results(prom)
    assert {r["metric"]["user"] for r in panels["Who holds which device"]} == {"ada"}
    assert [r["metric"]["user"] for r in panels["GPU utilisation per user (hub's NVML samples)"]] == ["ada"]
    started = prom.query('gpuspawner_spawn_duration_seconds_count{profile="one-a100",outcome="started"}')
    assert [float(s["value"][1]) for s in started] == [1.0]
    wait_for(lambda: prom.query('gpuspawner_gpu_seconds_total{user="ada",profile="one-a100"} > 0'), timeout=30,
             interval=0.5, what="ada's GPU-seconds to count up")

    hub.stop_server("ada")  # the GPU is free again: its holder series goes, the counts follow
    wait_for(lambda: not prom.query('gpuspawner_device_holder{user="ada"}'), timeout=30, interval=0.5,
             what="ada's holder series to go")
    wait_for(lambda: by_state(prom) == {"free": 3, "held": 0, "busy": 0, "unhealthy": 0}, timeout=30, interval=0.5,
             what="three free GPUs in Prometheus")
    # its record keeps the user's groups and the GPU time the samples saw idle (the simulated GPU sat at 0 %)
    held_seconds = float(prom.query('gpuspawner_gpu_seconds_total{user="ada"}')[0]["value"][1])
    (record,) = AuditStore(f"sqlite:///{hub.settings.workdir / 'gpuspawner-audit.sqlite'}").iter_records()
    assert record.groups == ("physics",) and record.outcome == "stopped"
    assert record.idle_gpu_seconds == pytest.approx(held_seconds, abs=3)
