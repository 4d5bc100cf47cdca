"""The house rules that keep the code base readable: pure decision modules stay pure and typed."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gpuspawner"
PURE = ["allocation.py", "audit.py", "claims.py", "devices.py", "export.py", "images.py", "injection.py", "labels.py", "profiles.py", "reconcile.py", "settings.py", "times.py", "userinput.py"]
IO_LIBRARIES = {"docker", "dockerspawner", "pynvml", "jupyterhub", "tornado", "sqlalchemy", "requests"}


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_io_library(module: str) -> None:
    tree = ast.parse((PACKAGE / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & IO_LIBRARIES


def test_pure_modules_pass_mypy_strict() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
         *(str(PACKAGE / m) for m in PURE)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
