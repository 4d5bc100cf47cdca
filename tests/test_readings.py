"""What the hub's metrics say of its devices (gpuspawner.readings): states, holders, counts, GPU time."""

from __future__ import annotations

import pytest

from gpuspawner.allocation import Holder
from gpuspawner.devices import Device, GiB, Inventory, Process
from gpuspawner.readings import account, device_readings, held_share, state_counts

A100 = "NVIDIA A100-SXM4-80GB"


def gpu(i: int, **kw: object) -> Device:
    return Device(uuid=f"GPU-{i}", index=i, name=A100, memory_total=80 * GiB, memory_used=0, utilization=0, **kw)  # type: ignore[arg-type]


INVENTORY = Inventory(devices=(
    gpu(0), gpu(1), gpu(2, processes=(Process(pid=7, used_memory=GiB),)), gpu(3, healthy=False, problem="lost"),
    gpu(4, mig_enabled=True),
    Device(uuid="MIG-a", index=4, name=A100, memory_total=10 * GiB, memory_used=0, parent_uuid="GPU-4", mig_profile="1g.10gb"),
    Device(uuid="MIG-b", index=4, name=A100, memory_total=10 * GiB, memory_used=0, parent_uuid="GPU-4", mig_profile="1g.10gb"),
    gpu(5),
))


def readings() -> dict[str, object]:
    claims = {"GPU-0": Holder("ada"), "MIG-a": Holder("bob", "train"), "GPU-5": Holder("", "someone-elses-container")}
    found = device_readings(INVENTORY, claims, {Holder("ada"): "a100", Holder("bob", "train"): "mig"},
                            busy_memory_threshold=512 * 1024**2)
    return {d.uuid: d for d in found}


def test_each_device_has_its_state_and_a_held_one_its_holder_and_profile() -> None:
    found = readings()
    assert {u: d.state for u, d in found.items()} == {  # type: ignore[attr-defined]
        "GPU-0": "held", "GPU-1": "free", "GPU-2": "busy", "GPU-3": "unhealthy", "GPU-4": "mig",
        "MIG-a": "held", "MIG-b": "free", "GPU-5": "busy",  # another container's GPU is busy outside the hub
    }
    mig = found["MIG-a"]
    assert (mig.user, mig.server, mig.profile, mig.model, mig.parent_uuid) == (  # type: ignore[attr-defined]
        "bob", "train", "mig", f"{A100} MIG 1g.10gb", "GPU-4")
    assert found["GPU-5"].user == ""  # type: ignore[attr-defined]


def test_a_mig_device_named_by_nvml_with_its_profile_is_counted_under_that_name_once() -> None:
    named = Device(uuid="MIG-c", index=4, name=f"{A100} MIG 1g.10gb", memory_total=10 * GiB, memory_used=0,
                   parent_uuid="GPU-4", mig_profile="1g.10gb")
    (found,) = device_readings(Inventory(devices=(named,)), {}, {}, busy_memory_threshold=0)
    assert found.model == f"{A100} MIG 1g.10gb"


def test_a_swarm_devices_node_is_named_by_its_host_name() -> None:
    on_node = Device(uuid="GPU-w1-0", index=0, name=A100, memory_total=80 * GiB, memory_used=0, node="x8f2kq")
    here = Device(uuid="GPU-h-0", index=0, name=A100, memory_total=80 * GiB, memory_used=0)
    found = device_readings(Inventory(devices=(on_node, here)), {}, {}, busy_memory_threshold=0, node_names={"x8f2kq": "gpu-node-1"})
    assert [d.node for d in found] == ["gpu-node-1", ""]  # a device of the hub's own host has no node


def test_counts_per_model_and_state_leave_out_mig_mode_gpus_and_list_empty_states_as_zero() -> None:
    counts = state_counts(readings().values())  # type: ignore[arg-type]
    assert counts == {
        (A100, "free"): 1, (A100, "held"): 1, (A100, "busy"): 2, (A100, "unhealthy"): 1,
        (f"{A100} MIG 1g.10gb", "free"): 1, (f"{A100} MIG 1g.10gb", "held"): 1,
        (f"{A100} MIG 1g.10gb", "busy"): 0, (f"{A100} MIG 1g.10gb", "unhealthy"): 0,
    }


def test_a_mig_slice_counts_its_share_of_a_gpu_and_an_unknown_device_a_whole_one() -> None:
    profiles = {"GPU-0": None, "MIG-a": "1g.10gb", "MIG-c": "3g.40gb"}
    assert held_share(["GPU-0", "MIG-a"], profiles) == pytest.approx(1 + 1 / 7)
    assert held_share(["MIG-c", "GPU-lost"], profiles) == pytest.approx(3 / 7 + 1)


def test_gpu_time_between_samples_is_idle_only_when_the_sample_saw_it_idle() -> None:
    busy, idle = account(2.0, since=100, now=160, idle=False), account(1 / 7, since=0, now=700, idle=True)
    assert (busy.gpu_seconds, busy.idle_gpu_seconds) == (120, 0)
    assert (idle.gpu_seconds, idle.idle_gpu_seconds) == pytest.approx((100, 100))
    assert account(1.0, since=200, now=100, idle=True).gpu_seconds == 0  # a clock that went back counts nothing
