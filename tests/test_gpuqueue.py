"""The GPU queue: first come, first served, nobody overtaken for what they wait for; places in line."""

from __future__ import annotations

from typing import Any

import pytest

from gpuspawner.allocation import GPURequest, Holder
from gpuspawner.devices import Device, GiB, Inventory
from gpuspawner.gpuqueue import KEPT, Waiter, ordinal, queue_lengths, serve

THRESHOLD = 1 * GiB
ONE, TWO = GPURequest(count=1), GPURequest(count=2)
MIG_SMALL = GPURequest(mig_profile="1g.10gb")


def gpu(n: int, name: str = "NVIDIA A100-SXM4-80GB", **kw: Any) -> Device:
    return Device(uuid=f"GPU-{n}", index=n, name=name, memory_total=80 * GiB, memory_used=0,
                  pci_bus_id=f"00000000:{0x10 + n:02X}:00.0", **kw)


def mig(parent: int, slot: int) -> Device:
    return Device(uuid=f"MIG-{parent}-{slot}", index=parent, name="NVIDIA A100-SXM4-80GB MIG 1g.10gb",
                  memory_total=10 * GiB, memory_used=0, pci_bus_id=f"00000000:{0x10 + parent:02X}:00.0",
                  parent_uuid=f"GPU-{parent}", mig_profile="1g.10gb")


def inv(*devices: Device) -> Inventory:
    return Inventory(devices=devices, driver_version="550.54.15", cuda_driver_version="12.4")


def waiter(name: str, request: GPURequest = ONE, joined: float = 0.0, quota: int | None = None) -> Waiter:
    return Waiter(id=name, holder=Holder(name), request=request, joined=joined, quota=quota)


def held(*uuids: str, by: str = "zoe") -> dict[str, Holder]:
    return {u: Holder(by) for u in uuids}


def granted(turn: object) -> dict[str, tuple[str, ...]]:
    return {w: g.uuids for w, g in turn.grants.items()}  # type: ignore[attr-defined]


def test_a_freed_gpu_goes_to_who_has_waited_longest_and_the_others_move_up() -> None:
    line = [waiter("cyd", joined=3), waiter("ada", joined=1), waiter("bob", joined=2)]
    full = serve(line, inv(gpu(0)), held("GPU-0"), busy_memory_threshold=THRESHOLD)
    assert granted(full) == {} and full.places == {"ada": 1, "bob": 2, "cyd": 3}
    freed = serve(line, inv(gpu(0)), {}, busy_memory_threshold=THRESHOLD)
    assert granted(freed) == {"ada": ("GPU-0",)} and freed.places == {"bob": 1, "cyd": 2}
    ada_gone = serve([line[0]], inv(gpu(0)), held("GPU-0", by="ada"), busy_memory_threshold=THRESHOLD)
    assert ada_gone.places == {"cyd": 1}  # bob cancelled: cyd moves up


def test_a_large_request_is_not_starved_by_small_ones_behind_it() -> None:
    line = [waiter("ada", TWO, joined=1), waiter("bob", ONE, joined=2)]
    one_free = serve(line, inv(gpu(0), gpu(1)), held("GPU-1"), busy_memory_threshold=THRESHOLD)
    assert granted(one_free) == {}  # GPU-0 is kept for ada, who needs it and one more
    assert one_free.places == {"ada": 1, "bob": 2}
    both_free = serve(line, inv(gpu(0), gpu(1)), {}, busy_memory_threshold=THRESHOLD)
    assert granted(both_free) == {"ada": ("GPU-0", "GPU-1")} and both_free.places == {"bob": 1}


def test_waiters_for_another_kind_of_device_are_served_past_the_head() -> None:
    line = [waiter("ada", GPURequest(count=2, model="A100"), joined=1), waiter("bob", MIG_SMALL, joined=2),
            waiter("cyd", GPURequest(count=1, model="H100"), joined=3)]
    turn = serve(line, inv(gpu(0), gpu(1), gpu(2, "NVIDIA H100 80GB HBM3"), Device(
        uuid="GPU-3", index=3, name="NVIDIA A100-SXM4-80GB", memory_total=80 * GiB, memory_used=0, mig_enabled=True,
    ), mig(3, 0)), held("GPU-1"), busy_memory_threshold=THRESHOLD)
    assert granted(turn) == {"bob": ("MIG-3-0",), "cyd": ("GPU-2",)} and turn.places == {"ada": 1}


def test_a_waiter_keeps_no_more_than_it_needs() -> None:
    line = [waiter("ada", ONE, joined=1), waiter("bob", ONE, joined=2)]
    turn = serve(line, inv(gpu(0), gpu(1)), {}, busy_memory_threshold=THRESHOLD)
    assert granted(turn) == {"ada": ("GPU-0",), "bob": ("GPU-1",)}


