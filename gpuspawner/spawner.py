"""GPUSpawner: DockerSpawner for shared GPU servers.

This module is glue. Decisions (which labels a container carries, and later which devices it
gets, from which image) are made by the pure modules beside it; this class feeds them what
the hub and the Docker engine know and hands their answers to DockerSpawner.

Override points, for admins who subclass GPUSpawner:

- ``container_labels()``: the labels put on every container this spawner creates. Call
  ``super()`` and add to the result; the ``gpuspawner.*`` labels must stay, since the hub
  rebuilds its state from them.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from dockerspawner import DockerSpawner
from traitlets import Unicode, default

from . import labels
from ._version import __version__


def _hub_db_url() -> str:
    """The database URL of the running hub, made absolute for SQLite files."""
    try:
        from jupyterhub.app import JupyterHub
    except ImportError:  # pragma: no cover - jupyterhub is a hard dependency
        return ""
    if not JupyterHub.initialized():
        return ""
    url: str = JupyterHub.instance().db_url
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        # A relative SQLite path names a different database from another working directory.
        url = prefix + os.path.abspath(url[len(prefix) :])
    return url


class GPUSpawner(DockerSpawner):
    """A DockerSpawner for shared GPU servers.

    Every container it creates is labelled with this hub's identity, the user and the server
    name (see :mod:`gpuspawner.labels`), so the hub can find its servers in the Docker engine
    after a restart and never confuses them with another hub's.
    """

    hub_id = Unicode(
        help="""
        A name for this hub, written into the labels of every container it creates.

        The hub uses it to tell its own containers from those of other hubs that share the
        same Docker engine, and to find its servers again after a restart. It must stay the
        same for the life of the hub's database and differ between hubs on one engine.

        By default it is derived from the host name and the hub's database URL, which meets
        both needs; set it when the hub moves to another host or database but keeps its
        containers. Example: ``c.GPUSpawner.hub_id = "physics-lab-hub"``.
        """,
    ).tag(config=True)

    @default("hub_id")
    def _default_hub_id(self) -> str:
        return labels.hub_id_for(hostname=socket.gethostname(), db_url=_hub_db_url())

    @property
    def server_identity(self) -> labels.ServerIdentity:
        """Which hub, user and server this spawner's container belongs to."""
        return labels.ServerIdentity(hub_id=self.hub_id, user=self.user.name, server=self.name or "")

    def container_labels(self) -> dict[str, str]:
        """The labels for this server's container (override point; call super() and add)."""
        return labels.server_labels(self.server_identity, version=__version__)

    def docker(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one docker-py call off the event loop; every container creation passes here.

        DockerSpawner builds the create call from its configuration and sends it through this
        method, so this is the one place where a container's labels are set: a fresh dict
        for each call, leaving the configured ``extra_create_kwargs`` untouched.
        """
        if method == "create_container":
            kwargs = dict(kwargs, labels=labels.merge_labels(kwargs.get("labels"), self.container_labels()))
        return super().docker(method, *args, **kwargs)
