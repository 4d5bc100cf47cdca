"""Giving GPUs back: the hub's loop that samples its servers' GPUs and stops servers past their time limits.

Every ``gpu_sample_seconds`` (only while some server has a limit), the hub reads each GPU's
utilisation through NVML (in a thread), carries each server's idle clock forward
(:func:`gpuspawner.limits.idle_since`) and judges it (:func:`gpuspawner.limits.judge`): a server
near its limit gets a warning its user sees on the home page (:func:`page_notices`); one past it
is stopped through JupyterHub's own stop path, so its record says why, its GPUs are freed and
the next spawn in the GPU queue is served.

The idle clocks are kept in ``gpuspawner-clocks.json`` in the hub's data folder, by audit record,
and the runtime clock in each server's state (when it started): a hub restart picks both up
where they were instead of starting them from zero.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .hubconfig import clocks_path, load_clocks, save_clocks
from .hubwide import resources
from .limits import idle_since, judge
from .nvml import NVMLTimeout

if TYPE_CHECKING:
    from .spawner import GPUSpawner

HUB_TEMPLATES = str(Path(__file__).parent / "templates" / "hub")  # JupyterHub's home page with the notices


async def keep_time(caretaker: GPUSpawner, log: Any) -> None:
    """Sample and judge the hub's servers every ``gpu_sample_seconds``, for the life of the hub."""
    path = clocks_path()
    resources.idle_clocks.update(await asyncio.to_thread(load_clocks, path))
    while True:
        try:
            await check_limits(caretaker, log, path)
        except Exception:
            log.exception("gpuspawner could not check its servers' time limits")
        await asyncio.sleep(caretaker.gpu_sample_seconds)


async def check_limits(caretaker: GPUSpawner, log: Any, path: Path | None = None) -> None:
    """One round: sample, carry the idle clocks, warn, stop."""
    servers = [sp for sp in list(resources.spawners.values())
               if sp.limits.any and sp.started_at and sp.ready and not sp._spawning and sp.audit_record_id]
    if not servers:
        return
    try:
        inventory = await caretaker.nvml_reader().get()
        utilization = {d.uuid: d.utilization for d in inventory.devices}
    except NVMLTimeout as e:  # no sample this round: the idle clocks stand still, runtime limits still hold
        log.warning("No GPU sample for the time limits: %s", e)
        utilization = None
    now = time.time()
    live = {sp.audit_record_id for sp in list(resources.spawners.values()) if sp.audit_record_id}
    clocks = {record: since for record, since in resources.idle_clocks.items() if record in live}
    for sp in servers:
        record = sp.audit_record_id
        idle = resources.idle_clocks.get(record) if utilization is None else idle_since(
            resources.idle_clocks.get(record), [utilization.get(u) for u in sp.gpu_devices],
            threshold=sp.limits.idle_threshold, now=now)
        if idle is None:
            clocks.pop(record, None)
        else:
            clocks[record] = idle
        verdict = judge(sp.limits, started=sp.started_at, idle_from=idle, now=now)
        if verdict.action == "warn" and sp.limit_notice != verdict.reason:
            log.info("Warned %s: %s", sp._log_name, verdict.reason)
        sp.limit_notice = verdict.reason if verdict.action == "warn" else ""
        if verdict.action == "stop":
            log.warning("Stopping %s: %s", sp._log_name, verdict.reason)
            resources.last_stops[(sp.user.name, sp.name or "")] = verdict.reason
            sp.stop_reason = verdict.reason
            resources.keep(sp.user.stop(sp.name))  # JupyterHub's own stop: proxy, state, record, GPUs
            clocks.pop(record, None)
    resources.idle_clocks = clocks
    if path is not None:
        await asyncio.to_thread(save_clocks, path, clocks)


def page_notices(user: Any) -> list[dict[str, str]]:
    """What the hub's pages tell `user` of their servers' time limits: a warning before a stop, and
    why the hub stopped one. For ``c.JupyterHub.template_vars = {"gpuspawner_notices": page_notices}``."""
    notices = []
    for (name, server), sp in list(resources.spawners.items()):
        if name == getattr(user, "name", None) and sp.limit_notice:
            notices.append({"server": server, "kind": "warning", "text": sp.limit_notice})
    for (name, server), reason in list(resources.last_stops.items()):
        running = resources.spawners.get((name, server))
        if name == getattr(user, "name", None) and not (running is not None and running.active):
            notices.append({"server": server, "kind": "stopped", "text": reason})
    return notices
