"""The resources one hub process shares among all its servers, held in one named object.

The NVML reader, the pending claims and the lock that makes allocation one decision at a
time, the GPU queue, the audit stores, the thread pools for Docker calls, the hub's identity once read, the
live spawners (to tell a server's container from an orphan) and the background tasks. There
is one :data:`resources` per hub process; tests start afresh with :meth:`HubResources.reset`.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .allocation import Holder
from .claims import ClaimBook
from .gpuqueue import Waiter
from .nvml import NVMLInventory
from .readings import Readings
from .store import AsyncAuditStore
from .swarm import SwarmNode

if TYPE_CHECKING:
    from .spawner import GPUSpawner


class HubResources:
    """What all servers of one hub process share (see the module's docstring)."""

    def __init__(self) -> None:
        self._start_afresh()

    def reset(self) -> None:
        """Forget everything, as in a new hub process (for tests); the thread pools are shut down and
        the background tasks cancelled."""
        for pool in self.pools.values():
            pool.shutdown(wait=False)
        for task in self.tasks:
            task.cancel()
        self._start_afresh()

    def _start_afresh(self) -> None:
        self.book = ClaimBook()
        self.nvml: NVMLInventory | None = None
        self._lock: asyncio.Lock | None = None
        self.stores: dict[str, AsyncAuditStore] = {}
        self.docker_version: str | None = None
        self.pools: dict[str, ThreadPoolExecutor] = {}
        self.hub_id: str | None = None
        self.spawners: weakref.WeakValueDictionary[tuple[str, str], GPUSpawner] = weakref.WeakValueDictionary()
        self.foreign: dict[str, dict[str, Any]] = {}  # container id -> inspection, for other containers' devices
        self.own_container_ids: tuple[str, ...] | None = None  # what may name the hub's own container, once read
        self.engine_claims: dict[str, tuple[float, dict[str, Holder]]] = {}  # hub id -> (when read, claims), for the form
        self.tasks: set[asyncio.Future[Any]] = set()
        self.waiters: dict[str, Waiter] = {}  # the GPU queue: spawn (record id) -> what it waits for
        self.idle_clocks: dict[str, float] = {}  # record id -> since when its server's GPUs are idle (epoch)
        self.last_stops: dict[tuple[str, str], str] = {}  # (user, server) -> why the hub stopped it last
        self.readings = Readings()  # the hub's latest sample of its GPUs and servers (gpuspawner.metrics shows it)
        self.accounted: dict[str, float] = {}  # record id -> until when its GPU time is counted (epoch)
        self.gpu_idle_seconds: dict[str, float] = {}  # record id -> idle GPU-seconds of its server so far
        self._queue_moved: asyncio.Event | None = None
        self.swarm_nodes: tuple[float, list[SwarmNode] | None] = (0.0, None)  # when read, the swarm's nodes
        self.swarm_networks: dict[str, str] = {}  # network name -> ID, on a swarm
        self.image_envs: dict[str, tuple[str, ...]] = {}  # image ID (its content's digest) -> its Config.Env
        self.image_ids: dict[str, tuple[float, str | None]] = {}  # image reference -> (when looked, its ID; None: absent)

    def keep(self, aw: Coroutine[Any, Any, Any] | asyncio.Future[Any]) -> asyncio.Future[Any]:
        """Run `aw` in the background, keeping a reference until it ends."""
        task = asyncio.ensure_future(aw)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def containers_changed(self) -> None:
        """A server's container started or ended, or a failed spawn gave its devices back: the claims
        the form shows are read afresh, and the GPU queue looks again. The last read stays, as what the
        metrics know of other containers' devices until the next."""
        self.engine_claims = {hub: (0.0, claims) for hub, (_, claims) in self.engine_claims.items()}
        self.wake_waiters()

    def wake_waiters(self) -> None:
        """Devices may have freed up or a place in the GPU queue: every waiter looks again."""
        if self._queue_moved is not None:
            self._queue_moved.set()
            self._queue_moved = None

    async def queue_moved(self, timeout: float) -> None:
        """Wait until :meth:`wake_waiters`, or `timeout` seconds."""
        if self._queue_moved is None:
            self._queue_moved = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue_moved.wait(), timeout)

    def pool(self, name: str, threads: int) -> ThreadPoolExecutor:
        """The hub's thread pool called `name`, made with `threads` workers on first use."""
        if name not in self.pools:
            self.pools[name] = ThreadPoolExecutor(threads, thread_name_prefix=f"gpuspawner-{name}")
        return self.pools[name]

    @property
    def lock(self) -> asyncio.Lock:
        """The lock under which one spawn at a time reads the claims and chooses devices."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def inventory(self, cache_seconds: float, timeout: float) -> NVMLInventory:
        """The hub's NVML reader, made with these settings on first use."""
        if self.nvml is None:
            self.nvml = NVMLInventory(cache_seconds=cache_seconds, timeout=timeout)
        return self.nvml

    def audit(self, url: str, *, key_file: str, head_file: str) -> AsyncAuditStore:
        """The hub's audit store at `url`, opened on first use."""
        if url not in self.stores:
            self.stores[url] = AsyncAuditStore(url, key_file=key_file, head_file=head_file)
        return self.stores[url]


resources = HubResources()
