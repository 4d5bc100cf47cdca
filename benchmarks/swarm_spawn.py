"""Single spawn on a Docker Swarm, dockerspawner's SwarmSpawner against GPUSwarmSpawner, side by side in one run.

    flock /tmp/gpuspawner-e2e.lock .venv/bin/python benchmarks/swarm_spawn.py [--runs 15]

As root (the multi-host test bed adds a network interface and enters namespaces). It starts one
SwarmBed (tests/testbed/swarm.py: a manager and two workers of 2 simulated GPUs each, every one a
Docker engine of its own on this machine), then two real JupyterHubs with their proxies at once,
both against the bed's manager (DOCKER_HOST), both spawning the light image (docker/light, which
answers HTTP as soon as it runs) by digest from the bed's registry, as services on the bed's
overlay network with EndpointSpec mode dnsrr (this kernel has no IPVS for Swarm's virtual IPs):

- "SwarmSpawner": dockerspawner's own SwarmSpawner, as ``TaskAddressSwarmSpawner`` below. Its one
  change is get_ip_and_port(), which returns the address of the service's task on the overlay
  network instead of the service's name: the hub runs on this host, which cannot resolve the
  overlay's DNS names. GPUSwarmSpawner reaches its servers the same way. Nothing else differs,
  its polling of the task included;
- "GPUSwarmSpawner" (``gpu-swarm``), with a CPU-only profile and a 1-GPU profile of that image.

The hubs take turns (and turns about who goes first), N times: a CPU-only spawn on each hub and a
1-GPU spawn on GPUSwarmSpawner's hub, each timed from the REST spawn request until the server
answers through the proxy (as benchmarks/spawn.py times it), then stopped. Printed: the medians,
the ratio GPUSwarmSpawner / SwarmSpawner for the CPU-only spawns, and where each spawn's time
went. A spawn the hub gives up on is tried again (the medians are of spawns that answered), and
the failures are counted and printed. For the breakdown, both hubs (alike) note when each spawn's
start() and its steps ran and every Docker call they made (``time_spawner``), and the manager
says when it created the service and when its task started running; ``--no-breakdown`` leaves
the hubs' notes out.

Both spawners wait for the task with SwarmSpawner.start_object(): it looks at the task, and while
it is not running sleeps 1 s, then 1.5 s, 2.25 s, ... So a spawn takes about 1 s more when the
first look comes before the node has started the container, which it usually does: that sleep,
not either spawner's own work, sets most of a swarm spawn's time.

The bed is stopped at the end and what it leaves, if anything, is printed (nothing, normally).
The hubs' logs and notes stay in a folder under /tmp, named at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from dockerspawner import SwarmSpawner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from testbed import DockerBed, docker_problem, free_port  # noqa: E402
from testbed.hub import HubSetup, RunningHub, chp_path  # noqa: E402
from testbed.swarm import SwarmBed  # noqa: E402

PEER, GPU = "SwarmSpawner", "GPUSwarmSpawner"
# What is measured: (hub, profile); the users of each are named <prefix><round>.
MEASURES = {"peer-cpu": (PEER, "CPU-only"), "gpu-cpu": (GPU, "CPU-only"), "gpu-one": (GPU, "1 GPU")}
PREFIX = {"peer-cpu": "cpu", "gpu-cpu": "cpu", "gpu-one": "one"}
OPTIONS: dict[str, dict[str, str]] = {"peer-cpu": {}, "gpu-cpu": {"profile": "cpu"}, "gpu-one": {"profile": "one"}}
ATTEMPTS = 3  # a spawn the hub gives up on is tried again, at most this often in all
SETTLE_SECONDS = 1.0  # after a stop, let the node finish removing the container before the next spawn
NOTES = "spawn-notes.jsonl"
STEPS = ("start", "create_object", "start_object", "get_ip_and_port")


class TaskAddressSwarmSpawner(SwarmSpawner):  # type: ignore[misc]  # dockerspawner ships no type hints
    """dockerspawner's SwarmSpawner, reached at its task's address on its overlay network.

    The one change to the peer: the hub runs on this host, which cannot resolve the overlay's DNS
    names (the service name SwarmSpawner returns), so the server is reached at its task's address,
    as GPUSwarmSpawner reaches its servers. The task is read by SwarmSpawner's own get_task().
    """

    async def get_ip_and_port(self) -> tuple[str, int]:
        task = await self.get_task() or {}
        for attachment in task.get("NetworksAttachments") or []:
            if attachment["Network"]["Spec"]["Name"] == self.network_name:
                return str(attachment["Addresses"][0]).split("/")[0], int(self.port)
        raise RuntimeError(f"The task of service {self.service_name} has no address on {self.network_name!r}.")


def time_spawner(cls: type, path: str) -> None:
    """Make a hub's spawner class note, as JSON lines in `path`, when each spawn's start() and its
    steps (STEPS) ran, and every Docker call (``docker <method>``): user, what, and wall-clock start
    and end. Called from both hubs' configurations alike; the classes' behaviour is unchanged."""

    def note(spawner: Any, what: str, t0: float, t1: float) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({"user": spawner.user.name, "what": what, "t0": t0, "t1": t1}) + "\n")

    def timed(name: str) -> None:
        plain = getattr(cls, name)

        async def step(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.time()
            try:
                return await plain(self, *args, **kwargs)
            finally:
                note(self, name, t0, time.time())

        setattr(cls, name, step)

    for name in STEPS:
        timed(name)
    plain_docker = cls.docker  # type: ignore[attr-defined]

    def docker(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        future = plain_docker(self, method, *args, **kwargs)
        future.add_done_callback(lambda _: note(self, "docker " + method, t0, time.time()))
        return future

    cls.docker = docker  # type: ignore[attr-defined]


@dataclass
class Spawn:
    """One measured spawn: its seconds (request to answer), and wall-clock times of its milestones."""

    user: str
    seconds: float
    requested: float  # the REST request, time.time()
    answered: float
    service_created: float | None = None  # the manager's CreatedAt of the service
    task_running: float | None = None  # the manager's Status.Timestamp of its task, once running
    notes: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # what -> [(t0, t1)] in start()


def docker_time(stamp: str) -> float:
    """An RFC 3339 timestamp of the Docker API (nanoseconds, Z) as time.time() would say it."""
    stamp = re.sub(r"(\.\d{6})\d*", r"\1", stamp).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


class SpawnFailed(RuntimeError):
    """The hub gave up on a spawn; the message is the hub's error."""


