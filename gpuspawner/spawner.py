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
import inspect
import os
import socket
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.errors
import jinja2

from dockerspawner import DockerSpawner
from tornado import web
from traitlets import Any as AnyTrait
from traitlets import Bool, Callable, Dict, Enum, Float, Int, List, TraitError, Unicode, Union, default, validate
from traitlets.config import Config

from . import audit, images, injection, labels, profiles, seams, settings
from ._version import __version__
from .allocation import Grant, GPURequest, Holder, allocate, availability, quota_for, quota_refusal
from .claims import ClaimBook, claims_from_containers
from .devices import Inventory
from .nvml import NVMLInventory
from .store import AsyncAuditStore, AuditStoreError, default_audit_url

WAIT_POLL_SECONDS = 2.0
TEMPLATES = Path(__file__).parent / "templates"


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
        self.stores: dict[str, AsyncAuditStore] = {}
        self.docker_version: str | None = None
        self.pools: dict[str, ThreadPoolExecutor] = {}

    def pool(self, name: str, threads: int) -> ThreadPoolExecutor:
        """The hub's thread pool called `name`, made with `threads` workers on first use."""
        if name not in self.pools:
            self.pools[name] = ThreadPoolExecutor(threads, thread_name_prefix=f"gpuspawner-{name}")
        return self.pools[name]

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def inventory(self, cache_seconds: float) -> NVMLInventory:
        if self.nvml is None:
            self.nvml = NVMLInventory(cache_seconds=cache_seconds)
        return self.nvml

    def audit(self, url: str) -> AsyncAuditStore:
        if url not in self.stores:
            self.stores[url] = AsyncAuditStore(url)
        return self.stores[url]


