"""The hub's settings from its configuration, as the spawner, the CLI and the audit service read them.

One place resolves what the hub process as a whole uses (its identity, the audit database and
the files that seal it, the busy threshold) and checks gpuspawner's settings in a hub's
``jupyterhub_config.py``. It imports no Docker library: the ``gpuspawner audit`` commands and
the audit service load it without loading the spawner.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from traitlets.config import Config

from . import audit, labels, profiles, settings, userinput

HUB_ID_FILE = "gpuspawner-hub-id"
AUDIT_KEY_FILE = "gpuspawner-audit.key"
AUDIT_HEAD_FILE = "gpuspawner-audit.head"

# The configuration sections GPUSpawner reads, most general first (its class and base classes,
# as traitlets resolves them); tests check this against GPUSpawner.mro().
SPAWNER_SECTIONS: tuple[str, ...] = (
    "object", "HasDescriptors", "HasTraits", "Configurable", "LoggingConfigurable", "Spawner", "DockerSpawner",
    "GPUSpawner",
)


class ConfigFileError(Exception):
    """A configuration file that is missing or fails to load; the message is one line."""


def hub_db_url() -> str:
    """The database URL of the running hub, made absolute for SQLite files; "" outside a hub."""
    from jupyterhub.app import JupyterHub

    if not JupyterHub.initialized():
        return ""
    url: str = JupyterHub.instance().db_url
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        # A relative SQLite path names a different database from another working directory.
        url = prefix + os.path.abspath(url[len(prefix) :])
    return url


def default_audit_db_url(db_url: str) -> str:
    """The audit database of a hub whose own database is `db_url` ("" for the default)."""
    # The store (and SQLAlchemy) load only where an audit URL is needed, not for `gpuspawner gpus`.
    from .store import default_audit_url

    return default_audit_url(db_url or "sqlite:///jupyterhub.sqlite", cwd=os.getcwd())


def data_folder(db_url: str) -> Path:
    """The hub's data folder: where its SQLite database lives, else its working directory."""
    return Path(default_audit_db_url(db_url)[len("sqlite:///"):]).parent


def default_audit_key_file(db_url: str) -> str:
    """The audit sealing key of a hub whose own database is `db_url`: in its data folder."""
    return str(data_folder(db_url) / AUDIT_KEY_FILE)


def default_audit_head_file(key_file: str) -> str:
    """The audit chain's head file: beside the sealing key."""
    return str(Path(key_file).with_name(AUDIT_HEAD_FILE))


def stored_hub_id(db_url: str, *, create: bool) -> str:
    """The hub's identity, kept in ``gpuspawner-hub-id`` in its data folder.

    The first start writes it (derived from the host name and the database URL, as before
    it was kept), so a hub whose container is recreated with another host name keeps it.
    ``create=False`` (the CLI) reads it, or derives it where the hub never wrote one.
    """
    path = data_folder(db_url) / HUB_ID_FILE
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


_MISSING: Any = object()


def _sections(cls: type | None) -> Sequence[str]:
    return SPAWNER_SECTIONS if cls is None else [k.__name__ for k in reversed(cls.mro())]


def config_value(config: Config, name: str, *, cls: type | None = None, fallback: Any = _MISSING) -> Any:
    """The value `name` has in `config` for `cls` (default GPUSpawner), as traitlets would resolve
    it: subclass sections win."""
    found = fallback
    for section in _sections(cls):
        if section in config and name in config[section]:
            found = config[section][name]
    return found


def check_config(config: Config, cls: type | None = None) -> None:
    """Check gpuspawner's settings in a hub's configuration; raise ConfigError naming the first bad one.

    `cls` is the spawner class whose sections count (default GPUSpawner). The hub runs this
    when it loads GPUSpawner, so a bad value stops the hub at start rather than failing spawns later.
    """
    checks: list[tuple[str, str, Callable[..., Any]]] = [
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
    db_url = hub_db_url() or "sqlite:///jupyterhub.sqlite"
    key_file = config_value(config, "audit_key_file", fallback="") or default_audit_key_file(db_url)
    return HubSettings(
        hub_id=hub_id or config_value(config, "hub_id", fallback="") or stored_hub_id(db_url, create=False),
        audit_db_url=config_value(config, "audit_db_url", fallback="") or default_audit_db_url(db_url),
        busy_memory_threshold=settings.parse_bytes(
            config_value(config, "busy_memory_threshold", fallback="1G"), where="GPUSpawner.busy_memory_threshold"
        ),
        audit_key_file=key_file,
        audit_redact_names=tuple(config_value(config, "audit_redact_names", fallback=[])),
        audit_head_file=config_value(config, "audit_head_file", fallback="") or default_audit_head_file(key_file),
    )


def load_hub_settings(config_file: str | None, *, hub_id: str | None) -> HubSettings:
    """GPUSpawner's settings from a jupyterhub_config.py, resolved as the hub resolves them.

    Raises ConfigFileError for a file that is missing or fails to load, and ConfigError for a
    bad setting in it.
    """
    from jupyterhub.app import JupyterHub

    app = JupyterHub.instance()
    if config_file:
        path = Path(config_file).resolve()
        if not path.exists():
            raise ConfigFileError(f"no configuration file at {path}")
        # Relative paths in the config (the hub database's, say) mean what they mean to a
        # hub started in the config's folder.
        os.chdir(path.parent)
        try:
            app.load_config_file(str(path))
        except Exception as e:  # the file is Python: it may fail in any way
            raise ConfigFileError(config_file_failure(path, e)) from None
    check_config(app.config)
    return hub_settings(app.config, hub_id=hub_id)


def config_file_failure(path: Path, error: BaseException) -> str:
    """One line saying why a configuration file did not load, and where in it."""
    if isinstance(error, SyntaxError):
        return f"the configuration file {path} has a syntax error at line {error.lineno}: {error.msg}"
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == str(path)]
    where = f" at line {lines[-1]}" if lines else ""
    first_line = next(iter(str(error).splitlines()), "")
    return f"the configuration file {path} failed{where}: {type(error).__name__}: {first_line}"
