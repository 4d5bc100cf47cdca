"""Helpers shared by the test modules (plain functions and constants, not fixtures).

Test modules import these from here, never from one another or from ``conftest``; the
fixtures themselves stay in ``conftest.py``, which imports what it needs from here too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from testbed import DockerBed, require_docker
from testbed.hub import BIN, RunningHub

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def unavailable(reason: str) -> None:
    """Skip, or fail where the test bed is required (CI)."""
    if require_docker():
        pytest.fail(f"{reason} (GPUSPAWNER_REQUIRE_DOCKER=1: the test bed must be complete)", pytrace=False)
    pytest.skip(reason)


def sim_config(spec: Path, extra: str = "") -> str:
    """Hub configuration: GPUs from the simulated NVML, errors returned by the spawn request itself."""
    return f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import simnvml
simnvml.install({str(spec)!r})
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 90}}
c.GPUSpawner.nvml_cache_seconds = 0
{extra}
"""


def one_gpu_hub_with_ada(start_hub: Any, folder: Path, extra: str = "") -> RunningHub:
    """A hub of one simulated GPU whose servers each ask for it (and `extra` settings), with ada's server ready."""
    import simnvml

    spec = simnvml.write_spec(folder / "gpus.json", [simnvml.gpu(0)])
    hub: RunningHub = start_hub(extra=sim_config(spec, f"c.GPUSpawner.gpu_request = 1\n{extra}"))
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    return hub


def records_of(hub: RunningHub, user: str) -> list[Any]:
    """The user's audit records in the hub's store (its default SQLite file), oldest first."""
    from gpuspawner.store import AuditStore

    store = AuditStore(f"sqlite:///{hub.settings.workdir / 'gpuspawner-audit.sqlite'}")
    try:
        return [r for r in store.iter_records() if r.user == user]
    finally:
        store.dispose()


def sealed_record(hub: RunningHub, user: str, *, first: bool = False, timeout: float = 60) -> Any:
    """The user's last (or first) audit record, once it is sealed."""
    from testbed import wait_for

    def found() -> Any:
        mine = records_of(hub, user)
        record = (mine[0] if first else mine[-1]) if mine else None
        return record if record is not None and record.sealed else None

    try:
        return wait_for(found, timeout=timeout, interval=0.3, what=f"{user}'s record to be sealed")
    except TimeoutError as e:
        raise AssertionError(f"{e}: {records_of(hub, user)}\n{hub.log_tail()}") from None


def container_of(bed: DockerBed, hub: RunningHub, user: str) -> dict[str, Any]:
    """The one container of `user` made by `hub` (found by its labels)."""
    (c,) = [c for c in bed.containers_labelled(f"gpuspawner.hub={hub.settings.hub_id}") if c["Labels"]["gpuspawner.user"] == user]
    return c


def read_progress(hub: RunningHub, user: str, *, until: str, timeout: float = 60) -> list[str]:
    """Messages of the spawn's progress stream (server-sent events), up to one containing `until`."""
    messages = []
    with hub.session.get(f"{hub.api_url}/users/{user}/server/progress", stream=True, timeout=timeout) as r:
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                messages.append(json.loads(line[5:])["message"])
                if until in messages[-1]:
                    break
    return messages


def gpus_cli(hub: RunningHub, *extra: str, json_out: bool = True, env: dict[str, str] | None = None) -> Any:
    """`gpuspawner gpus` (with `extra` arguments, `env` added to the environment) run as an admin would, with
    the hub's own config (which installs the simulated NVML for the command too, reading the same GPUs)."""
    args = [str(BIN / "gpuspawner"), "gpus", *extra, "-f", str(hub.config_file)] + (["--json"] if json_out else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if json_out else out.stdout


def login(hub: RunningHub, user: str, *, then: str | None = None) -> requests.Session:
    """A browser-like session logged in through the hub's login form (dummy authenticator). `then`: the
    page the login goes on to (``/hub/home`` starts no server), else JupyterHub's default (which may)."""
    s = requests.Session()
    s.get(f"{hub.url}/hub/login", timeout=30)
    r = s.post(f"{hub.url}/hub/login", params={"next": then} if then else None,
               data={"username": user, "password": "x", "_xsrf": s.cookies.get("_xsrf")}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    return s


# --- Images of the test bed (the fixtures and the benchmarks build them alike) ----------------------


def build_singleuser(repo: str, packages: str) -> str:
    """docker/singleuser/build.sh: built once per content, cached by the engine; returns the tag."""
    out = subprocess.run(
        [str(ROOT / "docker/singleuser/build.sh"), repo, packages],
        env=dict(os.environ, PYTHON=sys.executable),
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def build_docker_dir(bed: DockerBed, name: str, repo: str) -> str:
    """Build docker/<name>/ (its Dockerfile needs no network), tagged by a hash of the folder's files."""
    import hashlib

    subprocess.run([str(ROOT / "docker/base/build-debian-base.sh")], check=True, capture_output=True)
    path = ROOT / "docker" / name
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file.read_bytes())
    tag = f"{repo}:{digest.hexdigest()[:12]}"
    try:
        bed.api.inspect_image(tag)
    except Exception:
        bed.client.images.build(path=str(path), tag=tag, rm=True)
    return tag


def start_swarm_hub(start_hub: Any, bed: Any, profiles: list[dict[str, Any]], settings: str) -> RunningHub:
    """A gpu-swarm hub on the swarm test bed `bed` with `profiles` and `settings` (config lines): it listens
    on this host's end of the link to the overlay; servers reach it at the gateway's address on the overlay,
    the proxy on this host directly."""
    from testbed import free_port

    port = free_port(bed.hub_ip)
    return start_hub(spawner_class="gpu-swarm", hub_ip=bed.hub_ip, hub_port=port,  # type: ignore[no-any-return]
                     env={"DOCKER_HOST": bed.manager_url}, extra=f"""
c.JupyterHub.hub_bind_url = "http://{bed.hub_ip}:{port}"
c.Spawner.hub_connect_url = "http://{bed.hub_connect_ip}:{port}"
c.SwarmSpawner.network_name = {bed.network!r}
c.GPUSpawner.profiles = {profiles!r}
c.GPUSpawner.nvml_cache_seconds = 0
{settings}
""")
