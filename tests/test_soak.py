"""A short soak of one real hub (the full one is benchmarks/soak.py): concurrent users with random
profiles and bad options, interrupted spawns, a hub SIGKILLed mid-spawn, containers killed behind
its back and a GPU lost and brought back, checked against the Docker engine's event log.

See tests/testbed/soak.py for what is done and what counts as a violation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from testbed import DockerBed
from testbed.hub import RunningHub
from testbed.soak import SoakPlan, hub_config, run_soak, write_gpus

pytestmark = pytest.mark.docker

# About 45 s of traffic with each mishap at least once; the whole test takes about a minute on 2 CPUs.
SHORT = SoakPlan(
    duration=45, max_operations=400, seed=11, actors=3, warmup=3, chaos_every=7, gpu_lost_seconds=8,
    max_hub_kills=1, settle_timeout=60, interrupt_share=0.3,
)


def test_a_short_soak_breaks_no_rule(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, light_image: str, tmp_path: Path
) -> None:
    spec = tmp_path / "gpus.json"
    write_gpus(spec)
    hub = start_hub(extra=hub_config(spec, light_image))

    report = run_soak(hub=hub, bed=docker_bed, spec=spec, plan=SHORT, log=lambda line: print(line, flush=True))

    assert report.count("hub-kill") == 1 and report.count("gpu-lost") >= 1 and report.count("container-kill") >= 1, (
        "the short soak must have each mishap at least once\n" + report.summary()
    )
    assert sum(a.caught_pending for a in report.attempts) >= 1, "no spawn was interrupted while pending\n" + report.summary()
    if report.violations:
        pytest.fail(f"{len(report.violations)} violations (hub log: {hub.log_file})\n{report.summary()}", pytrace=False)