def hub_error(hub: RunningHub) -> str:
    """The last spawn error in the hub's log, one line ("" if none)."""
    found = [line for line in hub.log_tail(200).splitlines() if "Unhandled error starting" in line]
    return found[-1].split("] ", 1)[-1] if found else ""


def spawn_and_wait(hub: RunningHub, user: str, options: dict[str, str], *, timeout: float = 180,
                   interval: float = 0.02) -> Spawn:
    """From the REST spawn request until the server answers through the proxy, asked every `interval`
    (as benchmarks/spawn.py measures it); a spawn the hub gives up on fails at once, with its log."""
    hub.create_user(user)
    requested, t0 = time.time(), time.perf_counter()
    r = hub.api("POST", f"/users/{user}/server", json=options)
    assert r.status_code in (201, 202), r.text
    deadline, polls = t0 + timeout, 0
    while time.perf_counter() < deadline:
        try:
            if hub.session.get(f"{hub.url}/user/{user}/api/status", timeout=10, allow_redirects=False).status_code == 200:
                return Spawn(user=user, seconds=time.perf_counter() - t0, requested=requested, answered=time.time())
        except requests.RequestException:
            pass
        polls += 1
        if polls % 50 == 0 and hub.server_model(user) is None:
            raise SpawnFailed(hub_error(hub) or f"{user}'s spawn failed; the hub's log:\n{hub.log_tail(30)}")
        time.sleep(interval)
    raise TimeoutError(f"{user} did not answer within {timeout} s")


def note_swarm_times(bed: SwarmBed, spawn: Spawn, service_name: str) -> None:
    """When the manager created the spawn's service, and when its task started running."""
    services = [s for s in bed.manager.api.services(filters={"name": service_name}) if s["Spec"]["Name"] == service_name]
    if not services:
        return
    spawn.service_created = docker_time(services[0]["CreatedAt"])
    for task in bed.manager.api.tasks(filters={"service": service_name}):
        if task["Status"]["State"] == "running":
            spawn.task_running = docker_time(task["Status"]["Timestamp"])


