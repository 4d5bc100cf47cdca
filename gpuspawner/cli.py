"""The ``gpuspawner`` command, for lab admins.

    gpuspawner gpus [-f jupyterhub_config.py] [--json] [--swarm]

lists every device of this host (index, UUID, model, memory, utilization, health) and where
it stands: free, busy outside the hub, or held by which server of the hub. It reads the hub's
configuration for the hub's identity and thresholds, NVML for the devices and the Docker
engine for the claims, exactly as the hub does before each allocation. With ``--swarm``, the
devices every node of the Docker Swarm advertises, with their nodes, as the manager lists them.

    gpuspawner swarm-node-config [--merge /etc/docker/daemon.json]

run on a GPU node of a swarm, prints the daemon.json that makes its engine advertise its GPUs and
MIG devices, and says how to set NVIDIA's container runtime to hand them to containers.

Errors become one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import labels, settings, swarm, times
from .allocation import Holder, Status, device_status
from .devices import Device, Inventory, format_bytes
from .hubconfig import ConfigFileError, load_spawner_settings

if TYPE_CHECKING:
    import docker

    from .usage import Usage


class CLIError(Exception):
    """A failure to report as one line, without a traceback."""


def time_argument(text: str) -> str:
    """An argparse type: an ISO 8601 time (no zone: UTC), in the form the audit store writes."""
    try:
        return times.stored_time(text)
    except times.TimeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def docker_api() -> docker.APIClient:
    """A docker-py client of the engine the Docker settings reach (DOCKER_HOST, or the default socket)."""
    import docker
    from docker.utils import kwargs_from_env

    return docker.APIClient(version="auto", **kwargs_from_env())


def hub_containers(hub_id: str) -> list[dict[str, Any]]:
    """This hub's containers, as the Docker API lists them."""
    import docker

    try:
        client = docker_api()
        containers: list[dict[str, Any]] = client.containers(all=True, filters=labels.hub_filter(hub_id))
    except docker.errors.DockerException as e:
        raise CLIError(f"cannot read the hub's containers from the Docker engine: {e}") from None
    return containers


def limits_of_servers(containers: list[dict[str, Any]], *, hub_id: str, clocks_file: Path) -> dict[Holder, str]:
    """Holder -> its time limits in words (idle time, time left), from its container's labels and the
    hub's idle clocks; the runtime counts from the container's creation."""
    import time

    from .hubconfig import load_clocks
    from .limits import held_status, limits_from_label

    clocks = load_clocks(clocks_file).idle_since
    found = {}
    for c in containers:
        found_labels = c.get("Labels") or {}
        identity = labels.identity_from_labels(found_labels)
        limits = limits_from_label(found_labels.get(labels.LIMITS, ""))
        if identity and identity.hub_id == hub_id and limits.any and c.get("State") == "running":
            holder = Holder(user=identity.user, server=identity.server)
            found[holder] = held_status(limits, started=float(c.get("Created") or 0),
                                        idle_from=clocks.get(found_labels.get(labels.RECORD, "")), now=time.time())
    return found


