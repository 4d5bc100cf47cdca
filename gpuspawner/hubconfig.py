"""The hub's settings from its configuration, as the spawner, the CLI and the audit service read them.

Where the hub keeps its identity, its audit database and the files that seal it (the traits'
defaults in :mod:`gpuspawner.traits` come from here), and :func:`spawner_settings`: a hub's
``jupyterhub_config.py`` read and checked by GPUSpawner's own traits. It imports no Docker
library: the ``gpuspawner`` commands and the audit service load it without loading the spawner.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from traitlets.config import Config

from . import labels, settings

if TYPE_CHECKING:
    from .traits import GPUSpawnerConfig

HUB_ID_FILE = "gpuspawner-hub-id"
AUDIT_KEY_FILE = "gpuspawner-audit.key"
AUDIT_HEAD_FILE = "gpuspawner-audit.head"
CLOCKS_FILE = "gpuspawner-clocks.json"  # the servers' idle clocks and idle GPU-seconds (gpuspawner.reclaim)

# The configuration sections GPUSpawner reads, most general first (its class and base classes,
# as traitlets resolves them); tests check this against GPUSpawner.mro().
SPAWNER_SECTIONS: tuple[str, ...] = (
    "object", "HasDescriptors", "HasTraits", "Configurable", "LoggingConfigurable", "Spawner", "DockerSpawner",
    "GPUSpawnerConfig", "DockerPath", "UserChoice", "GPUSpawner",
)


class ConfigFileError(Exception):
    """A configuration file that is missing or fails to load; the message is one line."""


def hub_db_url() -> str:
    """The database URL of the hub running in this process, made absolute for SQLite files; "" outside a hub."""
    if "jupyterhub.app" not in sys.modules:  # no hub here (and a command need not load one)
        return ""
    from jupyterhub.app import JupyterHub

    return absolute_db_url(JupyterHub.instance().db_url) if JupyterHub.initialized() else ""


def absolute_db_url(url: str) -> str:
    """`url` with a relative SQLite path made absolute (from the working directory): a relative path
    names a different database from another working directory."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if database and database != ":memory:" and not os.path.isabs(database):
        scheme, sep, rest = url.partition(":///")
        url = scheme + sep + os.path.abspath(database) + rest[len(database):]
    return url


def default_audit_db_url(db_url: str) -> str:
    """The audit database of a hub whose own database is `db_url` ("" for the default)."""
    # The store (and SQLAlchemy) load only where an audit URL is needed, not for `gpuspawner gpus`.
    from .store import default_audit_url

    return default_audit_url(db_url or "sqlite:///jupyterhub.sqlite", cwd=os.getcwd())


def data_folder(db_url: str) -> Path:
    """The hub's data folder: where its SQLite database lives, else its working directory."""
    from sqlalchemy.engine import make_url

    return Path(make_url(default_audit_db_url(db_url)).database or ".").parent


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


def spawner_settings(config: Config, spawner_class: type | None = None, *, db_url: str | None = None) -> GPUSpawnerConfig:
    """GPUSpawner's settings in `config`, built and checked by the traits' own validators.

    The values are those `spawner_class` (default GPUSpawner) would get: its sections and its
    base classes', a subclass's winning, as traitlets resolves them. `db_url`: the hub database's
    URL, which places the hub's files (default: the hub running in this process). A bad value
    raises ``ConfigError`` naming the class, the setting, the value and what is allowed. Builds no
    spawner and imports no Docker library (the ``gpuspawner`` commands, the audit service).
    """
    from traitlets import TraitError

    from .traits import GPUSpawnerConfig

    sections = SPAWNER_SECTIONS if spawner_class is None else tuple(k.__name__ for k in reversed(spawner_class.mro()))
    ours = set(GPUSpawnerConfig.class_trait_names(config=True))
    values: dict[str, Any] = {}
    for section in sections:
        if section in config:
            values.update((k, v) for k, v in config[section].items() if k in ours)
    name = sections[-1]
    members: dict[str, Any] = {"create_hub_id": False}
    if db_url is not None:
        members["hub_database"] = lambda self: db_url
    checker = type(name, (GPUSpawnerConfig,), members)
    try:
        built: GPUSpawnerConfig = checker(config=Config({name: values}))
    except TraitError as e:
        raise settings.ConfigError(str(e)) from None
    return built


DEFAULT_DB_URL = "sqlite:///jupyterhub.sqlite"  # JupyterHub.db_url's default


def load_spawner_settings(config_file: str | None) -> GPUSpawnerConfig:
    """GPUSpawner's settings from a jupyterhub_config.py, resolved and checked as the hub does.

    The file is read as JupyterHub reads it (``c = get_config()``), without loading JupyterHub.
    Raises ConfigFileError for a file that is missing or fails to load, and ConfigError for a
    bad setting in it.
    """
    from traitlets.config.loader import PyFileConfigLoader

    config = Config()
    if config_file:
        path = Path(config_file).resolve()
        if not path.exists():
            raise ConfigFileError(f"no configuration file at {path}")
        # Relative paths in the config (the hub database's, say) mean what they mean to a
        # hub started in the config's folder.
        os.chdir(path.parent)
        try:
            config = PyFileConfigLoader(path.name, path=str(path.parent)).load_config()
        except Exception as e:  # the file is Python: it may fail in any way
            raise ConfigFileError(config_file_failure(path, e)) from None
    hub = config.JupyterHub if "JupyterHub" in config else Config()
    configured = hub.get("spawner_class")
    db_url = hub.get("db_url")
    return spawner_settings(config, configured if isinstance(configured, type) else None,
                            db_url=absolute_db_url(db_url if isinstance(db_url, str) and db_url else DEFAULT_DB_URL))


def config_file_failure(path: Path, error: BaseException) -> str:
    """One line saying why a configuration file did not load, and where in it."""
    if isinstance(error, SyntaxError):
        return f"the configuration file {path} has a syntax error at line {error.lineno}: {error.msg}"
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == str(path)]
    where = f" at line {lines[-1]}" if lines else ""
    first_line = next(iter(str(error).splitlines()), "")
    return f"the configuration file {path} failed{where}: {type(error).__name__}: {first_line}"


def clocks_path(db_url: str | None = None) -> Path:
    """Where the hub keeps its servers' idle clocks: in the data folder of the hub whose database is
    `db_url` (default: the hub running in this process)."""
    return data_folder(hub_db_url() if db_url is None else db_url) / CLOCKS_FILE


@dataclass
class Clocks:
    """What the hub's sampler keeps across hub restarts, by audit record: since when each server's GPUs
    are idle (seconds since the epoch), and the idle GPU-seconds counted so far."""

    idle_since: dict[str, float] = field(default_factory=dict)
    idle_gpu_seconds: dict[str, float] = field(default_factory=dict)


def load_clocks(path: Path) -> Clocks:
    """The clocks a previous hub process left; none when the file is missing or unreadable. A file of
    gpuspawner before idle GPU-seconds holds the idle clocks alone."""
    try:
        data = json.loads(path.read_text())
        if "idle_since" not in data:
            return Clocks({str(k): float(v) for k, v in data.items()})
        return Clocks(*({str(k): float(v) for k, v in data[part].items()} for part in ("idle_since", "idle_gpu_seconds")))
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return Clocks()


def save_clocks(path: Path, clocks: Clocks) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(clocks), sort_keys=True))
    tmp.replace(path)
