"""The allocation decision: which devices a server gets, and why not when none fit."""

from __future__ import annotations

import pytest

from gpuspawner.allocation import GPURequest, Grant, Holder, Refusal, allocate
from gpuspawner.devices import Device, GiB, Inventory, Process

ME = Holder("ada")
THRESHOLD = 1 * GiB


def gpu(n: int, *, name: str = "NVIDIA A100-SXM4-80GB", memory: int = 80, **kw: object) -> Device:
    fields: dict = dict(
        uuid=f"GPU-{n}", index=n, name=name, memory_total=memory * GiB, memory_used=0,
        pci_bus_id=f"00000000:{0x10 + n:02X}:00.0",
    )
    fields.update(kw)
    return Device(**fields)


def mig(parent: int, slot: int, profile: str = "1g.10gb", memory: int = 10) -> Device:
    return Device(
        uuid=f"MIG-{parent}-{slot}", index=parent, name=f"NVIDIA A100-SXM4-80GB MIG {profile}",
        memory_total=memory * GiB, memory_used=0, pci_bus_id=f"00000000:{0x10 + parent:02X}:00.0",
        parent_uuid=f"GPU-{parent}", mig_profile=profile,
    )


def inv(*devices: Device, topology: dict | None = None, problem: str | None = None) -> Inventory:
    return Inventory(devices=devices, driver_version="550.54.15", cuda_driver_version="12.4",
                     topology=topology or {}, problem=problem)


def run(request: GPURequest, inventory: Inventory, claims: dict[str, Holder] | None = None) -> Grant | Refusal:
    return allocate(request, inventory, claims or {}, holder=ME, busy_memory_threshold=THRESHOLD)


def granted(result: Grant | Refusal) -> tuple[str, ...]:
    assert isinstance(result, Grant), result.message(admin=True)
    return result.uuids


