"""What the spawn form's fields become: the chosen profile, DockerSpawner's image choice, or what an admin's
own ``Spawner.options_from_form`` makes of them (built from the configuration, as the hub builds a spawner)."""

from __future__ import annotations

from typing import Any

import pytest
from tornado import web
from traitlets.config import Config

from gpuspawner.upkeep import checked_config

PROFILES = [{"slug": "cpu", "display_name": "CPU", "image": "lab/notebook:2026-01", "default": True}]


def options(config: dict[str, Any], form: dict[str, list[str]], *, query: bool = False) -> Any:
    spawner = checked_config(Config(config))
    return spawner.options_from_query(form) if query else spawner.run_options_from_form(form)


@pytest.mark.parametrize("query", [False, True], ids=["form", "query"])
def test_with_profiles_the_form_gives_the_chosen_profile_and_nothing_else(query: bool) -> None:
    config = {"GPUSpawner": {"profiles": PROFILES}}
    assert options(config, {"profile": ["cpu"], "image": ["evil/image:1"], "x": ["y"]}, query=query) == {"profile": "cpu"}
    assert options(config, {}, query=query) == {}
    with pytest.raises(web.HTTPError) as e:
        options(config, {"profile": ["cpu", "gpu"]}, query=query)
    assert (e.value.status_code, e.value.log_message) == (400, "Choose one profile.")


def test_without_profiles_the_form_is_dockerspawners_image_choice() -> None:
    assert options({}, {"image": ["lab/other:1"], "x": ["y"]}) == {"image": "lab/other:1"}


@pytest.mark.parametrize("section", ["Spawner", "DockerSpawner", "GPUSpawner"])
@pytest.mark.parametrize("profiles", [PROFILES, []], ids=["profiles", "no-profiles"])
def test_an_admins_own_options_from_form_is_used(section: str, profiles: list[dict[str, Any]]) -> None:
    def admin_form(formdata: dict[str, list[str]], spawner: Any) -> dict[str, Any]:
        return {"profile": formdata["size"][0], "by": spawner.user.name}

    config: dict[str, dict[str, Any]] = {"GPUSpawner": {"profiles": profiles}}
    config.setdefault(section, {})["options_from_form"] = admin_form
    assert options(config, {"size": ["cpu"]}) == {"profile": "cpu", "by": "gpuspawner-caretaker"}


async def test_the_hub_does_not_warn_that_a_chosen_profile_is_unhandled(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    spawner = checked_config(Config({"GPUSpawner": {"profiles": PROFILES}}))
    spawner.user = SimpleNamespace(name="ada")
    await spawner._run_apply_user_options({"profile": "cpu"})
    assert not [r.getMessage() for r in caplog.records if "unhandled user_options" in r.getMessage()]


async def test_an_admins_own_apply_user_options_still_runs() -> None:
    applied: list[dict[str, Any]] = []
    spawner = checked_config(Config({"GPUSpawner": {"profiles": PROFILES}, "Spawner": {"apply_user_options": lambda s, o: applied.append(o)}}))
    await spawner._run_apply_user_options({"profile": "cpu"})
    assert applied == [{"profile": "cpu"}]
