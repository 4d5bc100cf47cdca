"""The one path from a server's spawner to the Docker engine: :class:`DockerPath`, GPUSpawner's base.

Every docker-py call of every server runs off the hub's event loop in the hub's bounded thread
pools (DockerSpawner runs everyone's calls through one thread), a spawn's calls in flight are
known (an interrupted spawn waits for them before it cleans up), and the one create request
DockerSpawner builds gets the server's labels and devices and is checked just before it goes
to the engine: whatever an admin configured, a container gets exactly its grant of devices
and the image its spawn recorded, or is not created.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from dockerspawner import DockerSpawner
from tornado import web
from traitlets import TraitError, default, validate

from . import injection, labels, serverinfo, settings
from .hubwide import resources
from .traits import GPUSpawnerConfig, checked, where

_client_lock = threading.Lock()  # held while the hub's Docker client is made (see DockerPath.client)


class DockerPath(GPUSpawnerConfig, DockerSpawner):  # type: ignore[misc]  # dockerspawner ships no type hints
    """DockerSpawner's Docker calls through the hub's pools, and its create request checked.

    :class:`gpuspawner.spawner.GPUSpawner` sets what a container gets: ``gpu_devices`` (the
    grant), ``spawn_image`` (the image its spawn recorded) and ``container_labels()``.
    """

    gpu_devices: tuple[str, ...] = ()  # UUIDs this server holds
    spawn_image: str | None = None  # the image the current spawn resolved and recorded

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.docker_calls: set[concurrent.futures.Future[Any]] = set()  # this server's calls in flight

    def container_labels(self) -> dict[str, str]:
        raise NotImplementedError

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

    @validate("extra_host_config")
    def _check_extra_host_config(self, proposal: Any) -> Any:
        checked(settings.check_extra_host_config, self, "extra_host_config", proposal.value)
        return proposal.value

    @validate("environment")
    def _check_environment(self, proposal: Any) -> Any:
        try:
            serverinfo.check_names([str(k) for k in proposal.value or {}], where=where(self, "environment"))
        except serverinfo.ReservedName as e:
            raise TraitError(str(e)) from None
        return proposal.value

    def server_environment(self) -> dict[str, str]:
        """The variables that say what the server is (:mod:`gpuspawner.serverinfo`); none before a spawn
        has resolved its image."""
        raise NotImplementedError

    def docker(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one docker-py call off the event loop; every Docker call of every server passes here.

        Calls run in the hub's pool of ``docker_threads``, so one user's slow call never
        queues another's; pulls in a pool of their own (``pull_threads``), so a long pull holds
        up no spawn, poll or stop. DockerSpawner sends its create call through here too, so this
        is where a container gets its labels and devices, checked (:meth:`_checked_create_request`).
        """
        if method == "create_container":
            kwargs = self._checked_create_request(kwargs)
        pool = resources.pool("pull", self.pull_threads) if method == "pull" else self.executor
        call = pool.submit(self._docker, method, *args, **kwargs)
        self.docker_calls.add(call)
        call.add_done_callback(self.docker_calls.discard)
        return asyncio.wrap_future(call)

    def _checked_create_request(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The create request with the server's labels and devices; HTTP 500 where it would give the
        container another image than its spawn recorded, or devices beyond its grant."""
        if self.spawn_image is not None and kwargs.get("image") != self.spawn_image:
            raise web.HTTPError(
                500, f"The container would be created from {kwargs.get('image')}, but this spawn resolved and "
                f"recorded {self.spawn_image}; tell an admin (a setting changes the image after gpuspawner chose it)."
            )
        kwargs = dict(kwargs, labels=labels.merge_labels(kwargs.get("labels"), self.container_labels()))
        mode = cast(injection.InjectionMode, self.device_injection)  # the Enum trait allows no other value
        try:
            request = injection.with_devices(kwargs, granted=self.gpu_devices, mode=mode)
            lies = serverinfo.check_create_environment(injection.environment_variables(request.get("environment")),
                                                       expected=self.server_environment())
            if lies:
                raise injection.InjectionError(lies)
            return request
        except injection.InjectionError as e:
            self.log.error("Refused to create the container of %s: %s", self._log_name, e)
            raise web.HTTPError(500, f"{e} The server was not created; tell an admin.") from None

    @property
    def client(self) -> Any:
        """The hub's Docker client, made by the first call that needs it while any others at once wait for it.

        DockerSpawner makes it lazily without a lock, so servers whose first Docker calls came together (a
        restarted hub checks all its servers at once) each made one and rebound the class attribute that
        holds it. On CPython 3.11 a replaced client freed while another thread reads that attribute is a
        use-after-free: the hub died of SIGSEGV.
        """
        with _client_lock:
            return super().client

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The hub's bounded pool for Docker calls (DockerSpawner has one thread for everyone)."""
        return resources.pool("docker", self.docker_threads)

    async def docker_version(self) -> str | None:
        """The engine's version, asked once per hub process."""
        if resources.docker_version is None:
            resources.docker_version = (await self.docker("version")).get("Version")
        return resources.docker_version
