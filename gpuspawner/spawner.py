"""GPUSpawner: DockerSpawner for shared GPU servers.

This module is glue. Decisions are made by the pure modules beside it (``allocation`` picks
devices, ``claims`` says who holds what, ``injection`` turns devices into DeviceRequests and
environment, ``labels`` marks containers, ``settings`` checks configuration); this class
feeds them what NVML (``nvml``) and the Docker engine know and hands their answers to
DockerSpawner.

A spawn goes like this: under one lock per hub process, rebuild the claim table from this
hub's running containers, read the inventory, choose devices and note a pending claim; then
create the container with the devices in its labels, its DeviceRequests and its environment,
and start it. Once it runs, its labels are the claim. A failed spawn drops the pending claim
at once; a stopped or dead container holds nothing.

Override points, for admins who subclass GPUSpawner:

- ``container_labels()``: the labels of every container this spawner creates. Call
  ``super()`` and add to the result; the ``gpuspawner.*`` labels must stay.
- ``get_env()``: as in every spawner; call ``super()``, which adds the GPU variables.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from dockerspawner import DockerSpawner
from tornado import web
from traitlets import Any as AnyTrait
from traitlets import Enum, Float, TraitError, Unicode, default, validate
from traitlets.config import Config

from . import injection, labels, settings
from ._version import __version__
from .allocation import Grant, GPURequest, Holder, Refusal, allocate
from .claims import ClaimBook, claims_from_containers
from .nvml import NVMLInventory

WAIT_POLL_SECONDS = 2.0


def _hub_db_url() -> str:
    """The database URL of the running hub, made absolute for SQLite files."""
    from jupyterhub.app import JupyterHub

    if not JupyterHub.initialized():
        return ""
    url: str = JupyterHub.instance().db_url
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        # A relative SQLite path names a different database from another working directory.
        url = prefix + os.path.abspath(url[len(prefix) :])
    return url


class _HubWide:
    """What all servers of one hub process share: the NVML reader, pending claims, the lock."""

    def __init__(self) -> None:
        self.book = ClaimBook()
        self.nvml: NVMLInventory | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def inventory(self, cache_seconds: float) -> NVMLInventory:
        if self.nvml is None:
            self.nvml = NVMLInventory(cache_seconds=cache_seconds)
        return self.nvml


_hub = _HubWide()


class GPUSpawner(DockerSpawner):
    """A DockerSpawner that gives each server GPUs that are really free, by UUID.

    Every container is labelled with this hub's identity, the user, the server and the
    devices it holds (see :mod:`gpuspawner.labels`), so the hub rebuilds its claims from the
    Docker engine after a restart and never confuses its containers with another hub's.
    """

    hub_id = Unicode(
        help="""
        A name for this hub, written into the labels of every container it creates.

        The hub uses it to tell its own containers from those of other hubs that share the
        same Docker engine, and to find its servers and their GPUs again after a restart. It
        must stay the same for the life of the hub's database and differ between hubs on one
        engine.

        By default it is derived from the host name and the hub's database URL, which meets
        both needs; set it when the hub moves to another host or database but keeps its
        containers. Example: ``c.GPUSpawner.hub_id = "physics-lab-hub"``.
        """,
    ).tag(config=True)

    gpu_request = AnyTrait(
        0,
        help="""
        The GPUs each server gets: a number of whole GPUs, or a dict.

        Dict keys: ``count`` (whole GPUs), ``mig_profile`` (one MIG device of that profile,
        such as ``"1g.10gb"``), ``model`` (a regular expression searched in the GPU model
        name, such as ``"A100|H100"``) and ``min_memory`` (least memory per device, such as
        ``"40G"``; binary units). ``0`` (the default) means no GPU: the container then gets
        ``NVIDIA_VISIBLE_DEVICES=void``.

        Examples::

            c.GPUSpawner.gpu_request = 1
            c.GPUSpawner.gpu_request = {"count": 2, "model": "A100", "min_memory": "40G"}
            c.GPUSpawner.gpu_request = {"mig_profile": "1g.10gb"}
        """,
    ).tag(config=True)

    gpu_wait_timeout = Float(
        0,
        help="""
        Seconds a spawn waits for devices to free up when none fit, with progress messages
        while it waits. ``0`` (the default) fails at once with the reason, as an HTTP 503.
        Waiting never outlasts ``Spawner.start_timeout``. Example: ``c.GPUSpawner.gpu_wait_timeout = 300``.
        """,
    ).tag(config=True)

    nvml_cache_seconds = Float(
        2.0,
        help="""
        How long an NVML inventory of the host's GPUs is reused before NVML is asked again.
        A burst of spawns and spawn-form views then costs one NVML read. Claims by this hub's
        servers are always read fresh from the Docker engine, so the cache never makes two
        servers share a device; it only delays noticing a GPU that became busy outside the
        hub or unhealthy. Example: ``c.GPUSpawner.nvml_cache_seconds = 5``.
        """,
    ).tag(config=True)

    busy_memory_threshold = AnyTrait(
        "1G",
        help="""
        A GPU with more memory in use than this, and not held by a server of this hub, is
        busy outside the hub and not handed out (a GPU with compute processes always is).
        A size such as ``"1G"`` or ``"512M"`` (binary units) or a number of bytes.
        Example: ``c.GPUSpawner.busy_memory_threshold = "256M"``.
        """,
    ).tag(config=True)

    device_injection = Enum(
        ["nvidia", "cdi"],
        default_value="nvidia",
        help="""
        How devices reach the container.

        ``"nvidia"`` (the default): a Docker DeviceRequest of driver ``nvidia`` naming the
        devices by UUID, for engines with the NVIDIA Container Toolkit. ``"cdi"``: Container
        Device Interface names ``nvidia.com/gpu=<UUID>`` (driver ``cdi``), for engines set up
        with ``nvidia-ctk cdi generate``. Example: ``c.GPUSpawner.device_injection = "cdi"``.
        """,
    ).tag(config=True)

    gpu_devices: tuple[str, ...] = ()  # UUIDs this server holds, kept in the spawner's state

    @default("hub_id")
    def _default_hub_id(self) -> str:
        return labels.hub_id_for(hostname=socket.gethostname(), db_url=_hub_db_url())

    @validate("gpu_request")
    def _check_gpu_request(self, proposal: Any) -> Any:
        _trait_check(settings.parse_gpu_request, proposal.value, "GPUSpawner.gpu_request")
        return proposal.value

    @validate("busy_memory_threshold")
    def _check_busy_memory_threshold(self, proposal: Any) -> Any:
        _trait_check(settings.parse_bytes, proposal.value, "GPUSpawner.busy_memory_threshold")
        return proposal.value

    @validate("gpu_wait_timeout", "nvml_cache_seconds")
    def _check_seconds(self, proposal: Any) -> float:
        _trait_check(settings.parse_seconds, proposal.value, f"GPUSpawner.{proposal.trait.name}")
        return float(proposal.value)

    @validate("extra_host_config")
    def _check_extra_host_config(self, proposal: Any) -> Any:
        _trait_check(settings.check_extra_host_config, proposal.value, "DockerSpawner.extra_host_config")
        return proposal.value

    # --- Identity and labels ---------------------------------------------------------------

    @property
    def holder(self) -> Holder:
        return Holder(user=self.user.name, server=self.name or "")

    @property
    def server_identity(self) -> labels.ServerIdentity:
        """Which hub, user and server this spawner's container belongs to."""
        return labels.ServerIdentity(hub_id=self.hub_id, user=self.user.name, server=self.name or "")

    def container_labels(self) -> dict[str, str]:
        """The labels for this server's container (override point; call super() and add)."""
        return labels.server_labels(self.server_identity, version=__version__, devices=self.gpu_devices)

    # --- State -------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        if self.gpu_devices:
            state["gpu_devices"] = list(self.gpu_devices)
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.gpu_devices = tuple(state.get("gpu_devices", ()))

    def clear_state(self) -> None:
        super().clear_state()
        self.gpu_devices = ()

    def get_env(self) -> dict[str, str]:
        env: dict[str, str] = super().get_env()
        env.update(injection.gpu_environment(self.gpu_devices))
        return env

    # --- Docker ------------------------------------------------------------------------------

    def docker(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one docker-py call off the event loop; every container creation passes here.

        DockerSpawner builds the create call from its configuration and sends it through this
        method, so this is the one place where a container gets its labels and devices: a
        fresh dict for each call, leaving the configured ``extra_create_kwargs`` untouched.
        """
        if method == "create_container":
            kwargs = dict(kwargs, labels=labels.merge_labels(kwargs.get("labels"), self.container_labels()))
            requests = injection.device_requests(self.gpu_devices, mode=self.device_injection)
            if requests:
                kwargs["host_config"] = dict(kwargs.get("host_config") or {}, DeviceRequests=requests)
        return super().docker(method, *args, **kwargs)

    async def engine_claims(self) -> dict[str, Holder]:
        """UUID -> holder for this hub's running containers, read from the Docker engine now."""
        containers = await self.docker("containers", all=True, filters=labels.hub_filter(self.hub_id))
        return claims_from_containers(containers, hub_id=self.hub_id)

    # --- Allocation --------------------------------------------------------------------------

    @property
    def requested_gpus(self) -> GPURequest:
        """The GPUs this server asks for (validated when the configuration loaded)."""
        return settings.parse_gpu_request(self.gpu_request, where="GPUSpawner.gpu_request")

    async def allocate_devices(self, request: GPURequest) -> Grant:
        """Choose devices and note a pending claim, waiting if configured; else HTTP 503."""
        waited_since = time.monotonic()
        deadline = waited_since + min(self.gpu_wait_timeout, self.start_timeout)
        threshold = settings.parse_bytes(self.busy_memory_threshold, where="GPUSpawner.busy_memory_threshold")
        while True:
            async with _hub.lock:
                claims = _hub.book.merged(await self.engine_claims())
                inventory = await _hub.inventory(self.nvml_cache_seconds).get()
                result = allocate(
                    request, inventory, claims, holder=self.holder, busy_memory_threshold=threshold
                )
                if isinstance(result, Grant):
                    _hub.book.reserve(self.holder, result.uuids)
                    return result
            self.log.info("No devices for %s: %s", self._log_name, result.message(admin=True))
            remaining = deadline - time.monotonic()
            if not result.can_wait or remaining <= 0:
                raise web.HTTPError(503, result.message(admin=self.user.admin))
            self._progress(
                f"Waiting for a free GPU ({time.monotonic() - waited_since:.0f} s of "
                f"{deadline - waited_since:.0f} s): {result.message()}"
            )
            await asyncio.sleep(min(WAIT_POLL_SECONDS, remaining))

    async def _replace_container_with_other_devices(self) -> None:
        """A kept container (remove = False) is never started with devices no longer its own."""
        obj = await self.get_object()
        if obj is None:
            return
        if labels.devices_from_labels(obj["Config"].get("Labels")) != self.gpu_devices:
            self.log.info("Recreating %s for %s: its devices changed", self.object_name, self._log_name)
            await self.stop_object()
            await self.remove_object()

    async def start(self) -> Any:
        self._progress_events = []
        request = self.requested_gpus
        if request.wants_gpu:
            self._progress(f"Looking for {request.describe()}")
            grant = await self.allocate_devices(request)
        else:
            grant = Grant(devices=())  # CPU-only: no lock, no NVML, no claim
        self.gpu_devices = grant.uuids
        try:
            if grant.devices:
                self.log.info("Allocated %s to %s", ", ".join(grant.uuids), self._log_name)
                self._progress(
                    "Allocated " + ", ".join(f"{d.name} ({d.uuid})" for d in grant.devices)
                )
            await self._replace_container_with_other_devices()
            self._progress("Starting container")
            result = await super().start()
        except BaseException:
            self.gpu_devices = ()
            raise
        finally:
            # Started: the running container's labels hold the devices. Failed: nothing does.
            _hub.book.release(self.holder)
        return result

    async def stop(self, now: bool = False) -> None:
        await super().stop(now=now)
        _hub.book.release(self.holder)

    # --- Progress ----------------------------------------------------------------------------

    _progress_events: list[dict[str, Any]]

    def _progress(self, message: str) -> None:
        events = getattr(self, "_progress_events", None)
        if events is None:
            events = self._progress_events = []
        events.append({"progress": min(10 + 10 * len(events), 90), "message": message})

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        """What the user sees while the server starts (JupyterHub stops reading once it is up)."""
        sent = 0
        while True:
            events = getattr(self, "_progress_events", [])
            while sent < len(events):
                yield events[sent]
                sent += 1
            await asyncio.sleep(0.5)


def _trait_check(parse: Any, value: Any, where: str) -> None:
    try:
        parse(value, where=where)
    except settings.ConfigError as e:
        raise TraitError(str(e)) from None


_MISSING: Any = object()


def config_value(config: Config, name: str, *, cls: type = GPUSpawner, fallback: Any = _MISSING) -> Any:
    """The value `name` has in `config` for `cls`, as traitlets would resolve it (subclass sections win)."""
    found = fallback
    for klass in reversed(cls.mro()):
        section = klass.__name__
        if section in config and name in config[section]:
            found = config[section][name]
    return found


def check_config(config: Config, cls: type = GPUSpawner) -> None:
    """Check gpuspawner's settings in a hub's configuration; raise ConfigError naming the first bad one.

    The hub runs this when it loads GPUSpawner, so a bad value stops the hub at start rather
    than failing spawns later.
    """
    checks = [
        ("GPUSpawner", "gpu_request", settings.parse_gpu_request),
        ("GPUSpawner", "busy_memory_threshold", settings.parse_bytes),
        ("GPUSpawner", "gpu_wait_timeout", settings.parse_seconds),
        ("GPUSpawner", "nvml_cache_seconds", settings.parse_seconds),
        ("DockerSpawner", "extra_host_config", settings.check_extra_host_config),
    ]
    for owner, name, parse in checks:
        v = config_value(config, name, cls=cls)
        if v is not _MISSING and not callable(v):
            parse(v, where=f"{owner}.{name}")
    mode = config_value(config, "device_injection", cls=cls)
    if mode is not _MISSING and mode not in ("nvidia", "cdi"):
        raise settings.ConfigError(f"GPUSpawner.device_injection is {mode!r}; allowed: 'nvidia' or 'cdi'.")


_check_scheduled = False


def check_when_the_hub_starts() -> None:
    """Check the hub's configuration once it has loaded, so bad config stops the hub at start.

    Called whenever ``gpuspawner.GPUSpawner`` is looked up (see ``gpuspawner/__init__.py``):
    JupyterHub does that when it applies ``spawner_class = "gpu"`` from its config file, a
    moment before the values are merged into ``app.config``. So the check runs on the event
    loop's next turn, still inside the hub's start-up, before anyone can spawn. A bad value is
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
        try:
            check_config(app.config)
        except settings.ConfigError as e:
            app.log.critical("Bad configuration: %s", e)
            app.exit(1)

    _check_scheduled = True
    loop.call_soon(check)
