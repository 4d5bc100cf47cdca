"""How devices reach a container, and the check that nothing else does."""

from __future__ import annotations

from typing import Any

import pytest
from docker.types import DeviceRequest, HostConfig, Mount

from gpuspawner.injection import InjectionError, InjectionMode, check_create_request, device_requests, gpu_environment

UUIDS = ("GPU-a", "MIG-b")
API = "1.43"  # the Docker API version docker-py builds host configs for here


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


# --- The create request, checked just before the engine call ---------------------------------------


def create_request(
    granted: tuple[str, ...] = ("GPU-a",),
    *,
    mode: InjectionMode = "nvidia",
    environment: dict[str, str] | list[str] | None = None,
    raw_host_config: dict[str, Any] | None = None,
    **host_config: Any,
) -> dict[str, Any]:
    """What DockerSpawner then GPUSpawner.docker() hand docker-py: admin settings merged in.

    `host_config` goes through docker-py (as DockerSpawner.extra_host_config does);
    `raw_host_config` is merged in as is (as DockerSpawner.extra_create_kwargs['host_config']).
    """
    host_config.setdefault("binds", ["jupyterhub-user-ada:/home/jovyan:rw"])
    built = dict(HostConfig(version=API, **host_config))
    built.update(raw_host_config or {})
    requests = device_requests(granted, mode=mode)
    if requests:
        built["DeviceRequests"] = requests
    env: dict[str, str] | list[str] = {"JUPYTERHUB_USER": "ada", **gpu_environment(granted)}
    if isinstance(environment, list):
        env = environment
    elif environment:
        env = {**env, **environment}
    return {
        "image": "quay.io/jupyter/base-notebook:2024-05-27",
        "environment": env,
        "host_config": built,
        "labels": {"org.gpuspawner.hub": "hub-1"},
        "name": "jupyter-ada",
    }


def check(request: dict[str, Any], granted: tuple[str, ...] = ("GPU-a",), mode: InjectionMode = "nvidia") -> None:
    check_create_request(request, granted=granted, mode=mode)


