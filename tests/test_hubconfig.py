"""The hub's settings from its configuration: read without the spawner, and as the spawner reads them."""

import subprocess
import sys


def test_the_configuration_sections_are_the_spawners() -> None:
    from gpuspawner.hubconfig import SPAWNER_SECTIONS
    from gpuspawner.spawner import GPUSpawner

    assert SPAWNER_SECTIONS == tuple(k.__name__ for k in reversed(GPUSpawner.mro()))


def test_the_audit_commands_load_no_docker_library() -> None:
    code = (
        "import sys; import gpuspawner.cli, gpuspawner.hubconfig; "
        "print(sorted(m for m in ('docker', 'dockerspawner', 'gpuspawner.spawner') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_command_finds_the_hubs_files_from_its_configured_database_without_loading_jupyterhub(tmp_path) -> None:
    """The commands read jupyterhub_config.py as the hub does: a relative ``JupyterHub.db_url`` means the
    config's folder, and the audit store, key, identity and idle clocks live beside that database."""
    (tmp_path / "data").mkdir()
    config = tmp_path / "jupyterhub_config.py"
    config.write_text('c = get_config()  # noqa\nc.JupyterHub.db_url = "sqlite:///data/jupyterhub.sqlite"\n')
    code = (
        "import sys; from gpuspawner.hubconfig import clocks_path, load_spawner_settings; "
        f"hub = load_spawner_settings({str(config)!r}); "
        "print(hub.audit_db_url, hub.audit_key_file, clocks_path(hub.hub_database()), 'jupyterhub.app' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    data = tmp_path / "data"
    assert out.stdout.split() == [
        f"sqlite:///{data / 'gpuspawner-audit.sqlite'}", str(data / "gpuspawner-audit.key"),
        str(data / "gpuspawner-clocks.json"), "False",
    ]
