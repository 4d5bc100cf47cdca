"""The shipped jupyterhub_config.py loads, uses GPUSpawner, and is safe by default."""

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jupyterhub import orm
from jupyterhub.app import JupyterHub

from gpuspawner import GPUSpawner

CONFIG = Path(__file__).resolve().parent.parent / "jupyterhub_config.py"
ENV = ("GPUSPAWNER_IP", "GPUSPAWNER_PORT", "GPUSPAWNER_IMAGE", "GPUSPAWNER_ADMIN_USERS", "GPUSPAWNER_AUTH",
       "GPUSPAWNER_SHARED_PASSWORD_ANYWHERE", "GPUSPAWNER_NETWORK")


@pytest.fixture
def load_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., JupyterHub]:
    """load(**env): a JupyterHub that loaded the shipped config with these GPUSPAWNER_* variables."""
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GPUSPAWNER_DATA_DIR", str(tmp_path / "data"))

    def load(**env: str) -> JupyterHub:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        app = JupyterHub()
        app.load_config_file(str(CONFIG))
        return app

    return load


@pytest.fixture
def hub_app(load_hub: Callable[..., JupyterHub]) -> JupyterHub:
    return load_hub()


def authenticator(app: JupyterHub) -> Any:
    """The configured authenticator, on a fresh in-memory hub database."""
    return app.authenticator_class(parent=app, db=orm.new_session_factory("sqlite://")())


def login(auth: Any, name: str, password: str) -> Any:
    return auth.get_authenticated_user(None, {"username": name, "password": password})


def test_config_selects_gpuspawner_by_entry_point_name(hub_app: JupyterHub) -> None:
    assert hub_app.spawner_class is GPUSpawner


def test_hub_listens_on_loopback_only_by_default(hub_app: JupyterHub) -> None:
    assert hub_app.ip == "127.0.0.1"
    assert hub_app.port == 8000
    assert hub_app.hub_ip != "0.0.0.0"


# --- Login: each person their own account -------------------------------------------------------

PASSWORD = "correct horse battery"


async def test_by_default_people_sign_up_and_log_in_only_once_an_admin_authorised_them(hub_app: JupyterHub) -> None:
    from nativeauthenticator.orm import UserInfo

    auth = authenticator(hub_app)
    assert auth.create_user("ada", PASSWORD) is not None  # the signup form
    assert await login(auth, "ada", PASSWORD) is None  # not yet authorised
    UserInfo.change_authorization(auth.db, "ada")  # what /hub/authorize/ada does
    assert (await login(auth, "ada", PASSWORD))["name"] == "ada"
    assert (await login(auth, "Ada", PASSWORD))["name"] == "ada"  # names are lowercased


async def test_no_one_logs_in_under_another_name_or_with_a_wrong_password(hub_app: JupyterHub) -> None:
    from nativeauthenticator.orm import UserInfo

    auth = authenticator(hub_app)
    for name, password in (("ada", PASSWORD), ("bob", "bob's own passphrase")):
        auth.create_user(name, password)
        UserInfo.change_authorization(auth.db, name)
    assert await login(auth, "bob", PASSWORD) is None
    assert await login(auth, "ada", "bob's own passphrase") is None
    assert await login(auth, "carol", PASSWORD) is None  # never signed up
    assert await login(auth, "ada", "") is None


async def test_admins_from_the_environment_are_authorised_when_they_sign_up(load_hub: Callable[..., JupyterHub]) -> None:
    app = load_hub(GPUSPAWNER_ADMIN_USERS="alice, bob")
    assert app.config.Authenticator.admin_users == {"alice", "bob"}
    auth = authenticator(app)
    auth.create_user("alice", PASSWORD)
    auth.create_user("eve", PASSWORD)
    assert (await login(auth, "alice", PASSWORD))["name"] == "alice"
    assert await login(auth, "eve", PASSWORD) is None  # an ordinary user waits for an admin


def test_signup_asks_for_a_password_that_is_not_short_or_common(hub_app: JupyterHub) -> None:
    auth = authenticator(hub_app)
    assert auth.create_user("ada", "short") is None
    assert auth.create_user("ada", "1234567890") is None
    assert auth.create_user("ada", PASSWORD) is not None


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        ("ada", True),
        ("ada.lovelace", True),
        ("ada-2_b", True),
        ("=1+2", False),  # a formula when an audit export is opened in a spreadsheet
        ("+ada", False),
        ("@ada", False),
        ("1ada", False),
        ("-ada", False),
        ("ada lovelace", False),
        ("ada/..", False),
        ("ada@example.org", False),
        ("a" * 33, False),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_user_names_are_plain(hub_app: JupyterHub, name: str, accepted: bool) -> None:
    auth = authenticator(hub_app)
    assert (auth.create_user(name, PASSWORD) is not None) is accepted
    assert auth.validate_username(auth.normalize_username(name)) is accepted


