"""GPUSpawner's settings: every trait an admin configures, with its help, its default and its check.

:class:`GPUSpawnerConfig` holds them apart from what the spawner does, and imports no Docker
library, so the ``gpuspawner`` commands and the audit service judge a hub's configuration by
building this class from it (:func:`gpuspawner.hubconfig.spawner_settings`), with the same
validators the hub runs. A bad value is a ``TraitError`` naming the class configured (a
subclass's own name), the trait, the value and what is allowed.

Configure them as ``c.GPUSpawner.<name>`` (or under the name of your subclass).
"""

from __future__ import annotations

from typing import Any, cast

from jupyterhub.traitlets import ByteSpecification
from traitlets import (
    Bool,
    Callable,
    Dict,
    Enum,
    Float,
    Int,
    List,
    TraitError,
    TraitType,
    Unicode,
    Union,
    default,
    validate,
)
from traitlets.config import LoggingConfigurable

from . import redaction, settings, userinput
from .allocation import GPURequest
from .hubconfig import default_audit_db_url, default_audit_head_file, default_audit_key_file, hub_db_url, stored_hub_id
from .images import Pinning
from .limits import parse_duration, parse_percent
from .profiles import parse_profiles


def where(obj: Any, name: str) -> str:
    """How an error names a setting: the class configured (a subclass's own name) and the trait."""
    return f"{type(obj).__name__}.{name}"


def checked(parse: Any, obj: Any, name: str, value: Any) -> Any:
    """`parse(value)`, its ``ConfigError`` a ``TraitError`` (the message says where, the value and what is allowed)."""
    try:
        return parse(value, where=where(obj, name))
    except settings.ConfigError as e:
        raise TraitError(str(e)) from None


class GPURequestTrait(TraitType[GPURequest, Any]):
    """A trait whose value is a :class:`GPURequest`, configured as a number of GPUs or a dict."""

    info_text = "a number of GPUs, or a dict with keys count, mig_profile, model, min_memory"

    def validate(self, obj: Any, value: Any) -> GPURequest:
        if isinstance(value, GPURequest):
            return value
        request: GPURequest = checked(settings.parse_gpu_request, obj, str(self.name), value)
        return request


class Duration(TraitType[float | None, Any]):
    """A duration: "8h", "90m", "1h30m", "2d" or seconds; ``None`` or 0 for none."""

    info_text = "a duration such as '8h' or '90m', or a number of seconds"
    allow_none = True

    def validate(self, obj: Any, value: Any) -> float | None:
        seconds: float | None = checked(parse_duration, obj, str(self.name), value)
        return seconds


class Bytes(ByteSpecification):  # type: ignore[misc]  # jupyterhub ships no type hints
    """JupyterHub's size trait ("512M", "1G", bytes), its refusal naming the setting."""

    def validate(self, obj: Any, value: Any) -> int:
        try:
            return int(super().validate(obj, value))
        except (TraitError, TypeError, IndexError):
            raise TraitError(
                f"{where(obj, self.name)} is {value!r}; allowed: a size such as 512M or 1G (suffix K, M, G or T, "
                "binary units) or a number of bytes."
            ) from None