def device_rows(
    inventory: Inventory,
    claims: dict[str, Holder],
    *,
    busy_memory_threshold: int,
    server_profiles: dict[Holder, str] | None = None,
    server_limits: dict[Holder, str] | None = None,
    node_names: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One dict per device, for the table and for --json. `server_limits`: each server's time limits in words.
    `node_names` (node ID -> host name) marks the devices as a swarm's: each row names its node, and a
    device held by a service that is not a server of this hub says so."""
    server_profiles = server_profiles or {}
    server_limits = server_limits or {}
    rows = []
    for d in inventory.devices:
        status = device_status(d, claims, busy_memory_threshold=busy_memory_threshold)
        if d.mig_enabled:
            where = "MIG mode: see its MIG devices"
        elif status is Status.HELD:
            holder = claims[d.uuid]
            profile = server_profiles.get(holder)
            shown = f"another service ({holder})" if node_names is not None and not holder.user else str(holder)
            where = f"held by {shown}" + (f" (profile {profile})" if profile else "")
            if server_limits.get(holder):
                where += f"; {server_limits[holder]}"
        elif status is Status.BUSY:
            where = _busy_reason(d)
        else:
            where = status.value
        rows.append(
            {
                "index": f"{d.index}" if not d.is_mig else f"{d.index}:mig",
                "uuid": d.uuid or None,
                "model": d.name,
                "mig_profile": d.mig_profile,
                "memory_total": d.memory_total,
                "memory_used": d.memory_used,
                "utilization": d.utilization,
                "health": "ok" if d.healthy else d.problem,
                "status": status.value,
                "holder": str(claims[d.uuid]) if status is Status.HELD else None,
                "profile": server_profiles.get(claims[d.uuid]) if status is Status.HELD else None,
                "limits": server_limits.get(claims[d.uuid]) if status is Status.HELD else None,
                "where": where,
            } | ({"node": node_names.get(d.node, d.node), "node_id": d.node, "memory_used": None}  # a swarm does not say
                 if node_names is not None else {})
        )
    return rows


def _busy_reason(d: Device) -> str:
    if d.processes:
        n = len(d.processes)
        return f"busy outside the hub ({n} process{'es' if n > 1 else ''})"
    return f"busy outside the hub ({format_bytes(d.memory_used)} in use)"


def format_table(rows: Sequence[dict[str, Any]], inventory: Inventory, hub_id: str, *,
                 summary: Sequence[str] | None = None) -> str:
    """The rows as a table, then `summary` (default: the host's driver and the hub's free and held counts).
    Rows of a swarm's devices (with a node) show the node and the memory each device has; a swarm
    reports neither memory in use, utilization nor health."""
    on_nodes = any("node" in r for r in rows)
    if on_nodes:
        header: tuple[str, ...] = ("NODE", "UUID", "MODEL", "MEMORY", "STATUS")
    else:
        header = ("INDEX", "UUID", "MODEL", "MEMORY USED", "UTIL", "HEALTH", "STATUS")
    lines = [header]
    for r in rows:
        memory = "-" if not r["memory_total"] else format_bytes(r["memory_total"])
        if on_nodes:
            lines.append((r["node"], r["uuid"] or "-", r["model"], memory, r["where"]))
            continue
        lines.append(
            (
                r["index"],
                r["uuid"] or "-",
                r["model"],
                f"{format_bytes(r['memory_used'])} / {memory}" if r["memory_total"] else "-",
                "-" if r["utilization"] is None else f"{r['utilization']}%",
                r["health"],
                r["where"],
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip() for line in lines)
    if summary is not None:
        return "\n".join([text, *summary] if rows else summary)
    if inventory.problem:
        summary = f"No GPUs: {inventory.problem}."
    else:
        held = sum(1 for r in rows if r["status"] == Status.HELD.value)
        free = sum(1 for r in rows if r["status"] == Status.FREE.value and "MIG mode" not in r["where"])
        summary = (
            f"NVIDIA driver {inventory.driver_version}, CUDA {inventory.cuda_driver_version}; "
            f"hub {hub_id}: {free} free, {held} held by its servers."
        )
    return text + "\n" + summary if rows else summary


def cmd_gpus(args: argparse.Namespace) -> int:
    from .claims import claims_from_containers, profiles_of_servers
    from .hubconfig import clocks_path
    from .nvml import read_inventory

    hub = load_spawner_settings(args.config)
    hub_id = args.hub_id or hub.hub_id
    if args.swarm:
        return _swarm_gpus(args, hub_id=hub_id, busy_memory_threshold=hub.busy_memory_threshold)

    inventory = read_inventory()
    containers = hub_containers(hub_id)
    rows = device_rows(
        inventory,
        claims_from_containers(containers, hub_id=hub_id),
        busy_memory_threshold=hub.busy_memory_threshold,
        server_profiles=profiles_of_servers(containers, hub_id=hub_id),
        server_limits=limits_of_servers(containers, hub_id=hub_id, clocks_file=clocks_path(hub.hub_database())),
    )
    if args.json:
        out = {
            "hub_id": hub_id,
            "driver_version": inventory.driver_version,
            "cuda_driver_version": inventory.cuda_driver_version,
            "problem": inventory.problem,
            "devices": rows,
        }
        print(json.dumps(out, indent=2))
    else:
        print(format_table(rows, inventory, hub_id))
    return 0


# --- A Docker Swarm ------------------------------------------------------------------------------


def swarm_listing() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The swarm's nodes, services and tasks, as the manager the Docker settings reach (DOCKER_HOST, or
    the default socket) lists them. An engine that is no manager is an error that says so."""
    import docker

    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker_api()
        nodes: list[dict[str, Any]] = client.nodes()
        services: list[dict[str, Any]] = client.services()  # type: ignore[no-untyped-call]
        tasks: list[dict[str, Any]] = client.tasks()  # type: ignore[no-untyped-call]
        return nodes, services, tasks
    except docker.errors.APIError as e:
        if e.status_code == 503:  # "This node is not a swarm manager. …", on a worker and outside a swarm alike
            raise CLIError(
                f"the Docker engine at {where} is not a swarm manager ({_one_line(e.explanation or str(e))}); "
                "run this on a manager node, or point DOCKER_HOST at one"
            ) from None
        raise CLIError(f"cannot read the swarm from the Docker engine at {where}: {_one_line(str(e))}") from None
    except docker.errors.DockerException as e:
        raise CLIError(f"cannot read the swarm from the Docker engine at {where}: {_one_line(str(e))}") from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).rstrip(".")