def read_notes(path: Path, spawns: list[Spawn]) -> None:
    """Each spawn's notes from its hub: its steps, and the Docker calls made while its start() ran."""
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if path.exists():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            by_user[entry["user"]].append(entry)
    for spawn in spawns:
        entries = by_user[spawn.user]
        starts = [e for e in entries if e["what"] == "start" and spawn.requested <= e["t0"] <= spawn.answered]
        if not starts:
            continue
        begin, end = starts[0]["t0"], starts[0]["t1"]
        for e in entries:
            if begin <= e["t0"] and e["t1"] <= end + 1e-3:
                spawn.notes.setdefault(e["what"], []).append((e["t0"], e["t1"]))


def start_hub(bed: SwarmBed, workdir: Path, *, spawner_class: str, timed: tuple[str, str] | None, extra: str) -> RunningHub:
    """A hub on this host whose servers are services on the bed's overlay network (as in tests/test_e2e_swarm.py);
    `timed`: (module, class) of its spawner class, for time_spawner, or None."""
    workdir.mkdir(parents=True)
    port = free_port(bed.hub_ip)
    hub_id = "bench-" + secrets.token_hex(3)
    config = f"""
c.JupyterHub.hub_bind_url = "http://{bed.hub_ip}:{port}"
c.Spawner.hub_connect_url = "http://{bed.hub_connect_ip}:{port}"
c.SwarmSpawner.network_name = {bed.network!r}
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
c.JupyterHub.log_level = "WARN"
{extra}
"""
    if timed:
        module, name = timed
        config += (f"import swarm_spawn\nfrom {module} import {name} as _timed\n"
                   f"swarm_spawn.time_spawner(_timed, {str(workdir / NOTES)!r})\n")
    settings = HubSetup(
        workdir=workdir, image=bed.base_ref, hub_ip=bed.hub_ip, hub_port=port, token=secrets.token_hex(32),
        hub_id=hub_id, spawner_class=spawner_class, debug=False, extra=config,
        # the hub imports this module: the peer's class, and time_spawner
        env={"DOCKER_HOST": bed.manager_url, "PYTHONPATH": str(ROOT / "benchmarks")},
    )
    return RunningHub(settings).start(timeout=90)


def service_name(hub: RunningHub, user: str) -> str:
    """DockerSpawner's name for a user's service: "{prefix}-{username}", the prefix t-<hub_id> (testbed.hub)."""
    return f"t-{hub.settings.hub_id}-{user}"


def run_rounds(
    bed: SwarmBed, hubs: dict[str, RunningHub], runs: int, failures: dict[str, list[str]],
) -> dict[str, list[Spawn]]:
    """`runs` rounds; in each, every measure once, each going first in turn. A spawn the hub gives up
    on is noted in `failures` and tried again, up to ATTEMPTS times, so each measure has `runs` spawns."""
    spawns: dict[str, list[Spawn]] = {key: [] for key in MEASURES}
    keys = list(MEASURES)
    for i in range(runs):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            hub, user = hubs[MEASURES[key][0]], f"{PREFIX[key]}{i}"
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    spawn = spawn_and_wait(hub, user, OPTIONS[key])
                    break
                except SpawnFailed as e:
                    failures[key].append(str(e))
                    print(f"  {key}, {user}: spawn failed ({e}){'; again' if attempt < ATTEMPTS else ''}", flush=True)
                    time.sleep(SETTLE_SECONDS)
            else:
                raise SpawnFailed(f"{user}'s spawn failed {ATTEMPTS} times in a row on {MEASURES[key][0]}'s hub")
            note_swarm_times(bed, spawn, service_name(hub, user))
            spawns[key].append(spawn)
            hub.stop_server(user, timeout=120)
            time.sleep(SETTLE_SECONDS)
        print(f"round {i + 1}/{runs}: " + ", ".join(f"{key} {spawns[key][-1].seconds:.2f} s" for key in keys), flush=True)
    return spawns


def median(values: list[float]) -> float:
    return statistics.median(values)


def quartiles(values: list[float]) -> str:
    return ", ".join(f"{q:.2f}" for q in statistics.quantiles(values, n=4)) if len(values) > 1 else "-"


def span(spawn: Spawn, what: str) -> tuple[float, float] | None:
    found = spawn.notes.get(what)
    return found[0] if found else None