class GPUSpawnerConfig(LoggingConfigurable):
    """The settings GPUSpawner adds to DockerSpawner's (see the README's configuration reference)."""

    create_hub_id = True  # the hub writes its identity on first start; a command only reads it

    def hub_database(self) -> str:
        """The hub's own database URL (absolute for SQLite), which places its data folder: the running
        hub's; settings read from a configuration file by a command know it from the file."""
        return hub_db_url()

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

    gpu_request = GPURequestTrait(
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
        Seconds a spawn waits in the hub's GPU queue for devices to free up when none fit. Waiters
        are served first come, first served, and none is overtaken for the devices it waits for
        (see the README's "Waiting in line for a GPU"); the progress page says the place in line.
        ``0`` (the default) fails at once with the reason, as an HTTP 503. Waiting never outlasts
        ``Spawner.start_timeout``. Example: ``c.GPUSpawner.gpu_wait_timeout = 300``.
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

    busy_memory_threshold = Bytes(
        "1G",
        help="""
        A GPU with more memory in use than this, and not held by a server of this hub, is
        busy outside the hub and not handed out (a GPU with compute processes always is).
        A size such as ``"1G"`` or ``"512M"`` (binary units) or a number of bytes.
        Example: ``c.GPUSpawner.busy_memory_threshold = "256M"``.
        """,
    ).tag(config=True)

    max_runtime = Duration(
        None,
        help="""
        How long a server with GPUs may run: it is stopped that long after it started, through the
        normal stop path (its record says why, its GPUs go to the next in line), with a warning
        ``limit_warning_seconds`` ahead on the hub's home page. A duration such as ``"8h"`` or
        ``"90m"``, or seconds. ``None`` (the default): no limit. A profile's own ``max_runtime``
        wins, and holds for any server of that profile.
        Example: ``c.GPUSpawner.max_runtime = "12h"``.
        """,
    ).tag(config=True)

    gpu_idle_timeout = Duration(
        None,
        help="""
        Stop a server with GPUs once every one of its GPUs has stayed under ``gpu_idle_threshold``
        percent utilisation for this long, as the hub's samples (every ``gpu_sample_seconds``) saw
        them, whatever the notebook's own activity. A warning comes first, as for ``max_runtime``.
        MIG devices report no utilisation through NVML: a server holding one is never stopped as
        idle. ``None`` (the default): never. A profile's own ``gpu_idle_timeout`` wins.
        Example: ``c.GPUSpawner.gpu_idle_timeout = "2h"``.
        """,
    ).tag(config=True)

    gpu_idle_threshold = Float(
        5.0,
        help="""
        The utilisation, in percent, under which a GPU counts as idle for ``gpu_idle_timeout``.
        A profile's own ``gpu_idle_threshold`` wins. Example: ``c.GPUSpawner.gpu_idle_threshold = 10``.
        """,
    ).tag(config=True)

    gpu_sample_seconds = Float(
        60.0,
        help="""
        Seconds between the hub's samples of its GPUs: each reads every GPU's utilisation through NVML
        (in a thread, off the hub's event loop), updates the hub's Prometheus metrics, counts each
        server's GPU time (and idle GPU time, for its audit record) and stops the servers past their
        time limits. Example: ``c.GPUSpawner.gpu_sample_seconds = 30``.
        """,
    ).tag(config=True)

    limit_warning_seconds = Float(
        600.0,
        help="""
        How long before a time limit stops a server its user is warned, on the hub's home page and
        in the log. Example: ``c.GPUSpawner.limit_warning_seconds = 1800``.
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
        SECRET, PASSWORD, PASS, PWD, KEY, CREDENTIALS, AUTH, PAT, COOKIE, SESSION, PRIVATE, DSN
        or WEBHOOK, or such words joined (``HF_TOKEN``, ``DB_PASSWORD``, ``APP_SECRETKEY``), nor
        URL passwords, credential query parameters, webhook URLs, tokens of known formats,
        private keys or random-looking strings in any value; the hub's own ``JUPYTERHUB_*``
        variables are left out. Add here what those rules cannot guess. A redacted variable stays in the record by
        name with the value ``<redacted>``, and ``gpuspawner reproduce`` passes it as
        ``-e NAME``, to be set in the shell that runs the command.
        Example: ``c.GPUSpawner.audit_redact_names = ["LICENSE_SERVER", "MYCORP_*"]``.
        """,
    ).tag(config=True)

    audit_key_file = Unicode(
        "",
        help="""
        The secret that seals every entry of the audit log (HMAC-SHA256): someone who can write
        the audit database but not read this file can neither change an entry nor forge one
        unseen. The hub creates it (mode 0600) on first start; back it up with the hub's other
        secrets and keep it off the database server and out of the database's folder or volume.
        ``gpuspawner audit verify`` and the audit service's witness read it. Default:
        ``gpuspawner-audit.key`` in the hub's data folder (beside its SQLite database).
        Example: ``c.GPUSpawner.audit_key_file = "/srv/jupyterhub/secrets/audit.key"``.
        """,
    ).tag(config=True)

    audit_head_file = Unicode(
        "",
        help="""
        Where the hub keeps the audit log's head (the newest entry's number and seal) outside the
        database, moved forward after every entry: a log that no longer holds it was rolled back
        or rewritten, and then the hub writes nothing more (and so starts no servers) until an
        admin has looked. Keep it apart from the database, where whoever can write the database
        cannot write it. ``gpuspawner audit verify`` checks the log against it and prints the head;
        keep copies elsewhere too (the audit service's witness, a log, a ticket) to check a store
        against later with ``--witness`` or ``--expect-head``.
        Default: ``gpuspawner-audit.head`` beside the sealing key.
        Example: ``c.GPUSpawner.audit_head_file = "/srv/jupyterhub/secrets/audit.head"``.
        """,
    ).tag(config=True)

    audit_head_log_interval = Float(
        600.0,
        help="""
        Seconds between the lines in which the hub writes its audit log's head to its own log
        (it writes one at start and one at stop too), so the hub's log, kept wherever your logs go,
        is one more witness of the audit log. The hub checks the log against the head file each
        time. 0 writes them at start and stop only.
        Example: ``c.GPUSpawner.audit_head_log_interval = 3600``.
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


    @default("hub_id")
    def _default_hub_id(self) -> str:
        return stored_hub_id(self.hub_database(), create=self.create_hub_id)

    @default("audit_db_url")
    def _default_audit_db_url(self) -> str:
        return default_audit_db_url(self.hub_database())

    @default("audit_key_file")
    def _default_audit_key_file(self) -> str:
        return default_audit_key_file(self.hub_database())

    @default("audit_head_file")
    def _default_audit_head_file(self) -> str:
        return default_audit_head_file(self.audit_key_file)

    @validate("gpu_sample_seconds")
    def _check_sample_seconds(self, proposal: Any) -> float:
        seconds = float(checked(settings.parse_seconds, self, proposal.trait.name, proposal.value))
        if seconds < 1:
            raise TraitError(f"{where(self, proposal.trait.name)} is {proposal.value!r}; allowed: 1 second or more.")
        return seconds

    @validate("docker_threads", "pull_threads")
    def _check_threads(self, proposal: Any) -> int:
        return int(checked(settings.parse_threads, self, proposal.trait.name, proposal.value))

    @validate("gpu_idle_threshold")
    def _check_percent(self, proposal: Any) -> float:
        return float(checked(parse_percent, self, proposal.trait.name, proposal.value))

    @validate("gpu_wait_timeout", "nvml_cache_seconds", "nvml_timeout", "reconcile_interval", "limit_warning_seconds")
    def _check_seconds(self, proposal: Any) -> float:
        return float(checked(settings.parse_seconds, self, proposal.trait.name, proposal.value))

    @validate("max_user_options_bytes")
    def _check_max_user_options_bytes(self, proposal: Any) -> int:
        return int(checked(userinput.parse_max_options_bytes, self, proposal.trait.name, proposal.value))

    @validate("max_gpus_per_user")
    def _check_max_gpus_per_user(self, proposal: Any) -> int | None:
        if proposal.value is None:
            return None
        return int(checked(settings.parse_count, self, proposal.trait.name, proposal.value))

    @validate("max_gpus_per_group")
    def _check_max_gpus_per_group(self, proposal: Any) -> dict[str, int]:
        name = proposal.trait.name
        return {g: checked(settings.parse_count, self, f"{name}[{g!r}]", n) for g, n in proposal.value.items()}

    @validate("profiles")
    def _check_profiles(self, proposal: Any) -> Any:
        if not callable(proposal.value):  # a callable's result is checked at each use
            checked(lambda v, where: parse_profiles(v, where=where, pinning=cast(Pinning, self.image_pinning)), self,
                    proposal.trait.name, proposal.value)
        return proposal.value

    @validate("audit_redact_names")
    def _check_audit_redact_names(self, proposal: Any) -> Any:
        checked(redaction.parse_redact_names, self, proposal.trait.name, proposal.value)
        return proposal.value
