"""How devices reach a container."""

from gpuspawner.injection import device_requests, gpu_environment

UUIDS = ("GPU-a", "MIG-b")


def test_nvidia_device_requests_name_the_uuids() -> None:
    assert device_requests(UUIDS, mode="nvidia") == [
        {"Driver": "nvidia", "DeviceIDs": ["GPU-a", "MIG-b"], "Capabilities": [["gpu"]]}
    ]


def test_cdi_device_requests_use_cdi_names() -> None:
    assert device_requests(UUIDS, mode="cdi") == [
        {"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=GPU-a", "nvidia.com/gpu=MIG-b"]}
    ]


def test_no_devices_no_requests() -> None:
    assert device_requests((), mode="nvidia") == []


def test_environment_names_the_same_devices_in_pci_order() -> None:
    assert gpu_environment(UUIDS) == {"NVIDIA_VISIBLE_DEVICES": "GPU-a,MIG-b", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_cpu_only_servers_see_no_gpu_even_from_cuda_images() -> None:
    assert gpu_environment(())["NVIDIA_VISIBLE_DEVICES"] == "void"
