"""DockerSpawner's own test suite, run against DockerSpawner and against GPUSpawner, side by side.

    .venv/bin/python benchmarks/dockerspawner_suite.py [--work DIR] [-k EXPRESSION] [--jupyterhub6-strict]

Takes the tests of the installed dockerspawner's own sdist from PyPI (`pip download
--no-binary`; the sdist ships tests/ but not their conftest.py, so the fixtures they use are
written here, after upstream's), and runs them twice against the real Docker engine of the test
bed: once as they are, once with gpuspawner.GPUSpawner wherever the tests take
dockerspawner.DockerSpawner (configured CPU-only: gpu_request 0). SwarmSpawner and
SystemUserSpawner are DockerSpawner's siblings, not what GPUSpawner extends: their tests run
unchanged both times. The tests were written for JupyterHub 4 and 5: where they take a named
server not yet in the hub's database, it is created as JupyterHub 5 did (JupyterHub 6 refuses),
for both runs alike; --jupyterhub6-strict leaves that out.

The images the tests name are public ones; as there is no registry to pull from, those they
start are the test bed's own images tagged under those names (quay.io/jupyterhub/singleuser:* as
gpuspawner-test/singleuser, busybox:1.29.1 as gpuspawner-test/light) before each test, and the
tags this script made are removed at the end. What really needs a registry (a pull) fails alike
for both.

Prints each test's outcome for both spawners, the counts, and every test that passes against
DockerSpawner but not against GPUSpawner with the first lines of its error; exits 1 if there is
one. Run it under the test bed's lock where others share the engine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import build_docker_dir, build_singleuser  # noqa: E402
from testbed import DockerBed, docker_problem  # noqa: E402

SPAWNERS = {"docker": "DockerSpawner", "gpu": "GPUSpawner"}
RUN_TIMEOUT = 1200  # seconds for one run of the whole suite

# The fixtures DockerSpawner's tests use (upstream keeps them in tests/conftest.py, which its
# sdist leaves out), plus the swap of the spawner class and a record of every test's outcome.
CONFTEST = '''
"""Fixtures for DockerSpawner's own tests; written by gpuspawner's benchmarks/dockerspawner_suite.py."""

import json
import os
from unittest import mock

import docker as docker_py
import pytest
import pytest_asyncio
from jupyterhub.tests.conftest import app as jupyterhub_app  # noqa: F401
from jupyterhub.tests.conftest import io_loop  # noqa: F401
from jupyterhub.tests.conftest import ssl_tmpdir  # noqa: F401
from jupyterhub.tests.conftest import user  # noqa: F401
from jupyterhub.tests.mocking import MockHub

import dockerspawner

MockHub.hub_ip = "0.0.0.0"
MockHub.hub_connect_ip = os.environ["HUB_CONNECT_IP"]  # the host on Docker's bridge, where containers reach it

SPAWNER = os.environ["SUITE_SPAWNER"]
if SPAWNER == "gpu":
    import gpuspawner

    # Before the test modules run `from dockerspawner import DockerSpawner`.
    dockerspawner.DockerSpawner = gpuspawner.GPUSpawner
RETAG = json.loads(os.environ.get("SUITE_RETAG", "{}"))  # {public name: local image}
OUTCOMES = {}

if os.environ.get("SUITE_JUPYTERHUB5_SPAWNERS"):
    # The tests (DockerSpawner 14, CI on JupyterHub 4 and 5) take user.spawners[name] for a named
    # server not yet in the database, which JupyterHub 5 created and JupyterHub 6 refuses
    # ("orm_spawner not found"). As JupyterHub 5 did, for both spawners alike.
    from jupyterhub.user import User

    _new_spawner = User._new_spawner

    def _new_spawner_as_in_jupyterhub5(self, server_name, *args, **kwargs):
        if server_name not in self.orm_spawners:
            self._new_orm_spawner(server_name, server_name)
        return _new_spawner(self, server_name, *args, **kwargs)

    User._new_spawner = _new_spawner_as_in_jupyterhub5


def pytest_collection_modifyitems(items):
    marker = pytest.mark.asyncio(loop_scope="module")
    for item in items:
        if pytest_asyncio.is_async_test(item):
            present = item.get_closest_marker("asyncio")
            if not present or not present.kwargs:
                item.add_marker(marker, append=False)


@pytest.fixture(scope="session")
def docker():
    client = docker_py.from_env()
    yield client
    for c in client.containers.list(all=True):
        if c.name.startswith("dockerspawner-test"):
            c.remove(force=True)


@pytest.fixture(autouse=True)
def public_names(docker):
    """The public images the tests name, as local ones (a test may have removed one)."""
    for name, local in RETAG.items():
        try:
            docker.images.get(name)
        except docker_py.errors.ImageNotFound:
            repo, tag = name.rsplit(":", 1)
            docker.images.get(local).tag(repo, tag)


@pytest.fixture
def app(jupyterhub_app):  # noqa: F811
    jupyterhub_app.config.DockerSpawner.prefix = "dockerspawner-test"
    if SPAWNER == "gpu":
        jupyterhub_app.config.GPUSpawner.gpu_request = 0
    return jupyterhub_app


@pytest.fixture
def named_servers(app):
    with mock.patch.dict(app.tornado_settings, {"allow_named_servers": True, "named_server_limit_per_user": 2}):
        yield


@pytest.fixture
def dockerspawner_configured_app(app, named_servers):
    with mock.patch.dict(app.tornado_settings, {"spawner_class": dockerspawner.DockerSpawner}):
        yield app


@pytest.fixture
def swarmspawner_configured_app(app, named_servers):
    with (
        mock.patch.dict(app.tornado_settings, {"spawner_class": dockerspawner.SwarmSpawner}),
        mock.patch.dict(app.config.SwarmSpawner, {"network_name": "bridge"}),
    ):
        yield app


@pytest.fixture
def systemuserspawner_configured_app(app, named_servers):
    with mock.patch.dict(app.tornado_settings, {"spawner_class": dockerspawner.SystemUserSpawner}):
        yield app


_username_counter = 0


@pytest.fixture
def username():
    global _username_counter
    _username_counter += 1
    return f"test-user-{_username_counter}"


def pytest_runtest_logreport(report):
    """One outcome per test: the first failure of any phase wins over a pass or a skip."""
    entry = OUTCOMES.setdefault(report.nodeid, {"outcome": "passed", "error": ""})
    if entry["outcome"] not in ("passed", "skipped"):
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    error = (f"{crash.path}:{crash.lineno}: {crash.message}" if crash else report.longreprtext)[:2000]
    if hasattr(report, "wasxfail"):
        entry["outcome"] = "xfailed" if report.skipped else "xpassed"
    elif report.failed:
        entry.update(outcome="failed" if report.when == "call" else f"error in {report.when}", error=error)
    elif report.skipped:
        entry.update(outcome="skipped", error=error)


def pytest_sessionfinish(session):
    with open(os.environ["SUITE_RESULTS"], "w") as f:
        json.dump(OUTCOMES, f, indent=1)
'''

PYTEST_INI = """[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = module
markers =
    role
    user
    slow
    group
    services
"""


def fetch_suite(work: Path, version: str) -> Path:
    """dockerspawner's tests from its sdist on PyPI, with our conftest.py and pytest.ini beside them."""
    sdist_dir = work / "sdist"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         f"dockerspawner=={version}", "-d", str(sdist_dir)],
        check=True,
    )
    (archive,) = sdist_dir.glob(f"dockerspawner-{version}.tar.gz")
    suite = work / "suite"
    prefix = f"dockerspawner-{version}/tests/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
        for member in members:
            member.name = member.name.removeprefix(f"dockerspawner-{version}/")
        tar.extractall(suite, members=members, filter="data")
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "pytest.ini").write_text(PYTEST_INI)
    return suite