# --- Login: the shared password of `make run`'s loopback demo ------------------------------------


async def test_the_shared_password_demo_needs_the_generated_password(load_hub: Callable[..., JupyterHub], tmp_path: Path) -> None:
    app = load_hub(GPUSPAWNER_AUTH="shared-password")
    auth = app.authenticator_class(parent=app)
    password_file = tmp_path / "data" / "user-password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    password = password_file.read_text().strip()
    assert len(password) >= 16

    assert await login(auth, "ada", "") is None
    assert await login(auth, "ada", "guess") is None
    assert await login(auth, "=1+2", password) is None  # plain names here too
    assert (await login(auth, "ada", password))["name"] == "ada"


@pytest.mark.parametrize("ip", ["0.0.0.0", "", "192.0.2.7", "::"])
def test_the_shared_password_is_refused_beyond_loopback(load_hub: Callable[..., JupyterHub], ip: str) -> None:
    with pytest.raises(ValueError, match="GPUSPAWNER_AUTH=native"):
        load_hub(GPUSPAWNER_AUTH="shared-password", GPUSPAWNER_IP=ip)


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1", "localhost"])
def test_the_shared_password_is_for_loopback(load_hub: Callable[..., JupyterHub], ip: str) -> None:
    app = load_hub(GPUSPAWNER_AUTH="shared-password", GPUSPAWNER_IP=ip)
    assert app.config.JupyterHub.authenticator_class == "shared-password"


def test_the_shared_password_beyond_loopback_only_when_asked_for_by_name(load_hub: Callable[..., JupyterHub]) -> None:
    app = load_hub(GPUSPAWNER_AUTH="shared-password", GPUSPAWNER_IP="0.0.0.0", GPUSPAWNER_SHARED_PASSWORD_ANYWHERE="1")
    assert app.config.JupyterHub.authenticator_class == "shared-password"


def test_an_unknown_login_kind_is_refused(load_hub: Callable[..., JupyterHub]) -> None:
    with pytest.raises(ValueError, match="'native' or 'shared-password'"):
        load_hub(GPUSPAWNER_AUTH="none")


def test_password_survives_restarts(load_hub: Callable[..., JupyterHub]) -> None:
    first = load_hub(GPUSPAWNER_AUTH="shared-password")
    second = load_hub(GPUSPAWNER_AUTH="shared-password")
    assert first.config.SharedPasswordAuthenticator.user_password == second.config.SharedPasswordAuthenticator.user_password


def test_admins_of_the_shared_password_demo_get_their_own_password(load_hub: Callable[..., JupyterHub], tmp_path: Path) -> None:
    app = load_hub(GPUSPAWNER_AUTH="shared-password", GPUSPAWNER_ADMIN_USERS="alice, bob")
    assert app.config.Authenticator.admin_users == {"alice", "bob"}
    admin_password = (tmp_path / "data" / "admin-password").read_text().strip()
    assert len(admin_password) >= 32
    assert admin_password != app.config.SharedPasswordAuthenticator.user_password


# --- The audit service reads the hub's store ------------------------------------------------------


