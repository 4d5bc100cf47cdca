"""GPUSpawner: DockerSpawner for shared GPU servers.

This module is glue. Decisions are made by the pure modules beside it (``allocation`` picks
devices, ``claims`` says who holds what, ``injection`` turns devices into DeviceRequests and
environment, ``labels`` marks containers, ``settings`` checks configuration, ``plan`` builds a
spawn's settings from its profile, ``facts`` says what a spawn learnt of its image and devices);
this class feeds them what NVML (``nvml``) and the Docker engine know and hands their answers
to DockerSpawner. Its helpers each own one job: ``hubconfig`` the hub's settings from its
configuration, ``hubwide`` what all servers of the hub share, ``recorder`` a spawn's audit
record, ``form`` the profile chooser, ``progress`` the progress messages, and ``upkeep`` the
hub's start-up check and reconciliation loop.

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
import concurrent.futures
import inspect
import socket
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import docker.errors
from dockerspawner import DockerSpawner
from tornado import web
from traitlets import Any as AnyTrait
from traitlets import Bool, Callable, Dict, Enum, Float, Int, List, TraitError, Unicode, Union, default, validate

from . import audit, images, injection, labels, profiles, reconcile, seams, settings, userinput
from ._version import __version__
from .allocation import GPURequest, Grant, Holder, allocate, quota_for, quota_refusal
from .claims import claims_from_containers, foreign_claims
from .devices import Inventory
from .facts import ResolvedImage, device_facts, resolved_image
from .form import form_entries, render_form
from .hubconfig import (
    default_audit_db_url,
    default_audit_head_file,
    default_audit_key_file,
    hub_db_url,
    stored_hub_id,
)
from .hubwide import resources
from .images import Pinning
from .nvml import NVMLInventory, NVMLTimeout
from .plan import Configured, SpawnPlan, spawn_plan
from .profiles import Profile
from .progress import ProgressLog
from .recorder import SpawnRecorder, close_record, error_text
from .store import AsyncAuditStore

WAIT_POLL_SECONDS = 2.0


_NO_GPUS = Inventory()


class GPUSpawner(DockerSpawner):  # type: ignore[misc]  # dockerspawner ships no type hints
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

        By default it is made on the hub's first start (from the host name and the database
        URL) and kept in the file ``gpuspawner-hub-id`` in the hub's data folder (beside its
        SQLite database, else its working directory), so a hub whose container is recreated
        keeps it. Set it to give the hub a name of your own, or to keep the identity of a hub
        moved to another data folder. Example: ``c.GPUSpawner.hub_id = "physics-lab-hub"``.
        """,
    ).tag(config=True)

    nvml_timeout = Float(
        10.0,
        help="""
        Seconds to wait for NVML to answer (a hung driver can block it for minutes). Past
        it, GPU spawns are refused with HTTP 503 saying NVML does not answer, the spawn form
        marks GPU profiles unavailable, and CPU-only servers start as usual.
        Example: ``c.GPUSpawner.nvml_timeout = 30``.
        """,
    ).tag(config=True)

    reconcile_interval = Float(
        60.0,
        help="""
        Seconds between the hub's checks of its containers against its servers: a container
        of this hub that no server of the hub owns (an orphan, left by a crash or an
        interrupted spawn) is stopped, its GPUs freed and its audit record closed with the
        reason; a record whose server is gone is closed with what the engine knows (exit
        code, OOM). The check also runs once when the hub has started. ``0``: only then.
        Example: ``c.GPUSpawner.reconcile_interval = 30``.
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

    max_user_options_bytes = Int(
        userinput.DEFAULT_MAX_OPTIONS_BYTES,
        help="""
        The largest server options a user may send, in bytes of JSON: the spawn form's fields,
        or the ``user_options`` of a REST API request (``POST /hub/api/users/<name>/servers/<server>``).
        Larger options are refused with HTTP 400 before the spawn is recorded, so they reach
        neither the audit records (which are sealed and never deleted) nor the container.
        ``{"profile": "<slug>"}`` takes under 100 bytes; raise this only for a custom form that
        sends more. From 256 to 1048576 (1 MiB). Example: ``c.GPUSpawner.max_user_options_bytes = 8192``.
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
        ``"postgresql+psycopg://gpuspawner@db/audit"`` for large hubs (``pip install "gpuspawner[postgresql]"``). Default: an SQLite file
        ``gpuspawner-audit.sqlite`` beside the hub's own SQLite database (or in the hub's
        folder). The ``gpuspawner audit`` commands find it from ``jupyterhub_config.py``.
        Example: ``c.GPUSpawner.audit_db_url = "sqlite:////srv/jupyterhub/audit.sqlite"``.
        """,
    ).tag(config=True)

    audit_redact_names = List(
        Unicode(),
        [],
        help="""
        More environment variables whose values the audit record must not keep: names or glob
        patterns (``*``, ``?``, ``[...]``), compared in any case.

        The record already keeps no value of a variable whose name has a part such as TOKEN,
        SECRET, PASSWORD, PASS, PWD, KEY, CREDENTIALS, AUTH, PAT, COOKIE, SESSION or PRIVATE
        (``HF_TOKEN``, ``DB_PASSWORD``, ``GITHUB_PAT``), nor the password of a URL in any value
        (``postgresql://u:<redacted>@db/x``); the hub's own ``JUPYTERHUB_*`` variables are left
        out. Add here what those rules cannot guess. A redacted variable stays in the record by
        name with the value ``<redacted>``, and ``gpuspawner reproduce`` passes it as
        ``-e NAME``, to be set in the shell that runs the command.
        Example: ``c.GPUSpawner.audit_redact_names = ["LICENSE_SERVER", "MYCORP_*"]``.
        """,
    ).tag(config=True)

    audit_key_file = Unicode(
        "",
        help="""
        The secret that seals the audit records (HMAC-SHA256): someone who can write the audit
        database but not read this file can neither change a record nor forge one unseen. The
        hub creates it (mode 0600) on first start; back it up with the hub's other secrets and
        keep it off the database server. ``gpuspawner audit verify`` needs it. Default:
        ``gpuspawner-audit.key`` in the hub's data folder (beside its SQLite database).
        Example: ``c.GPUSpawner.audit_key_file = "/srv/jupyterhub/secrets/audit.key"``.
        """,
    ).tag(config=True)

    audit_head_file = Unicode(
        "",
        help="""
        Where the hub keeps the audit chain's head (the newest sealed record's number and seal,
        and how many records were opened) outside the database, updated with every record: so
        deleting the newest records is seen. ``gpuspawner audit verify`` prints the head; keep a
        copy elsewhere (a log, a ticket) to check a store against later with ``--expect-head``.
        Default: ``gpuspawner-audit.head`` beside the sealing key.
        Example: ``c.GPUSpawner.audit_head_file = "/srv/jupyterhub/secrets/audit.head"``.
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
        self.progress_log = ProgressLog()  # what the user sees while the server starts
        self.recorder = SpawnRecorder(self.audit_store, lambda: self.log, lambda: self._log_name)
        self._docker_calls: set[concurrent.futures.Future[Any]] = set()  # this server's calls in flight
        self._spawning = False  # from start() until its record says how the spawn went
        self._spawn_image: str | None = None  # the image resolved and recorded for this spawn
        self._settings_hash = ""  # what this spawn's container is made from (label gpuspawner.settings)
        self._plan: SpawnPlan | None = None  # the current or last spawn's settings
        self._started_here = False  # a spawn of this hub process started it (not a server resumed at hub start)
        if getattr(self, "orm_spawner", None) is not None:  # one of the hub's servers (not the caretaker)
            resources.spawners[(self.user.name, self.name or "")] = self

    # DockerSpawner's traits that a spawn's plan sets (declared for the type checker only).
    image: str
    mem_limit: int | None
    cpu_limit: float | None

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
        return default_audit_db_url(hub_db_url())

    @default("audit_key_file")
    def _default_audit_key_file(self) -> str:
        return default_audit_key_file(hub_db_url())

    @default("audit_head_file")
    def _default_audit_head_file(self) -> str:
        return default_audit_head_file(self.audit_key_file)

    @default("hub_id")
    def _default_hub_id(self) -> str:
        if resources.hub_id is None:
            resources.hub_id = stored_hub_id(hub_db_url(), create=True)
        return resources.hub_id

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

    @validate("max_user_options_bytes")
    def _check_max_user_options_bytes(self, proposal: Any) -> int:
        _trait_check(userinput.parse_max_options_bytes, proposal.value, "GPUSpawner.max_user_options_bytes")
        return int(proposal.value)

    @validate("profiles")
    def _check_profiles(self, proposal: Any) -> Any:
        if not callable(proposal.value):
            _trait_check(
                lambda v, where: profiles.parse_profiles(v, where=where, pinning=self._pinning),
                proposal.value,
                "GPUSpawner.profiles",
            )
        return proposal.value

    @validate("audit_redact_names")
    def _check_audit_redact_names(self, proposal: Any) -> Any:
        _trait_check(audit.parse_redact_names, proposal.value, "GPUSpawner.audit_redact_names")
        return proposal.value

    @validate("extra_host_config")
    def _check_extra_host_config(self, proposal: Any) -> Any:
        _trait_check(settings.check_extra_host_config, proposal.value, "DockerSpawner.extra_host_config")
        return proposal.value

    @property
    def _pinning(self) -> Pinning:
        return cast(Pinning, self.image_pinning)  # the Enum trait allows no other value

    @property
    def _injection_mode(self) -> injection.InjectionMode:
        return cast(injection.InjectionMode, self.device_injection)  # the Enum trait allows no other value

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
            self.server_identity, version=__version__, devices=self.gpu_devices, profile=self.profile_slug,
            record=self.audit_record_id, settings=self._settings_hash,
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
        if self._plan is not None:
            env.update(self._plan.profile_environment)
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
            kwargs = self._checked_create_request(kwargs)
        pool = resources.pool("pull", self.pull_threads) if method == "pull" else self.executor
        call = pool.submit(self._docker, method, *args, **kwargs)
        # An interrupted spawn waits for the calls it started (a `docker start` runs on in its
        # thread) before it removes what they made and gives its devices back.
        self._docker_calls.add(call)
        call.add_done_callback(self._docker_calls.discard)
        return asyncio.wrap_future(call)

    def _checked_create_request(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The create request with our labels and devices, checked just before it goes to the engine.

        Whatever the admin configured (``extra_host_config``, ``extra_create_kwargs``, callables),
        a container gets exactly its grant of devices and the image this spawn recorded, or is
        not created.
        """
        kwargs = dict(kwargs, labels=labels.merge_labels(kwargs.get("labels"), self.container_labels()))
        host_config = dict(kwargs.get("host_config") or {})
        requests = injection.device_requests(self.gpu_devices, mode=self._injection_mode)
        if requests:  # a DeviceRequest the admin configured stays, for the check to refuse
            host_config["DeviceRequests"] = list(host_config.get("DeviceRequests") or ()) + requests
        # The hub removes its containers itself (on stop, or once it has read how one died), so
        # that a dead container's exit code and OOM flag can still be read into its record.
        host_config["AutoRemove"] = False
        kwargs["host_config"] = host_config
        if self._spawn_image is not None and kwargs.get("image") != self._spawn_image:
            raise web.HTTPError(
                500, f"The container would be created from {kwargs.get('image')}, but this spawn resolved and "
                f"recorded {self._spawn_image}; tell an admin (a setting changes the image after gpuspawner chose it)."
            )
        try:
            injection.check_create_request(kwargs, granted=self.gpu_devices, mode=self._injection_mode)
        except injection.InjectionError as e:
            self.log.error("Refused to create the container of %s: %s", self._log_name, e)
            raise web.HTTPError(500, f"{e} The server was not created; tell an admin.") from None
        return kwargs

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The hub's bounded pool for Docker calls (DockerSpawner has one thread for everyone)."""
        return resources.pool("docker", self.docker_threads)

    async def engine_claims(self, inventory: Inventory) -> dict[str, Holder]:
        """UUID -> holder for every running container on the engine, read from it now.

        This hub's containers hold what their labels say; any other running container (another
        hub's, a ``docker run --gpus``) what its DeviceRequests name. A container's requests
        never change, so each other container is inspected once, when first seen.
        """
        running = await self.docker("containers")
        others = [c for c in running if (c.get("Labels") or {}).get(labels.HUB) != self.hub_id]
        for c in others:
            if c["Id"] not in resources.foreign:
                try:
                    resources.foreign[c["Id"]] = await self.docker("inspect_container", c["Id"])
                except docker.errors.NotFound:
                    continue
        seen = {c["Id"] for c in others}
        for gone in set(resources.foreign) - seen:
            del resources.foreign[gone]
        claims = foreign_claims([resources.foreign[i] for i in seen if i in resources.foreign], inventory)
        claims.update(claims_from_containers(running, hub_id=self.hub_id))
        return claims

    # --- Profiles ----------------------------------------------------------------------------

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.user.groups]

    async def resolved_profiles(self) -> tuple[Profile, ...]:
        """The configured profiles, calling the callable form; a bad result is the hub's fault (500)."""
        value = self.profiles
        if callable(value):
            value = value(self)
            if inspect.isawaitable(value):
                value = await value
        try:
            return profiles.parse_profiles(value, where="GPUSpawner.profiles", pinning=self._pinning)
        except settings.ConfigError as e:
            self.log.error("Bad GPUSpawner.profiles for %s: %s", self._log_name, e)
            raise web.HTTPError(500, f"The hub's profiles are misconfigured; tell an admin. ({e})") from None

    def _apply_plan(self, plan: SpawnPlan) -> None:
        """Set this spawn's settings where DockerSpawner reads them.

        The values as they stand when the spawn begins (configuration, group overrides, a
        pre-spawn hook) are put back when it ends (:meth:`_restore_configured`), so one
        spawn's profile never leaks into the next, and the next sees what is configured then.
        """
        self._configured: dict[str, Any] = {"image": self.image, "mem_limit": self.mem_limit, "cpu_limit": self.cpu_limit}
        self._plan = plan
        self.profile_slug = plan.profile_slug
        self.image = plan.image
        self.mem_limit = plan.mem_limit
        self.cpu_limit = plan.cpu_limit

    def _restore_configured(self) -> None:
        base = self.__dict__.pop("_configured", None)
        if base is not None:
            self.image, self.mem_limit, self.cpu_limit = base["image"], base["mem_limit"], base["cpu_limit"]

    def run_options_from_form(self, form_data: dict[str, list[str]]) -> Any:
        self._check_options_size(form_data)
        if not self.profiles:
            return super().run_options_from_form(form_data)
        try:
            return profiles.options_from_form(form_data)
        except profiles.OptionsError as e:
            raise web.HTTPError(e.status, e.message) from None

    def options_from_query(self, query_data: dict[str, list[str]]) -> Any:
        return self.run_options_from_form(query_data)

    def _check_options_size(self, options: Any) -> None:
        """Refuse (HTTP 400) options past max_user_options_bytes, before anything records them."""
        try:
            userinput.check_options_size(options, max_bytes=self.max_user_options_bytes)
        except userinput.OptionsError as e:
            self.log.warning(
                "Refused to start %s: its options are over %d bytes", self._log_name, self.max_user_options_bytes
            )
            raise web.HTTPError(e.status, e.message) from None

    async def get_options_form(self) -> str:
        """The profile chooser with live availability; DockerSpawner's form without profiles."""
        configured = await self.resolved_profiles()
        if not configured:
            form: str = await super().get_options_form()
            return form
        mine = profiles.allowed_profiles(configured, user=self.user.name, groups=self.group_names)
        inventory, claims = _NO_GPUS, {}
        if any(p.gpus.wants_gpu for p in mine):
            inventory = await self._inventory_or_problem()
            claims = resources.book.merged(await self.engine_claims(inventory))
        entries = form_entries(
            mine, inventory, claims, holder=self.holder,
            busy_memory_threshold=settings.parse_bytes(self.busy_memory_threshold, where="GPUSpawner.busy_memory_threshold"),
            waiting=self.gpu_wait_timeout > 0, last_choice=(self.user_options or {}).get("profile"),
        )
        return render_form(entries, waiting=self.gpu_wait_timeout > 0, template_file=self.profile_form_template)

    # --- Allocation --------------------------------------------------------------------------

    @property
    def requested_gpus(self) -> GPURequest:
        """The GPUs this server asks for without profiles (validated when the configuration loaded)."""
        return settings.parse_gpu_request(self.gpu_request, where="GPUSpawner.gpu_request")

    def nvml_reader(self) -> NVMLInventory:
        return resources.inventory(self.nvml_cache_seconds, self.nvml_timeout)

    async def _inventory_or_problem(self) -> Inventory:
        """The inventory; where NVML hangs, an empty one saying so (the form shows it)."""
        try:
            return await self.nvml_reader().get()
        except NVMLTimeout as e:
            return Inventory(problem=str(e))

    async def allocate_devices(self, request: GPURequest) -> Grant:
        """Choose devices and note a pending claim, waiting if configured; else HTTP 403 or 503."""
        waited_since = time.monotonic()
        deadline = waited_since + min(self.gpu_wait_timeout, self.start_timeout)
        threshold = settings.parse_bytes(self.busy_memory_threshold, where="GPUSpawner.busy_memory_threshold")
        quota = quota_for(self.group_names, default=self.max_gpus_per_user, per_group=self.max_gpus_per_group)
        while True:
            # Read outside the lock: a hung NVML then holds up no other spawn (each waits at
            # most nvml_timeout), and the hardware's state does not depend on the claims.
            try:
                inventory = await self.nvml_reader().get()
            except NVMLTimeout as e:
                raise web.HTTPError(503, str(e)) from None
            async with resources.lock:
                claims = resources.book.merged(await self.engine_claims(inventory))
                over_quota = quota_refusal(request, claims, holder=self.holder, quota=quota)
                if over_quota:
                    raise web.HTTPError(403, over_quota)
                result = allocate(
                    request, inventory, claims, holder=self.holder, busy_memory_threshold=threshold
                )
                if isinstance(result, Grant):
                    resources.book.reserve(self.audit_record_id, self.holder, result.uuids)
                    return result
            self.log.info("No devices for %s: %s", self._log_name, result.message(admin=True))
            remaining = deadline - time.monotonic()
            if not result.can_wait or remaining <= 0:
                raise web.HTTPError(503, result.message(admin=self.user.admin))
            self.progress_log.say(
                f"Waiting for a free GPU ({time.monotonic() - waited_since:.0f} s of "
                f"{deadline - waited_since:.0f} s): {result.message()}"
            )
            await asyncio.sleep(min(WAIT_POLL_SECONDS, remaining))

    async def _replace_kept_container_if_changed(self) -> None:
        """Deal with a container this server already has before this spawn makes its own.

        A kept container (remove = False) is reused only if made from exactly this spawn's
        settings: its label ``gpuspawner.settings`` hashes the image, limits, environment,
        devices and profile it was created from; any difference (a new image, a revoked
        profile, other GPUs) and it is replaced by a new container. With remove = True any
        leftover container goes. A leftover from a spawn the hub lost track of (it was killed
        mid-spawn) has an open record: it ends here, with the container, not a reconciliation later.
        """
        obj = await self.get_object()
        if obj is None:
            return
        container_labels = obj["Config"].get("Labels") or {}
        if not self.remove and container_labels.get(labels.SETTINGS) == self._settings_hash:
            return
        if not self.remove:
            self.log.info("Recreating %s for %s: its settings changed", self.object_name, self._log_name)
        await self.stop_object()
        await self.remove_object()
        old_record = container_labels.get(labels.RECORD, "")
        if old_record and old_record != self.audit_record_id:
            await close_record(
                self.audit_store(), old_record, self.log, outcome="abandoned", error=reconcile.REPLACED,
                stopped_at=seams.now_iso(), container_id=obj["Id"], container_name=obj.get("Name", "").lstrip("/") or None,
            )

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
        self.progress_log.say(f"Pulling image {image}")
        self.log.info("Pulling %s for %s", image, self._log_name)
        await self.docker(
            "pull", ref.familiar_name if ref.registry == images.DEFAULT_REGISTRY else ref.name,
            tag=ref.digest or ref.tag or "latest",
        )
        pulled: dict[str, Any] = await self.docker("inspect_image", image)
        return pulled

    async def resolve_image(self, image: str) -> ResolvedImage:
        """Pull if needed, then what the audit records: repository digest, image ID, OCI labels."""
        self.progress_log.say(f"Checking image {image}")
        found = resolved_image(image, await self._pulled_image_info(image))
        self.progress_log.say(f"Image {found.shown}")
        return found

    # --- Audit -------------------------------------------------------------------------------

    def audit_store(self) -> AsyncAuditStore:
        return resources.audit(self.audit_db_url, key_file=self.audit_key_file, head_file=self.audit_head_file)

    async def _docker_version(self) -> str | None:
        if resources.docker_version is None:
            resources.docker_version = (await self.docker("version")).get("Version")
        return resources.docker_version

    # --- Start, poll and stop ----------------------------------------------------------------

    async def start(self) -> Any:
        """Record the spawn, then plan, allocate, resolve the image, create and start; whatever
        happens, the record says how it ended.

        A spawn that fails or is interrupted (the user cancels, ``start_timeout``) removes what
        it created and gives its devices back only once its container is known not to run.
        """
        self.progress_log.clear()
        self._started_here = True
        self._spawn_image = None
        record_id = await self._begin_record()
        try:
            plan = await self._plan_spawn()
            await self._allocate_for(plan)
            await self._resolve_image_for(plan)
            result = await self._create_and_start()
            await self.recorder.flush()
        except asyncio.CancelledError as e:
            # Interrupted (the user cancelled, start_timeout): JupyterHub goes on at once; the
            # clean-up runs on, and the devices stay claimed until the container is gone.
            resources.keep(self._end_failed_spawn(record_id, e, container_id=self.object_id))
            raise
        except BaseException as e:
            await self._end_failed_spawn(record_id, e, container_id=self.object_id)
            raise
        self._spawning = False
        resources.keep(self.recorder.watch_ready(
            record_id, starting=lambda: self.pending == "spawn",
            ready=lambda: bool(self.ready) and self.audit_record_id == record_id, timeout=self.http_timeout + 60,
        ))
        return result

    async def _begin_record(self) -> str:
        """Write this spawn's new record; its id. HTTP 400 for options too large to keep, before any record."""
        # Before the record: options too large to keep are refused, and this attempt leaves no
        # record behind (it decided nothing, and sealed records can never be deleted).
        self.audit_record_id = ""
        try:
            self._check_options_size(self.user_options)
        except web.HTTPError:
            # JupyterHub saved them as this server's options for its next start; refused ones are not kept.
            if getattr(self, "orm_spawner", None) is not None:
                self.orm_spawner.user_options = {}
            raise
        record = audit.AuditRecord(
            id=seams.new_record_id(), hub_id=self.hub_id, user=self.user.name, server=self.name or "",
            requested_at=seams.now_iso(), hostname=socket.gethostname(), gpuspawner_version=__version__,
        )
        # Set before the insert, so the hub's reconciliation never takes the new record for a lost one.
        self.audit_record_id = record.id
        self._spawning = True
        try:
            await self.recorder.begin(record)
        except asyncio.CancelledError:  # interrupted while the record is written: it is closed once it is
            self._spawning = False
            raise
        except Exception:
            self._spawning = False
            self.audit_record_id = ""
            raise
        return record.id

    async def _plan_spawn(self) -> SpawnPlan:
        """This spawn's settings from the user's profile and the values configured now; applied and recorded."""
        configured = await self.resolved_profiles()
        profile = None
        if configured:
            try:
                profile = profiles.choose_profile(
                    configured, self.user_options, user=self.user.name, groups=self.group_names
                )
            except profiles.OptionsError as e:
                raise web.HTTPError(e.status, e.message) from None
            self.progress_log.say(f"Profile: {profile.display_name} ({profile.resources()})")
        image_option = (self.user_options or {}).get("image") if profile is None else None
        # DockerSpawner's allowed_images: resolved here, before it is recorded and pinned.
        allowed = await self._allowed_image_option(image_option) if image_option else None
        plan = spawn_plan(profile, Configured(
            image=self.image, mem_limit=self.mem_limit, cpu_limit=self.cpu_limit,
            environment=self.environment or {}, gpu_request=self.gpu_request,
        ), image_option=allowed)
        self._apply_plan(plan)
        self.recorder.note_request(
            self.audit_record_id,
            profile=plan.profile_slug or None,
            profile_hash=plan.profile_hash,
            image_requested=self.image,
            cpu_limit=self.cpu_limit,
            mem_limit=_bytes_or_none(self.mem_limit),
            environment=self._recorded_environment(plan),
        )
        return plan

    def _recorded_environment(self, plan: SpawnPlan) -> dict[str, str]:
        return audit.without_secrets(plan.environment, extra_names=self.audit_redact_names)

    async def _allocate_for(self, plan: SpawnPlan) -> None:
        """The devices of `plan`, claimed for this server and recorded; none and no claim for CPU only."""
        if plan.gpus.wants_gpu:
            self.progress_log.say(f"Looking for {plan.gpus.describe()}")
            grant = await self.allocate_devices(plan.gpus)
        else:
            grant = Grant(devices=())  # CPU-only: no lock, no NVML, no claim
        self.gpu_devices = grant.uuids
        if grant.devices:
            self.log.info("Allocated %s to %s", ", ".join(grant.uuids), self._log_name)
            self.progress_log.say("Allocated " + ", ".join(f"{d.name} ({d.uuid})" for d in grant.devices))
            inventory = await self.nvml_reader().get()
            self.recorder.note_devices(self.audit_record_id, device_facts(
                grant.devices, driver_version=inventory.driver_version,
                cuda_driver_version=inventory.cuda_driver_version,
            ))

    async def _resolve_image_for(self, plan: SpawnPlan) -> None:
        """Resolve the plan's image (pulled if needed), pin it to its digest and record it."""
        resolved = await self.resolve_image(self.image)
        if self.pin_to_digest and resolved.repo_digest:
            self.image = images.parse_image(resolved.repo_digest).by_digest()
        self._spawn_image = self.image
        self._settings_hash = labels.settings_hash({
            "image": self.image, "image_id": resolved.image_id, "devices": self.gpu_devices,
            "cpu_limit": self.cpu_limit, "mem_limit": self.mem_limit, "environment": self._recorded_environment(plan),
            "profile": plan.profile_slug or None, "profile_hash": plan.profile_hash,
        })
        self.recorder.note_image(self.audit_record_id, resolved, docker_version=await self._docker_version())

    async def _create_and_start(self) -> Any:
        """Create the container (or keep one made from the same settings) and start it."""
        await self._replace_kept_container_if_changed()
        result = await super().start()
        # It runs: its labels hold the devices from now on.
        resources.book.release(self.audit_record_id)
        self._restore_configured()
        return result

    async def _end_failed_spawn(self, record_id: str, error: BaseException, *, container_id: str) -> None:
        """After a failed or interrupted spawn: remove its container, free its devices, close its record."""
        gone, removed = await self._remove_spawned_container(record_id, container_id)
        if gone:
            resources.book.release(record_id)
        else:  # the engine could not say: keep the devices until the hub's reconciliation can
            resources.book.keep_unconfirmed(record_id)
        if self.audit_record_id == record_id:  # no later spawn of this server has begun meanwhile
            self.gpu_devices = ()
            self._spawn_image = None
            self._restore_configured()
        # the container it made is named, though the spawn was cut short before it noted it
        seen = {"container_id": removed} if removed else {}
        await self.recorder.finish(record_id, outcome="failed", error=error_text(error), **seen)
        if self.audit_record_id == record_id:
            self._spawning = False

    async def _remove_spawned_container(self, record_id: str, container_id: str) -> tuple[bool, str | None]:
        """Wait for this spawn's Docker calls to end, then remove the container it created, or stop
        the kept one it started. (True when no container of this spawn runs any more, the id of
        the container it removed or stopped.)"""
        try:
            calls = [asyncio.wrap_future(c) for c in list(self._docker_calls)]
            if calls:
                await asyncio.wait(calls, timeout=max(self.start_timeout, 60))
            obj = await self.docker("inspect_container", self.object_name)
            if (obj["Config"].get("Labels") or {}).get(labels.RECORD) == record_id:
                self.log.info("Removing %s, left by the failed spawn of %s", self.object_name, self._log_name)
                await self.docker("remove_container", obj["Id"], force=True, v=True)
                return True, str(obj["Id"])
            if obj["Id"] == container_id and obj["State"].get("Running"):
                await self.docker("stop", obj["Id"])  # a kept container (remove = False) this spawn started
                return True, str(obj["Id"])
            return True, None
        except docker.errors.NotFound:
            return True, None
        except Exception:
            self.log.exception("Could not make sure the container of %s's failed spawn is gone", self._log_name)
            return False, None

    async def _allowed_image_option(self, image: Any) -> str:
        """DockerSpawner's check of a user's ``image`` option, quoting only a prefix of a refused name."""
        if not isinstance(image, str):
            raise web.HTTPError(400, f"'image' is {userinput.quote(image)}; it must be the name of an allowed image.")
        try:
            allowed: str = await super().check_allowed(image)
        except web.HTTPError as e:
            head = f"Image {image} "
            if e.log_message and e.log_message.startswith(head):
                raise web.HTTPError(e.status_code, f"Image {userinput.quote(image)} {e.log_message[len(head):]}") from None
            raise
        return allowed

    async def check_allowed(self, image: str) -> str:
        """DockerSpawner's check of a user's ``image`` option; within a spawn, the image it resolved."""
        if self._spawn_image is not None:
            return self._spawn_image
        allowed: str = await super().check_allowed(image)
        return allowed

    async def _record_container(self, container_id: str) -> None:
        info = await self.docker("inspect_container", container_id)
        await self.recorder.note_container(
            self.audit_record_id, container_id=container_id, container_name=self.container_name, inspection=info
        )

    async def start_object(self) -> None:
        self.progress_log.say("Starting container")
        # What the engine made of the request (a new or a kept container), read while it starts.
        self.recorder.note_container_soon(resources.keep(self._record_container(self.container_id)))
        await super().start_object()
        self.recorder.note_started(self.audit_record_id)

    async def poll(self) -> Any:
        """None while the container runs; else its exit status, and its record says how it ended.

        JupyterHub never calls ``stop()`` for a server whose container died (crash, OOM,
        ``docker stop``): this is where the hub learns of it, so the record is closed here with
        the engine's exit code and OOM flag, and a dead container is removed (``remove = True``).
        """
        container = await self.get_object()
        if container is not None and container["State"].get("Running"):
            return None
        # the container's own label names the spawn that made it, where the server's state may not
        # (a hub killed mid-spawn resumes the server with the state of an earlier spawn, or none)
        record_ids = list(dict.fromkeys(filter(None, [self.audit_record_id, _record_label(container)])))
        if record_ids and not self._spawning:
            seen = {"container_id": container["Id"], "container_name": container["Name"].lstrip("/")} if container else {}
            for record_id in record_ids:
                await self.recorder.finish(record_id, **reconcile.ended_container_changes(container), **seen)
            if container is not None and self.remove:
                await self.remove_object()
                self.object_id = ""
        if container is None:
            return 0
        state = container["State"]
        return f"ExitCode={state.get('ExitCode')}, Error='{state.get('Error')}', FinishedAt={state.get('FinishedAt')}"

    async def stop(self, now: bool = False) -> None:
        """Stop the container; its record says whether the server had ever answered.

        The record closed is the one the server's state names and the one the container's label
        names, where they differ: a server JupyterHub resumed after the hub was killed mid-spawn
        has the container but not the record in its state. A failing spawn closes its own record.
        """
        never_answered = bool(getattr(self, "_waiting_for_response", False))
        container = None if self._spawning else await self.get_object()
        await super().stop(now=now)
        if self._spawning:
            return
        # the container stopped is named in its records: a hub killed mid-spawn never noted it
        seen = {"container_id": container["Id"], "container_name": container["Name"].lstrip("/")} if container else {}
        for record_id in dict.fromkeys(filter(None, [self.audit_record_id, _record_label(container)])):
            await self.recorder.finish(record_id, **await self._ending(record_id, never_answered=never_answered), **seen)

    async def _ending(self, record_id: str, *, never_answered: bool) -> dict[str, Any]:
        """How a stopped server's record ends: failed if it never answered, stopped otherwise."""
        if never_answered:  # JupyterHub stops a server that did not answer within http_timeout
            return {"outcome": "failed", "error": f"The server did not answer within {self.http_timeout:.0f} s, so the hub stopped it."}
        if self._started_here:  # (a record may still say "starting" a moment after the server answered)
            return {"outcome": "stopped"}
        record = await self.audit_store().get(record_id)
        if record is not None and record.outcome in ("requested", "starting"):
            # JupyterHub resumed it after a hub restart, waited, and gave up (its flag is cleared
            # by then): it never ran.
            return {"outcome": "failed", "error": "The server was stopped before it ever answered the hub."}
        return {"outcome": "stopped"}

    # --- Progress ----------------------------------------------------------------------------

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        """What the user sees while the server starts (JupyterHub stops reading once it is up)."""
        async for event in self.progress_log.follow():
            yield event


def _record_label(container: dict[str, Any] | None) -> str:
    """The audit record a container was made for (its ``gpuspawner.record`` label), or ""."""
    if container is None:
        return ""
    return str((container.get("Config", {}).get("Labels") or {}).get(labels.RECORD, ""))


def _bytes_or_none(value: Any) -> int | None:
    if value in (None, "", 0):
        return None
    return settings.parse_bytes(value, where="DockerSpawner.mem_limit")


def _trait_check(parse: Any, value: Any, where: str) -> None:
    try:
        parse(value, where=where)
    except settings.ConfigError as e:
        raise TraitError(str(e)) from None
