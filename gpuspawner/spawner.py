"""GPUSpawner: DockerSpawner for shared GPU servers, as glue between JupyterHub and the modules beside it.

One spawn (:meth:`GPUSpawner.start`) goes: plan (``plan``, from the user's profile), and a GPU
server whose image the driver cannot run refused (``cudareq``) → record (``recorder``) → allocate
(``gpus``, deciding with ``allocation``) → resolve the image (``pulls``, ``facts``) and judge it
again → create and start (DockerSpawner, with ``labels`` and ``injection``
checking the request) → flush the record. Its bases hold the rest: its settings
(:class:`gpuspawner.traits.GPUSpawnerConfig`), the one path to the Docker engine
(:class:`gpuspawner.dockerpath.DockerPath`) and what the user chooses, the profiles and the spawn
form (:class:`gpuspawner.choice.UserChoice`). What all servers of the hub share is
``hubwide.resources``; the hub's start-up check and reconciliation are in ``upkeep``, its time
limits in ``reclaim``.

Under one lock per hub process, a spawn rebuilds the claim table from this hub's running
containers, reads the inventory, chooses devices and notes a pending claim; the container is
created with the devices in its labels, its DeviceRequests and its environment. Once it runs,
its labels are the claim. A failed spawn drops the pending claim once its container is known
gone; a stopped or dead container holds nothing.

Override points, for admins who subclass GPUSpawner:

- ``container_labels()``: the labels of every container this spawner creates. Call
  ``super()`` and add to the result; the ``gpuspawner.*`` labels must stay.
- ``get_env()``: as in every spawner; call ``super()``, which adds the GPU variables and the
  ``GPUSPAWNER_*`` variables that say what the server is (:mod:`gpuspawner.serverinfo`; the file
  with the same facts is put into the container before it starts).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, replace
from typing import Any

import docker.errors
from tornado import web
from traitlets import default

from . import audit, cudareq, images, injection, labels, metrics, reconcile, seams, serverinfo, userinput
from ._version import __version__
from .allocation import quota_for
from .choice import UserChoice, gpu_facts
from .cleanup import remove_spawned_container
from .devices import Inventory
from .facts import DeviceFacts, ResolvedImage, device_facts, resolved_image
from .gpus import Ask, NoDevices, claim_devices
from .hubconfig import hub_db_url, stored_hub_id
from .hubwide import resources
from .limits import Limits
from .nvml import NVMLTimeout
from .plan import Configured, SpawnPlan, spawn_plan
from .profiles import OptionsError, choose_profile
from .progress import ProgressLog
from .pulls import ImageMissing, pulled_image_info
from .reclaim import count_until_stop
from .reconcile import Ending
from .recorder import SpawnRecorder, close_record, error_text
from .store import AsyncAuditStore


class Refused(web.HTTPError):
    """A spawn the hub refuses (no devices, over quota, a profile not theirs, bad options): an HTTP error
    the user reads, counted by `reason` in ``gpuspawner_spawn_refusals_total``."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(status, message)
        self.reason = reason
        metrics.REFUSALS.labels(reason).inc()


