"""The time-limit round (gpuspawner.reclaim.check_limits) over stand-in servers: its idle clocks
across rounds where NVML does not answer or a server sits one round out. No Docker, no hub."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gpuspawner.allocation import Holder
from gpuspawner.devices import Device, GiB, Inventory
from gpuspawner.hubwide import resources
from gpuspawner.limits import Limits
from gpuspawner.nvml import NVMLTimeout
from gpuspawner.reclaim import check_limits

LOG = logging.getLogger("test")


class Reader:
    """NVML as the hub's reader gives it: an inventory, or a timeout."""

    def __init__(self) -> None:
        self.utilization: int | None = 0

    async def get(self) -> Inventory:
        if self.utilization is None:
            raise NVMLTimeout(10)
        return Inventory(devices=(Device(uuid="GPU-0", index=0, name="NVIDIA A100-SXM4-80GB", memory_total=80 * GiB,
                                         memory_used=0, utilization=self.utilization),))


class Caretaker:
    busy_memory_threshold = 512 * 1024**2

    def __init__(self) -> None:
        self.reader = Reader()

    def nvml_reader(self) -> Reader:
        return self.reader


class User:
    def __init__(self, name: str) -> None:
        self.name = name

    async def stop(self, server: str) -> None:
        raise AssertionError("nobody is past a limit here")


class Server:
    """A running GPU server of the hub, as the round reads it."""

    name, _spawning, limit_notice, stop_reason, profile_slug, _started_here = "", False, "", "", "a100", True

    def __init__(self, user: str = "ada", record: str = "r1") -> None:
        self.user, self._log_name, self.ready, self.audit_record_id = User(user), user, True, record
        self.gpu_devices = ("GPU-0",)
        self.limits, self.started_at = Limits(idle_timeout=3600), time.time()

    @property
    def holder(self) -> Holder:
        return Holder(self.user.name, self.name)


@pytest.fixture
def ada() -> Iterator[Server]:
    resources.reset()
    server = Server()
    resources.spawners[("ada", "")] = server  # type: ignore[assignment]
    yield server
    resources.reset()


async def test_a_round_without_nvml_stands_the_idle_clock_still(ada: Server) -> None:
    caretaker: Any = Caretaker()
    await check_limits(caretaker, LOG)
    idle_from = resources.idle_clocks["r1"]
    caretaker.reader.utilization = None  # NVML hangs for a round
    await check_limits(caretaker, LOG)
    assert resources.idle_clocks == {"r1": idle_from}
    caretaker.reader.utilization = 90  # busy again: the clock goes
    await check_limits(caretaker, LOG)
    assert resources.idle_clocks == {}


async def test_a_server_that_sits_a_round_out_keeps_its_idle_clock(ada: Server) -> None:
    bob = Server("bob", "r2")  # judged every round
    resources.spawners[("bob", "")] = bob  # type: ignore[assignment]
    caretaker: Any = Caretaker()
    await check_limits(caretaker, LOG)
    idle_from = resources.idle_clocks["r1"]
    ada.ready = False  # JupyterHub checks on it (a restart resumes it): no judgement this round
    await check_limits(caretaker, LOG)
    assert resources.idle_clocks["r1"] == idle_from
    ada.ready = True
    await check_limits(caretaker, LOG)
    assert resources.idle_clocks["r1"] == idle_from


def counted(name: str, user: str = "ada") -> float:
    return REGISTRY.get_sample_value(name, {"user": user, "profile": "a100"}) or 0.0


async def test_each_round_publishes_who_holds_which_device_and_how_long_its_server_has_been_idle(ada: Server) -> None:
    await check_limits(Caretaker(), LOG)  # type: ignore[arg-type]
    (device,) = resources.readings.devices
    assert (device.uuid, device.state, device.user, device.server, device.profile) == ("GPU-0", "held", "ada", "", "a100")
    (server,) = resources.readings.servers
    assert server.idle_seconds == pytest.approx(0, abs=1)
    assert server.time_left == pytest.approx(3600, abs=5)  # the idle limit: 1 h from the first idle sample


async def test_gpu_time_is_counted_from_the_start_and_its_idle_part_is_kept_for_the_record(ada: Server) -> None:
    caretaker: Any = Caretaker()
    ada.started_at = time.time() - 100
    held, idle = counted("gpuspawner_gpu_seconds_total"), counted("gpuspawner_gpu_idle_seconds_total")
    await check_limits(caretaker, LOG)  # idle at this sample: the 100 s since the start count as idle
    assert counted("gpuspawner_gpu_seconds_total") - held == pytest.approx(100, abs=2)
    assert counted("gpuspawner_gpu_idle_seconds_total") - idle == pytest.approx(100, abs=2)
    assert resources.gpu_idle_seconds["r1"] == pytest.approx(100, abs=2)
    resources.accounted["r1"] -= 50  # 50 s later, busy
    caretaker.reader.utilization = 90
    await check_limits(caretaker, LOG)
    assert counted("gpuspawner_gpu_seconds_total") - held == pytest.approx(150, abs=2)
    assert resources.gpu_idle_seconds["r1"] == pytest.approx(100, abs=2)


async def test_a_server_the_hub_resumed_counts_its_gpu_time_from_when_the_hub_first_saw_it(ada: Server) -> None:
    ada.started_at, ada._started_here = time.time() - 7200, False  # started by the hub process before a restart
    held = counted("gpuspawner_gpu_seconds_total")
    await check_limits(Caretaker(), LOG)  # type: ignore[arg-type]
    assert counted("gpuspawner_gpu_seconds_total") - held == pytest.approx(0, abs=1)  # not the 2 h again
