"""The time-limit round (gpuspawner.reclaim.check_limits) over stand-in servers: its idle clocks
across rounds where NVML does not answer or a server sits one round out. No Docker, no hub."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

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

    name, _spawning, limit_notice, stop_reason = "", False, "", ""

    def __init__(self, user: str = "ada", record: str = "r1") -> None:
        self.user, self._log_name, self.ready, self.audit_record_id = User(user), user, True, record
        self.gpu_devices = ("GPU-0",)
        self.limits, self.started_at = Limits(idle_timeout=3600), time.time()


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
