"""Soak: one hub under concurrent users, crashes and a lost GPU, checked against the engine's event log.

    .venv/bin/python benchmarks/soak.py [--duration 600] [--seed 1] [--max-operations 5000] [--gpu-wait 0] [--keep]

Needs the test bed (``tests/testbed/testbed.sh start``, or any ``make test`` run) and the light
image, which it builds if missing. Not part of ``make test``: ``tests/test_soak.py`` runs a
short version of the same soak there.

For ``--duration`` seconds (or ``--max-operations`` user operations, whichever comes first)
users spawn random profiles (CPU, 1 GPU, 2 GPUs, a MIG slice), some with bad options, stop
their servers and interrupt their own spawns, while the hub is SIGKILLed mid-spawn and started
again, containers are killed behind its back and a GPU is lost and brought back. Then every
server is stopped through the hub and everything is checked (see ``tests/testbed/soak.py``).
With ``--gpu-wait SECONDS`` spawns wait in the hub's GPU queue instead of being refused at once.

Prints a summary table with every violation in full (container ids, users, device UUIDs,
times) and exits 1 if there was any. All traffic stays on this host: 127.0.0.1 and the Docker
bridge.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import build_docker_dir  # noqa: E402
from testbed import DockerBed, docker_problem  # noqa: E402
from testbed.hub import HubSetup, RunningHub, chp_path  # noqa: E402
from testbed.soak import SoakPlan, hub_config, run_soak, write_gpus  # noqa: E402


def parse_args() -> argparse.Namespace:
    defaults = SoakPlan()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=defaults.duration, help="seconds of traffic (default %(default)s)")
    parser.add_argument("--max-operations", type=int, default=defaults.max_operations, help="user operations at most")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--actors", type=int, default=defaults.actors, help="user threads acting at once")
    parser.add_argument("--chaos-every", type=float, default=defaults.chaos_every, help="mean seconds between mishaps")
    parser.add_argument("--max-hub-kills", type=int, default=defaults.max_hub_kills)
    parser.add_argument("--gpu-lost-seconds", type=float, default=defaults.gpu_lost_seconds)
    parser.add_argument("--gpu-wait", type=float, default=0, help="seconds a spawn waits in the GPU queue (default 0)")
    parser.add_argument("--keep", action="store_true", help="keep the hub's folder (its log, database and audit records)")
    parser.add_argument("--output", type=Path, help="also write the summary to this file")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    problem = docker_problem()
    if problem is not None:
        print(f"no soak: {problem}", file=sys.stderr)
        return 2
    if chp_path() is None:
        print("no soak: configurable-http-proxy is not installed (npm install -g configurable-http-proxy)", file=sys.stderr)
        return 2
    plan = SoakPlan(
        duration=args.duration, max_operations=args.max_operations, seed=args.seed, users=args.users,
        actors=args.actors, chaos_every=args.chaos_every, max_hub_kills=args.max_hub_kills,
        gpu_lost_seconds=args.gpu_lost_seconds,
    )
    bed = DockerBed()
    image = build_docker_dir(bed, "light", "gpuspawner-test/light")
    work = Path(tempfile.mkdtemp(prefix="gpuspawner-soak-"))
    spec = work / "gpus.json"
    write_gpus(spec)
    settings = HubSetup(
        workdir=work, image=image, hub_ip=bed.bridge_gateway, token=secrets.token_hex(32),
        hub_id="soak-" + secrets.token_hex(3), debug=False, extra=hub_config(spec, image, gpu_wait=args.gpu_wait),
    )
    hub = RunningHub(settings)
    started = time.monotonic()
    print(f"soak: hub {settings.hub_id} in {work} (log: {hub.log_file}), seed {plan.seed}, "
          f"{plan.duration:.0f} s or {plan.max_operations} operations", flush=True)
    try:
        hub.start(timeout=90)
        report = run_soak(hub=hub, bed=bed, spec=spec, plan=plan, log=lambda line: print(line, flush=True))
    finally:
        hub.stop()
        for c in bed.containers_labelled(f"gpuspawner.hub={settings.hub_id}"):
            bed.api.remove_container(c["Id"], force=True)
    summary = report.summary()
    print("\n" + summary)
    print(f"\n{time.monotonic() - started:.0f} s in all; hub folder: {work}" + ("" if args.keep else " (removed)"))
    if args.output:
        args.output.write_text(summary + "\n")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