ALL_GPUS = {"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}
OTHER_GPU = {"Driver": "nvidia", "DeviceIDs": ["GPU-z"], "Capabilities": [["gpu"]]}
MINE = device_requests(("GPU-a",), mode="nvidia")


@pytest.mark.parametrize(
    "request_, granted, mode, refused, fix",
    [
        (create_request(raw_host_config={"DeviceRequests": [ALL_GPUS]}, granted=()), (), "nvidia",
         "Refused the device requests [{\"Driver\": \"nvidia\", \"Count\": -1", "'device_requests' from DockerSpawner.extra_host_config"),
        (create_request((), device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])]), (), "nvidia",
         "this server was granted no GPU", "'device_requests' from DockerSpawner.extra_host_config"),
        ({**create_request(), "host_config": {"DeviceRequests": [*MINE, OTHER_GPU]}}, ("GPU-a",), "nvidia",
         "Refused the device requests", "'DeviceRequests' from DockerSpawner.extra_create_kwargs['host_config']"),
        ({**create_request(), "host_config": {"DeviceRequests": [OTHER_GPU]}}, ("GPU-a",), "nvidia",
         "\"GPU-z\"", "DeviceRequests"),
        ({**create_request(), "host_config": {"DeviceRequests": [{"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=all"]}]}},
         ("GPU-a",), "nvidia", "nvidia.com/gpu=all", "DeviceRequests"),
        ({**create_request(), "host_config": {"DeviceRequests": [{"Count": 1, "Capabilities": [["gpu"]]}]}},
         ("GPU-a",), "nvidia", "\"Capabilities\": [[\"gpu\"]]", "DeviceRequests"),
        (create_request(mode="nvidia"), ("GPU-a",), "cdi", "(here: [{\"Driver\": \"cdi\"", "DeviceRequests"),
        (create_request(raw_host_config={"devicerequests": [ALL_GPUS]}), ("GPU-a",), "nvidia",
         "\"Count\": -1", "DeviceRequests"),
        (create_request(raw_host_config={"DeviceRequeſts": [ALL_GPUS]}), ("GPU-a",), "nvidia",
         "\"Count\": -1", "DeviceRequests"),
        (create_request(privileged=True), ("GPU-a",), "nvidia",
         "Refused a privileged container: a privileged container sees every GPU on the host", "'privileged' from"),
        (create_request((), raw_host_config={"privileged": True}), (), "nvidia", "privileged container", "'Privileged'"),
        (create_request(runtime="nvidia"), ("GPU-a",), "nvidia",
         "Refused runtime 'nvidia': the NVIDIA runtime hands out GPUs by environment variable", "'runtime' from"),
        ({**create_request(), "runtime": "nvidia"}, ("GPU-a",), "nvidia", "Refused runtime 'nvidia'",
         "'runtime' from DockerSpawner.extra_create_kwargs"),
        (create_request(devices=["/dev/nvidia1"]), ("GPU-a",), "nvidia",
         "Refused device '/dev/nvidia1': it is, or holds, a GPU's device node", "'devices' from DockerSpawner.extra_host_config"),
        (create_request(devices=["/dev/nvidia-caps/nvidia-cap1"]), ("GPU-a",), "nvidia", "'/dev/nvidia-caps/nvidia-cap1'", "'devices'"),
        (create_request(devices=["/dev/dri/renderD128:/dev/dri/renderD128:rw"]), ("GPU-a",), "nvidia",
         "Refused device '/dev/dri/renderD128'", "'devices'"),
        (create_request(devices=["/dev"]), ("GPU-a",), "nvidia", "Refused device '/dev'", "'devices'"),
        (create_request(raw_host_config={"Devices": [{"PathOnHost": "/dev/char/195:1", "PathInContainer": "/dev/x"}]}),
         ("GPU-a",), "nvidia", "'/dev/char/195:1'", "'Devices'"),
        (create_request(devices=["/dev/../dev//nvidia1"]), ("GPU-a",), "nvidia", "'/dev/../dev//nvidia1'", "'devices'"),
        (create_request(raw_host_config={"Devices": [{"pathonhost": "/dev/nvidia1", "PathInContainer": "/dev/x"}]}),
         ("GPU-a",), "nvidia", "'/dev/nvidia1'", "'Devices'"),
        (create_request(device_cgroup_rules=["c 195:* rwm"]), ("GPU-a",), "nvidia",
         "Refused device cgroup rule 'c 195:* rwm': it lets the container use NVIDIA GPUs (character major 195)",
         "'device_cgroup_rules' from DockerSpawner.extra_host_config"),
        (create_request(device_cgroup_rules=["a *:* rwm"]), ("GPU-a",), "nvidia", "every character device", "'DeviceCgroupRules'"),
        (create_request(device_cgroup_rules=["c 226:128 rw"]), ("GPU-a",), "nvidia", "DRM GPU nodes", "'device_cgroup_rules'"),
        (create_request(binds=["/dev/nvidia1:/dev/nvidia1"]), ("GPU-a",), "nvidia",
         "Refused bind mount '/dev/nvidia1:/dev/nvidia1': it mounts a GPU's device node", "DockerSpawner.volumes"),
        (create_request(binds=["/dev/null:/var/run/nvidia-container-devices/all"]), ("GPU-a",), "nvidia",
         "a mount under /var/run/nvidia-container-devices asks the NVIDIA runtime for GPUs", "DockerSpawner.volumes"),
        (create_request(mounts=[Mount("/run/nvidia-container-devices/GPU-z", "/dev/null", type="bind")]), ("GPU-a",), "nvidia",
         "Refused mount of '/dev/null' at '/run/nvidia-container-devices/GPU-z'", "DockerSpawner.mounts"),
        (create_request(raw_host_config={"Annotations": {"cdi.k8s.io/gpus": "nvidia.com/gpu=all"}}), ("GPU-a",), "nvidia",
         "Refused annotation 'cdi.k8s.io/gpus': the NVIDIA runtime reads CDI annotations", "'Annotations'"),
        (create_request(environment={"NVIDIA_VISIBLE_DEVICES": "all"}), ("GPU-a",), "nvidia",
         "Refused NVIDIA_VISIBLE_DEVICES='all': this server was granted GPU-a, so it must be 'GPU-a'",
         "DockerSpawner.extra_create_kwargs['environment']"),
        (create_request(environment={"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-z"}), ("GPU-a",), "nvidia",
         "Refused NVIDIA_VISIBLE_DEVICES='GPU-a,GPU-z'", "['environment']"),
        (create_request(environment=["NVIDIA_VISIBLE_DEVICES=all"]), ("GPU-a",), "nvidia",
         "Refused NVIDIA_VISIBLE_DEVICES='all'", "['environment']"),
        (create_request(environment=["NVIDIA_VISIBLE_DEVICES=GPU-a", "NVIDIA_VISIBLE_DEVICES=all"]), ("GPU-a",), "nvidia",
         "Refused NVIDIA_VISIBLE_DEVICES='all'", "['environment']"),
        (create_request((), environment=["NVIDIA_VISIBLE_DEVICES"]), (), "nvidia",
         "Refused NVIDIA_VISIBLE_DEVICES without a value: this server was granted no GPU, so it must be 'void'", "['environment']"),
        (create_request(environment=["JUPYTERHUB_USER=ada"]), ("GPU-a",), "nvidia",
         "Refused an environment without NVIDIA_VISIBLE_DEVICES: it must be 'GPU-a'", "Spawner.environment"),
        (create_request(environment={"NVIDIA_MIG_CONFIG_DEVICES": "all"}), ("GPU-a",), "nvidia",
         "Refused NVIDIA_MIG_CONFIG_DEVICES='all': it hands the container MIG set-up", "Spawner.environment"),
    ],
    ids=[
        "requests-without-a-grant", "docker-py-count-all-without-a-grant", "an-extra-request", "another-uuid",
        "another-driver", "capabilities-gpu-by-count", "nvidia-requests-in-cdi-mode", "lower-case-key",
        "unicode-folded-key", "privileged", "privileged-lower-case-raw", "runtime-nvidia", "runtime-create-kwarg",
        "device-nvidia", "device-nvidia-caps", "device-dri", "device-dev-directory", "device-char-symlink",
        "device-unnormalised-path", "device-raw-lower-case-key", "cgroup-rule-195", "cgroup-rule-all", "cgroup-rule-dri",
        "bind-device-node", "bind-device-list", "mount-device-list", "annotation-cdi", "env-all", "env-another-gpu",
        "env-list-form", "env-list-duplicate", "env-name-without-value", "env-missing", "env-mig-config",
    ],
)
def test_a_request_reaching_beyond_the_grant_is_refused_naming_the_setting(
    request_: dict[str, Any], granted: tuple[str, ...], mode: InjectionMode, refused: str, fix: str
) -> None:
    with pytest.raises(InjectionError) as raised:
        check(request_, granted, mode)
    message = str(raised.value)
    assert refused in message and fix in message, message