def public_images(bed: DockerBed) -> dict[str, str]:
    """The public image names the tests start, each mapped to a local image built here."""
    singleuser = build_singleuser("gpuspawner-test/singleuser", "jupyter_server")
    light = build_docker_dir(bed, "light", "gpuspawner-test/light")
    jupyterhub_xy = ".".join(importlib.metadata.version("jupyterhub").split(".")[:2])  # DockerSpawner.image's default
    return {
        f"quay.io/jupyterhub/singleuser:{jupyterhub_xy}": singleuser,
        "quay.io/jupyterhub/singleuser:4.0": singleuser,
        "quay.io/jupyterhub/singleuser:4": singleuser,
        "busybox:1.29.1": light,
    }


def image_present(bed: DockerBed, name: str) -> bool:
    try:
        bed.api.inspect_image(name)
    except Exception:
        return False
    return True


def run_suite(
    suite: Path, spawner: str, *, bed: DockerBed, retag: dict[str, str], select: str | None, strict: bool,
) -> dict:
    """Run the suite with `spawner` in place of DockerSpawner; {test id: {"outcome", "error"}}."""
    results = suite.parent / f"results-{spawner}.json"
    results.unlink(missing_ok=True)
    bindir = Path(sys.executable).parent  # configurable-http-proxy and jupyterhub-singleuser live here
    env = dict(
        os.environ, SUITE_SPAWNER=spawner, SUITE_RESULTS=str(results), SUITE_RETAG=json.dumps(retag),
        HUB_CONNECT_IP=bed.bridge_gateway, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        SUITE_JUPYTERHUB5_SPAWNERS="" if strict else "1",
    )
    command = [sys.executable, "-m", "pytest", "tests", "-p", "no:cacheprovider", "-q", "--color=no",
               *(["-k", select] if select else [])]
    log = suite.parent / f"pytest-{spawner}.log"
    print(f"running DockerSpawner's tests with {SPAWNERS[spawner]} (log: {log})", flush=True)
    with open(log, "w") as out:
        subprocess.run(command, cwd=suite, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT, check=False)
    if not results.exists():
        sys.exit(f"benchmarks/dockerspawner_suite.py: the run with {SPAWNERS[spawner]} recorded no outcomes; see {log}")
    outcomes: dict = json.loads(results.read_text())
    return outcomes


