"""Configuration values: parsed the same everywhere, refused with a message an admin can act on."""

import pytest
from traitlets.config import Config

from gpuspawner.allocation import GPURequest
from gpuspawner.devices import GiB, MiB
from gpuspawner.hubconfig import spawner_settings
from gpuspawner.settings import ConfigError, parse_bytes, parse_gpu_request
from gpuspawner.upkeep import checked_config

WHERE = "GPUSpawner.gpu_request"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, GPURequest()),
        (None, GPURequest()),
        (2, GPURequest(count=2)),
        ({"count": 1, "model": "A100|H100", "min_memory": "40G"}, GPURequest(count=1, model="A100|H100", min_memory=40 * GiB)),
        ({"mig_profile": "1g.10gb"}, GPURequest(mig_profile="1g.10gb")),
        ({"mig_profile": "1g.10gb", "count": 1}, GPURequest(mig_profile="1g.10gb")),
    ],
    ids=["zero", "none", "int-shorthand", "full-dict", "mig", "mig-with-count-1"],
)
def test_gpu_requests_parse(value: object, expected: GPURequest) -> None:
    assert parse_gpu_request(value, where=WHERE) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"cuont": 1}, "GPUSpawner.gpu_request has unknown key 'cuont'; allowed keys: count, mig_profile, model, min_memory."),
        ({"count": -1}, "GPUSpawner.gpu_request: 'count' is -1; allowed: a whole number of GPUs, 0 or more."),
        ({"count": True}, "GPUSpawner.gpu_request: 'count' is True; allowed: a whole number of GPUs, 0 or more."),
        ({"count": 2, "mig_profile": "1g.10gb"}, "GPUSpawner.gpu_request: 'count' is 2 with 'mig_profile' '1g.10gb'; a server gets one MIG device."),
        ({"mig_profile": "small"}, "GPUSpawner.gpu_request: 'mig_profile' is 'small'; allowed: a MIG profile name such as '1g.10gb'"),
        ({"count": 1, "model": "A100("}, "GPUSpawner.gpu_request: 'model' is 'A100(', which is not a valid regular expression"),
        ({"count": 1, "min_memory": "lots"}, "GPUSpawner.gpu_request: 'min_memory' is 'lots'; allowed: a size such as 40G"),
        ({"model": "A100"}, "GPUSpawner.gpu_request sets 'model' or 'min_memory' but asks for no GPU"),
        ("one", "GPUSpawner.gpu_request is 'one'; allowed: a number of GPUs, or a dict"),
    ],
    ids=["unknown-key", "negative-count", "bool-count", "mig-with-count", "bad-mig-profile", "bad-regex",
         "bad-memory", "model-without-gpu", "wrong-type"],
)
def test_bad_gpu_requests_are_refused_with_where_what_and_allowed(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_gpu_request(value, where=WHERE)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (1024, 1024), ("40G", 40 * GiB), ("40GiB", 40 * GiB), ("40 GB", 40 * GiB), ("512M", 512 * MiB), ("1.5G", 3 * GiB // 2)],
)
def test_sizes(value: object, expected: int) -> None:
    assert parse_bytes(value, where="x") == expected


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"GPUSpawner": {"gpu_request": {"count": "two"}}}, "GPUSpawner.gpu_request: 'count' is 'two'"),
        ({"GPUSpawner": {"busy_memory_threshold": "a lot"}}, "GPUSpawner.busy_memory_threshold is 'a lot'"),
        ({"GPUSpawner": {"gpu_wait_timeout": -5}}, "GPUSpawner.gpu_wait_timeout is -5.0; allowed: a number of seconds"),
        ({"GPUSpawner": {"device_injection": "amd"}}, "The 'device_injection' trait of a GPUSpawner instance expected any of ['nvidia', 'cdi'], not the str 'amd'."),
        ({"DockerSpawner": {"extra_host_config": {"device_requests": []}}}, "GPUSpawner.extra_host_config sets 'device_requests'"),
        ({"GPUSpawner": {"docker_threads": 0}}, "GPUSpawner.docker_threads is 0; allowed: a whole number of threads, 1 or more."),
        ({"GPUSpawner": {"pull_threads": "4"}}, "The 'pull_threads' trait of a GPUSpawner instance expected an int, not the str '4'."),
        ({"GPUSpawner": {"max_gpus_per_group": {"students": -1}}}, "GPUSpawner.max_gpus_per_group['students'] is -1; allowed: a whole number, 0 or more."),
        ({"GPUSpawner": {"nvml_timeout": -1}}, "GPUSpawner.nvml_timeout is -1.0; allowed: a number of seconds, 0 or more."),
        ({"DockerSpawner": {"environment": {"GPUSPAWNER_RECORD_ID": "made-up"}}},
         "GPUSpawner.environment: 'GPUSPAWNER_RECORD_ID' is a variable of gpuspawner's own"),
    ],
    ids=["gpu-request", "threshold", "wait-timeout", "injection", "device-requests-in-host-config", "docker-threads",
         "pull-threads", "group-quota", "nvml-timeout", "environment-named-as-gpuspawners"],
)
def test_hub_config_check_names_the_trait(config: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        checked_config(Config(config))
    assert str(e.value).startswith(message)
    if "DockerSpawner" not in config:  # the commands judge GPUSpawner's own settings alike, without Docker
        with pytest.raises(ConfigError) as e:
            spawner_settings(Config(config))
        assert str(e.value).startswith(message)


def test_subclass_sections_override_the_base_section() -> None:
    from gpuspawner import GPUSpawner

    class LabSpawner(GPUSpawner):
        pass

    config = Config({"GPUSpawner": {"gpu_request": {"count": "x"}}, "LabSpawner": {"gpu_request": 1}})
    # the subclass value is the one in force, and it is fine
    assert checked_config(config, LabSpawner).gpu_request == GPURequest(count=1)
    assert spawner_settings(config, LabSpawner).gpu_request == GPURequest(count=1)


def test_a_refusal_names_the_subclass_configured() -> None:
    from gpuspawner import GPUSpawner

    class LabSpawner(GPUSpawner):
        pass

    config = Config({"LabSpawner": {"busy_memory_threshold": "lots"}})
    for check in (checked_config, spawner_settings):
        with pytest.raises(ConfigError, match=r"^LabSpawner.busy_memory_threshold is 'lots'; allowed: a size"):
            check(config, LabSpawner)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, {"max_pool_size": 18}),
        ({"GPUSpawner": {"docker_threads": 4, "pull_threads": 1}}, {"max_pool_size": 5}),
        ({"GPUSpawner": {"docker_threads": 4, "client_kwargs": {"timeout": 30}}}, {"max_pool_size": 6, "timeout": 30}),
        ({"DockerSpawner": {"client_kwargs": {"max_pool_size": 3}}}, {"max_pool_size": 3}),
    ],
    ids=["default", "threads-set", "admin-kwargs-kept", "admin-pool-size-wins"],
)
def test_the_docker_client_has_a_connection_for_every_thread(config: dict, expected: dict) -> None:
    from gpuspawner import GPUSpawner

    assert GPUSpawner(config=Config(config)).client_kwargs == expected
