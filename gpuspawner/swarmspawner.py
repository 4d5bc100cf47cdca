"""GPUSwarmSpawner: the same hub on a Docker Swarm, as glue between GPUSpawner and dockerspawner's SwarmSpawner.

Everything a user and an admin see stays GPUSpawner's: profiles and who may use them, quotas,
the GPU queue, the spawn form's live availability, time limits, metrics and the audit record.
What changes is where the GPUs come from:

- the devices are what the swarm's schedulable nodes advertise as generic resources, and what
  holds them is the swarm's tasks (:mod:`gpuspawner.swarm`), read from the manager;
- an image's CUDA requirements are judged against each node's driver as its engine labels say: a
  node that cannot run the image is neither allocated from nor chosen by Swarm;
- a server is a service asking Swarm for its kind and number of devices (``NVIDIA-GPU=2``,
  ``NVIDIA-MIG-1g.10gb=1``), constrained to nodes of the GPU model the queue found free; Swarm
  places it and picks the UUIDs, which the spawner reads back from the task and records with the
  node, its engine's version and its driver;
- the manager pulls the image (as on one host) and the service is created from ``repo@sha256:…``, so
  every node runs the recorded image;
- a server is reached at its task's address on the hub's network, and is never restarted by Swarm
  (a server whose node fails ends, and its record says so).

Configure it with ``c.JupyterHub.spawner_class = "gpu-swarm"`` on a hub whose Docker engine is a
swarm manager (``DOCKER_HOST``), and ``c.SwarmSpawner.network_name`` an attachable overlay network
the hub is on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import docker.errors
from docker.types import ContainerSpec, EndpointSpec, Placement, Resources, RestartPolicy, TaskTemplate
from dockerspawner import SwarmSpawner
from tornado import web

from . import cudareq, labels, reconcile, swarm
from .allocation import GPURequest, Holder
from .devices import Inventory
from .facts import DeviceFacts, ResolvedImage
from .gpus import remembered_claims
from .hubwide import resources
from .injection import gpu_environment
from .plan import SpawnPlan
from .reconcile import Ending
from .spawner import GPUSpawner, _records

ENDED_STATES = swarm.FINISHED_STATES | {"remove"}


class SwarmNodes:
    """The swarm's devices, as the hub's NVML reader gives a host's: read from the manager's nodes, kept
    ``cache_seconds``. The swarm has no utilisation to read: a swarm's GPUs are never idle to the hub."""

    def __init__(self, spawner: GPUSwarmSpawner) -> None:
        self.spawner = spawner

    async def get(self, *, max_age: float | None = None) -> Inventory:
        age = self.spawner.nvml_cache_seconds if max_age is None else max_age
        seen_at, nodes = resources.swarm_nodes
        if nodes is None or time.monotonic() - seen_at > age:
            nodes = [swarm.node_from_api(n) for n in await self.spawner.docker("nodes")]
            resources.swarm_nodes = (time.monotonic(), nodes)
        return swarm.cluster_inventory(nodes)