@pytest.mark.parametrize(
    "request_, granted, mode",
    [
        (create_request(UUIDS), UUIDS, "nvidia"),
        (create_request(UUIDS, mode="cdi"), UUIDS, "cdi"),
        (create_request(()), (), "nvidia"),
        (create_request((), mode="cdi"), (), "cdi"),
        (create_request(environment=["JUPYTERHUB_USER=ada", "NVIDIA_VISIBLE_DEVICES=GPU-a"]), ("GPU-a",), "nvidia"),
        (create_request(binds=["/srv/data:/data:ro"], mem_limit="32g", shm_size="2g"), ("GPU-a",), "nvidia"),
        (create_request(devices=["/dev/fuse"], cap_add=["SYS_ADMIN"], device_cgroup_rules=["c 10:229 rwm"]), ("GPU-a",), "nvidia"),
        (create_request(mounts=[Mount("/home/jovyan/work", "ada-work")], runtime="runc"), ("GPU-a",), "nvidia"),
        (create_request(environment={"CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "8"}), ("GPU-a",), "nvidia"),
        (create_request(raw_host_config={"Annotations": {"org.example/team": "vision"}, "Privileged": False}), ("GPU-a",), "nvidia"),
    ],
    ids=[
        "spawner-request-nvidia", "spawner-request-cdi", "no-gpu-nvidia", "no-gpu-cdi", "env-list-form-with-the-grant",
        "binds-and-memory", "fuse-device", "volume-mount-and-runc", "other-variables", "other-annotations",
    ],
)
def test_the_spawners_own_request_and_harmless_admin_settings_pass(
    request_: dict[str, Any], granted: tuple[str, ...], mode: InjectionMode
) -> None:
    check(request_, granted, mode)


def test_every_problem_is_named_at_once_one_sentence_each() -> None:
    request = create_request(privileged=True, devices=["/dev/nvidia1"], environment={"NVIDIA_VISIBLE_DEVICES": "all"})
    with pytest.raises(InjectionError) as raised:
        check(request)
    assert [p.split(":")[0] for p in raised.value.problems] == [
        "Refused a privileged container", "Refused device '/dev/nvidia1'", "Refused NVIDIA_VISIBLE_DEVICES='all'"
    ]
    assert str(raised.value) == " ".join(raised.value.problems)


def test_the_privileged_message_in_full() -> None:
    with pytest.raises(InjectionError) as raised:
        check(create_request(privileged=True))
    assert str(raised.value) == (
        "Refused a privileged container: a privileged container sees every GPU on the host, whatever its grant. "
        "Remove 'privileged' from DockerSpawner.extra_host_config "
        "(or 'Privileged' from DockerSpawner.extra_create_kwargs['host_config'])."
    )
