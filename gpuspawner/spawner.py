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
import concurrent.futures
import inspect
import os
import socket
import time
import weakref
from collections.abc import AsyncIterator, Coroutine
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

from . import audit, images, injection, labels, profiles, reconcile, seams, settings, userinput
from ._version import __version__
from .allocation import Grant, GPURequest, Holder, allocate, availability, quota_for, quota_refusal
from .claims import HOLDING_STATES, ClaimBook, claims_from_containers, foreign_claims
from .devices import Inventory
from .nvml import NVMLInventory, NVMLTimeout
from .store import AsyncAuditStore, AuditRecordSealed, AuditStoreError, default_audit_url

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


HUB_ID_FILE = "gpuspawner-hub-id"
AUDIT_KEY_FILE = "gpuspawner-audit.key"
AUDIT_HEAD_FILE = "gpuspawner-audit.head"


def _data_folder(db_url: str) -> Path:
    """The hub's data folder: where its SQLite database lives, else its working directory."""
    return Path(default_audit_url(db_url or "sqlite:///jupyterhub.sqlite", cwd=os.getcwd())[len("sqlite:///"):]).parent


def stored_hub_id(db_url: str, *, create: bool) -> str:
    """The hub's identity, kept in ``gpuspawner-hub-id`` in its data folder.

    The first start writes it (derived from the host name and the database URL, as before
    it was kept), so a hub whose container is recreated with another host name keeps it.
    ``create=False`` (the CLI) reads it, or derives it where the hub never wrote one.
    """
    path = _data_folder(db_url) / HUB_ID_FILE
    try:
        stored = path.read_text().strip()
        if stored:
            return stored
    except FileNotFoundError:
        pass
    derived = labels.hub_id_for(hostname=socket.gethostname(), db_url=db_url)
    if create:
        tmp = path.with_name(f".{HUB_ID_FILE}.{os.getpid()}")
        tmp.write_text(derived + "\n")
        try:
            os.link(tmp, path)  # never overwrites an identity another process wrote first
        except FileExistsError:
            return path.read_text().strip() or derived
        finally:
            tmp.unlink()
    return derived


