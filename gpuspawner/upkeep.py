"""The hub's start-up check and its upkeep loop (reconciling containers and records with servers).

The hub's configuration is checked once it has loaded; then its containers, audit records and
unconfirmed claims are checked against its servers, at start and every ``GPUSpawner.reconcile_interval``.

What to do is decided by :mod:`gpuspawner.reconcile` (pure); this module reads the Docker engine
and the audit store for it and carries out its plan.
"""

from __future__ import annotations

import asyncio
import atexit
from dataclasses import replace
from typing import Any

from traitlets import TraitError
from traitlets.config import Config

from . import reconcile, seams, settings
from .hubwide import resources
from .reclaim import keep_time
from .recorder import close_record
from .spawner import GPUSpawner
from .store import AuditStoreError

_check_scheduled = False


def check_when_the_hub_starts() -> None:
    """Check the hub's configuration once it has loaded, so bad config stops the hub at start.

    Called whenever ``gpuspawner.GPUSpawner`` is looked up (see ``gpuspawner/__init__.py``):
    JupyterHub does that when it applies ``spawner_class = "gpu"`` from its config file, a
    moment before the values are merged into ``app.config``. So the check runs on the event
    loop's next turn, still inside the hub's start-up, before anyone can spawn: it builds the
    configured spawner class from the configuration (:func:`checked_config`). A bad value is
    logged as one critical line naming the setting, and the hub exits with status 1.
    """
    global _check_scheduled
    from jupyterhub.app import JupyterHub

    if _check_scheduled or not JupyterHub.initialized():
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not inside the hub's start-up (a script, the CLI, a test)
        return
    app = JupyterHub.instance()

    def check() -> None:
        spawner_class = app.spawner_class if isinstance(app.spawner_class, type) else GPUSpawner
        try:
            caretaker = checked_config(app.config, spawner_class if issubclass(spawner_class, GPUSpawner) else GPUSpawner)
        except settings.ConfigError as e:
            app.log.critical("Bad configuration: %s", e)
            app.exit(1)
            return
        resources.keep(maintain(app, caretaker))

    _check_scheduled = True
    loop.call_soon(check)


class _Caretaker:
    """The user of the spawner that does the hub's upkeep: no one."""

    name = "gpuspawner-caretaker"
    admin = False
    groups: tuple[Any, ...] = ()


def checked_config(config: Config, spawner_class: type[GPUSpawner] = GPUSpawner) -> GPUSpawner:
    """A spawner of no server built from the hub's configuration: every setting checked by the traits'
    own validators (GPUSpawner's, DockerSpawner's, a subclass's), as every server's spawner will be.
    Raises ConfigError naming the first bad setting, its value and what is allowed."""
    try:
        return spawner_class(config=config, user=_Caretaker())
    except TraitError as e:
        raise settings.ConfigError(str(e)) from None


async def maintain(app: Any, caretaker: GPUSpawner) -> None:
    """The hub's own upkeep: once the hub has started, and every ``reconcile_interval`` after,
    check its containers and records against its servers (see :mod:`gpuspawner.reconcile`)."""
    started = getattr(app, "_start_future", None)
    if started is not None:
        await started  # the servers JupyterHub resumes are known only once it has started
    caretaker.hub = getattr(app, "hub", None)  # known once the hub has started
    resources.keep(keep_time(caretaker, app.log))  # the servers' time limits (gpuspawner.reclaim)
    resources.keep(witness_the_audit_head(caretaker, app.log))
    while True:
        try:
            await reconcile_once(caretaker, app.log)
        except Exception:
            app.log.exception("gpuspawner could not check the hub's containers against its servers")
        if caretaker.reconcile_interval <= 0:
            return
        await asyncio.sleep(caretaker.reconcile_interval)


async def witness_the_audit_head(caretaker: GPUSpawner, log: Any) -> None:
    """Write the audit log's head to the hub's log at start, every ``audit_head_log_interval`` and at
    stop, each time checking the log against the head file: the hub's own log becomes one more
    witness, and a rollback is refused (and logged) before the next spawn meets it."""
    store = caretaker.audit_store()
    atexit.register(lambda: log.info("Audit log head at hub stop: %s (%s)", store.head.text(), store.where))
    when = "start"
    while True:
        try:
            head = await store.check_head()
            log.info("Audit log head at hub %s: %s (%s)", when, head.text(), store.where)
        except AuditStoreError as e:
            log.error("Audit log check at hub %s failed: %s", when, e)
        if caretaker.audit_head_log_interval <= 0:
            return
        await asyncio.sleep(caretaker.audit_head_log_interval)
        when = "check"


def _server_view(spawner: GPUSpawner) -> reconcile.ServerView:
    return reconcile.ServerView(
        user=spawner.user.name, server=spawner.name or "", active=bool(spawner.active),
        spawning=spawner._spawning, ready=bool(spawner.ready), container_id=spawner.object_id or "",
        record_id=spawner.audit_record_id,
    )


async def reconcile_once(caretaker: GPUSpawner, log: Any) -> reconcile.Plan:
    """One check of this hub's containers, open records and unconfirmed claims; carry out the plan."""
    store = caretaker.audit_store()
    containers = await caretaker.server_objects()
    spawners = {key: sp for key, sp in list(resources.spawners.items())}
    open_records = [
        reconcile.OpenRecord(id=r.id, user=r.user, server=r.server, outcome=r.outcome)
        for r in await store.open_records(caretaker.hub_id)
    ]
    todo = reconcile.plan(
        containers, [_server_view(sp) for sp in spawners.values()], open_records,
        unconfirmed=resources.book.unconfirmed(), remove=caretaker.remove,
    )
    for c in todo.stop:
        log.warning("Stopping orphan %s %s of %s/%s: no server of this hub owns it", caretaker.object_type, c.name,
                    c.user, c.server)
        ended_at = await caretaker.end_server_object(c, remove=caretaker.remove)
        if c.record_id:
            # the hub may have died before the record learnt its container's id: say which it was
            await close_record(store, c.record_id, log, reconcile.Ending(
                "abandoned", reconcile.ORPHAN_STOPPED, container_id=c.id, container_name=c.name, ended_at=ended_at))
    for c in todo.ended:
        ending = replace(await caretaker.ended_server_object(c), container_id=c.id, container_name=c.name)
        await close_record(store, c.record_id, log, ending)
    for c in todo.remove:
        await caretaker.end_server_object(c, remove=True)
    for record_id, ending in todo.close:
        log.warning("Closing audit record %s: %s", record_id, ending.error)
        await close_record(store, record_id, log, ending)
    for user, server, record_id in todo.adopt:
        adopted = spawners.get((user, server))
        if adopted is not None and not adopted.audit_record_id:
            adopted.audit_record_id = record_id
    for record_id in todo.now_running:
        try:
            await store.update(record_id, outcome="running", ready_at=seams.now_iso())
        except AuditStoreError as e:
            log.debug("Audit record %s not marked running: %s", record_id, e)
    for spawn_id in todo.release:
        log.info("Devices of failed spawn %s released: its container is not running", spawn_id)
        resources.book.release(spawn_id)
    return todo
