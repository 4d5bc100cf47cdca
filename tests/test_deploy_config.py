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
