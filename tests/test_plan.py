"""A spawn's plan: built fresh from the profile and the values configured when it begins."""

from __future__ import annotations

from typing import Any

import pytest

from gpuspawner.allocation import GPURequest
from gpuspawner.devices import GiB
from gpuspawner.limits import Limits
from gpuspawner.plan import Configured, SpawnPlan, spawn_plan
from gpuspawner.profiles import parse_profiles

A100, BARE = parse_profiles([
    {"slug": "a100-1", "display_name": "1 × A100", "image": "lab/pytorch:2024.10", "gpus": {"count": 1, "model": "A100"},
     "cpu_limit": 8, "mem_limit": "64G", "environment": {"OMP_NUM_THREADS": "8"}},
    {"slug": "bare", "display_name": "Bare", "image": "lab/notebook:2024.10"},
])


def configured(**changes: Any) -> Configured:
    values: dict[str, Any] = {
        "image": "lab/base:1", "mem_limit": 4 * GiB, "cpu_limit": 2.0,
        "environment": {"LANG": "C.UTF-8", "CALLED": lambda spawner: "x"}, "gpu_request": GPURequest(),
    }
    return Configured(**{**values, **changes})


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (spawn_plan(None, configured()),
         SpawnPlan(image="lab/base:1", mem_limit=4 * GiB, cpu_limit=2.0, gpus=GPURequest(), environment={"LANG": "C.UTF-8"})),
        (spawn_plan(None, configured(gpu_request=GPURequest(count=2)), image_option="lab/other:2"),
         SpawnPlan(image="lab/other:2", mem_limit=4 * GiB, cpu_limit=2.0, gpus=GPURequest(count=2),
                   environment={"LANG": "C.UTF-8"})),
        (spawn_plan(BARE, configured(gpu_request=GPURequest(count=1))),
         SpawnPlan(image="lab/notebook:2024.10", mem_limit=4 * GiB, cpu_limit=2.0, gpus=GPURequest(),
                   environment={"LANG": "C.UTF-8"}, profile=BARE, profile_hash=spawn_plan(BARE, configured()).profile_hash)),
    ],
    ids=["configured-values", "allowed-image-option", "profile-keeps-configured-limits"],
)
def test_a_plan_takes_what_the_profile_does_not_set_from_the_configured_values(plan: SpawnPlan, expected: SpawnPlan) -> None:
    assert plan == expected


def test_a_profile_sets_its_image_limits_gpus_and_environment() -> None:
    plan = spawn_plan(A100, configured())
    assert (plan.image, plan.mem_limit, plan.cpu_limit) == ("lab/pytorch:2024.10", 64 * GiB, 8.0)
    assert plan.gpus == GPURequest(count=1, model="A100")
    assert plan.environment == {"LANG": "C.UTF-8", "OMP_NUM_THREADS": "8"}
    assert plan.profile_environment == {"OMP_NUM_THREADS": "8"}
    assert plan.profile_slug == "a100-1" and plan.profile_hash


def test_without_a_profile_the_plan_names_none() -> None:
    plan = spawn_plan(None, configured())
    assert (plan.profile_slug, plan.profile_hash, dict(plan.profile_environment)) == ("", None, {})


def test_a_kept_container_is_reused_only_for_the_same_settings() -> None:
    plan = spawn_plan(A100, configured())
    same = {"image": "lab/torch@sha256:" + "a" * 64, "image_id": "sha256:" + "b" * 64, "devices": ("GPU-1",)}
    base = plan.settings_hash(**same)
    assert base == spawn_plan(A100, configured()).settings_hash(**same)
    assert base != plan.settings_hash(**{**same, "image": "lab/torch@sha256:" + "c" * 64})
    assert base != plan.settings_hash(**{**same, "devices": ("GPU-2",)})
    assert base == spawn_plan(A100, configured(mem_limit=GiB)).settings_hash(**same)  # the profile's limit is in force
    bare = spawn_plan(BARE, configured()).settings_hash(**same)
    assert bare != spawn_plan(BARE, configured(mem_limit=GiB)).settings_hash(**same)  # the configured limit is in force


def test_the_recorded_environment_keeps_no_secret() -> None:
    plan = spawn_plan(None, configured(environment={"HF_TOKEN": "hf_x", "LAB_LICENSE": "1234@lic", "LANG": "C"}))
    assert plan.recorded_environment(["LAB_*"]) == {"HF_TOKEN": "<redacted>", "LAB_LICENSE": "<redacted>", "LANG": "C"}


def test_time_limits_hold_for_gpu_servers_and_a_profiles_own_win() -> None:
    hub_wide = Limits(max_runtime=8 * 3600, idle_timeout=7200, idle_threshold=5, warn_before=300)
    timed = parse_profiles([
        {"slug": "timed", "display_name": "T", "image": "lab/pytorch:2024.10", "gpus": 1, "max_runtime": "2h",
         "gpu_idle_threshold": 10},
        {"slug": "cpu-timed", "display_name": "C", "image": "lab/notebook:2024.10", "max_runtime": "1h"},
    ])
    assert spawn_plan(A100, configured(limits=hub_wide)).limits == hub_wide  # a GPU profile without its own
    assert spawn_plan(timed[0], configured(limits=hub_wide)).limits == Limits(
        max_runtime=7200, idle_timeout=7200, idle_threshold=10, warn_before=300)
    assert spawn_plan(BARE, configured(limits=hub_wide)).limits == Limits(warn_before=300)  # CPU only: none
    assert spawn_plan(timed[1], configured(limits=hub_wide)).limits == Limits(max_runtime=3600, warn_before=300)
    assert spawn_plan(None, configured(limits=hub_wide)).limits == Limits()  # gpu_request 0
    assert spawn_plan(None, configured(limits=hub_wide, gpu_request=GPURequest(count=1))).limits == hub_wide
