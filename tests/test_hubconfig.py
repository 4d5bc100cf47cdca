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