def test_a_waiter_over_its_quota_leaves_the_queue_with_the_reason() -> None:
    line = [waiter("ada", ONE, joined=1, quota=1)]
    ada_elsewhere = {"GPU-1": Holder("ada", "other")}
    turn = serve(line, inv(gpu(0), gpu(1)), ada_elsewhere, busy_memory_threshold=THRESHOLD)
    assert granted(turn) == {} and turn.over_quota["ada"].startswith("GPU quota reached") and turn.places == {}


def test_a_request_this_host_can_never_meet_leaves_the_queue() -> None:
    turn = serve([waiter("ada", GPURequest(count=3))], inv(gpu(0), gpu(1)), {}, busy_memory_threshold=THRESHOLD)
    assert "never has that many" in turn.refused["ada"]


def test_the_same_inputs_give_the_same_turn() -> None:
    line = [waiter(n, joined=0.0) for n in ("bob", "ada", "cyd")]  # joined at once: by id
    turns = {str(serve(line, inv(gpu(0)), {}, busy_memory_threshold=THRESHOLD)) for _ in range(3)}
    assert len(turns) == 1 and granted(serve(line, inv(gpu(0)), {}, busy_memory_threshold=THRESHOLD)) == {"ada": ("GPU-0",)}


def test_queue_lengths_count_each_kind_of_device_once() -> None:
    lengths = queue_lengths([waiter("ada", ONE), waiter("bob", TWO), waiter("cyd", MIG_SMALL)])
    assert lengths == {GPURequest(count=1): 2, GPURequest(mig_profile="1g.10gb"): 1}


@pytest.mark.parametrize(("n", "text"), [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (12, "12th"),
                                         (13, "13th"), (21, "21st"), (102, "102nd"), (111, "111th")])
def test_ordinals(n: int, text: str) -> None:
    assert ordinal(n) == text


def test_kept_devices_are_not_anyones_claim() -> None:
    assert KEPT.user == ""


# --- Several nodes (a Docker Swarm): a waiter is served on one node or waits for one ------------------


def node_gpus(node: str, *numbers: int, unhealthy: tuple[int, ...] = ()) -> list[Device]:
    return [gpu(n, node=node, healthy=n not in unhealthy) for n in numbers]


def test_a_two_gpu_waiter_waits_while_the_free_gpus_are_on_different_nodes() -> None:
    cluster = inv(*node_gpus("n1", 0, 1), *node_gpus("n2", 2, 3))
    line = [waiter("ada", TWO, joined=1)]
    split = serve(line, cluster, held("GPU-1", "GPU-3"), busy_memory_threshold=THRESHOLD)
    assert granted(split) == {} and split.refused == {} and split.places == {"ada": 1}
    freed = serve(line, cluster, held("GPU-3"), busy_memory_threshold=THRESHOLD)  # n1 is whole again
    assert granted(freed) == {"ada": ("GPU-0", "GPU-1")}


@pytest.mark.parametrize(
    "devices",
    [node_gpus("n1", 0) + node_gpus("n2", 1),
     node_gpus("n1", 0, 1, unhealthy=(1,)) + node_gpus("n2", 2, 3, unhealthy=(2,)),
     node_gpus("n1", 0) + node_gpus("n2", 1) + node_gpus("n3", 2)],
    ids=["one-gpu-on-each-of-two-nodes", "one-healthy-on-each-node", "one-on-each-of-three-nodes"],
)
def test_a_request_no_single_node_could_ever_serve_leaves_the_queue(devices: list[Device]) -> None:
    turn = serve([waiter("ada", TWO)], inv(*devices), {}, busy_memory_threshold=THRESHOLD)
    assert granted(turn) == {} and "ada" in turn.refused and turn.places == {}


def test_the_refusal_of_a_request_no_node_could_ever_serve_says_waiting_will_not_help() -> None:
    turn = serve([waiter("ada", TWO)], inv(*node_gpus("n1", 0), *node_gpus("n2", 1)), {}, busy_memory_threshold=THRESHOLD)
    assert "Try again" not in turn.refused["ada"]
    assert "No node has that many healthy devices of this kind" in turn.refused["ada"]


def test_a_one_gpu_waiter_behind_is_served_on_a_node_the_head_cannot_use_yet() -> None:
    # ada needs 2 on one node: the first free GPU of n1 and of n2 are kept for her, whichever node frees up first.
    cluster = inv(*node_gpus("n1", 0, 1), *node_gpus("n2", 2, 3), *node_gpus("n3", 4))
    line = [waiter("ada", TWO, joined=1), waiter("bob", ONE, joined=2)]
    turn = serve(line, cluster, held("GPU-1", "GPU-3"), busy_memory_threshold=THRESHOLD)
    assert granted(turn) == {"bob": ("GPU-4",)} and turn.places == {"ada": 1}
