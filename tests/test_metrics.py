"""The hub's gpuspawner series as a Prometheus scrape shows them (prometheus_client's default registry,
which JupyterHub serves at /hub/metrics), from the hub's latest readings and its GPU queue."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpuspawner import metrics
from gpuspawner.allocation import GPURequest, Holder
from gpuspawner.gpuqueue import Waiter
from gpuspawner.hubwide import resources
from gpuspawner.readings import DeviceReading, Readings, ServerReading
from gpuspawner.store import AsyncAuditStore


@pytest.fixture
def scrape() -> Iterator[object]:
    resources.reset()

    def read() -> dict[str, list[tuple[dict[str, str], float]]]:
        series: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
            for s in family.samples:
                if s.name.startswith("gpuspawner_"):
                    series.setdefault(s.name, []).append((s.labels, s.value))
        return series

    yield read
    resources.reset()


def device(uuid: str, state: str, **kw: object) -> DeviceReading:
    values: dict[str, object] = dict(uuid=uuid, index=0, model="NVIDIA H100 80GB HBM3", mig_profile="", parent_uuid="",
                                     utilization=40, memory_used=2**30, memory_total=80 * 2**30, state=state)
    values.update(kw)
    return DeviceReading(**values)  # type: ignore[arg-type]


def test_a_scrape_shows_each_device_its_holder_the_counts_the_queue_and_the_servers_limits(scrape) -> None:  # type: ignore[no-untyped-def]
    resources.readings = Readings(taken_at=1_700_000_000.0, devices=(
        device("GPU-a", "held", user="ada", server="train", profile="h100"),
        device("GPU-b", "free", index=1, utilization=None),
    ), servers=(ServerReading("ada", "train", idle_seconds=120.0, time_left=3000.0),))
    resources.waiters["r9"] = Waiter(id="r9", holder=Holder("bob"), request=GPURequest(count=1), joined=0, profile="h100")
    series = scrape()
    assert series["gpuspawner_device_holder"] == [({"uuid": "GPU-a", "user": "ada", "server": "train", "profile": "h100"}, 1)]
    assert ({"uuid": "GPU-b", "node": "", "index": "1", "model": "NVIDIA H100 80GB HBM3", "mig_profile": "",
             "parent_uuid": ""}, 1) in series["gpuspawner_device_info"]
    assert series["gpuspawner_device_state"] == [({"uuid": "GPU-a", "state": "held"}, 1), ({"uuid": "GPU-b", "state": "free"}, 1)]
    assert series["gpuspawner_device_utilization_ratio"] == [({"uuid": "GPU-a"}, 0.4)]  # none for GPU-b: NVML had none
    assert ({"uuid": "GPU-a"}, 2**30) in series["gpuspawner_device_memory_used_bytes"]
    counts = {(labels["model"], labels["state"]): v for labels, v in series["gpuspawner_devices"]}
    assert counts == {("NVIDIA H100 80GB HBM3", s): n for s, n in (("free", 1), ("held", 1), ("busy", 0), ("unhealthy", 0))}
    assert series["gpuspawner_queue_length"] == [({"profile": "h100"}, 1)]
    assert series["gpuspawner_server_idle_seconds"] == [({"user": "ada", "server": "train"}, 120)]
    assert series["gpuspawner_server_time_left_seconds"] == [({"user": "ada", "server": "train"}, 3000)]
    assert series["gpuspawner_sample_timestamp_seconds"] == [({}, 1_700_000_000.0)]


def test_on_a_swarm_each_device_names_its_node(scrape) -> None:  # type: ignore[no-untyped-def]
    resources.readings = Readings(taken_at=1.0, devices=(device("GPU-w1-0", "free", node="gpu-node-1"),
                                                         device("GPU-w2-0", "free", node="gpu-node-2")))
    nodes = {labels["uuid"]: labels["node"] for labels, _ in scrape()["gpuspawner_device_info"]}
    assert nodes == {"GPU-w1-0": "gpu-node-1", "GPU-w2-0": "gpu-node-2"}


def test_before_the_first_sample_a_scrape_shows_no_devices_and_no_sample_time(scrape) -> None:  # type: ignore[no-untyped-def]
    series = scrape()
    assert "gpuspawner_device_info" not in series
    assert "gpuspawner_sample_timestamp_seconds" not in series


def test_metric_names_lists_every_series_a_scrape_shows(scrape) -> None:  # type: ignore[no-untyped-def]
    resources.readings = Readings(taken_at=1.0, devices=(device("GPU-a", "held", user="ada"),),
                                  servers=(ServerReading("ada", "", 1.0, 2.0),))
    resources.waiters["r9"] = Waiter(id="r9", holder=Holder("bob"), request=GPURequest(count=1), joined=0)
    metrics.SPAWN_DURATION.labels("test-profile", "started").observe(3)
    metrics.REFUSALS.labels("no_devices")
    metrics.GPU_SECONDS.labels("test-user", "")
    metrics.GPU_IDLE_SECONDS.labels("test-user", "")
    resources.stores["sqlite://"] = AsyncAuditStore("sqlite://")
    assert set(scrape()) == metrics.metric_names()