class GPUSpawner(UserChoice):
    """A DockerSpawner that gives each server GPUs that are really free, by UUID.

    Every container is labelled with this hub's identity, the user, the server and the
    devices it holds (see :mod:`gpuspawner.labels`), so the hub rebuilds its claims from the
    Docker engine after a restart and never confuses its containers with another hub's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress_log = ProgressLog()  # what the user sees while the server starts
        self.recorder = SpawnRecorder(self.audit_store, lambda: self.log, lambda: self._log_name)
        self._spawning = False  # from start() until its record says how the spawn went
        self._plan: SpawnPlan | None = None  # the current or last spawn's settings
        self._this_server: serverinfo.ServerInfo | None = None  # what the current or last spawn's server is
        self._settings_hash = ""  # what this spawn's container is made from (label gpuspawner.settings)
        self._started_here = False  # a spawn of this hub process started it (not a server resumed at hub start)
        self._attempt = ""  # the record of this server's latest spawn (its state's is cleared when it stops)
        self._configured: tuple[str, int | None, float | None] | None = None  # values the running plan replaced
        self._ended_at: str | None = None  # when the engine says the container the last stop_object() stopped ended
        if getattr(self, "orm_spawner", None) is not None:  # one of the hub's servers (not the caretaker)
            resources.spawners[(self.user.name, self.name or "")] = self

    # DockerSpawner's traits that a spawn's plan sets while it creates the container (for the type checker).
    image: str
    mem_limit: int | None
    cpu_limit: float | None

    audit_record_id: str = ""  # the audit record of the server's spawn, kept in the state while it runs
    profile_slug: str = ""  # the profile this server was started with, kept in the spawner's state
    limits: Limits = Limits()  # when the hub stops this server (gpuspawner.limits), kept in the state
    started_at: float = 0.0  # when its container started (seconds since the epoch), kept in the state
    limit_notice: str = ""  # the warning its user sees before a time limit stops it
    stop_reason: str = ""  # why the hub is stopping it (a time limit), for its record

    @default("hub_id")
    def _default_hub_id(self) -> str:  # written on the hub's first start, read once per hub process
        if resources.hub_id is None:
            resources.hub_id = stored_hub_id(hub_db_url(), create=True)
        return resources.hub_id

    # --- Identity, labels, state and environment ------------------------------------------

    def container_labels(self) -> dict[str, str]:
        """The labels for this server's container (override point; call super() and add)."""
        return labels.server_labels(
            labels.ServerIdentity(hub_id=self.hub_id, user=self.user.name, server=self.name or ""),
            version=__version__, devices=self.gpu_devices, profile=self.profile_slug,
            record=self.audit_record_id, settings=self._settings_hash,
            limits=json.dumps(asdict(self.limits), sort_keys=True) if self.limits.any else "",
        )

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        kept = {"gpu_devices": list(self.gpu_devices), "profile": self.profile_slug, "audit_record_id": self.audit_record_id,
                "limits": asdict(self.limits) if self.limits.any else None, "started": self.started_at}
        state.update((k, v) for k, v in kept.items() if v)
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.gpu_devices = tuple(state.get("gpu_devices", ()))
        self.profile_slug = state.get("profile", "")
        self.audit_record_id = state.get("audit_record_id", "")
        self.limits = Limits(**state["limits"]) if state.get("limits") else Limits()
        self.started_at = float(state.get("started") or 0)

    def clear_state(self) -> None:
        """The server stopped: forget its devices, profile and record, and put back the values its plan replaced."""
        super().clear_state()
        self.gpu_devices, self.profile_slug, self.audit_record_id = (), "", ""
        self.limits, self.started_at, self.limit_notice = Limits(), 0.0, ""
        self._restore_configured()

    def get_env(self) -> dict[str, str]:
        env: dict[str, str] = super().get_env()
        if self._plan is not None:
            env.update(self._plan.profile_environment)
        env.update(injection.gpu_environment(self.gpu_devices))
        env.update(self.server_environment())  # last: nothing configured stands in for gpuspawner's variables
        return env

    def server_environment(self) -> dict[str, str]:
        """The ``GPUSPAWNER_*`` variables of the spawn's server (:mod:`gpuspawner.serverinfo`); a container
        later spawns start again (``remove = False``) has its record id in its file only."""
        if self._this_server is None:
            return {}
        return serverinfo.server_environment(self._this_server, with_record=bool(self.remove))

    def audit_store(self) -> AsyncAuditStore:
        return resources.audit(self.audit_db_url, key_file=self.audit_key_file, head_file=self.audit_head_file)

    # --- One spawn ------------------------------------------------------------------------------

    async def start(self) -> Any:
        """Plan the spawn (refusing, before anything else, a GPU server whose image the driver cannot run),
        record it, then allocate, resolve the image, create and start; once recorded, whatever happens, the
        record says how it ended.

        A spawn that fails or is interrupted (the user cancels, ``start_timeout``) removes what
        it created and gives its devices back only once its container is known not to run.
        """
        self.progress_log.clear()
        self._started_here = True
        began = time.monotonic()
        early = await self._plan_before_record(began)
        record_id = await self._begin_record()
        try:
            plan = await self._plan_spawn(early)
            devices = await self._allocate_for(plan)
            image = await self._resolve_image_for(plan)
            await self._check_image_runs(plan, image)
            result = await self._create_and_start(plan, self._describe_server(plan, image, devices))
            await self.recorder.flush()
        except asyncio.CancelledError as e:
            # Interrupted (the user cancelled, start_timeout): JupyterHub goes on at once; the
            # clean-up runs on, and the devices stay claimed until the container is gone.
            self._observe_spawn(began, "failed")
            resources.keep(self._end_failed_spawn(record_id, e, container_id=self.object_id))
            raise
        except BaseException as e:
            self._observe_spawn(began, "refused" if isinstance(e, Refused) else "failed")
            await self._end_failed_spawn(record_id, e, container_id=self.object_id)
            raise
        self._observe_spawn(began, "started")
        self._spawning = False
        # JupyterHub's spawn future ends once the server has answered (or failed to): then the record says so.
        answered = getattr(self, "_spawn_future", None)
        resources.keep(self.recorder.watch_ready(
            record_id, answered=answered, ready=lambda: bool(self.ready) and self._attempt == record_id,
            timeout=self.http_timeout + 60,
        ))
        return result

    def _observe_spawn(self, began: float, outcome: str) -> None:
        metrics.SPAWN_DURATION.labels(self.profile_slug, outcome).observe(time.monotonic() - began)

    async def _begin_record(self) -> str:
        """Write this spawn's new record; its id. HTTP 400 for options too large to keep, before any record
        (a sealed record can never be deleted, and this attempt decided nothing)."""
        self.audit_record_id = ""
        self.spawn_image = None
        try:
            userinput.check_options_size(self.user_options, max_bytes=self.max_user_options_bytes)
        except userinput.OptionsError as e:
            self.log.warning("Refused to start %s: its options are over %d bytes", self._log_name, self.max_user_options_bytes)
            if getattr(self, "orm_spawner", None) is not None:  # JupyterHub saved them for the next start
                self.orm_spawner.user_options = {}
            raise Refused(e.status, e.message, "bad_options") from None
        record = audit.AuditRecord(
            id=seams.new_record_id(), hub_id=self.hub_id, user=self.user.name, server=self.name or "",
            requested_at=seams.now_iso(), hostname=socket.gethostname(), gpuspawner_version=__version__,
            groups=tuple(sorted(self.group_names)),
        )
        # Set before the insert, so the hub's reconciliation never takes the new record for a lost one.
        self.audit_record_id = self._attempt = record.id
        resources.last_stops.pop((self.user.name, self.name or ""), None)  # a new start: the old notice goes
        self._spawning = True
        try:
            await self.recorder.begin(record)
        except BaseException as e:  # interrupted: the record is closed once it is written; failed: there is none
            self._spawning = False
            if not isinstance(e, asyncio.CancelledError):
                self.audit_record_id = ""
            raise
        return record.id

    async def _plan_before_record(self, began: float) -> SpawnPlan | None:
        """The spawn's plan, made before its record; a GPU server whose image the engine has is refused here,
        with no record, claim or container, where NVIDIA's container toolkit would not start it (the image's
        CUDA requirements, :mod:`gpuspawner.cudareq`). None where the options or the profile are refused:
        that refusal comes once the record is written, which says so."""
        self.spawn_image = None  # a user's image option is checked afresh (see check_allowed)
        try:
            userinput.check_options_size(self.user_options, max_bytes=self.max_user_options_bytes)
            plan = await self._make_plan()
        except (OptionsError, web.HTTPError):
            return None
        if plan.gpus.wants_gpu and images.must_look_up(self.pull_policy):  # "always" pulls first: judged then
            verdict = await self._image_verdict(plan)
            if verdict is not None and not verdict.met:
                self.log.warning("Refused to start %s: %s", self._log_name, verdict.reason)
                metrics.SPAWN_DURATION.labels(plan.profile_slug, "refused").observe(time.monotonic() - began)
                raise Refused(409, verdict.reason, "cuda_requirement")
        return plan

    async def _make_plan(self) -> SpawnPlan:
        """This spawn's settings from the user's profile and the values configured now. OptionsError for a
        profile the user may not choose, HTTPError for an image option not allowed."""
        configured = await self.resolved_profiles()
        profile = None
        if configured:
            profile = choose_profile(configured, self.user_options, user=self.user.name, groups=self.group_names)
        image_option = (self.user_options or {}).get("image") if profile is None else None
        image, mem_limit, cpu_limit = self._configured or (self.image, self.mem_limit, self.cpu_limit)
        return spawn_plan(profile, Configured(
            image=image, mem_limit=mem_limit, cpu_limit=cpu_limit, environment=self.environment or {},
            gpu_request=self.gpu_request, limits=Limits(
                max_runtime=self.max_runtime, idle_timeout=self.gpu_idle_timeout,
                idle_threshold=self.gpu_idle_threshold, warn_before=self.limit_warning_seconds,
            ),
        ), image_option=await self._allowed_image_option(image_option) if image_option else None)

    async def _plan_spawn(self, plan: SpawnPlan | None = None) -> SpawnPlan:
        """This spawn's settings (`plan`, where made before the record), recorded."""
        if plan is None:
            try:
                plan = await self._make_plan()
            except OptionsError as e:
                raise Refused(e.status, e.message, "forbidden_profile" if e.status == 403 else "bad_options") from None
        if plan.profile is not None:
            self.progress_log.say(f"Profile: {plan.profile.display_name} ({plan.profile.resources()})")
        self._plan, self.profile_slug, self.limits, self.limit_notice = plan, plan.profile_slug, plan.limits, ""
        self.recorder.note_request(
            self.audit_record_id, profile=plan.profile_slug or None, profile_hash=plan.profile_hash,
            image_requested=plan.image, cpu_limit=plan.cpu_limit, mem_limit=plan.mem_limit or None,
            environment=plan.recorded_environment(self.audit_redact_names),
        )
        return plan

    async def _image_verdict(
        self, plan: SpawnPlan, *, env: tuple[str, ...] | None = None, devices: tuple[str, ...] = (),
    ) -> cudareq.Verdict | None:
        """Whether NVIDIA's container toolkit will start the plan's image here (see ``image_fit``); None where
        it cannot be told yet (the image not on the engine, NVML not answering: the allocation says so)."""
        try:
            inventory = await self.nvml_reader().get()
        except NVMLTimeout:
            return None
        return await self.image_fit(plan.image, environment=plan.environment, request=plan.gpus, inventory=inventory,
                                    env=env, devices=devices)

    async def _check_image_runs(self, plan: SpawnPlan, image: ResolvedImage) -> None:
        """The resolved image's CUDA requirements, judged again for the image as resolved (just pulled, or its
        tag moved since) and the devices granted: a server that could not start is refused (its devices go back,
        its record ends failed); the requirement met is recorded."""
        env = resources.image_envs.get(image.image_id)
        if not plan.gpus.wants_gpu or env is None:
            return
        verdict = await self._image_verdict(plan, env=env, devices=self.gpu_devices)
        if verdict is None:
            return
        if not verdict.met:
            self.log.warning("Refused to start %s: %s", self._log_name, verdict.reason)
            raise Refused(409, verdict.reason, "cuda_requirement")
        self.recorder.note_requirement(self.audit_record_id, verdict.requirement)

    async def _allocate_for(self, plan: SpawnPlan) -> DeviceFacts | None:
        """The devices of `plan`, claimed for this server and recorded; none and no claim for CPU only (None)."""
        self.gpu_devices = ()
        if not plan.gpus.wants_gpu:  # CPU-only: no lock, no NVML, no claim
            return None
        self.progress_log.say(f"Looking for {plan.gpus.describe()}")
        ask = Ask(
            request=plan.gpus, holder=self.holder, record_id=self.audit_record_id, admin=bool(self.user.admin),
            profile=plan.profile_slug,
            quota=quota_for(self.group_names, default=self.max_gpus_per_user,
                            per_group=self.max_gpus_per_group),
            busy_memory_threshold=self.busy_memory_threshold,
            wait_seconds=min(self.gpu_wait_timeout, self.start_timeout),
        )
        try:
            grant = await claim_devices(ask, read_inventory=self.inventory_reader(plan), read_claims=self.device_claims,
                                        say=self.progress_log.say, log=self.log, name=self._log_name)
        except NoDevices as e:
            raise Refused(e.status, e.message, e.reason) from None
        self.gpu_devices = grant.uuids
        self.log.info("Allocated %s to %s", ", ".join(grant.uuids), self._log_name)
        self.progress_log.say("Allocated " + ", ".join(f"{d.name} ({d.uuid})" for d in grant.devices))
        inventory = await self.nvml_reader().get()
        facts = device_facts(
            grant.devices, driver_version=inventory.driver_version, cuda_driver_version=inventory.cuda_driver_version,
        )
        self.recorder.note_devices(self.audit_record_id, facts)
        return facts

    def inventory_reader(self, plan: SpawnPlan) -> Callable[[], Awaitable[Inventory]]:
        """Where the allocation for `plan` reads the devices: the host's, without the GPUs whose brand or compute
        capability the plan's image cannot run on (a swarm leaves out the nodes whose driver cannot run it)."""
        async def read() -> Inventory:
            inventory = await self.nvml_reader().get()
            found = await self.image_requirements(plan.image, environment=plan.environment) if plan.gpus.wants_gpu else None
            if found is None:
                return inventory
            kinds = [gpu_facts(d) for d in inventory.devices if plan.gpus.matches(d)]
            verdict, unfit = cudareq.judge_kinds(
                found, cudareq.Host(inventory.driver_version, inventory.cuda_driver_version), kinds, image=plan.image)
            if not verdict.met or not unfit:  # none fits: the check of the resolved image says why
                return inventory
            return replace(inventory, devices=tuple(d for d in inventory.devices if gpu_facts(d) not in unfit))
        return read

    async def _resolve_image_for(self, plan: SpawnPlan) -> ResolvedImage:
        """Pull the plan's image if needed, pin it to its digest and record it; what the engine said of it."""
        self.progress_log.say(f"Checking image {plan.image}")
        try:
            found = resolved_image(plan.image, await pulled_image_info(
                plan.image, policy=self.pull_policy, call=self.docker, say=self.progress_log.say, log=self.log,
                name=self._log_name,
            ))
        except ImageMissing as e:
            raise web.HTTPError(500, str(e)) from None
        self.progress_log.say(f"Image {found.shown}")
        pinned = found.repo_digest if self.pin_to_digest else None
        self.spawn_image = images.parse_image(pinned).by_digest() if pinned else plan.image
        self.recorder.note_image(self.audit_record_id, found, docker_version=await self.docker_version())
        return found

    def _describe_server(self, plan: SpawnPlan, image: ResolvedImage, devices: DeviceFacts | None) -> serverinfo.ServerInfo:
        return serverinfo.server_info(
            record_id=self.audit_record_id, hub_id=self.hub_id, user=self.user.name, server=self.name or "",
            profile=plan.profile_slug, image=self.spawn_image or plan.image, resolved=image, devices=devices,
            version=__version__,
        )

    async def _create_and_start(self, plan: SpawnPlan, server: serverinfo.ServerInfo) -> Any:
        """Create the container (or keep one made from the same settings), put the server's file in, and start it."""
        self._this_server = server
        self._settings_hash = plan.settings_hash(
            image=server.image, image_id=server.image_id, devices=self.gpu_devices, redact_names=self.audit_redact_names,
            server_environment=serverinfo.server_environment(server, with_record=False),
        )
        await self._replace_kept_container_if_changed()
        self._apply_plan(plan)
        result = await super().start()
        self.started_at = time.time()  # its time limit counts from here
        resources.book.release(self.audit_record_id)  # it runs: its labels hold the devices from now on
        resources.containers_changed()
        return result

    def _apply_plan(self, plan: SpawnPlan) -> None:
        """Set the plan's image and limits where DockerSpawner reads them, as DockerSpawner sets a chosen
        image: while the server runs, ``image`` names the image it runs. The configured values come back
        when it stops (:meth:`clear_state`) or its spawn fails, so no spawn's profile leaks into the next."""
        if self._configured is None:
            self._configured = self.image, self.mem_limit, self.cpu_limit
        self.image, self.mem_limit, self.cpu_limit = self.spawn_image or plan.image, plan.mem_limit, plan.cpu_limit

    def _restore_configured(self) -> None:
        if self._configured is not None:
            (self.image, self.mem_limit, self.cpu_limit), self._configured = self._configured, None

    async def pull_image(self, image: str) -> None:
        """Nothing: :meth:`start` has pulled and inspected the image as ``pull_policy`` says."""

    async def _replace_kept_container_if_changed(self) -> None:
        """Deal with a container this server already has before this spawn makes its own.

        A kept container (remove = False) is reused only if made from exactly this spawn's
        settings (its label ``gpuspawner.settings``); else, and always with remove = True, it
        goes. A leftover from a spawn the hub lost track of (killed mid-spawn) has an open record:
        it ends here, naming the container, not at a reconciliation later.
        """
        obj = await self.get_object()
        if obj is None or (not self.remove and _label(obj, labels.SETTINGS) == self._settings_hash):
            return
        if not self.remove:
            self.log.info("Recreating %s for %s: its settings changed", self.object_name, self._log_name)
        await self.stop_object()
        ended_at, self._ended_at = self._ended_at, None
        await self.remove_object()
        old_record = _label(obj, labels.RECORD)
        if old_record and old_record != self.audit_record_id:
            await close_record(self.audit_store(), old_record, self.log,
                               Ending("abandoned", reconcile.REPLACED, ended_at=ended_at).with_container(obj))

    async def start_object(self) -> None:
        await self._write_server_info()
        self.progress_log.say("Starting container")
        # What the engine made of the request (a new or a kept container), read while it starts.
        self.recorder.note_container_soon(resources.keep(self._record_container(self.container_id)))
        await super().start_object()
        self.recorder.note_started(self.audit_record_id)

    async def _write_server_info(self) -> None:
        """Put the server's file (:data:`gpuspawner.serverinfo.SERVER_INFO_PATH`) into its created container,
        through the engine (no host file is mounted: it works where the hub runs in a container too). A kept
        container gets the new spawn's file, so its record id is this spawn's."""
        if self._this_server is None:
            return
        mtime = datetime.datetime.fromisoformat(seams.now_iso()).timestamp()
        archive = serverinfo.server_archive(self._this_server, mtime=mtime)
        try:
            await self.docker("put_archive", self.container_id, "/", archive)
        except docker.errors.APIError as e:
            raise web.HTTPError(500, f"Could not write {serverinfo.SERVER_INFO_PATH} into the server's container: "
                                     f"{e.explanation or e}. Tell an admin (a read-only root file system?).") from None

    async def _record_container(self, container_id: str) -> None:
        info = await self.docker("inspect_container", container_id)
        await self.recorder.note_container(
            self.audit_record_id, container_id=container_id, container_name=self.container_name, inspection=info
        )

    async def _end_failed_spawn(self, record_id: str, error: BaseException, *, container_id: str) -> None:
        """After a failed or interrupted spawn: remove its container, free its devices, close its record."""
        gone, removed = await remove_spawned_container(
            self.docker, name=self.object_name, record_id=record_id, container_id=container_id,
            in_flight=self.docker_calls, wait_seconds=max(self.start_timeout, 60), log=self.log,
        )
        if gone:
            resources.book.release(record_id)
            resources.containers_changed()
        else:  # the engine could not say: keep the devices until the hub's reconciliation can
            resources.book.keep_unconfirmed(record_id)
        if self._attempt == record_id:  # no later spawn of this server has begun meanwhile
            self.gpu_devices, self.spawn_image, self._this_server = (), None, None
            self._restore_configured()
        # the container it made is named, though the spawn was cut short before it noted it
        await self.recorder.finish(record_id, Ending("failed", error_text(error), container_id=removed))
        if self._attempt == record_id:
            self._spawning = False

    # --- A running server: poll, stop, progress -----------------------------------------------

    async def poll(self) -> Any:
        """None while the container runs; else its exit status, and its record says how it ended.

        JupyterHub never calls ``stop()`` for a server whose container died (crash, OOM,
        ``docker stop``): this is where the hub learns of it, so the record is closed here with
        the engine's exit code, OOM flag and end time (when the container ended, not when the hub
        noticed), and a dead container is removed (``remove = True``).
        The records closed are the one the server's state names and the one the container's label
        names (a hub killed mid-spawn resumes the server with the state of an earlier spawn, or none).
        """
        container = await self.get_object()
        if container is not None and container["State"].get("Running"):
            return None
        records = _records(self.audit_record_id, container)
        resources.containers_changed()
        if records and not self._spawning:
            for record_id in records:
                await self.recorder.finish(record_id, reconcile.ended_container(container))
            if container is not None and self.remove:
                await self.remove_object()
                self.object_id = ""
        if container is None:
            return 0
        state = container["State"]
        return f"ExitCode={state.get('ExitCode')}, Error='{state.get('Error')}', FinishedAt={state.get('FinishedAt')}"

    async def stop(self, now: bool = False) -> None:
        """Stop the container; its records (as for :meth:`poll`) say whether the server had ever answered,
        or why the hub stopped it (a time limit), and stop when the engine says the container ended.
        A failing spawn closes its own record."""
        never_answered = bool(getattr(self, "_waiting_for_response", False))
        reason, self.stop_reason = self.stop_reason, ""
        count_until_stop(self)  # its GPU time up to now, for the metrics and its record
        container = None if self._spawning else await self.get_object()
        records = _records(self.audit_record_id, container)  # read before the stop clears the state
        self._ended_at = None
        await super().stop(now=now)
        ended_at, self._ended_at = self._ended_at, None
        resources.containers_changed()
        if self._spawning:
            return
        for record_id in records:
            ending = await self.recorder.stopped(record_id, never_answered=never_answered, started_here=self._started_here,
                                                 http_timeout=self.http_timeout)
            if reason and ending.outcome == "stopped":
                ending = replace(ending, error=reason)
            await self.recorder.finish(record_id, replace(self.named_ending(ending, container), ended_at=ended_at))

    async def stop_object(self) -> None:
        """Stop the container (DockerSpawner's ``docker stop``), then read when the engine says it ended,
        before :meth:`stop` removes it: its records stop then."""
        await super().stop_object()
        self._ended_at = await self.object_ended_at()

    async def object_ended_at(self) -> str | None:
        """When the engine says the server's container ended (ISO 8601 UTC); None while it runs, once it
        is gone, or where the engine cannot say (its record then stops when the hub closes it)."""
        if not self.container_id:
            return None
        try:
            return reconcile.finished_at(await self.docker("inspect_container", self.container_id))
        except (docker.errors.DockerException, OSError) as e:
            self.log.debug("Could not read when the container of %s ended: %s", self._log_name, e)
            return None

    def named_ending(self, ending: Ending, container: dict[str, Any] | None) -> Ending:
        """`ending`, naming the server's inspected container (a service's record named its own when it started)."""
        return ending.with_container(container)

    # --- This hub's containers, for its reconciliation (gpuspawner.upkeep) -----------------------------

    async def server_objects(self) -> list[reconcile.ContainerView]:
        """Every container of this hub on the engine, running or not, by its labels."""
        found = []
        for c in await self.docker("containers", all=True, filters=labels.hub_filter(self.hub_id)):
            identity = labels.identity_from_labels(c.get("Labels"))
            if identity is not None and identity.hub_id == self.hub_id:
                found.append(reconcile.ContainerView(
                    id=c["Id"], name=(c.get("Names") or [c["Id"][:12]])[0].lstrip("/"), user=identity.user,
                    server=identity.server, state=c.get("State", ""), record_id=(c.get("Labels") or {}).get(labels.RECORD, ""),
                ))
        return found

    async def end_server_object(self, c: reconcile.ContainerView, *, remove: bool) -> str | None:
        """Stop a container of this hub that no server owns, and remove it where `remove`. Returns when the
        engine says a container stopped here ended (None: it was not running, or the engine cannot say)."""
        ended_at = None
        try:
            if c.state in reconcile.LIVE_STATES:
                await self.docker("stop", c.id)
                ended_at = reconcile.finished_at(await self.docker("inspect_container", c.id))
            if remove:
                await self.docker("remove_container", c.id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        return ended_at

    async def ended_server_object(self, c: reconcile.ContainerView) -> Ending:
        """How the record of a container that ended on its own ends, from the engine's inspection."""
        try:
            info = await self.docker("inspect_container", c.id)
        except docker.errors.NotFound:
            info = None
        return reconcile.ended_container(info)

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        """What the user sees while the server starts (JupyterHub stops reading once it is up)."""
        async for event in self.progress_log.follow():
            yield event


def _label(container: dict[str, Any] | None, name: str) -> str:
    """A label of an inspected container (or swarm service), or ""."""
    if container is None:
        return ""
    return str(((container.get("Config") or container.get("Spec") or {}).get("Labels") or {}).get(name, ""))


def _records(own: str, container: dict[str, Any] | None) -> list[str]:
    """The records a server's container ends: the server's own and the one its label names, once each."""
    return list(dict.fromkeys(filter(None, [own, _label(container, labels.RECORD)])))