def swarm_report(
    nodes: Sequence[Mapping[str, Any]], services: Sequence[Mapping[str, Any]], tasks: Sequence[Mapping[str, Any]], *,
    hub_id: str, busy_memory_threshold: int,
) -> dict[str, Any]:
    """What `gpus --swarm` shows, from the manager's lists: every device the schedulable nodes advertise
    (as the hub counts them), the counts per kind of device, and the GPU nodes not counted, with why."""
    from .claims import profiles_of_servers

    found = [swarm.node_from_api(n) for n in nodes]
    holding = swarm.tasks_from_api(swarm.holding(tasks), services)
    inventory = swarm.cluster_inventory(found)
    claims = swarm.cluster_claims(holding, hub_id=hub_id)
    rows = device_rows(
        inventory, claims, busy_memory_threshold=busy_memory_threshold,
        server_profiles=profiles_of_servers([{"Labels": t.labels, "State": "running"} for t in holding], hub_id=hub_id),
        node_names={n.id: n.hostname or n.id for n in found},
    )
    return {"hub_id": hub_id, "problem": inventory.problem, "devices": rows, "kinds": kind_counts(rows),
            "not_counted": [why for n in nodes if (why := not_counted(n))]}


def kind_counts(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per kind of device (a model, or a model's MIG profile): how many are advertised, held and free."""
    counts: dict[str, dict[str, Any]] = {}
    for r in rows:
        kind = counts.setdefault(r["model"], {"kind": r["model"], "advertised": 0, "held": 0, "free": 0})
        kind["advertised"] += 1
        kind["held"] += r["status"] == Status.HELD.value
        kind["free"] += r["status"] == Status.FREE.value
    return [counts[k] for k in sorted(counts)]


def not_counted(node: Mapping[str, Any]) -> dict[str, Any] | None:
    """Why a GPU node's devices are not counted (it is down, drained or paused), or None when they are
    (or it advertises none)."""
    found = swarm.node_from_api(node)
    kinds: dict[str, int] = {}
    for kind, _ in found.resources:
        if swarm.is_device_kind(kind):
            kinds[kind] = kinds.get(kind, 0) + 1
    if found.schedulable or not kinds:
        return None
    status = node.get("Status") or {}
    availability = (node.get("Spec") or {}).get("Availability", "active")
    reasons = [] if found.ready else [str(status.get("State") or "unknown") + (f" ({status['Message']})" if status.get("Message") else "")]
    reasons += {"drain": ["drained"], "pause": ["paused"]}.get(availability, [])
    return {"node": found.hostname or found.id, "node_id": found.id, "why": ", ".join(reasons), "advertises": kinds}


def swarm_summary(report: Mapping[str, Any]) -> list[str]:
    """The lines under the table: the hub's counts, each kind's, and each GPU node not counted."""
    rows = report["devices"]
    mine = sum(1 for r in rows if r["status"] == Status.HELD.value and not r["where"].startswith("held by another service"))
    others = sum(1 for r in rows if r["status"] == Status.HELD.value) - mine
    free = sum(1 for r in rows if r["status"] == Status.FREE.value)
    lines = [f"No GPUs: {report['problem']}." if report["problem"] else
             f"Swarm, hub {report['hub_id']}: {free} free, {mine} held by its servers, {others} held by other services."]
    lines += [f"{k['kind']}: {k['advertised']} advertised on schedulable nodes, {k['held']} held, {k['free']} free."
              for k in report["kinds"]]
    lines += [f"{n['node']}: not counted, {n['why']} (advertises "
              + ", ".join(f"{count} × {kind}" for kind, count in sorted(n["advertises"].items())) + ")."
              for n in report["not_counted"]]
    return lines


def _swarm_gpus(args: argparse.Namespace, *, hub_id: str, busy_memory_threshold: int) -> int:
    nodes, services, tasks = swarm_listing()
    report = swarm_report(nodes, services, tasks, hub_id=hub_id, busy_memory_threshold=busy_memory_threshold)
    if args.json:
        print(json.dumps({"swarm": True, **report}, indent=2))
    else:
        print(format_table(report["devices"], Inventory(problem=report["problem"]), hub_id, summary=swarm_summary(report)))
    return 0


# NVIDIA Container Toolkit, api/config/v1/config.go: `swarm-resource` is a top-level key of
# /etc/nvidia-container-runtime/config.toml naming the variables whose device lists take the place of
# NVIDIA_VISIBLE_DEVICES when a container has any of them. A comma-separated list of several variables
# is read from v1.12.0 on (CHANGELOG "Add support for multiple Docker Swarm resources";
# cmd/nvidia-container-runtime-hook/hook_config.go, getSwarmResourceEnvvars); before, the whole value
# is one variable's name. v1.18.0 made jit-cdi the runtime's default mode and read the setting only in
# the legacy hook; v1.19.0 reads it in every mode again (commit a290bcf8 "fix: Add docker swarm support
# to jit-cdi mode": internal/config/image/builder.go, WithPreferredVisibleDevicesEnvVars;
# internal/runtime/runtime_factory.go).
MULTIPLE_SWARM_RESOURCES_SINCE = "1.12.0"


def runtime_advice(variables: Sequence[str], *, default_runtime: str | None) -> list[str]:
    """What to set for NVIDIA's container runtime on the node, as lines for stderr."""
    lines = [
        "# /etc/nvidia-container-runtime/config.toml, at the top level (before any [section]):",
        f'swarm-resource = "{",".join(variables)}"',
    ]
    if len(variables) > 1:
        lines.append(f"# A list of several variables needs NVIDIA Container Toolkit {MULTIPLE_SWARM_RESOURCES_SINCE} or later "
                     "(older ones read one name only).")
    lines.append('# Toolkit 1.18.x reads swarm-resource only with mode = "legacy" under [nvidia-container-runtime]; '
                 "1.19.0 and later in every mode.")
    if default_runtime != "nvidia":
        lines.append('# A Swarm service cannot choose a runtime: make "nvidia" the engine\'s default runtime '
                     "(nvidia-ctk runtime configure --runtime=docker --set-as-default), then restart the engine.")
    return lines


def node_label_advice(node_labels: Mapping[str, str], *, hostname: str) -> list[str]:
    """The command that gives the node, on a manager, the labels the hub shows and places services by."""
    import shlex

    added = " ".join(f"--label-add {shlex.quote(f'{k}={v}')}" for k, v in sorted(node_labels.items()))
    return ["# On a manager, the labels the hub shows this node's GPUs with and places services by:",
            f"docker node update {added} {shlex.quote(hostname)}"]


def merge_daemon_config(existing: Mapping[str, Any], ours: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """`existing` daemon.json with `ours` (swarm.node_daemon_config): its other keys and labels kept; its
    gpuspawner.* labels and the generic resources of NVIDIA kinds, or naming one of our devices, replaced.
    Other generic resources stay."""
    if not isinstance(existing, Mapping):
        raise CLIError(f"{where} is not a JSON object")
    for key in ("labels", "node-generic-resources"):
        if not isinstance(existing.get(key, []), list):
            raise CLIError(f"{where}: {key!r} is not a list")
    devices = {entry.split("=", 1)[1] for entry in ours["node-generic-resources"]}

    def stale(entry: object) -> bool:
        kind, _, value = str(entry).partition("=")
        return swarm.is_device_kind(kind) or value in devices

    merged = dict(existing)
    merged["node-generic-resources"] = [e for e in existing.get("node-generic-resources", []) if not stale(e)] + list(
        ours["node-generic-resources"])
    merged["labels"] = [e for e in existing.get("labels", []) if not str(e).startswith(labels.PREFIX)] + list(ours["labels"])
    return merged


def cmd_swarm_node_config(args: argparse.Namespace) -> int:
    from .nvml import read_inventory

    inventory = read_inventory()
    if inventory.problem:
        raise CLIError(f"no GPU to advertise: {inventory.problem}")
    config = swarm.node_daemon_config(inventory)
    if not config["node-generic-resources"]:
        raise CLIError("no GPU to advertise: this host has no healthy GPU or MIG device (see nvidia-smi)")
    if args.merge:
        try:
            existing = json.loads(Path(args.merge).read_text())
        except OSError as e:
            raise CLIError(f"cannot read {args.merge}: {e.strerror or e}") from None
        except ValueError as e:
            raise CLIError(f"{args.merge} is not JSON: {e}") from None
        config = merge_daemon_config(existing, config, where=args.merge)
    print(json.dumps(config, indent=2))
    runtime = config.get("default-runtime")
    advice = runtime_advice(swarm.resource_variables(inventory), default_runtime=runtime if isinstance(runtime, str) else None)
    advice += node_label_advice(swarm.node_labels(inventory), hostname=platform.node())
    print("\n".join(advice), file=sys.stderr)
    return 0


# --- Audit --------------------------------------------------------------------------------------


class StoreMissing(CLIError):
    """No audit store, or no sealing key, where the configuration says: exit status 2."""


def _store(args: argparse.Namespace, *, with_key: bool = False) -> Any:
    """The hub's audit store, read-only: never creates one (a missing store is an error).

    `with_key`: the sealing key is required (verify); otherwise it is used where this user can
    read it, so exports and usage check each record's seals, and mark them unchecked where not.
    """
    from .store import AuditStore, AuditStoreError, AuditStoreMissing, load_key

    hub = load_spawner_settings(args.config)
    try:
        store = AuditStore(hub.audit_db_url, head_file=hub.audit_head_file, create=False)
        if with_key:
            store.key = load_key(hub.audit_key_file)
        else:
            try:
                store.key = load_key(hub.audit_key_file)
            except AuditStoreError:
                store.key = None
        return store
    except AuditStoreMissing as e:
        where = f" (configuration {Path(args.config).resolve()})" if args.config else " (no jupyterhub_config.py here; pass -f)"
        raise StoreMissing(f"{e}{where}") from None
    except Exception as e:
        raise CLIError(f"cannot open the audit database {hub.audit_db_url}: {e}") from None


def _record(args: argparse.Namespace) -> Any:
    record = _store(args).get(args.id)
    if record is None:
        raise CLIError(f"no audit record {args.id}")
    return record


def cmd_audit_export(args: argparse.Namespace) -> int:
    from . import export
    from .store import Filters

    store = _store(args)
    records = store.iter_records(Filters(since=args.since, until=args.until, user=args.user, profile=args.profile))
    chunks = {"csv": export.csv_lines, "jsonl": export.jsonl_lines, "ro-crate": export.ro_crate_chunks}[args.format](records)
    target = args.output
    if args.format == "ro-crate" and target and Path(target).is_dir():
        target = str(Path(target) / "ro-crate-metadata.json")
    try:
        out = open(target, "w", encoding="utf-8", newline="") if target else sys.stdout
    except OSError as e:
        raise CLIError(f"cannot write {target}: {e.strerror or e}") from None
    try:
        for chunk in chunks:
            out.write(chunk)
    except OSError as e:  # a full disk, a closed pipe
        raise CLIError(f"cannot write {target or 'standard output'}: {e.strerror or e}") from None
    finally:
        if target:
            out.close()
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    """GPU-hours and idle GPU-hours by user (or server, profile, model, group) within a period, from the
    audit records, streamed."""
    import datetime

    from .usage import usage_report

    now = datetime.datetime.now(datetime.timezone.utc)
    until = min(times.parse_time(args.until), now) if args.until else now
    since = times.parse_time(args.since) if args.since else None
    by = [b.strip() for b in args.by.split(",") if b.strip()]
    try:
        usage_report([], by=by, since=since, until=until, now=now)
    except ValueError as e:
        raise CLIError(f"--by: {e}") from None
    store = _store(args)
    report, rejected = _usage_read(store, args.jobs, until_arg=args.until, by=by, since=since, until=until, now=now)
    if rejected:
        print(f"gpuspawner usage: WARNING: {rejected} record(s) fail their seals or lie outside the log's numbering and "
              "are not counted; run `gpuspawner audit verify`.", file=sys.stderr)
    if store.key is None:
        print("gpuspawner usage: the sealing key is not readable here, so seals were not checked.", file=sys.stderr)
    rows = report.rows
    out = [{**dict(zip(by, r.key, strict=True)), **_usage_figures(r)} for r in rows]
    period = f"{since.isoformat() if since else 'the first record'} to {until.isoformat()}"
    if args.format == "json":
        print(json.dumps({"since": since.isoformat() if since else None, "until": until.isoformat(), "by": by,
                          "rows": out, "total": _usage_figures(report.total)}, indent=2))
    elif args.format == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=[*by, "gpu_hours", "device_hours", "servers", "idle_gpu_hours"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(out)  # an unknown idle_gpu_hours (None) is an empty cell
    else:
        header = [b.upper() for b in by] + ["GPU-HOURS", "DEVICE-HOURS", "SERVERS", "IDLE-GPU-HOURS"]
        lines = [header] + [[*r.key, f"{r.gpu_hours:.2f}", f"{r.device_hours:.2f}", str(r.servers),
                             "-" if r.idle_gpu_hours is None else f"{r.idle_gpu_hours:.2f}"] for r in rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        print("\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines))
        idle = report.total.idle_gpu_hours
        print(f"GPU-hours {period}: {report.total.gpu_hours:.2f}"
              + (f", idle {idle:.2f}" if idle is not None else "")
              + " (a MIG slice counts its share of its GPU"
              + ("; a server counts in each of its groups, so the groups add up to more" if "group" in by else "")
              + ")")
    return 0


def _usage_read(store: Any, jobs: int, *, until_arg: str | None, smallest: int = 10_000, **period: Any) -> tuple[Any, int]:
    """The usage report of the store's records and how many rows it rejected, read in up to `jobs` processes
    side by side (each checks the seals of its part of the log, of at least `smallest` entries), then added up."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from .usage import merged_reports

    parts = store.usage_parts(jobs, smallest=smallest)
    if len(parts) == 1:
        return _usage_part(store, parts[0], until_arg, period)
    n = len(parts)
    # fork: the process has loaded what a part needs, and holds no threads
    with ProcessPoolExecutor(n, mp_context=get_context("fork")) as pool:
        done = list(pool.map(_usage_part_apart, [store.url] * n, [store.key] * n, parts, [until_arg] * n, [period] * n))
    return merged_reports(report for report, _ in done), sum(rejected for _, rejected in done)


def _usage_part_apart(url: str, key: bytes | None, part: Any, until_arg: str | None, period: dict[str, Any]) -> tuple[Any, int]:
    from .store import AuditStore

    store = AuditStore(url, key=key, create=False)
    try:
        return _usage_part(store, part, until_arg, period)
    finally:
        store.dispose()


def _usage_part(store: Any, part: Any, until_arg: str | None, period: dict[str, Any]) -> tuple[Any, int]:
    from .usage import usage_report

    # a record requested before the period may still hold GPUs in it: only the end bounds the stream
    read: list[Any] = []
    report = usage_report(store.iter_held(until=until_arg, read=read, part=part), **period)
    return report, read[0].rejected


def _jobs(text: str) -> int:
    """An argparse type: a number of processes, 1 or more."""
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes (1 or more)")
    return jobs


def _usage_figures(row: Usage) -> dict[str, Any]:
    """A usage row's figures as the JSON and CSV outputs show them; unknown idle time stays None."""
    idle = row.idle_gpu_hours
    return {"gpu_hours": round(row.gpu_hours, 4), "device_hours": round(row.device_hours, 4), "servers": row.servers,
            "idle_gpu_hours": None if idle is None else round(idle, 4)}


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 for a log that holds, 2 for anything else: every malformed store, head, witness or key
    is a one-line verdict, never a traceback."""
    try:
        result = _verification(args)
    except StoreMissing:
        raise
    except Exception as e:  # a verdict, whatever broke: the admin needs the answer, not a traceback
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"FAILED: {message}", file=sys.stderr)
        return 2
    print(result.message(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 2


def _verification(args: argparse.Namespace) -> Any:
    from .auditlog import Witness, head_from_text, parse_head

    witnesses = []
    for text in args.expect_head or ():
        try:
            witnesses.append(Witness(parse_head(text), f"the head given with --expect-head ({text[:20]}…)"))
        except ValueError as e:
            raise CLIError(f"--expect-head: {e}") from None
    for path in args.witness or ():
        try:
            head = head_from_text(Path(path).read_text())
        except OSError as e:
            raise CLIError(f"--witness {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise CLIError(f"--witness {path}: {e}") from None
        witnesses.append(Witness(head, f"the witness {path}"))
    store = _store(args, with_key=True)
    return store.verify(key=store.key, witnesses=witnesses)


def cmd_audit_adopt(args: argparse.Namespace) -> int:
    """Carry a store of the earlier format (records sealed whole) over to the append-only log, once."""
    from .store import LEGACY_TABLE, LOG_TABLE, AuditStore, AuditStoreError, load_key

    hub = load_spawner_settings(args.config)
    try:
        store = AuditStore(hub.audit_db_url, head_file=hub.audit_head_file, create=False)
    except AuditStoreError as e:
        if LEGACY_TABLE not in str(e):
            raise StoreMissing(str(e)) from None
    else:
        raise CLIError(f"the audit store at {hub.audit_db_url} is an append-only log already ({LOG_TABLE}): nothing to carry over")
    try:
        store = AuditStore(hub.audit_db_url, key=load_key(hub.audit_key_file), head_file=hub.audit_head_file,
                           accept_adoption_problems=args.accept_problems)
    except AuditStoreError as e:
        raise CLIError(str(e)) from None
    print(store.verify().message())
    return 0


def cmd_audit_show(args: argparse.Namespace) -> int:
    from .audit import record_to_dict

    print(json.dumps(record_to_dict(_record(args)), indent=2, ensure_ascii=False))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .export import reproduce_command

    hub = load_spawner_settings(args.config)
    # an older record may hold what the admin's names (GPUSpawner.audit_redact_names) now hide
    print(reproduce_command(_record(args), extra_names=hub.audit_redact_names))
    return 0


# --- Configuration reference ------------------------------------------------------------------

REFERENCE_BEGIN = "<!-- BEGIN CONFIGURATION REFERENCE (generated by `gpuspawner config-reference`) -->"
REFERENCE_END = "<!-- END CONFIGURATION REFERENCE -->"


def config_reference() -> str:
    """Markdown for every setting GPUSpawner adds, from the traits' own help texts."""
    import inspect as _inspect

    from .traits import GPUSpawnerConfig

    parts = []
    for name, trait in sorted(GPUSpawnerConfig.class_own_traits(config=True).items()):
        default = trait.default_value_repr()
        kind = type(trait).__name__
        help_text = _inspect.cleandoc(trait.help or "").strip()
        parts.append(f"#### `GPUSpawner.{name}`\n\n{kind}, default `{default}`\n\n{help_text}\n")
    return "\n".join(parts)


def cmd_config_reference(args: argparse.Namespace) -> int:
    text = config_reference()
    if not args.update:
        print(text)
        return 0
    path = Path(args.update)
    content = path.read_text()
    if REFERENCE_BEGIN not in content or REFERENCE_END not in content:
        raise CLIError(f"{path} has no configuration reference markers")
    head, _, rest = content.partition(REFERENCE_BEGIN)
    _, _, tail = rest.partition(REFERENCE_END)
    path.write_text(f"{head}{REFERENCE_BEGIN}\n\n{text}\n{REFERENCE_END}{tail}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuspawner", description="Admin tools for gpuspawner hubs.")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "-f", "--config", default="jupyterhub_config.py" if os.path.exists("jupyterhub_config.py") else None,
        help="the hub's jupyterhub_config.py (default: ./jupyterhub_config.py if present)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gpus = sub.add_parser("gpus", parents=[config], help="list the host's GPUs and which server holds each")
    gpus.add_argument("--hub-id", help="the hub's GPUSpawner.hub_id, if not the configured or derived one")
    gpus.add_argument("--json", action="store_true", help="print JSON instead of a table")
    gpus.add_argument(
        "--swarm", action="store_true",
        help="the devices every node of the Docker Swarm advertises, read from the manager the Docker settings "
             "reach (DOCKER_HOST, or the default socket), with each device's node; drained, paused or down nodes "
             "are listed apart",
    )
    gpus.set_defaults(run=cmd_gpus)

    node_config = sub.add_parser(
        "swarm-node-config",
        help="on a GPU node of a Docker Swarm: print the daemon.json that advertises its GPUs and MIG devices "
             "(NVML), and, on stderr, the NVIDIA container runtime setting that hands them to containers and the "
             "node labels to set on a manager",
    )
    node_config.add_argument(
        "--merge", metavar="DAEMON_JSON",
        help="an existing daemon.json (e.g. /etc/docker/daemon.json) to print with these settings merged in: its "
             "other keys and labels are kept, its gpuspawner.* labels and NVIDIA generic resources replaced",
    )
    node_config.set_defaults(run=cmd_swarm_node_config)

    audit_cmd = sub.add_parser("audit", help="the reproducibility records of the hub's servers")
    audit_sub = audit_cmd.add_subparsers(dest="audit_command", required=True)
    export = audit_sub.add_parser("export", parents=[config], help="export records (streamed)")
    export.add_argument("--format", choices=("csv", "jsonl", "ro-crate"), default="csv")
    zones = "ISO 8601, such as 2026-11-21 or 2026-11-21T12:00+02:00; without a zone, UTC"
    export.add_argument("--since", type=time_argument, help=f"records requested at or after this time ({zones})")
    export.add_argument("--until", type=time_argument, help=f"records requested before this time ({zones})")
    export.add_argument("--user", help="one user's records")
    export.add_argument("--profile", help="one profile's records")
    export.add_argument(
        "-o", "--output",
        help="write here (relative to the current folder) instead of standard output (ro-crate: a file or folder)",
    )
    export.set_defaults(run=cmd_audit_export)
    verify = audit_sub.add_parser(
        "verify", parents=[config],
        help="check that no record was changed, forged or deleted (exit 2 if one was, or if there is no store)",
    )
    verify.add_argument(
        "--expect-head", metavar="N:SEAL", action="append",
        help="a head printed by an earlier verify (its 'Head:' line) and kept elsewhere: the log must still hold it",
    )
    verify.add_argument(
        "--witness", metavar="FILE", action="append",
        help="a head kept in a file anywhere (a copy of the hub's head file, the audit service's witness file, or "
             "a text file holding an N:SEAL line): the log must still hold it; may be given several times",
    )
    verify.set_defaults(run=cmd_audit_verify)
    adopt = audit_sub.add_parser(
        "adopt", parents=[config],
        help="carry a store written by an earlier gpuspawner (records sealed whole) over to the append-only log, once "
             "(the hub does it on its first start too)",
    )
    adopt.add_argument(
        "--accept-problems", action="store_true",
        help="carry it over even where it fails its own checks; the problems are written into the new log's first entry",
    )
    adopt.set_defaults(run=cmd_audit_adopt)
    show = audit_sub.add_parser("show", parents=[config], help="one record, in full")
    show.add_argument("id")
    show.set_defaults(run=cmd_audit_show)

    usage = sub.add_parser(
        "usage", parents=[config],
        help="GPU-hours and idle GPU-hours by user, server, profile, model or group, from the audit records",
    )
    usage.add_argument("--since", type=time_argument, help=f"from this time ({zones}); default: the first record")
    usage.add_argument("--until", type=time_argument, help=f"up to this time ({zones}); default: now")
    usage.add_argument(
        "--by", default="user",
        help="what to group by: user, server, profile, model, group (the user's JupyterHub groups: a server counts "
             "in each, so the groups may add up to more than the total; none: '(no group)'), or several joined by "
             "commas (default: user)",
    )
    usage.add_argument("--format", choices=("table", "csv", "json"), default="table")
    usage.add_argument(
        "--jobs", type=_jobs, default=min(os.cpu_count() or 1, 8),
        help="processes that read a large log side by side, each checking the seals of its part "
             "(default: this machine's CPUs, at most 8)",
    )
    usage.set_defaults(run=cmd_usage)

    reproduce = sub.add_parser("reproduce", parents=[config], help="a docker run command that recreates a record's environment")
    reproduce.add_argument("id")
    reproduce.set_defaults(run=cmd_reproduce)

    reference = sub.add_parser("config-reference", help="print the settings reference (Markdown) from the help texts")
    reference.add_argument("--update", metavar="FILE", help="rewrite the reference between the markers in FILE")
    reference.set_defaults(run=cmd_config_reference)

    args = parser.parse_args(argv)
    # Paths the caller typed mean what they mean where the caller is: loading the config moves
    # into the config's folder.
    for name in ("config", "output"):
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    if getattr(args, "since", None) and getattr(args, "until", None) and args.since >= args.until:
        export.error(f"--since {args.since} is not before --until {args.until}, so no record can match")
    try:
        result: int = args.run(args)
        return result
    except StoreMissing as e:
        print(f"gpuspawner {args.command}: {e}", file=sys.stderr)
        return 2
    except (CLIError, ConfigFileError, settings.ConfigError) as e:
        print(f"gpuspawner {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