class GPUSwarmSpawner(GPUSpawner, SwarmSpawner):  # type: ignore[misc]  # dockerspawner ships no type hints
    """GPUSpawner's profiles, quotas, queue and audit for servers that are Docker Swarm services (see the
    module's docstring)."""

    # --- Where the devices are, and who holds them ----------------------------------------------------

    def nvml_reader(self) -> SwarmNodes:  # type: ignore[override]
        return SwarmNodes(self)

    async def device_claims(self, inventory: Inventory, *, max_age: float = 0) -> dict[str, Holder]:
        """UUID -> holder of every device a task of the swarm holds now (this hub's servers by their labels; any
        other service's are busy outside the hub); the spawn form may show a read up to `max_age` seconds old."""

        async def read() -> dict[str, Holder]:
            return swarm.cluster_claims(await self.swarm_tasks(holding=True), hub_id=self.hub_id)

        return await remembered_claims(self.hub_id, read, max_age=max_age)

    def judge_requirements(
        self, found: cudareq.ImageRequirements, *, image: str, request: GPURequest, inventory: Inventory,
        devices: Sequence[str] = (),
    ) -> cudareq.Verdict:
        """`found` judged against the drivers of the swarm's nodes with GPUs of `request`'s kind (given
        `devices`, the node that has them), as their engine labels say: met where one of them can run it."""
        nodes = swarm.gpu_nodes(request, resources.swarm_nodes[1] or [], devices=devices)
        return swarm.judge_nodes(found, nodes, image=image)[0]

    def inventory_reader(self, plan: SpawnPlan) -> Callable[[], Awaitable[Inventory]]:
        """The swarm's devices without those of nodes whose driver cannot run the plan's image."""
        async def read() -> Inventory:
            inventory = await self.nvml_reader().get()
            return swarm.without_nodes(inventory, await self._unfit_nodes(plan))
        return read

    async def _unfit_nodes(self, plan: SpawnPlan) -> frozenset[str]:
        """IDs of the GPU nodes whose driver cannot run the plan's image, where another node can (none while the
        manager has no copy of it, or no node can: the spawn judges the node it got once the image is resolved)."""
        if not plan.gpus.wants_gpu:
            return frozenset()
        found = await self.image_requirements(plan.image, environment=plan.environment)
        if found is None:
            return frozenset()
        nodes = swarm.gpu_nodes(plan.gpus, resources.swarm_nodes[1] or [])
        verdict, unfit = swarm.judge_nodes(found, nodes, image=plan.image)
        return unfit if verdict.met else frozenset()  # none fits: the check of the resolved image says why

    async def swarm_tasks(self, *, service: str | None = None, holding: bool = False) -> list[swarm.SwarmTask]:
        """The swarm's tasks (of one service, by name; only those holding resources, where `holding`),
        with their services' names and labels."""
        services = await self.docker("services", filters={"name": service} if service else None)
        tasks = await self.docker("tasks", filters={"service": service} if service else None)
        return swarm.tasks_from_api(swarm.holding(tasks) if holding else tasks, services, network_id=await self._network_id())

    async def _network_id(self) -> str:
        if not self.network_name:
            return ""
        if self.network_name not in resources.swarm_networks:
            resources.swarm_networks[self.network_name] = (await self.docker("inspect_network", self.network_name))["Id"]
        return resources.swarm_networks[self.network_name]

    # --- A spawn -------------------------------------------------------------------------------------

    def container_labels(self) -> dict[str, str]:
        """The service's labels: the server's identity, profile, record and limits. Its devices are
        Swarm's to choose, so they are read from its task, not kept in a label."""
        found = super().container_labels()
        found[labels.DEVICES] = ""
        return found

    def get_env(self) -> dict[str, str]:
        """As GPUSpawner's, but a GPU server's devices reach it through ``DOCKER_RESOURCE_*`` (Swarm's), not
        ``NVIDIA_VISIBLE_DEVICES``; a CPU-only server still gets ``void``, so it sees no GPU."""
        env = super().get_env()
        if self._plan is not None and self._plan.gpus.wants_gpu:
            env.pop("NVIDIA_VISIBLE_DEVICES", None)
        else:
            env.update(gpu_environment(()))
        return env

    def server_environment(self) -> dict[str, str]:
        """None: Swarm chooses a server's devices after its service is created, so the ``GPUSPAWNER_*``
        variables and file (which name them) are not given to a swarm's servers yet."""
        return {}

    async def _resolve_image_for(self, plan: SpawnPlan) -> ResolvedImage:
        """As GPUSpawner's (the manager pulls the image as ``pull_policy`` says, and the service is created
        from its digest, so every node runs the recorded image); an image no registry has is refused."""
        found = await super()._resolve_image_for(plan)
        if not (self.spawn_image and "@sha256:" in self.spawn_image):
            raise web.HTTPError(500, f"Image {plan.image} has no repository digest: on a swarm every image must come "
                                     "from a registry all nodes reach (push it, and pin the profile to its digest).")
        return found

    async def create_object(self) -> dict[str, Any]:
        """The server's service: its image by digest, its devices as generic resources of the plan's kind,
        on a node of the model the queue found free, never restarted, reached at its task's address."""
        assert self._plan is not None
        granted = self._granted_model()
        container = ContainerSpec(**{
            "image": self.spawn_image or self.image, "env": self.get_env(), "args": await self.get_command(),
            "mounts": self.mounts, "labels": self.container_labels(), **self.extra_container_spec,
        })
        task_resources = Resources(**{
            "mem_limit": self.mem_limit, "mem_reservation": self.mem_guarantee,
            "cpu_limit": int(self.cpu_limit * 1e9) if self.cpu_limit else None,
            "cpu_reservation": int(self.cpu_guarantee * 1e9) if self.cpu_guarantee else None,
            "generic_resources": swarm.generic_resources(self._plan.gpus) or None, **self.extra_resources_spec,
        })
        extra_placement = dict(self.extra_placement_spec)
        avoid = await self._unfit_nodes(self._plan)
        constraints = swarm.placement(granted, resources.swarm_nodes[1] or [], avoid=avoid) + list(
            extra_placement.pop("constraints", None) or [])
        template = TaskTemplate(**{
            "container_spec": container, "resources": task_resources,
            "networks": [self.network_name] if self.network_name else [],
            "placement": Placement(constraints=constraints or None, **extra_placement),
            "restart_policy": RestartPolicy(condition="none"), **self.extra_task_spec,
        })
        service: dict[str, Any] = await self.docker(
            "create_service", template, name=self.service_name, labels=self.container_labels(),
            endpoint_spec=EndpointSpec(**{"mode": "dnsrr", **self.extra_endpoint_spec}), **self.extra_create_kwargs,
        )
        await self._wait_for_task(lambda task: True)  # the service is there for the hub once it has a task
        return service

    async def _wait_for_task(self, done: Any) -> dict[str, Any]:
        """The service's task once `done(task)`, looked at every 0.1 s at first, then less often (up to
        every 2 s); HTTP 500 if the task ended first (a server is never restarted). JupyterHub's
        ``start_timeout`` bounds the wait."""
        delay = 0.1
        said = ""
        while True:
            task = await self.get_task()
            if task is not None and done(task):
                return dict(task)
            state = str((task or {}).get("Status", {}).get("State", "")).lower()
            error = str((task or {}).get("Status", {}).get("Err", ""))
            if state in ENDED_STATES:
                raise web.HTTPError(500, f"The server's task ended before it ran ({state}: {error or 'no reason given'}).")
            if state == "pending" and error and error != said:  # no node has what it asks for, for now
                self.progress_log.say(f"Swarm has not placed it yet: {error}")
                said = error
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def _granted_model(self) -> str | None:
        """The model of the devices the queue found free for this spawn (its pending claim)."""
        if not self.gpu_devices:
            return None
        nodes = resources.swarm_nodes[1] or []
        inventory = swarm.cluster_inventory(nodes).by_uuid()
        device = inventory.get(self.gpu_devices[0])
        return device.model if device is not None else None

    async def start_object(self) -> None:
        """Wait for Swarm to place and start the server; then record where it runs and which devices it got."""
        self.progress_log.say("Waiting for Swarm to place the server")
        running = await self._wait_for_task(lambda task: task["Status"]["State"] == "running")
        task = swarm.task_from_api(running, service_name=self.service_name, network_id=await self._network_id())
        node = swarm.node_from_api(await self.docker("inspect_node", task.node_id))
        assigned = tuple(value for kind, value in task.resources)
        known = swarm.cluster_inventory([node]).by_uuid()
        self.gpu_devices = assigned
        resources.book.release(self.audit_record_id)  # the task holds them now; Swarm's claim, not ours
        resources.containers_changed()
        self.progress_log.say(f"Running on node {node.hostname}" + (f" with {', '.join(assigned)}" if assigned else ""))
        self.recorder.note_swarm_task(self.audit_record_id, node=node, task=task, devices=DeviceFacts(
            devices=tuple(swarm.recorded_device(known[u]) if u in known else swarm.unknown_device(u) for u in assigned),
            driver_version=node.label(swarm.DRIVER_LABEL), cuda_driver_version=node.label(swarm.CUDA_LABEL),
        ), service_name=self.service_name)
        self.recorder.note_started(self.audit_record_id)

    async def get_ip_and_port(self) -> tuple[str, int]:
        """The server's task's address on the hub's network: the hub reaches it there, on any node."""
        for task in await self.swarm_tasks(service=self.service_name):
            if task.holds and task.address:
                return task.address, self.port
        raise web.HTTPError(500, f"The service {self.service_name} has no address on network {self.network_name!r}.")

    # --- A running server ------------------------------------------------------------------------------

    async def poll(self) -> Any:
        """None while the server's task runs on a node that is up; else its status, and its record says how it
        ended (the task's error, or its node going down)."""
        service = await self.get_object()
        if service is None:
            ending: Ending | None = Ending("died", "Its service was removed outside the hub.")
        else:
            ending = await self._task_ending()
        if ending is None:
            return None
        resources.containers_changed()
        if not self._spawning:
            for record_id in _records(self.audit_record_id, service):
                await self.recorder.finish(record_id, ending)
            if service is not None:
                await self.remove_object()
                self.object_id = ""
        return ending.error or "ended"

    async def _task_ending(self) -> Ending | None:
        """How the server ended, from its task and node (when its task ended, as Swarm says; not known for a
        node that went down); None while it runs."""
        tasks = await self.swarm_tasks(service=self.service_name)
        live = [t for t in tasks if t.desired_state == "running" and t.state not in ENDED_STATES]
        if live:
            task = live[0]
            if task.state != "running" or not task.node_id:
                return None  # still being placed or started
            try:
                node = swarm.node_from_api(await self.docker("inspect_node", task.node_id))
            except docker.errors.NotFound:
                return Ending("died", "The node it ran on left the swarm.")
            if node.ready:
                return None
            return Ending("died", f"The node it ran on, {node.hostname}, is down: its engine does not answer the manager.")
        if not tasks:
            return Ending("died", "Its service has no task any more.")
        task = tasks[-1]
        where = task.node_id
        try:
            node = swarm.node_from_api(await self.docker("inspect_node", task.node_id))
            where = node.hostname + ("" if node.ready else ", which is down")
        except docker.errors.APIError:
            pass
        return Ending("died", f"Its task on node {where} ended ({task.state}{': ' + task.error if task.error else ''}).",
                      ended_at=task.ended_at)

    # --- This hub's services, for its reconciliation (gpuspawner.upkeep) -------------------------------

    async def server_objects(self) -> list[reconcile.ContainerView]:
        """Every service of this hub on the swarm, "running" while its task holds devices or starts on a
        node that is up, else "exited"."""
        services = await self.docker("services", filters=labels.hub_filter(self.hub_id))
        by_service: dict[str, list[swarm.SwarmTask]] = {}
        for task in await self.swarm_tasks():
            by_service.setdefault(task.service_id, []).append(task)
        found = []
        for service in services:
            spec = service.get("Spec") or {}
            identity = labels.identity_from_labels(spec.get("Labels"))
            if identity is None or identity.hub_id != self.hub_id:
                continue
            live = any(t.desired_state == "running" and t.state not in ENDED_STATES for t in by_service.get(service["ID"], []))
            found.append(reconcile.ContainerView(
                id=service["ID"], name=spec.get("Name", ""), user=identity.user, server=identity.server,
                state="running" if live else "exited", record_id=(spec.get("Labels") or {}).get(labels.RECORD, ""),
            ))
        return found

    async def end_server_object(self, c: reconcile.ContainerView, *, remove: bool) -> str | None:
        """Remove a service of this hub that no server owns (a service is never kept stopped). Its task's
        container ends after that, at a time the hub does not wait for: None."""
        try:
            await self.docker("remove_service", c.id)
        except docker.errors.NotFound:
            pass
        return None

    async def ended_server_object(self, c: reconcile.ContainerView) -> Ending:
        tasks = [t for t in await self.swarm_tasks(service=c.name)]
        states = ", ".join(sorted({t.state for t in tasks})) or "no task"
        return Ending("died", f"Its service's task ended ({states}) with no server of the hub to own it.",
                      ended_at=swarm.last_ended_at(tasks))

    async def object_ended_at(self) -> str | None:
        """None: a removed service's task ends after the hub removed it, at a time the hub does not wait
        for, so its record stops when the hub removed the service."""
        return None

    def named_ending(self, ending: Ending, container: dict[str, Any] | None) -> Ending:
        return ending  # the record named the service and its task's container when it started
