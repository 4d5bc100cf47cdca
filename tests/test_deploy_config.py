"""The shipped jupyterhub_config.py loads, uses GPUSpawner, and is safe by default."""

import stat
from pathlib import Path

import pytest
from jupyterhub.app import JupyterHub

from gpuspawner import GPUSpawner

CONFIG = Path(__file__).resolve().parent.parent / "jupyterhub_config.py"


@pytest.fixture
def hub_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> JupyterHub:
    for var in ("GPUSPAWNER_IP", "GPUSPAWNER_PORT", "GPUSPAWNER_IMAGE", "GPUSPAWNER_ADMIN_USERS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GPUSPAWNER_DATA_DIR", str(tmp_path / "data"))
    app = JupyterHub()
    app.load_config_file(str(CONFIG))
    return app


def test_config_selects_gpuspawner_by_entry_point_name(hub_app: JupyterHub) -> None:
    assert hub_app.spawner_class is GPUSpawner


def test_hub_listens_on_loopback_only_by_default(hub_app: JupyterHub) -> None:
    assert hub_app.ip == "127.0.0.1"
    assert hub_app.port == 8000
    assert hub_app.hub_ip != "0.0.0.0"


async def test_login_needs_the_generated_password(hub_app: JupyterHub, tmp_path: Path) -> None:
    authenticator = hub_app.authenticator_class(parent=hub_app)
    password_file = tmp_path / "data" / "user-password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    password = password_file.read_text().strip()
    assert len(password) >= 16

    assert await authenticator.get_authenticated_user(None, {"username": "ada", "password": ""}) is None
    assert await authenticator.get_authenticated_user(None, {"username": "ada", "password": "guess"}) is None
    user = await authenticator.get_authenticated_user(None, {"username": "ada", "password": password})
    assert user is not None and user["name"] == "ada"


def test_password_survives_restarts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUSPAWNER_DATA_DIR", str(tmp_path / "data"))
    first, second = JupyterHub(), JupyterHub()
    first.load_config_file(str(CONFIG))
    second.load_config_file(str(CONFIG))
    assert first.config.SharedPasswordAuthenticator.user_password == second.config.SharedPasswordAuthenticator.user_password


def test_admins_from_the_environment_get_their_own_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUSPAWNER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GPUSPAWNER_ADMIN_USERS", "alice, bob")
    app = JupyterHub()
    app.load_config_file(str(CONFIG))
    assert app.config.Authenticator.admin_users == {"alice", "bob"}
    admin_password = (tmp_path / "data" / "admin-password").read_text().strip()
    assert len(admin_password) >= 32
    assert admin_password != app.config.SharedPasswordAuthenticator.user_password


# --- The shipped configuration as a lab would use it ----------------------------------------------

from gpuspawner.cli import REFERENCE_BEGIN, REFERENCE_END, config_reference  # noqa: E402
from gpuspawner.images import is_pinned, parse_image  # noqa: E402
from gpuspawner.profiles import parse_profiles  # noqa: E402
from gpuspawner.spawner import check_config  # noqa: E402

ROOT = CONFIG.parent


def test_the_shipped_configuration_passes_the_hub_start_check(hub_app: JupyterHub) -> None:
    check_config(hub_app.config)


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
    check_config(app.config)
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