_hub = _HubWide()
_NO_GPUS = Inventory()


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

    profiles = Union(
        [List(), Callable()],
        default_value=[],
        help="""
        The profiles users choose from at login. Empty (the default): no choice, and
        GPUSpawner behaves as DockerSpawner with ``gpu_request``.

        A list of dicts, or a callable (sync or async) taking the spawner and returning one.
        Keys: ``slug`` (required; lowercase letters, digits, '-'), ``display_name``
        (required), ``image`` (required, pinned: see ``image_pinning``), ``description``,
        ``gpus`` (as ``gpu_request``), ``cpu_limit``, ``mem_limit`` (e.g. ``"32G"``),
        ``environment`` (dict), ``allowed_groups`` and ``allowed_users`` (lists; neither
        means everyone), ``default`` (one profile at most). Unknown keys are errors. Close to
        KubeSpawner's ``profile_list``, with the settings as keys of the profile itself.

        Users choose with ``user_options = {"profile": "<slug>"}`` (form or REST API) and
        nothing else: an unknown slug is a 400, a profile they may not use a 403, any other
        key a 400. The list is checked when the hub starts; a callable's result at each use.

        Example::

            c.GPUSpawner.profiles = [
                {"slug": "cpu", "display_name": "CPU only", "default": True,
                 "image": "quay.io/jupyter/scipy-notebook:2026-08-24"},
                {"slug": "a100-1", "display_name": "1 × A100 · PyTorch",
                 "image": "quay.io/jupyter/pytorch-notebook:cuda12-2026-08-24",
                 "gpus": {"count": 1, "model": "A100"}, "cpu_limit": 8, "mem_limit": "64G",
                 "allowed_groups": ["ml-lab"]},
            ]
        """,
    ).tag(config=True)

    image_pinning = Enum(
        ["tag", "digest"],
        default_value="tag",
        help="""
        What counts as a pinned image in a profile. ``"tag"`` (the default): an explicit tag
        other than ``latest``, or a digest. ``"digest"``: a digest (``name@sha256:…``) only.
        An unpinned profile image stops the hub at start. Example:
        ``c.GPUSpawner.image_pinning = "digest"``.
        """,
    ).tag(config=True)

    max_gpus_per_user = Int(
        None,
        allow_none=True,
        help="""
        The most GPUs (whole GPUs and MIG devices count one each) a user may hold across all
        their servers at once. ``None`` (the default): no limit. A spawn past it is refused with
        HTTP 403 saying which servers hold the user's GPUs. Example: ``c.GPUSpawner.max_gpus_per_user = 2``.
        """,
    ).tag(config=True)

    max_gpus_per_group = Dict(
        key_trait=Unicode(),
        value_trait=Int(),
        help="""
        GPU quotas by JupyterHub group, overriding ``max_gpus_per_user`` for their members; a
        user in several groups gets the largest. Example:
        ``c.GPUSpawner.max_gpus_per_group = {"students": 1, "staff": 4}``.
        """,
    ).tag(config=True)

    profile_form_template = Unicode(
        "",
        help="""
        A Jinja2 template to render the profile chooser instead of gpuspawner's own
        (``gpuspawner/templates/profiles.html``, whose header lists the variables). Example:
        ``c.GPUSpawner.profile_form_template = "/etc/jupyterhub/profiles.html"``.
        """,
    ).tag(config=True)

    pin_to_digest = Bool(
        True,
        help="""
        Create each container from the image's repository digest (``repo@sha256:…``) resolved
        at spawn time, so what runs is exactly what the audit record names, even if the tag
        moves a minute later. An image with no repository digest (built locally, never pushed)
        still starts, by its name; its record says it cannot be pulled elsewhere.
        Example: ``c.GPUSpawner.pin_to_digest = False``.
        """,
    ).tag(config=True)

    audit_db_url = Unicode(
        "",
        help="""
        Where the audit records live: any SQLAlchemy URL, e.g.
        ``"postgresql://gpuspawner@db/audit"`` for large hubs. Default: an SQLite file
        ``gpuspawner-audit.sqlite`` beside the hub's own SQLite database (or in the hub's
        folder). The ``gpuspawner audit`` commands find it from ``jupyterhub_config.py``.
        Example: ``c.GPUSpawner.audit_db_url = "sqlite:////srv/jupyterhub/audit.sqlite"``.
        """,
    ).tag(config=True)

    docker_threads = Int(
        16,
        help="""
        Threads for the Docker calls of all servers (inspect, create, start, stop, poll), shared
        by the hub. DockerSpawner runs every call of every user through one thread, so a burst
        of spawns queues; here different users' calls run side by side, up to this many at once.
        GPU allocation stays one decision at a time whatever this is. The Docker client keeps
        ``docker_threads + pull_threads`` connections open to the engine (``max_pool_size`` in
        ``DockerSpawner.client_kwargs``, unless you set it there). Read when the hub starts.
        Example: ``c.GPUSpawner.docker_threads = 32``.
        """,
    ).tag(config=True)

    pull_threads = Int(
        2,
        help="""
        Threads for image pulls, apart from all other Docker calls: a long pull of a large CUDA
        image never holds up other users' spawns, polls or stops. A pull past this many waits
        for one of them to finish. Read when the hub starts.
        Example: ``c.GPUSpawner.pull_threads = 4``.
        """,
    ).tag(config=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._audit_writes: list[asyncio.Future[Any]] = []  # queued changes to the current record

    gpu_devices: tuple[str, ...] = ()  # UUIDs this server holds, kept in the spawner's state
    audit_record_id: str = ""  # the audit record of the current or last spawn, kept in the state
    profile_slug: str = ""  # the profile this server was started with, kept in the spawner's state

    @default("client_kwargs")
    def _default_client_kwargs(self) -> dict[str, Any]:
        return self._with_pool_size({})

    @validate("client_kwargs")
    def _check_client_kwargs(self, proposal: Any) -> dict[str, Any]:
        return self._with_pool_size(proposal.value)

    def _with_pool_size(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        # One HTTP connection to the engine per thread that may call it at once; an admin's own
        # max_pool_size wins. (Validators run after all config is loaded, so the thread counts are set.)
        return {"max_pool_size": self.docker_threads + self.pull_threads, **kwargs}

    @validate("docker_threads", "pull_threads")
    def _check_threads(self, proposal: Any) -> int:
        _trait_check(settings.parse_threads, proposal.value, f"GPUSpawner.{proposal.trait.name}")
        return int(proposal.value)

    @default("audit_db_url")
    def _default_audit_db_url(self) -> str:
        return default_audit_url(_hub_db_url() or "sqlite:///jupyterhub.sqlite", cwd=os.getcwd())

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

    @validate("profiles")
    def _check_profiles(self, proposal: Any) -> Any:
        if not callable(proposal.value):
            _trait_check(
                lambda v, where: profiles.parse_profiles(v, where=where, pinning=self.image_pinning),
                proposal.value,
                "GPUSpawner.profiles",
            )
        return proposal.value

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
        return labels.server_labels(
            self.server_identity, version=__version__, devices=self.gpu_devices, profile=self.profile_slug
        )

    # --- State -------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        if self.gpu_devices:
            state["gpu_devices"] = list(self.gpu_devices)
        if self.profile_slug:
            state["profile"] = self.profile_slug
        if self.audit_record_id:
            state["audit_record_id"] = self.audit_record_id
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.gpu_devices = tuple(state.get("gpu_devices", ()))
        self.profile_slug = state.get("profile", "")
        self.audit_record_id = state.get("audit_record_id", "")

    def clear_state(self) -> None:
        super().clear_state()
        self.gpu_devices = ()
        self.profile_slug = ""

    def get_env(self) -> dict[str, str]:
        env: dict[str, str] = super().get_env()
        profile = getattr(self, "_profile", None)
        if profile is not None:
            env.update(profile.environment)
        env.update(injection.gpu_environment(self.gpu_devices))
        return env

    # --- Docker ------------------------------------------------------------------------------

    def docker(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one docker-py call off the event loop; every Docker call of every server passes here.

        Calls run in the hub's pool of ``docker_threads``, so one user's slow call never
        queues another's; pulls run in a pool of their own (``pull_threads``), so a long
        pull holds up no spawn, poll or stop. DockerSpawner builds the create call from its
        configuration and sends it through this method, so this is the one place where a
        container gets its labels and devices: a fresh dict for each call, leaving the
        configured ``extra_create_kwargs`` untouched.
        """
        if method == "create_container":
            kwargs = dict(kwargs, labels=labels.merge_labels(kwargs.get("labels"), self.container_labels()))
            requests = injection.device_requests(self.gpu_devices, mode=self.device_injection)
            if requests:
                kwargs["host_config"] = dict(kwargs.get("host_config") or {}, DeviceRequests=requests)
        if method == "pull":
            return asyncio.wrap_future(_hub.pool("pull", self.pull_threads).submit(self._docker, method, *args, **kwargs))
        return super().docker(method, *args, **kwargs)

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The hub's bounded pool for Docker calls (DockerSpawner has one thread for everyone)."""
        return _hub.pool("docker", self.docker_threads)

    async def engine_claims(self) -> dict[str, Holder]:
        """UUID -> holder for this hub's running containers, read from the Docker engine now."""
        containers = await self.docker("containers", all=True, filters=labels.hub_filter(self.hub_id))
        return claims_from_containers(containers, hub_id=self.hub_id)

    # --- Profiles ----------------------------------------------------------------------------

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.user.groups]

    async def resolved_profiles(self) -> tuple[profiles.Profile, ...]:
        """The configured profiles, calling the callable form; a bad result is the hub's fault (500)."""
        value = self.profiles
        if callable(value):
            value = value(self)
            if inspect.isawaitable(value):
                value = await value
        try:
            return profiles.parse_profiles(value, where="GPUSpawner.profiles", pinning=self.image_pinning)
        except settings.ConfigError as e:
            self.log.error("Bad GPUSpawner.profiles for %s: %s", self._log_name, e)
            raise web.HTTPError(500, f"The hub's profiles are misconfigured; tell an admin. ({e})") from None

    def _use_profile(self, profile: profiles.Profile | None) -> GPURequest:
        """Settings for this spawn, built fresh from the profile and the configured defaults.

        The configured values are read once and never changed, so one spawn's profile cannot
        leak into the next spawn of this server or any other.
        """
        base = getattr(self, "_configured", None)
        if base is None:
            base = self._configured = {"image": self.image, "mem_limit": self.mem_limit, "cpu_limit": self.cpu_limit}
        self._profile = profile
        if profile is None:
            self.profile_slug = ""
            self.image, self.mem_limit, self.cpu_limit = base["image"], base["mem_limit"], base["cpu_limit"]
            return self.requested_gpus
        self.profile_slug = profile.slug
        self.image = str(profile.image)
        self.mem_limit = profile.mem_limit if profile.mem_limit is not None else base["mem_limit"]
        self.cpu_limit = profile.cpu_limit if profile.cpu_limit is not None else base["cpu_limit"]
        return profile.gpus

    def run_options_from_form(self, form_data: dict[str, list[str]]) -> Any:
        if not self.profiles:
            return super().run_options_from_form(form_data)
        try:
            return profiles.options_from_form(form_data)
        except profiles.OptionsError as e:
            raise web.HTTPError(e.status, e.message) from None

    def options_from_query(self, query_data: dict[str, list[str]]) -> Any:
        return self.run_options_from_form(query_data)

    async def get_options_form(self) -> str:
        """The profile chooser with live availability; DockerSpawner's form without profiles."""
        configured = await self.resolved_profiles()
        if not configured:
            form: str = await super().get_options_form()
            return form
        mine = profiles.allowed_profiles(configured, user=self.user.name, groups=self.group_names)
        inventory, claims = _NO_GPUS, {}
        if any(p.gpus.wants_gpu for p in mine):
            claims = _hub.book.merged(await self.engine_claims())
            inventory = await _hub.inventory(self.nvml_cache_seconds).get()
        threshold = settings.parse_bytes(self.busy_memory_threshold, where="GPUSpawner.busy_memory_threshold")
        entries = []
        for p in mine:
            avail = availability(p.gpus, inventory, claims, holder=self.holder, busy_memory_threshold=threshold)
            entries.append({
                "slug": p.slug, "display_name": p.display_name, "description": p.description,
                "image": str(p.image), "resources": p.resources(), "availability": avail.text,
                "startable": avail.startable, "selectable": avail.startable or self.gpu_wait_timeout > 0,
                "checked": False,
            })
        # Pre-select the user's last choice, else the default profile, else the first that can start.
        default_slug = (profiles.default_profile(mine) or mine[0]).slug if mine else None
        wanted = [(self.user_options or {}).get("profile"), default_slug]
        selectable = [e for e in entries if e["selectable"]]
        chosen = next((e for slug in wanted for e in selectable if e["slug"] == slug), selectable[0] if selectable else None)
        if chosen is not None:
            chosen["checked"] = True
        return self._form_template().render(profiles=entries, waiting=self.gpu_wait_timeout > 0)

    def _form_template(self) -> jinja2.Template:
        if self.profile_form_template:
            path = Path(self.profile_form_template)
            loader = jinja2.FileSystemLoader(str(path.parent))
            name = path.name
        else:
            loader, name = jinja2.FileSystemLoader(str(TEMPLATES)), "profiles.html"
        return jinja2.Environment(loader=loader, autoescape=True).get_template(name)

    # --- Allocation --------------------------------------------------------------------------

    @property
    def requested_gpus(self) -> GPURequest:
        """The GPUs this server asks for without profiles (validated when the configuration loaded)."""
        return settings.parse_gpu_request(self.gpu_request, where="GPUSpawner.gpu_request")

    async def allocate_devices(self, request: GPURequest) -> Grant:
        """Choose devices and note a pending claim, waiting if configured; else HTTP 403 or 503."""
        waited_since = time.monotonic()
        deadline = waited_since + min(self.gpu_wait_timeout, self.start_timeout)
        threshold = settings.parse_bytes(self.busy_memory_threshold, where="GPUSpawner.busy_memory_threshold")
        quota = quota_for(self.group_names, default=self.max_gpus_per_user, per_group=self.max_gpus_per_group)
        while True:
            async with _hub.lock:
                claims = _hub.book.merged(await self.engine_claims())
                over_quota = quota_refusal(request, claims, holder=self.holder, quota=quota)
                if over_quota:
                    raise web.HTTPError(403, over_quota)
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
        if self.remove:  # DockerSpawner removes any leftover container itself
            return
        obj = await self.get_object()
        if obj is None:
            return
        if labels.devices_from_labels(obj["Config"].get("Labels")) != self.gpu_devices:
            self.log.info("Recreating %s for %s: its devices changed", self.object_name, self._log_name)
            await self.stop_object()
            await self.remove_object()

    # --- Images ------------------------------------------------------------------------------

    async def pull_image(self, image: str) -> None:
        """Pull as ``pull_policy`` says, by tag or by digest (DockerSpawner would split a digest).

        ``start()`` has pulled and inspected the image already (``resolve_image``); DockerSpawner's
        own call here then costs nothing.
        """
        if image != getattr(self, "_resolved_image", None):
            await self._pulled_image_info(image)

    async def _pulled_image_info(self, image: str) -> dict[str, Any]:
        """The engine's inspection of `image`, pulled first where ``pull_policy`` says so."""
        policy = self.pull_policy.lower()
        if policy != "always":
            try:
                info: dict[str, Any] = await self.docker("inspect_image", image)
                return info
            except docker.errors.NotFound:
                if policy in ("never", "skip"):
                    raise web.HTTPError(
                        500, f"Image {image} is not on this host and DockerSpawner.pull_policy is {self.pull_policy!r}."
                    ) from None
        ref = images.parse_image(image)
        self._progress(f"Pulling image {image}")
        self.log.info("Pulling %s for %s", image, self._log_name)
        await self.docker(
            "pull", ref.familiar_name if ref.registry == images.DEFAULT_REGISTRY else ref.name,
            tag=ref.digest or ref.tag or "latest",
        )
        pulled: dict[str, Any] = await self.docker("inspect_image", image)
        return pulled

    async def resolve_image(self, image: str) -> dict[str, Any]:
        """Pull if needed, then what the audit records: repository digest, image ID, OCI labels."""
        self._progress(f"Checking image {image}")
        info = await self._pulled_image_info(image)
        ref = images.parse_image(image)
        repo_digest = images.repo_digest_for(ref, info.get("RepoDigests") or [])
        found: dict[str, Any] = {
            "image_requested": image,
            "repo_digest": repo_digest,
            "image_id": info["Id"],
            "image_labels": {
                k: v for k, v in ((info.get("Config") or {}).get("Labels") or {}).items()
                if k.startswith("org.opencontainers.image.")
            },
            "note": None if repo_digest else (
                f"Image {image} ({info['Id']}) has no repository digest: it was built here or never "
                "pushed, so it cannot be pulled on another host."
            ),
        }
        self._progress(f"Image {repo_digest or info['Id']}")
        return found

    # --- Audit -------------------------------------------------------------------------------

    def audit_store(self) -> AsyncAuditStore:
        return _hub.audit(self.audit_db_url)

    def _audit_update(self, **changes: Any) -> None:
        """Queue a change to this spawn's record; the spawn goes on while the audit thread writes it.

        ``_audit_written()`` waits for what was queued: ``start()`` does before it hands the
        server to the hub, so no server runs with a record that failed to say what it is.
        """
        self._audit_writes.append(self.audit_store().update_soon(self.audit_record_id, **changes))

    async def _audit_written(self) -> None:
        """Wait for the queued changes; raise the first that failed, unless the record was sealed."""
        writes, self._audit_writes = self._audit_writes, []
        for result in await asyncio.gather(*writes, return_exceptions=True):
            if isinstance(result, AuditStoreError):  # sealed already: the spawn ended while this was on its way
                self.log.debug("Audit record of %s not updated: %s", self._log_name, result)
            elif isinstance(result, BaseException):
                raise result

    async def _audit_finish(self, **changes: Any) -> None:
        try:
            await self._audit_written()
        except Exception as e:
            self.log.error("A change to the audit record of %s was not written: %s", self._log_name, e)
        try:
            await asyncio.shield(self.audit_store().finish(self.audit_record_id, stopped_at=seams.now_iso(), **changes))
        except AuditStoreError as e:
            self.log.debug("Audit record of %s already closed: %s", self._log_name, e)

    async def _docker_version(self) -> str | None:
        if _hub.docker_version is None:
            _hub.docker_version = (await self.docker("version")).get("Version")
        return _hub.docker_version

    async def _watch_until_ready(self, record_id: str) -> None:
        """Note when JupyterHub has seen the server answer (it keeps that to itself)."""
        deadline = time.monotonic() + self.http_timeout + 60
        try:
            while self.pending == "spawn" and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
            if self.ready and self.audit_record_id == record_id:
                self._audit_update(outcome="running", ready_at=seams.now_iso())
                await self._audit_written()
        except Exception:
            self.log.exception("Could not note that %s is ready in its audit record", self._log_name)

    # --- Start and stop ----------------------------------------------------------------------

    async def start(self) -> Any:
        """Record the spawn, then start it; whatever happens, the record says how it ended."""
        self._progress_events = []
        self._resolved_image = None
        record = audit.AuditRecord(
            id=seams.new_record_id(), hub_id=self.hub_id, user=self.user.name, server=self.name or "",
            requested_at=seams.now_iso(), hostname=socket.gethostname(), gpuspawner_version=__version__,
        )
        try:
            await self.audit_store().insert(record)
        except Exception as e:
            self.log.error("Cannot write the audit record of %s: %s", self._log_name, e)
            raise web.HTTPError(500, "The hub cannot write its audit record, so it starts no server; tell an admin.") from e
        self.audit_record_id = record.id
        try:
            result = await self._start_recorded()
            await self._audit_written()
        except BaseException as e:
            await self._audit_finish(outcome="failed", error=_error_text(e))
            raise
        asyncio.ensure_future(self._watch_until_ready(record.id))
        return result

    async def _start_recorded(self) -> Any:
        configured = await self.resolved_profiles()
        profile = None
        if configured:
            try:
                profile = profiles.choose_profile(
                    configured, self.user_options, user=self.user.name, groups=self.group_names
                )
            except profiles.OptionsError as e:
                raise web.HTTPError(e.status, e.message) from None
            self._progress(f"Profile: {profile.display_name} ({profile.resources()})")
        request = self._use_profile(profile)
        self._audit_update(
            profile=profile.slug if profile else None,
            profile_hash=audit.content_hash(profiles.profile_config(profile)) if profile else None,
            image_requested=self.image,
            cpu_limit=self.cpu_limit,
            mem_limit=_bytes_or_none(self.mem_limit),
            environment=audit.without_secrets(self._configured_environment()),
        )
        if request.wants_gpu:
            self._progress(f"Looking for {request.describe()}")
            grant = await self.allocate_devices(request)
        else:
            grant = Grant(devices=())  # CPU-only: no lock, no NVML, no claim
        self.gpu_devices = grant.uuids
        try:
            if grant.devices:
                self.log.info("Allocated %s to %s", ", ".join(grant.uuids), self._log_name)
                self._progress("Allocated " + ", ".join(f"{d.name} ({d.uuid})" for d in grant.devices))
                inventory = await _hub.inventory(self.nvml_cache_seconds).get()
                self._audit_update(
                    devices=tuple(
                        audit.RecordedDevice(uuid=d.uuid, model=d.model, memory_total=d.memory_total,
                                             mig_parent=d.parent_uuid, mig_profile=d.mig_profile)
                        for d in grant.devices
                    ),
                    driver_version=inventory.driver_version,
                    cuda_driver_version=inventory.cuda_driver_version,
                )
            resolved = await self.resolve_image(self.image)
            if self.pin_to_digest and resolved["repo_digest"]:
                self.image = images.parse_image(resolved["repo_digest"]).by_digest()
            self._resolved_image = self.image
            self._audit_update(docker_version=await self._docker_version(), **resolved)
            await self._replace_container_with_other_devices()
            result = await super().start()
        except BaseException:
            self.gpu_devices = ()
            raise
        finally:
            # Started: the running container's labels hold the devices. Failed: nothing does.
            _hub.book.release(self.holder)
        return result

    def _configured_environment(self) -> dict[str, str]:
        env = {k: v for k, v in (self.environment or {}).items() if isinstance(v, str)}
        profile = getattr(self, "_profile", None)
        if profile is not None:
            env.update(profile.environment)
        return env

    async def create_object(self) -> Any:
        obj = await super().create_object()
        # What the engine made of the request, read while the container starts.
        self._audit_writes.append(asyncio.ensure_future(self._record_container(obj["Id"])))
        return obj

    async def _record_container(self, container_id: str) -> None:
        info = await self.docker("inspect_container", container_id)
        await self.audit_store().update(
            self.audit_record_id,
            container_id=container_id,
            container_name=self.container_name,
            container_image_id=info.get("Image"),
            device_requests=tuple((info.get("HostConfig") or {}).get("DeviceRequests") or ()),
        )

    async def start_object(self) -> None:
        self._progress("Starting container")
        await super().start_object()
        self._audit_update(outcome="starting", started_at=seams.now_iso())

    async def stop(self, now: bool = False) -> None:
        await super().stop(now=now)
        _hub.book.release(self.holder)
        if self.audit_record_id:
            record = await self.audit_store().get(self.audit_record_id)
            if record is not None and not record.sealed:
                if self.pending == "spawn":  # JupyterHub stops a server that never answered
                    await self._audit_finish(outcome="failed", error="the server did not answer in time")
                else:
                    await self._audit_finish(outcome="stopped")

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


def _error_text(e: BaseException) -> str:
    if isinstance(e, web.HTTPError):
        return f"HTTP {e.status_code}: {e.log_message}"
    if isinstance(e, asyncio.CancelledError):
        return "the spawn was cancelled (timed out, or the hub stopped it)"
    return f"{type(e).__name__}: {e}"


def _bytes_or_none(value: Any) -> int | None:
    if value in (None, "", 0):
        return None
    return settings.parse_bytes(value, where="DockerSpawner.mem_limit")


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
        ("GPUSpawner", "docker_threads", settings.parse_threads),
        ("GPUSpawner", "pull_threads", settings.parse_threads),
        ("DockerSpawner", "extra_host_config", settings.check_extra_host_config),
    ]
    for owner, name, parse in checks:
        v = config_value(config, name, cls=cls)
        if v is not _MISSING and not callable(v):
            parse(v, where=f"{owner}.{name}")
    for name, allowed in (("device_injection", ("nvidia", "cdi")), ("image_pinning", ("tag", "digest"))):
        v = config_value(config, name, cls=cls)
        if v is not _MISSING and v not in allowed:
            raise settings.ConfigError(
                f"GPUSpawner.{name} is {v!r}; allowed: {' or '.join(repr(a) for a in allowed)}."
            )
    per_user = config_value(config, "max_gpus_per_user", cls=cls)
    if per_user is not _MISSING and per_user is not None:
        settings.parse_count(per_user, where="GPUSpawner.max_gpus_per_user")
    per_group = config_value(config, "max_gpus_per_group", cls=cls, fallback={})
    if not isinstance(per_group, dict):
        raise settings.ConfigError(
            f"GPUSpawner.max_gpus_per_group is {per_group!r}; allowed: a dict of group name to GPU count."
        )
    for group, count in per_group.items():
        settings.parse_count(count, where=f"GPUSpawner.max_gpus_per_group[{group!r}]")
    configured = config_value(config, "profiles", cls=cls)
    if configured is not _MISSING and not callable(configured):
        pinning = config_value(config, "image_pinning", cls=cls, fallback="tag")
        profiles.parse_profiles(configured, where="GPUSpawner.profiles", pinning=pinning)


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
        asyncio.ensure_future(close_abandoned_records(hub_settings(app.config), app.log))

    _check_scheduled = True
    loop.call_soon(check)


@dataclass(frozen=True)
class HubSettings:
    """What the hub process as a whole uses, resolved from its configuration as a spawner would."""

    hub_id: str
    audit_db_url: str
    busy_memory_threshold: int


def hub_settings(config: Config, *, hub_id: str | None = None) -> HubSettings:
    """hub_id, the audit database and the busy threshold, from the hub's configuration."""
    db_url = _hub_db_url() or "sqlite:///jupyterhub.sqlite"
    return HubSettings(
        hub_id=hub_id or config_value(config, "hub_id", fallback="")
        or labels.hub_id_for(hostname=socket.gethostname(), db_url=db_url),
        audit_db_url=config_value(config, "audit_db_url", fallback="") or default_audit_url(db_url, cwd=os.getcwd()),
        busy_memory_threshold=settings.parse_bytes(
            config_value(config, "busy_memory_threshold", fallback="1G"), where="GPUSpawner.busy_memory_threshold"
        ),
    )


async def close_abandoned_records(hub: HubSettings, log: Any) -> None:
    """At hub start: spawns that were in progress when the last hub process died are abandoned."""
    store = _hub.audit(hub.audit_db_url)
    try:
        open_records = await store.open_records(hub.hub_id)
    except Exception as e:
        log.error("Cannot read the audit records at %s: %s", hub.audit_db_url, e)
        return
    for record in open_records:
        if record.outcome in ("requested", "starting"):
            await store.finish(
                record.id, outcome="abandoned", stopped_at=seams.now_iso(),
                error="The hub stopped while this server was starting.",
            )
            log.warning("Audit record %s (%s/%s) closed as abandoned", record.id, record.user, record.server)