def test_the_audit_service_started_as_jupyterhub_starts_it_reads_the_hubs_audit_database(
    load_hub: Callable[..., JupyterHub], tmp_path: Path
) -> None:
    data = tmp_path / "elsewhere"
    app = load_hub(GPUSPAWNER_DATA_DIR=str(data), GPUSPAWNER_NETWORK="gpuspawner")
    (service,) = [s for s in app.config.JupyterHub.services if s["name"] == "audit"]
    # JupyterHub gives a managed service its `environment`, PATH and few else; the service finds
    # its database as `gpuspawner audit` does, from the configuration file.
    env = {**service.get("environment", {}), "PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join(sys.path)}
    script = (
        "import sys; from gpuspawner.hubconfig import load_spawner_settings; "
        "print(load_spawner_settings(sys.argv[1]).audit_db_url)"
    )
    out = subprocess.run(
        [service["command"][0], "-c", script, service["command"][-1]],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True,
    )
    assert out.stdout.strip() == f"sqlite:///{data.resolve() / 'gpuspawner-audit.sqlite'}"


# --- The shipped configuration as a lab would use it ----------------------------------------------

from gpuspawner.cli import REFERENCE_BEGIN, REFERENCE_END, config_reference  # noqa: E402
from gpuspawner.images import is_pinned, parse_image  # noqa: E402
from gpuspawner.profiles import parse_profiles  # noqa: E402
from gpuspawner.upkeep import checked_config  # noqa: E402

ROOT = CONFIG.parent


def test_the_shipped_configuration_passes_the_hub_start_check(hub_app: JupyterHub) -> None:
    checked_config(hub_app.config)


def test_example_profiles_cover_what_a_lab_needs(hub_app: JupyterHub) -> None:
    profiles = {p.slug: p for p in parse_profiles(hub_app.config.GPUSpawner.profiles)}
    assert not profiles["cpu"].gpus.wants_gpu and profiles["cpu"].default
    assert profiles["gpu-1"].gpus.count == 1
    assert (profiles["a100-2"].gpus.count, profiles["a100-2"].gpus.model) == (2, "A100")
    assert profiles["mig-small"].gpus.mig_profile == "1g.10gb"
    assert profiles["course"].allowed_groups == {"course"}
    assert hub_app.config.GPUSpawner.max_gpus_per_group["course"] == 1
    assert all(is_pinned(p.image, pinning="tag") for p in profiles.values())


def test_a_digest_from_the_environment_pins_the_multi_gpu_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    digest = "quay.io/jupyter/pytorch-notebook@sha256:" + "0123456789abcdef" * 4
    monkeypatch.setenv("GPUSPAWNER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GPUSPAWNER_GPU_IMAGE_DIGEST", digest)
    app = JupyterHub()
    app.load_config_file(str(CONFIG))
    checked_config(app.config)
    (a100,) = [p for p in parse_profiles(app.config.GPUSpawner.profiles) if p.slug == "a100-2"]
    assert a100.image == parse_image(digest) and is_pinned(a100.image, pinning="digest")


def test_idle_culling_audit_service_and_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUSPAWNER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GPUSPAWNER_METRICS_TOKEN", "a-long-random-token-for-prometheus")
    app = JupyterHub()
    app.load_config_file(str(CONFIG))
    services = {s["name"]: s for s in app.config.JupyterHub.services}
    assert "jupyterhub_idle_culler" in services["idle-culler"]["command"]
    assert "--timeout=3600" in services["idle-culler"]["command"]
    assert services["audit"]["command"][1:3] == ["-m", "gpuspawner.service"]
    assert services["prometheus"]["api_token"] == "a-long-random-token-for-prometheus"
    roles = {r["name"]: r["scopes"] for r in app.config.JupyterHub.load_roles}
    assert "delete:servers" in roles["idle-culler"] and roles["metrics"] == ["read:metrics"]


def test_in_a_container_on_a_network_the_hub_listens_there_and_containers_join_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUSPAWNER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GPUSPAWNER_NETWORK", "gpuspawner")
    monkeypatch.setenv("GPUSPAWNER_HUB_CONNECT_IP", "jupyterhub")
    app = JupyterHub()
    app.load_config_file(str(CONFIG))
    assert (app.hub_ip, app.hub_connect_ip) == ("0.0.0.0", "jupyterhub")
    assert app.config.DockerSpawner.network_name == "gpuspawner"
    assert app.config.DockerSpawner.use_internal_ip is True


def test_the_readme_configuration_reference_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    generated = readme.split(REFERENCE_BEGIN, 1)[1].split(REFERENCE_END, 1)[0].strip()
    assert generated == config_reference().strip(), "run `make reference` to regenerate it"


def test_every_setting_has_help_with_an_example() -> None:
    from gpuspawner import GPUSpawner

    for name, trait in GPUSpawner.class_own_traits(config=True).items():
        assert len(trait.help) > 80 and "Example" in trait.help, name


def test_the_gpu_image_recipe_is_pinned_non_root_and_labelled() -> None:
    text = (ROOT / "docker/singleuser-gpu/Dockerfile").read_text()
    base = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARG BASE="))
    assert is_pinned(parse_image(base), pinning="tag") and "cuda" in base
    assert "USER ${NB_UID}" in text and "USER root" in text.split("USER ${NB_UID}")[0]
    for label in ("source", "version", "revision"):
        assert f"org.opencontainers.image.{label}=" in text
    requirements = [
        line for line in (ROOT / "docker/singleuser-gpu/requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert requirements and all("==" in line for line in requirements)
    # users see their GPU at work in JupyterLab (the README's user guide says where)
    assert any(line.startswith("jupyterlab-nvdashboard==") for line in requirements)
