"""What a waiter is told of the servers holding the devices it waits for, and who the engine's containers
say holds which device (no Docker needed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gpuspawner.allocation import GPURequest, Holder
from gpuspawner.devices import Device, GiB, Inventory
from gpuspawner.gpus import engine_claims, soonest_end
from gpuspawner.hubwide import resources
from gpuspawner.limits import Limits

A100, H100 = "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"
INVENTORY = Inventory(devices=tuple(
    Device(uuid=f"GPU-{i}", index=i, name=name, memory_total=80 * GiB, memory_used=0)
    for i, name in enumerate((A100, A100, H100))
))


class Running:
    """A running server of the hub, as the GPU queue sees it: its time limits and when it started."""

    def __init__(self, limits: Limits, started_ago: float) -> None:
        self.limits, self.started_at = limits, time.time() - started_ago


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    resources.reset()
    yield
    resources.reset()


def test_a_waiter_hears_when_the_first_time_limit_of_the_holders_ends() -> None:
    servers = {"ada": Running(Limits(max_runtime=8 * 3600), started_ago=7 * 3600 + 20 * 60),  # 40 min left
               "bob": Running(Limits(max_runtime=8 * 3600), started_ago=3600),
               "cyd": Running(Limits(max_runtime=600), started_ago=0)}  # on the H100: not what is awaited
    for name, server in servers.items():
        resources.spawners[(name, "")] = server  # type: ignore[assignment]
    claims = {"GPU-0": Holder("ada"), "GPU-1": Holder("bob"), "GPU-2": Holder("cyd")}
    text = soonest_end(GPURequest(count=1, model="A100"), INVENTORY, claims)
    assert text == " The soonest time limit of the servers holding them ends in 40 min."


def test_no_word_of_time_limits_where_the_holders_have_none() -> None:
    resources.spawners[("ada", "")] = Running(Limits(idle_timeout=60), started_ago=0)  # type: ignore[assignment]
    assert soonest_end(GPURequest(count=1), INVENTORY, {"GPU-0": Holder("ada"), "GPU-1": Holder("zoe")}) == ""



HUB, TRAINING = "a" * 64, "b" * 64  # the compose hub asks for every GPU; someone's `docker run --gpus` for one
REQUESTS = {HUB: [{"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}],
            TRAINING: [{"Driver": "nvidia", "DeviceIDs": ["GPU-2"], "Capabilities": [["gpu"]]}]}


@pytest.mark.parametrize(("own_ids", "held"), [
    ((HUB,), {"GPU-2": "training"}),
    ((HUB[:12],), {"GPU-2": "training"}),
    ((), {"GPU-0": "hub", "GPU-1": "hub", "GPU-2": "hub|training"}),  # a hub on the host: that one is another's
], ids=["hub-in-that-container", "found-by-hostname", "hub-on-the-host"])
def test_the_engines_claims_leave_out_the_hubs_own_container(own_ids: tuple, held: dict) -> None:
    resources.own_container_ids = own_ids

    async def docker(method: str, *args: Any) -> Any:
        if method == "containers":
            return [{"Id": i, "State": "running", "Labels": {}} for i in REQUESTS]
        return {"Id": args[0], "Name": "/hub" if args[0] == HUB else "/training",
                "HostConfig": {"DeviceRequests": REQUESTS[args[0]]}}

    claims = asyncio.run(engine_claims(docker, "hub-1", INVENTORY))
    assert set(claims) == set(held)
    assert all(h.server.removeprefix("container ") in held[uuid].split("|") for uuid, h in claims.items())