class _HubWide:
    """What all servers of one hub process share: the NVML reader, pending claims, the lock,
    the live spawners (to tell a server's container from an orphan) and background tasks."""

    def __init__(self) -> None:
        self.book = ClaimBook()
        self.nvml: NVMLInventory | None = None
        self._lock: asyncio.Lock | None = None
        self.stores: dict[str, AsyncAuditStore] = {}
        self.docker_version: str | None = None
        self.pools: dict[str, ThreadPoolExecutor] = {}
        self.hub_id: str | None = None
        self.spawners: weakref.WeakValueDictionary[tuple[str, str], GPUSpawner] = weakref.WeakValueDictionary()
        self.foreign: dict[str, dict[str, Any]] = {}  # container id -> inspection, for other containers' devices
        self.tasks: set[asyncio.Future[Any]] = set()

    def keep(self, aw: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> asyncio.Future[Any]:
        """Run `aw` in the background, keeping a reference until it ends (and logging a failure)."""
        task = asyncio.ensure_future(aw)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

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

    def inventory(self, cache_seconds: float, timeout: float) -> NVMLInventory:
        if self.nvml is None:
            self.nvml = NVMLInventory(cache_seconds=cache_seconds, timeout=timeout)
        return self.nvml

    def audit(self, url: str, *, key_file: str, head_file: str) -> AsyncAuditStore:
        if url not in self.stores:
            self.stores[url] = AsyncAuditStore(url, key_file=key_file, head_file=head_file)
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
        self._audit_writes: list[asyncio.Future[Any]] = []  # queued changes to the current record
        self._docker_calls: set[concurrent.futures.Future[Any]] = set()  # this server's calls in flight
        self._spawning = False  # from start() until its record says how the spawn went
        self._spawn_image: str | None = None  # the image resolved and recorded for this spawn
        self._settings_hash = ""  # what this spawn's container is made from (label gpuspawner.settings)
        if getattr(self, "orm_spawner", None) is not None:  # one of the hub's servers (not the caretaker)
            _hub.spawners[(self.user.name, self.name or "")] = self

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

    @default("audit_key_file")
    def _default_audit_key_file(self) -> str:
        return str(_data_folder(_hub_db_url()) / AUDIT_KEY_FILE)

    @default("audit_head_file")
    def _default_audit_head_file(self) -> str:
        return str(Path(self.audit_key_file).with_name(AUDIT_HEAD_FILE))

    @default("hub_id")
    def _default_hub_id(self) -> str:
        if _hub.hub_id is None:
            _hub.hub_id = stored_hub_id(_hub_db_url(), create=True)
        return _hub.hub_id

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
                lambda v, where: profiles.parse_profiles(v, where=where, pinning=self.image_pinning),
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
            kwargs = self._checked_create_request(kwargs)
        pool = _hub.pool("pull", self.pull_threads) if method == "pull" else self.executor
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
        requests = injection.device_requests(self.gpu_devices, mode=self.device_injection)
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
            injection.check_create_request(kwargs, granted=self.gpu_devices, mode=self.device_injection)
        except injection.InjectionError as e:
            self.log.error("Refused to create the container of %s: %s", self._log_name, e)
            raise web.HTTPError(500, f"{e} The server was not created; tell an admin.") from None
        return kwargs

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The hub's bounded pool for Docker calls (DockerSpawner has one thread for everyone)."""
        return _hub.pool("docker", self.docker_threads)

    async def engine_claims(self, inventory: Inventory) -> dict[str, Holder]:
        """UUID -> holder for every running container on the engine, read from it now.

        This hub's containers hold what their labels say; any other running container (another
        hub's, a ``docker run --gpus``) what its DeviceRequests name. A container's requests
        never change, so each other container is inspected once, when first seen.
        """
        running = await self.docker("containers")
        others = [c for c in running if (c.get("Labels") or {}).get(labels.HUB) != self.hub_id]
        for c in others:
            if c["Id"] not in _hub.foreign:
                try:
                    _hub.foreign[c["Id"]] = await self.docker("inspect_container", c["Id"])
                except docker.errors.NotFound:
                    continue
        seen = {c["Id"] for c in others}
        for gone in set(_hub.foreign) - seen:
            del _hub.foreign[gone]
        claims = foreign_claims([_hub.foreign[i] for i in seen if i in _hub.foreign], inventory)
        claims.update(claims_from_containers(running, hub_id=self.hub_id))
        return claims

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
        """Settings for this spawn, built fresh from the profile and the values configured now.

        The values as they stand when the spawn begins (configuration, group overrides, a
        pre-spawn hook) are put back when it ends (:meth:`_restore_configured`), so one
        spawn's profile never leaks into the next, and the next sees what is configured then.
        """
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
            claims = _hub.book.merged(await self.engine_claims(inventory))
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

    def nvml_reader(self) -> NVMLInventory:
        return _hub.inventory(self.nvml_cache_seconds, self.nvml_timeout)

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
            async with _hub.lock:
                claims = _hub.book.merged(await self.engine_claims(inventory))
                over_quota = quota_refusal(request, claims, holder=self.holder, quota=quota)
                if over_quota:
                    raise web.HTTPError(403, over_quota)
                result = allocate(
                    request, inventory, claims, holder=self.holder, busy_memory_threshold=threshold
                )
                if isinstance(result, Grant):
                    _hub.book.reserve(self.audit_record_id, self.holder, result.uuids)
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
        return _hub.audit(self.audit_db_url, key_file=self.audit_key_file, head_file=self.audit_head_file)

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
            if isinstance(result, AuditRecordSealed):  # the spawn ended while this was on its way
                self.log.debug("Audit record of %s not updated: %s", self._log_name, result)
            elif isinstance(result, AuditStoreError):
                raise web.HTTPError(
                    500, "The hub could not write this server's audit record, so it does not start it; tell an admin."
                ) from result
            elif isinstance(result, BaseException):
                raise result

    async def _audit_finish(self, record_id: str, **changes: Any) -> None:
        """Close a record; never raises. A database that does not answer gets the change later."""
        try:
            await self._audit_written()
        except Exception as e:
            self.log.error("A change to the audit record of %s was not written: %s", self._log_name, e)
        await close_record(self.audit_store(), record_id, self.log, stopped_at=seams.now_iso(), **changes)

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

    # --- Start, poll and stop ----------------------------------------------------------------

    async def start(self) -> Any:
        """Record the spawn, then start it; whatever happens, the record says how it ended.

        A spawn that fails or is interrupted (the user cancels, ``start_timeout``) removes what
        it created and gives its devices back only once its container is known not to run.
        """
        self._progress_events = []
        self._spawn_image = None
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
        inserting = _hub.keep(self.audit_store().insert(record))
        try:
            await asyncio.shield(inserting)
        except asyncio.CancelledError as e:  # interrupted while the record is written: close it once it is
            self._spawning = False
            _hub.keep(self._close_after_insert(inserting, record.id, e))
            raise
        except Exception as e:
            self._spawning = False
            self.audit_record_id = ""
            self.log.error("Cannot write the audit record of %s: %s", self._log_name, e)
            raise web.HTTPError(500, "The hub cannot write its audit record, so it starts no server; tell an admin.") from e
        try:
            result = await self._start_recorded()
            await self._audit_written()
        except asyncio.CancelledError as e:
            # Interrupted (the user cancelled, start_timeout): JupyterHub goes on at once; the
            # clean-up runs on, and the devices stay claimed until the container is gone.
            _hub.keep(self._end_failed_spawn(record.id, e, container_id=self.object_id))
            raise
        except BaseException as e:
            await self._end_failed_spawn(record.id, e, container_id=self.object_id)
            raise
        self._spawning = False
        _hub.keep(self._watch_until_ready(record.id))
        return result

    async def _close_after_insert(self, inserting: asyncio.Future[Any], record_id: str, error: BaseException) -> None:
        try:
            await inserting
        except Exception:
            return  # never written: nothing to close
        await self._audit_finish(record_id, outcome="failed", error=_error_text(error))

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
        image_option = (self.user_options or {}).get("image") if profile is None else None
        if image_option:  # DockerSpawner's allowed_images: resolved here, before it is recorded and pinned
            self.image = await self._allowed_image_option(image_option)
        environment = audit.without_secrets(self._configured_environment(), extra_names=self.audit_redact_names)
        profile_hash = audit.content_hash(profiles.profile_config(profile)) if profile else None
        self._audit_update(
            profile=profile.slug if profile else None,
            profile_hash=profile_hash,
            image_requested=self.image,
            cpu_limit=self.cpu_limit,
            mem_limit=_bytes_or_none(self.mem_limit),
            environment=environment,
        )
        if request.wants_gpu:
            self._progress(f"Looking for {request.describe()}")
            grant = await self.allocate_devices(request)
        else:
            grant = Grant(devices=())  # CPU-only: no lock, no NVML, no claim
        self.gpu_devices = grant.uuids
        if grant.devices:
            self.log.info("Allocated %s to %s", ", ".join(grant.uuids), self._log_name)
            self._progress("Allocated " + ", ".join(f"{d.name} ({d.uuid})" for d in grant.devices))
            inventory = await self.nvml_reader().get()
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
        self._spawn_image = self.image
        self._settings_hash = labels.settings_hash({
            "image": self.image, "image_id": resolved["image_id"], "devices": self.gpu_devices,
            "cpu_limit": self.cpu_limit, "mem_limit": self.mem_limit, "environment": environment,
            "profile": profile.slug if profile else None, "profile_hash": profile_hash,
        })
        self._audit_update(docker_version=await self._docker_version(), **resolved)
        await self._replace_kept_container_if_changed()
        result = await super().start()
        # It runs: its labels hold the devices from now on.
        _hub.book.release(self.audit_record_id)
        self._restore_configured()
        return result

    async def _end_failed_spawn(self, record_id: str, error: BaseException, *, container_id: str) -> None:
        """After a failed or interrupted spawn: remove its container, free its devices, close its record."""
        if await self._remove_spawned_container(record_id, container_id):
            _hub.book.release(record_id)
        else:  # the engine could not say: keep the devices until the hub's reconciliation can
            _hub.book.keep_unconfirmed(record_id)
        if self.audit_record_id == record_id:  # no later spawn of this server has begun meanwhile
            self.gpu_devices = ()
            self._spawn_image = None
            self._restore_configured()
        await self._audit_finish(record_id, outcome="failed", error=_error_text(error))
        if self.audit_record_id == record_id:
            self._spawning = False

    async def _remove_spawned_container(self, record_id: str, container_id: str) -> bool:
        """Wait for this spawn's Docker calls to end, then remove the container it created, or stop
        the kept one it started. True when no container of this spawn runs any more."""
        try:
            calls = [asyncio.wrap_future(c) for c in list(self._docker_calls)]
            if calls:
                await asyncio.wait(calls, timeout=max(self.start_timeout, 60))
            obj = await self.docker("inspect_container", self.object_name)
            if (obj["Config"].get("Labels") or {}).get(labels.RECORD) == record_id:
                self.log.info("Removing %s, left by the failed spawn of %s", self.object_name, self._log_name)
                await self.docker("remove_container", obj["Id"], force=True, v=True)
            elif obj["Id"] == container_id and obj["State"].get("Running"):
                await self.docker("stop", obj["Id"])  # a kept container (remove = False) this spawn started
            return True
        except docker.errors.NotFound:
            return True
        except Exception:
            self.log.exception("Could not make sure the container of %s's failed spawn is gone", self._log_name)
            return False

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

    def _configured_environment(self) -> dict[str, str]:
        env = {k: v for k, v in (self.environment or {}).items() if isinstance(v, str)}
        profile = getattr(self, "_profile", None)
        if profile is not None:
            env.update(profile.environment)
        return env

    async def check_allowed(self, image: str) -> str:
        """DockerSpawner's check of a user's ``image`` option; within a spawn, the image it resolved."""
        if self._spawn_image is not None:
            return self._spawn_image
        allowed: str = await super().check_allowed(image)
        return allowed

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
        # What the engine made of the request (a new or a kept container), read while it starts.
        self._audit_writes.append(_hub.keep(self._record_container(self.container_id)))
        await super().start_object()
        self._audit_update(outcome="starting", started_at=seams.now_iso())

    async def poll(self) -> Any:
        """None while the container runs; else its exit status, and its record says how it ended.

        JupyterHub never calls ``stop()`` for a server whose container died (crash, OOM,
        ``docker stop``): this is where the hub learns of it, so the record is closed here with
        the engine's exit code and OOM flag, and a dead container is removed (``remove = True``).
        """
        container = await self.get_object()
        if container is not None and container["State"].get("Running"):
            return None
        if self.audit_record_id and not self._spawning:
            await self._audit_finish(self.audit_record_id, **reconcile.ended_container_changes(container))
            if container is not None and self.remove:
                await self.remove_object()
                self.object_id = ""
        if container is None:
            return 0
        state = container["State"]
        return f"ExitCode={state.get('ExitCode')}, Error='{state.get('Error')}', FinishedAt={state.get('FinishedAt')}"

    async def stop(self, now: bool = False) -> None:
        never_answered = bool(getattr(self, "_waiting_for_response", False))
        await super().stop(now=now)
        if self.audit_record_id and not self._spawning:  # a failing spawn closes its own record
            if never_answered:  # JupyterHub stops a server that did not answer within http_timeout
                await self._audit_finish(
                    self.audit_record_id, outcome="failed",
                    error=f"The server did not answer within {self.http_timeout:.0f} s, so the hub stopped it.",
                )
            else:
                await self._audit_finish(self.audit_record_id, outcome="stopped")

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
    """Why a spawn failed, for its record: clipped, since a record can never shrink once sealed."""
    if isinstance(e, web.HTTPError):
        return userinput.clip(f"HTTP {e.status_code}: {e.log_message}")
    if isinstance(e, asyncio.CancelledError):
        return "the spawn was cancelled (timed out, or the hub stopped it)"
    return userinput.clip(f"{type(e).__name__}: {e}")


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
        ("GPUSpawner", "audit_redact_names", audit.parse_redact_names),
        ("GPUSpawner", "max_user_options_bytes", userinput.parse_max_options_bytes),
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
        _hub.keep(maintain(app))

    _check_scheduled = True
    loop.call_soon(check)


@dataclass(frozen=True)
class HubSettings:
    """What the hub process as a whole uses, resolved from its configuration as a spawner would."""

    hub_id: str
    audit_db_url: str
    busy_memory_threshold: int
    audit_key_file: str
    audit_head_file: str
    audit_redact_names: tuple[str, ...] = ()


def hub_settings(config: Config, *, hub_id: str | None = None) -> HubSettings:
    """hub_id, the audit database and its key files, and the busy threshold, from the hub's configuration."""
    db_url = _hub_db_url() or "sqlite:///jupyterhub.sqlite"
    key_file = config_value(config, "audit_key_file", fallback="") or str(_data_folder(db_url) / AUDIT_KEY_FILE)
    return HubSettings(
        hub_id=hub_id or config_value(config, "hub_id", fallback="") or stored_hub_id(db_url, create=False),
        audit_db_url=config_value(config, "audit_db_url", fallback="") or default_audit_url(db_url, cwd=os.getcwd()),
        busy_memory_threshold=settings.parse_bytes(
            config_value(config, "busy_memory_threshold", fallback="1G"), where="GPUSpawner.busy_memory_threshold"
        ),
        audit_key_file=key_file,
        audit_redact_names=tuple(config_value(config, "audit_redact_names", fallback=[])),
        audit_head_file=config_value(config, "audit_head_file", fallback="") or str(Path(key_file).with_name(AUDIT_HEAD_FILE)),
    )


async def close_record(store: AsyncAuditStore, record_id: str, log: Any, **changes: Any) -> None:
    """Give a record its final state; a sealed one is left alone, and an unreachable database
    gets the change later (``finish_eventually``). Never raises: a user sees the refusal or the
    stop they asked for, never a database error."""
    try:
        await store.finish_eventually(record_id, **changes)
    except AuditStoreError as e:
        log.debug("Audit record %s not closed: %s", record_id, e)
    except Exception:
        log.exception("Could not close audit record %s", record_id)


class _Caretaker:
    """The user of the spawner that does the hub's upkeep: no one."""

    name = "gpuspawner-caretaker"
    admin = False
    groups: tuple[Any, ...] = ()


async def maintain(app: Any) -> None:
    """The hub's own upkeep: once the hub has started, and every ``reconcile_interval`` after,
    check its containers and records against its servers (see :mod:`gpuspawner.reconcile`)."""
    started = getattr(app, "_start_future", None)
    if started is not None:
        await started  # the servers JupyterHub resumes are known only once it has started
    spawner_class = app.spawner_class if isinstance(app.spawner_class, type) else GPUSpawner
    if not issubclass(spawner_class, GPUSpawner):
        spawner_class = GPUSpawner
    # A spawner of no server: the hub's settings, resolved as for every server, and its Docker path.
    caretaker = spawner_class(config=app.config, hub=getattr(app, "hub", None), user=_Caretaker())
    while True:
        try:
            await reconcile_once(caretaker, app.log)
        except Exception:
            app.log.exception("gpuspawner could not check the hub's containers against its servers")
        if caretaker.reconcile_interval <= 0:
            return
        await asyncio.sleep(caretaker.reconcile_interval)


def _server_view(spawner: GPUSpawner) -> reconcile.ServerView:
    return reconcile.ServerView(
        user=spawner.user.name, server=spawner.name or "", active=bool(spawner.active),
        spawning=spawner._spawning, ready=bool(spawner.ready), container_id=spawner.object_id or "",
        record_id=spawner.audit_record_id,
    )


async def reconcile_once(caretaker: GPUSpawner, log: Any) -> reconcile.Plan:
    """One check of this hub's containers, open records and unconfirmed claims; carry out the plan."""
    hub_id = caretaker.hub_id
    store = caretaker.audit_store()
    listed = await caretaker.docker("containers", all=True, filters=labels.hub_filter(hub_id))
    containers = []
    for c in listed:
        identity = labels.identity_from_labels(c.get("Labels"))
        if identity is not None and identity.hub_id == hub_id:
            containers.append(reconcile.ContainerView(
                id=c["Id"], name=(c.get("Names") or [c["Id"][:12]])[0].lstrip("/"), user=identity.user,
                server=identity.server, state=c.get("State", ""), record_id=(c.get("Labels") or {}).get(labels.RECORD, ""),
            ))
    spawners = {key: sp for key, sp in list(_hub.spawners.items())}
    open_records = [
        reconcile.OpenRecord(id=r.id, user=r.user, server=r.server, outcome=r.outcome)
        for r in await store.open_records(hub_id)
    ]
    todo = reconcile.plan(
        containers, [_server_view(sp) for sp in spawners.values()], open_records,
        unconfirmed=_hub.book.unconfirmed(), remove=caretaker.remove,
    )
    for c in todo.stop:
        log.warning("Stopping orphan container %s of %s/%s: no server of this hub owns it", c.name, c.user, c.server)
        try:
            await caretaker.docker("stop", c.id)
            if caretaker.remove:
                await caretaker.docker("remove_container", c.id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        if c.record_id:
            # the hub may have died before the record learnt its container's id: say which it was
            await close_record(store, c.record_id, log, outcome="abandoned", error=reconcile.ORPHAN_STOPPED,
                               stopped_at=seams.now_iso(), container_id=c.id, container_name=c.name)
    for c in todo.ended:
        try:
            info = await caretaker.docker("inspect_container", c.id)
        except docker.errors.NotFound:
            info = None
        await close_record(store, c.record_id, log, stopped_at=seams.now_iso(), container_id=c.id, container_name=c.name,
                           **reconcile.ended_container_changes(info))
    for c in todo.remove:
        try:
            await caretaker.docker("remove_container", c.id, force=True, v=True)
        except docker.errors.NotFound:
            pass
    for record_id, changes in todo.close:
        log.warning("Closing audit record %s: %s", record_id, changes["error"])
        await close_record(store, record_id, log, stopped_at=seams.now_iso(), **changes)
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
        _hub.book.release(spawn_id)
    return todo