def first_lines(text: str, n: int = 4) -> str:
    return "\n".join(line for line in text.strip().splitlines()[:n])


def report(docker_run: dict, gpu_run: dict) -> int:
    """Print outcomes side by side, the counts and the regressions; how many tests regressed."""
    tests = sorted(set(docker_run) | set(gpu_run))
    width = max(len(t) for t in tests)
    print(f"\n{'test':<{width}}  {'DockerSpawner':<16}  GPUSpawner")
    for test in tests:
        d = docker_run.get(test, {}).get("outcome", "not run")
        g = gpu_run.get(test, {}).get("outcome", "not run")
        print(f"{test:<{width}}  {d:<16}  {g}{'' if d == g else '   <- differs'}")
    for name, run in (("DockerSpawner", docker_run), ("GPUSpawner", gpu_run)):
        counts = Counter(entry["outcome"] for entry in run.values())
        print(f"\n{name}: {len(run)} tests: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())))
    regressed = [t for t in tests if docker_run.get(t, {}).get("outcome") == "passed"
                 and gpu_run.get(t, {}).get("outcome") != "passed"]
    print(f"\npass against DockerSpawner but not against GPUSpawner: {len(regressed)}")
    for test in regressed:
        entry = gpu_run.get(test, {"outcome": "not run", "error": ""})
        print(f"\n{test} ({entry['outcome']}):\n  " + first_lines(entry["error"]).replace("\n", "\n  "))
    other = [t for t in tests if t not in regressed
             and docker_run.get(t, {}).get("outcome") != gpu_run.get(t, {}).get("outcome")]
    for test in other:
        print(f"\nalso differs: {test}: DockerSpawner {docker_run.get(test, {}).get('outcome')}, "
              f"GPUSpawner {gpu_run.get(test, {}).get('outcome')}")
    return len(regressed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the sdist, the suite and the logs (default: a new temporary one)")
    parser.add_argument("-k", dest="select", help="only the tests pytest's -k expression selects")
    parser.add_argument("--jupyterhub6-strict", action="store_true",
                        help="no JupyterHub 5 shim: tests that take a named server not in the database fail")
    args = parser.parse_args()
    problem = docker_problem()
    if problem:
        sys.exit(f"benchmarks/dockerspawner_suite.py: {problem}")
    version = importlib.metadata.version("dockerspawner")
    work = args.work or Path(tempfile.mkdtemp(prefix="dockerspawner-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    suite = fetch_suite(work, version)
    print(f"dockerspawner {version}'s tests in {suite}", flush=True)

    bed = DockerBed()
    retag = public_images(bed)
    made = [name for name in retag if not image_present(bed, name)]
    try:
        runs = {spawner: run_suite(suite, spawner, bed=bed, retag=retag, select=args.select,
                                    strict=args.jupyterhub6_strict) for spawner in SPAWNERS}
    finally:
        for name in made:  # the tags this script made; an image someone else tagged stays
            if image_present(bed, name):
                bed.api.remove_image(name, noprune=True)
    sys.exit(1 if report(runs["docker"], runs["gpu"]) else 0)


if __name__ == "__main__":
    main()