@pytest.mark.parametrize(
    ("request_", "devices", "claims", "expected"),
    [
        (GPURequest(), [gpu(0)], {}, ()),
        (GPURequest(count=1), [gpu(0), gpu(1)], {}, ("GPU-0",)),
        (GPURequest(count=1), [gpu(0), gpu(1)], {"GPU-0": Holder("bob")}, ("GPU-1",)),
        (GPURequest(count=1), [gpu(0, processes=(Process(1, GiB),)), gpu(1)], {}, ("GPU-1",)),
        (GPURequest(count=1), [gpu(0, memory_used=2 * GiB), gpu(1)], {}, ("GPU-1",)),
        (GPURequest(count=1), [gpu(0, memory_used=GiB // 2), gpu(1)], {}, ("GPU-0",)),
        (GPURequest(count=1), [gpu(0, healthy=False, problem="lost"), gpu(1)], {}, ("GPU-1",)),
        (GPURequest(count=1), [gpu(0), gpu(1)], {"GPU-0": ME}, ("GPU-0",)),
        (GPURequest(count=1, model="H100"), [gpu(0), gpu(1, name="NVIDIA H100 80GB HBM3")], {}, ("GPU-1",)),
        (GPURequest(count=1, model="a100|h100"), [gpu(0, name="Tesla T4", memory=16), gpu(1)], {}, ("GPU-1",)),
        (GPURequest(count=1, min_memory=40 * GiB), [gpu(0, memory=24), gpu(1, memory=48)], {}, ("GPU-1",)),
        (GPURequest(mig_profile="1g.10gb"), [gpu(0, mig_enabled=True), mig(0, 0, "3g.40gb", 40), mig(0, 1)], {}, ("MIG-0-1",)),
        (GPURequest(mig_profile="1g.10gb"), [gpu(0, mig_enabled=True), mig(0, 0), mig(0, 1)], {"MIG-0-0": Holder("bob")}, ("MIG-0-1",)),
        (GPURequest(count=1), [gpu(0, mig_enabled=True), mig(0, 0), gpu(1)], {}, ("GPU-1",)),
        # the stable order is the PCI bus id, not the NVML index
        (GPURequest(count=1), [gpu(0, pci_bus_id="00000000:90:00.0"), gpu(1)], {}, ("GPU-1",)),
    ],
    ids=[
        "cpu-only-gets-nothing", "first-free-in-order", "held-by-another-server-skipped",
        "compute-process-outside-hub-skipped", "memory-used-above-threshold-skipped",
        "memory-used-below-threshold-free", "unhealthy-skipped", "own-claim-is-free-for-self",
        "model-match", "model-regex-case-insensitive", "min-memory", "mig-profile-match",
        "mig-held-slice-skipped", "mig-parent-never-whole", "pci-bus-order",
    ],
)
def test_grants(request_: GPURequest, devices: list[Device], claims: dict[str, Holder], expected: tuple[str, ...]) -> None:
    assert granted(run(request_, inv(*devices), claims)) == expected


def test_two_gpus_prefer_the_same_pcie_switch_over_lower_order() -> None:
    # GPU-0 and GPU-1 are on different NUMA nodes; GPU-1 and GPU-2 share a switch.
    topology = {
        frozenset(("GPU-0", "GPU-1")): 50,
        frozenset(("GPU-0", "GPU-2")): 50,
        frozenset(("GPU-1", "GPU-2")): 10,
    }
    assert granted(run(GPURequest(count=2), inv(gpu(0), gpu(1), gpu(2), topology=topology))) == ("GPU-1", "GPU-2")


def test_four_of_eight_gpus_take_one_numa_node_when_the_other_is_partly_used() -> None:
    gpus = [gpu(i) for i in range(8)]
    topology = {}
    for a in range(8):
        for b in range(a + 1, 8):
            same_switch, same_node = a // 2 == b // 2, a // 4 == b // 4
            topology[frozenset((f"GPU-{a}", f"GPU-{b}"))] = 10 if same_switch else 40 if same_node else 50
    claims = {"GPU-0": Holder("bob")}  # node 0 has only 3 free GPUs left
    assert granted(run(GPURequest(count=4), inv(*gpus, topology=topology), claims)) == (
        "GPU-4", "GPU-5", "GPU-6", "GPU-7",
    )


def test_without_topology_the_lowest_in_order_are_chosen() -> None:
    assert granted(run(GPURequest(count=2), inv(gpu(3), gpu(1), gpu(2)))) == ("GPU-1", "GPU-2")


def test_same_inputs_same_choice() -> None:
    inventory = inv(*(gpu(i) for i in range(8)))
    claims = {"GPU-2": Holder("bob"), "GPU-5": Holder("eve", "x")}
    results = {run(GPURequest(count=3), inventory, claims) for _ in range(20)}
    assert len(results) == 1


def test_refusal_counts_and_names_holders_for_admins_only() -> None:
    inventory = inv(gpu(0), gpu(1), gpu(2, processes=(Process(9, GiB),)), gpu(3, healthy=False, problem="lost"))
    claims = {"GPU-0": Holder("bob"), "GPU-1": Holder("eve", "train")}
    result = run(GPURequest(count=1, model="A100", min_memory=40 * GiB), inventory, claims)
    assert isinstance(result, Refusal)
    assert result.message() == (
        "No free GPU for this server: needs 1 × A100 ≥ 40 GiB; 0 free, 2 held by other servers, "
        "1 busy outside the hub, 1 unhealthy. Try again when a server stops."
    )
    assert "bob" not in result.message() and "eve" not in result.message()
    assert result.message(admin=True).endswith("Held by: bob, eve/train.")
    assert result.can_wait


def test_refusal_when_the_host_never_has_enough() -> None:
    result = run(GPURequest(count=4), inv(gpu(0), gpu(1)))
    assert isinstance(result, Refusal)
    assert "2 free" in result.message()
    assert "never has that many" in result.message()
    assert not result.can_wait


def test_refusal_when_nothing_matches_says_what_the_host_has() -> None:
    result = run(GPURequest(count=1, model="H100"), inv(gpu(0), gpu(1)))
    assert isinstance(result, Refusal)
    assert result.message() == (
        "No GPU on this host matches: needs 1 × H100; this host has 2 × NVIDIA A100-SXM4-80GB."
    )
    assert not result.can_wait


def test_refusal_without_a_driver() -> None:
    result = run(GPURequest(count=1), inv(problem="no NVIDIA driver is usable on this host (NVML: Driver Not Loaded)"))
    assert isinstance(result, Refusal)
    assert result.message() == (
        "No GPU available: needs 1 × any GPU, and no NVIDIA driver is usable on this host (NVML: Driver Not Loaded)."
    )
    assert not result.can_wait


def test_cpu_only_requests_need_no_driver() -> None:
    assert granted(run(GPURequest(), inv(problem="no driver"))) == ()


@pytest.mark.parametrize(
    ("request_", "text"),
    [
        (GPURequest(), "no GPU"),
        (GPURequest(count=1), "1 × any GPU"),
        (GPURequest(count=2, model="A100|H100", min_memory=40 * GiB), "2 × A100|H100 ≥ 40 GiB"),
        (GPURequest(mig_profile="1g.10gb"), "1 × MIG 1g.10gb"),
    ],
    ids=["none", "one", "two-with-model-and-memory", "mig"],
)
def test_requests_in_words(request_: GPURequest, text: str) -> None:
    assert request_.describe() == text


# --- Availability on the spawn form, and quotas ----------------------------------------------------

from gpuspawner.allocation import Availability, availability, quota_for, quota_refusal  # noqa: E402


@pytest.mark.parametrize(
    ("request_", "inventory", "claims", "expected"),
    [
        (GPURequest(), inv(problem="no driver"), {}, Availability(True, "no GPU needed")),
        (GPURequest(count=1), inv(problem="no driver"), {}, Availability(False, "no NVIDIA driver on this host")),
        (GPURequest(count=1, model="H100"), inv(gpu(0, name="NVIDIA H100 80GB HBM3"), gpu(1, name="NVIDIA H100 80GB HBM3"), gpu(2)),
         {"GPU-0": Holder("bob")}, Availability(True, "1 of 2 NVIDIA H100 80GB HBM3 free")),
        (GPURequest(count=1), inv(gpu(0), gpu(1)), {"GPU-0": Holder("bob"), "GPU-1": Holder("eve")},
         Availability(False, "none free (2 × NVIDIA A100-SXM4-80GB, all in use)")),
        (GPURequest(count=2), inv(gpu(0), gpu(1)), {"GPU-0": Holder("bob")},
         Availability(False, "1 of 2 NVIDIA A100-SXM4-80GB free, needs 2")),
        (GPURequest(mig_profile="1g.10gb"), inv(gpu(0, mig_enabled=True), mig(0, 0), mig(0, 1)), {},
         Availability(True, "2 of 2 MIG 1g.10gb free")),
        (GPURequest(count=1, model="H100"), inv(gpu(0)), {}, Availability(False, "no matching GPU on this host")),
    ],
    ids=["cpu", "no-driver", "some-free", "none-free", "not-enough", "mig", "no-match"],
)
def test_availability_in_words(request_: GPURequest, inventory: Inventory, claims: dict, expected: Availability) -> None:
    assert availability(request_, inventory, claims, holder=ME, busy_memory_threshold=THRESHOLD) == expected


def test_quota_is_the_largest_of_the_users_groups_else_the_default() -> None:
    assert quota_for(["students"], default=2, per_group={"students": 1, "staff": 4}) == 1
    assert quota_for(["students", "staff"], default=2, per_group={"students": 1, "staff": 4}) == 4
    assert quota_for(["guests"], default=2, per_group={"students": 1}) == 2
    assert quota_for([], default=None, per_group={}) is None


def test_quota_counts_the_users_other_servers() -> None:
    claims = {"GPU-0": Holder("ada", "train"), "MIG-1-0": Holder("ada", "eval"), "GPU-2": Holder("bob")}
    assert quota_refusal(GPURequest(count=1), claims, holder=Holder("ada", "new"), quota=3) is None
    message = quota_refusal(GPURequest(count=2), claims, holder=Holder("ada", "new"), quota=3)
    assert message == (
        "GPU quota reached: you may hold 3 GPUs across your servers; 2 held by your other servers "
        "(eval, train), and this server needs 2. Stop another server or choose a profile with fewer GPUs."
    )
    # a server's own earlier devices do not count against it; CPU-only never does
    assert quota_refusal(GPURequest(count=1), claims, holder=Holder("ada", "train"), quota=2) is None
    assert quota_refusal(GPURequest(), claims, holder=Holder("ada", "new"), quota=0) is None


# --- Several nodes (a Docker Swarm): one server's devices are all on one node --------------------------


def on(node: str, *numbers: int) -> list[Device]:
    """GPUs of one node of a swarm (the bus order puts lower numbers first, whatever the node)."""
    return [gpu(n, node=node) for n in numbers]


@pytest.mark.parametrize(
    ("request_", "devices", "claims", "expected"),
    [
        # 2 free in all, one on each node: the request fits no node
        (GPURequest(count=2), on("n1", 0, 1) + on("n2", 2, 3), {"GPU-1": Holder("bob"), "GPU-3": Holder("eve")}, None),
        (GPURequest(count=2), on("n1", 0, 1) + on("n2", 2, 3, 4), {"GPU-1": Holder("bob")}, ("GPU-2", "GPU-3")),
        (GPURequest(count=3), on("n1", 0, 1, 2) + on("n2", 3, 4, 5), {"GPU-0": Holder("bob"), "GPU-4": Holder("eve")}, None),
        (GPURequest(count=4), on("n1", 0, 1, 2, 3) + on("n2", 4, 5), {}, ("GPU-0", "GPU-1", "GPU-2", "GPU-3")),
    ],
    ids=["one-free-on-each-node-refused", "served-on-the-node-that-has-two", "three-never-split-two-plus-one",
         "four-on-the-node-with-four"],
)
def test_a_multi_gpu_server_gets_all_its_gpus_on_one_node(
    request_: GPURequest, devices: list[Device], claims: dict[str, Holder], expected: tuple[str, ...] | None,
) -> None:
    result = run(request_, inv(*devices), claims)
    if expected is None:
        assert isinstance(result, Refusal), f"granted across nodes: {result}"
    else:
        assert granted(result) == expected
        assert len({d.node for d in result.devices}) == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("devices", "claims", "expected"),
    [
        (on("n1", 0, 1, 2, 3) + on("n2", 4, 5), {"GPU-5": Holder("bob")}, ("GPU-4",)),
        (on("n1", 0, 1) + on("n2", 2, 3, 4, 5), {"GPU-1": Holder("bob")}, ("GPU-0",)),
        (on("n2", 0, 1) + on("n1", 2, 3), {}, ("GPU-2",)),
    ],
    ids=["goes-to-the-node-with-one-free", "first-node-has-fewer-free", "a-tie-goes-to-the-first-node-by-id"],
)
def test_a_one_gpu_server_goes_where_fewest_are_free_so_a_whole_node_stays_for_big_requests(
    devices: list[Device], claims: dict[str, Holder], expected: tuple[str, ...],
) -> None:
    inventory = inv(*devices)
    assert granted(run(GPURequest(count=1), inventory, claims)) == expected


def test_after_small_servers_a_four_gpu_server_still_finds_a_whole_node() -> None:
    inventory = inv(*on("n1", 0, 1, 2, 3), *on("n2", 4, 5, 6, 7))
    claims: dict[str, Holder] = {}
    for user in ("bob", "cyd", "dan"):  # three 1-GPU servers, one after another
        result = allocate(GPURequest(count=1), inventory, claims, holder=Holder(user), busy_memory_threshold=THRESHOLD)
        claims.update((u, Holder(user)) for u in granted(result))
    assert len({inventory.by_uuid()[u].node for u in claims}) == 1
    assert len(granted(run(GPURequest(count=4), inventory, claims))) == 4


def test_on_one_host_the_devices_of_the_hub_s_own_engine_count_as_one_node() -> None:
    assert granted(run(GPURequest(count=2), inv(gpu(0), gpu(1)), {})) == ("GPU-0", "GPU-1")


def test_topology_is_weighed_only_among_the_gpus_of_the_chosen_node() -> None:
    # GPU-0 and GPU-4 would be close if they were on one host; on two nodes they cannot go together.
    topology = {frozenset(("GPU-0", "GPU-4")): 10, frozenset(("GPU-4", "GPU-5")): 50, frozenset(("GPU-5", "GPU-6")): 10,
                frozenset(("GPU-4", "GPU-6")): 50}
    inventory = inv(*on("n1", 0), *on("n2", 4, 5, 6), topology=topology)
    assert granted(run(GPURequest(count=2), inventory)) == ("GPU-5", "GPU-6")
