"""The house rules that keep the code base readable: pure decision modules stay pure and typed."""

import ast
import functools
import subprocess
import sys
from collections.abc import Collection, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gpuspawner"
PURE = ["allocation.py", "audit.py", "auditlog.py", "redaction.py", "claims.py", "devices.py", "export.py", "images.py", "injection.py", "labels.py", "profiles.py", "reconcile.py", "settings.py", "times.py", "userinput.py", "plan.py", "facts.py", "progress.py", "gpuqueue.py", "limits.py", "usage.py", "readings.py", "charts.py", "swarm.py", "witness.py", "serverinfo.py", "cudareq.py"]
# Libraries that talk to the outside world. A module of the package that imports one, or that
# imports (directly or through others) a module of the package that does, is an I/O module.
IO_LIBRARIES = {
    "docker", "dockerspawner", "pynvml", "jupyterhub", "nativeauthenticator", "tornado", "sqlalchemy", "psycopg",
    "requests", "sqlite3", "socket", "subprocess", "fcntl",
}

Source = tuple[str, bool]  # a module's text, and whether it is a package's __init__


def package_sources(package: Path = PACKAGE) -> dict[str, Source]:
    """Every module of the package by dotted name: {"gpuspawner.store": (its text, False), ...}."""
    sources = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        is_init = parts[-1] == "__init__"
        sources[".".join(parts[:-1] if is_init else parts)] = (path.read_text(), is_init)
    return sources


def imports_of(module: str, source: Source, modules: Collection[str]) -> set[str]:
    """The dotted names `module` imports, relative imports resolved against its package.

    ``from . import store`` and ``from .store import X`` in gpuspawner.claims both name
    gpuspawner.store; ``from .. import store`` in gpuspawner.sub.x names it too. ``from P import n``
    names P.n where that is one of `modules`, else P. Imports inside functions count: they run too.
    """
    text, is_init = source
    package = module if is_init else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                keep = len(parts) - (node.level - 1)
                assert keep >= 1, f"{module}: a relative import above the top-level package: {ast.unparse(node)}"
                base = ".".join([*parts[:keep], *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return found


def io_modules(sources: Mapping[str, Source]) -> dict[str, str]:
    """The package's I/O modules, each with why: "imports gpuspawner.store, which imports sqlalchemy"."""
    imports = {name: imports_of(name, source, sources) for name, source in sources.items()}
    why = {}
    for name, names in imports.items():
        libraries = sorted({n.split(".")[0] for n in names} & IO_LIBRARIES)
        if libraries:
            why[name] = f"imports {', '.join(libraries)}"
    grew = True
    while grew:  # until no module is found to import one already found
        grew = False
        for name, names in imports.items():
            via = sorted(n for n in names if n in why)
            if name not in why and via:
                why[name] = f"imports {via[0]}, which {why[via[0]]}"
                grew = True
    return why


@functools.cache
def package_io_modules() -> dict[str, str]:
    return io_modules(package_sources())


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_io_library_nor_an_io_module_of_the_package(module: str) -> None:
    name = f"{PACKAGE.name}.{module.removesuffix('.py')}"
    assert name not in package_io_modules(), f"{module} must stay pure, but it {package_io_modules()[name]}"


def test_the_io_modules_of_the_package_are_found() -> None:
    found = package_io_modules()
    assert {"gpuspawner.store", "gpuspawner.nvml", "gpuspawner.spawner", "gpuspawner.cli", "gpuspawner.service"} <= found.keys()
    assert found["gpuspawner.store"].startswith("imports ") and "sqlalchemy" in found["gpuspawner.store"]


@pytest.mark.parametrize(
    ("module", "source", "is_io"),
    [
        ("gpuspawner.fake", "from . import store", True),
        ("gpuspawner.fake", "from . import labels, store", True),
        ("gpuspawner.fake", "from .store import AuditStore", True),
        ("gpuspawner.fake", "from gpuspawner import store", True),
        ("gpuspawner.fake", "import gpuspawner.store", True),
        ("gpuspawner.fake", "def later():\n    from .nvml import read_inventory", True),
        ("gpuspawner.fake", "from .cli import main", True),
        ("gpuspawner.sub.fake", "from .. import store", True),
        ("gpuspawner.sub.fake", "from ..store import AuditStore", True),
        ("gpuspawner.fake", "import docker.errors", True),
        ("gpuspawner.fake", "from . import labels\nfrom .images import parse_image", False),
        ("gpuspawner.sub.fake", "from .. import labels", False),
    ],
    ids=["from-dot-import-store", "among-others", "from-dot-store", "absolute-from", "absolute-import",
         "inside-a-function", "through-cli", "from-dot-dot-import", "from-dot-dot-store", "io-library",
         "pure-siblings", "pure-from-dot-dot"],
)
def test_the_check_resolves_relative_imports(module: str, source: str, is_io: bool) -> None:
    assert (module in io_modules({**package_sources(), module: (source, False)})) is is_io


def test_an_io_module_reached_through_another_module_is_found() -> None:
    sources = {**package_sources(), "gpuspawner.middle": ("from . import store", False),
               "gpuspawner.top": ("from .middle import helper", False)}
    assert io_modules(sources)["gpuspawner.top"].startswith(
        "imports gpuspawner.middle, which imports gpuspawner.store, which imports "
    )


def test_pure_modules_pass_mypy_strict() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
         *(str(PACKAGE / m) for m in PURE)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_commands_and_the_services_load_no_docker_library() -> None:
    # `gpuspawner audit …`, the audit page and the GPU page judge the hub's configuration with GPUSpawner's own
    # traits (gpuspawner.traits), not by loading the spawner with DockerSpawner and docker-py.
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, gpuspawner.cli, gpuspawner.service, gpuspawner.gpupage, gpuspawner.hubconfig, gpuspawner.traits;"
         "print(sorted(m for m in sys.modules if m.split('.')[0] in ('docker', 'dockerspawner', 'gpuspawner')))"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "'docker" not in loaded and "gpuspawner.spawner" not in loaded, loaded
