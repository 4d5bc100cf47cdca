"""Helpers shared by the test modules (plain functions and constants, not fixtures).

Test modules import these from here, never from one another or from ``conftest``; the
fixtures themselves stay in ``conftest.py``, which imports what it needs from here too.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

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


def gpus_cli(hub: RunningHub, *, json_out: bool = True) -> Any:
    """`gpuspawner gpus` run as an admin would, with the hub's own config (which installs the
    simulated NVML for the command too, reading the same GPUs)."""
    args = [str(BIN / "gpuspawner"), "gpus", "-f", str(hub.config_file)] + (["--json"] if json_out else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if json_out else out.stdout