def wait_end(spawn: Spawn) -> float | None:
    """When SwarmSpawner's wait in start_object() ended: its last look at the task (an inspect_service,
    then a task list) returned."""
    begin = span(spawn, "start_object")
    if begin is None:
        return None
    looks = [t0 for t0, _ in spawn.notes.get("docker inspect_service", []) if begin[0] <= t0 <= begin[1]]
    lists = [t1 for t0, t1 in spawn.notes.get("docker tasks", []) if looks and max(looks) <= t0 <= begin[1]]
    return min(lists) if lists else None


def segments(spawn: Spawn) -> dict[str, float | None]:
    """Where one spawn's time went, in seconds (None where a note is missing)."""
    start, create, begin, _ = (span(spawn, s) for s in STEPS)
    waited = wait_end(spawn)

    def between(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else b - a

    return {
        "request -> the spawner's start() begins (JupyterHub)": between(spawn.requested, start and start[0]),
        "start() -> create_object() (GPUSwarmSpawner: record, profile, image look-up)": between(start and start[0], create and create[0]),
        "create_object() (create_service; SwarmSpawner: then lists tasks until there is one)": between(*create) if create else None,
        "start_object(): SwarmSpawner's wait for the task (its looks, and sleeps of 1 s, 1.5 s, ...)": between(begin and begin[0], waited),
        "start_object() after the wait (GPUSwarmSpawner: reads its task and node, records them)": between(waited, begin and begin[1]),
        "start_object() -> start() returns (get_ip_and_port)": between(begin and begin[1], start and start[1]),
        "start() returned -> answers through the proxy (JupyterHub, proxy, client poll)": between(start and start[1], spawn.answered),
        "the swarm: service created -> task running (the manager's timestamps)": between(spawn.service_created, spawn.task_running),
        "task running -> the wait's last look returns (asleep while the task ran)": between(spawn.task_running, waited),
    }


def polls(spawn: Spawn) -> int:
    """How often start_object() looked at the task (each look is one inspect_service, then a task list)."""
    begin = span(spawn, "start_object")
    if begin is None:
        return 0
    return sum(1 for t0, _ in spawn.notes.get("docker inspect_service", []) if begin[0] <= t0 <= begin[1])


def breakdown(spawns: dict[str, list[Spawn]]) -> str:
    """Tables of medians: where the time went, and the Docker calls made while start() ran."""
    keys = [k for k in MEASURES if spawns[k] and spawns[k][0].notes]
    if not keys:
        return "(no breakdown: the hubs made no notes)\n"
    head = [f"{MEASURES[k][0]}, {MEASURES[k][1]}" for k in keys]

    def cell(values: list[float | None]) -> str:
        found = [v for v in values if v is not None]
        return f"{median(found) * 1000:.0f}" if found else "-"

    lines = ["where a spawn's time goes (medians, ms):", "| step | " + " | ".join(head) + " |",
             "| --- |" + " --- |" * len(keys)]
    names = list(segments(spawns[keys[0]][0]))
    for name in names:
        lines.append(f"| {name} | " + " | ".join(cell([segments(s)[name] for s in spawns[k]]) for k in keys) + " |")
    lines.append("| looks at the task in start_object() (median; spread) | " + " | ".join(
        f"{median([polls(s) for s in spawns[k]]):.0f}; {min(polls(s) for s in spawns[k])}-{max(polls(s) for s in spawns[k])}"
        for k in keys) + " |")
    lines += ["", "Docker calls while start() ran (median per spawn: count x ms in all):",
              "| call | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(keys)]
    methods = sorted({w for k in keys for s in spawns[k] for w in s.notes if w.startswith("docker ")})
    for method in methods:
        row = []
        for k in keys:
            counts = [len(s.notes.get(method, [])) for s in spawns[k]]
            totals = [sum(t1 - t0 for t0, t1 in s.notes.get(method, [])) for s in spawns[k]]
            row.append(f"{median(counts):.0f} x {median(totals) * 1000:.0f}" if any(counts) else "-")
        lines.append(f"| {method[7:]} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def machine_line(bed: SwarmBed) -> str:
    return (f"{os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
            f"{platform.machine()}, Python {platform.python_version()}, Docker {bed.host.version()['Version']} "
            f"(host), {bed.manager.version()['Version']} (nodes)")


def check_prerequisites() -> None:
    problems = [docker_problem()]
    if os.geteuid() != 0:
        problems.append("the Swarm test bed needs root (it adds a network interface and enters namespaces)")
    if chp_path() is None:
        problems.append("configurable-http-proxy is not installed (npm install -g configurable-http-proxy)")
    found = [p for p in problems if p]
    if found:
        sys.exit("benchmarks/swarm_spawn.py: " + "; ".join(found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="single spawns of each kind (CPU-only on each hub, 1 GPU)")
    parser.add_argument("--no-breakdown", action="store_true", help="the hubs make no notes of their steps and Docker calls")
    args = parser.parse_args()
    check_prerequisites()
    from helpers import build_docker_dir  # here, not above: helpers imports pytest, and the hubs import this module

    began = time.perf_counter()
    light = build_docker_dir(DockerBed(), "light", "gpuspawner-test/light")
    bed = SwarmBed(base_image=light)
    work = Path(tempfile.mkdtemp(prefix="gpuspawner-swarm-bench-"))
    hubs: dict[str, RunningHub] = {}
    leftovers: list[str] = []
    try:
        bed.start()
        print(f"machine: {machine_line(bed)}", flush=True)
        print(f"bed: a manager and {len(bed.workers)} workers of 2 simulated GPUs, started in "
              f"{bed.timings['start, in all']:.0f} s; image {bed.base_ref}", flush=True)
        print(f"{PEER}: dockerspawner's own (TaskAddressSwarmSpawner), whose one change is get_ip_and_port() "
              "returning its task's address on the overlay, as GPUSwarmSpawner reaches its servers", flush=True)
        profiles = [
            {"slug": "cpu", "display_name": "CPU only", "image": bed.base_ref, "default": True},
            {"slug": "one", "display_name": "1 GPU", "image": bed.base_ref, "gpus": 1},
        ]
        starts: dict[str, Callable[[], RunningHub]] = {
            PEER: lambda: start_hub(bed, work / "peer", spawner_class="swarm_spawn.TaskAddressSwarmSpawner",
                                    timed=None if args.no_breakdown else ("swarm_spawn", "TaskAddressSwarmSpawner"),
                                    extra='c.SwarmSpawner.extra_endpoint_spec = {"mode": "dnsrr"}'),
            GPU: lambda: start_hub(bed, work / "gpu", spawner_class="gpu-swarm",
                                   timed=None if args.no_breakdown else ("gpuspawner", "GPUSwarmSpawner"),
                                   extra=f"c.GPUSpawner.profiles = {profiles!r}"),
        }
        with ThreadPoolExecutor(2) as pool:
            futures = {name: pool.submit(start) for name, start in starts.items()}
            for name, future in futures.items():
                hubs[name] = future.result()
        failures: dict[str, list[str]] = {key: [] for key in MEASURES}
        spawns = run_rounds(bed, hubs, args.runs, failures)
        print()
        for key, (hub_name, profile) in MEASURES.items():
            values = [s.seconds for s in spawns[key]]
            print(f"single spawn, {profile}, {hub_name}: median {median(values):.3f} s over {len(values)} runs "
                  f"(quartiles {quartiles(values)}; all: {' '.join(f'{v:.2f}' for v in sorted(values))})")
        ratio = median([s.seconds for s in spawns["gpu-cpu"]]) / median([s.seconds for s in spawns["peer-cpu"]])
        print(f"ratio {GPU} / {PEER}, CPU-only: {ratio:.3f}", flush=True)
        for key, errors in failures.items():
            if errors:
                print(f"failed spawns, {MEASURES[key][1]}, {MEASURES[key][0]}: {len(errors)} (tried again; not in "
                      f"the medians), e.g. {errors[0]}")
        if not args.no_breakdown:
            for name, hub in hubs.items():
                read_notes(hub.settings.workdir / NOTES, [s for k, v in spawns.items() if MEASURES[k][0] == name for s in v])
            print()
            print(breakdown(spawns))
    finally:
        for hub in hubs.values():
            hub.stop()
        bed.stop()
        leftovers = bed.leftovers()
        print(f"bed stopped; left behind: {', '.join(leftovers) or 'nothing'}")
        print(f"hub logs and notes: {work}; the run took {time.perf_counter() - began:.0f} s")
    if leftovers:
        sys.exit(1)


if __name__ == "__main__":
    main()
