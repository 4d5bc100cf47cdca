"""What a user chooses: the profiles open to them, the spawn form, and the image option.

:class:`UserChoice` (a base of :class:`gpuspawner.spawner.GPUSpawner`) turns the configured
profiles (a list, or a callable) into the spawn form with live availability, the GPU queue's
length per profile and whether its image's CUDA requirements hold here (:mod:`gpuspawner.cudareq`),
turns the form's fields into ``user_options`` (DockerSpawner's ``@default("options_from_form")``
pattern, so an admin's own ``options_from_form`` is used), and checks a user's ``image`` option as
DockerSpawner does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, cast

from jupyterhub.utils import maybe_future
from tornado import web
from traitlets import default

from . import cudareq, images, settings, userinput
from .allocation import GPURequest, Holder
from .devices import Device, Inventory
from .dockerpath import DockerPath
from .form import form_entries, render_form
from .gpuqueue import queue_lengths
from .gpus import engine_claims
from .hubwide import resources
from .nvml import NVMLInventory, NVMLTimeout
from .profiles import OptionsError, Profile, allowed_profiles, parse_profiles
from .profiles import options_from_form as profile_from_form
from .pulls import local_image_env


class UserChoice(DockerPath):
    """The profiles, the spawn form and the image option of one server (see the module's docstring)."""

    @default("options_from_form")
    def _default_options_from_form(self) -> Any:
        """The chosen profile from the spawn form; DockerSpawner's image choice without profiles."""
        choose_image = super()._default_options_from_form()

        def options_from_form(formdata: dict[str, list[str]]) -> dict[str, Any]:
            if not self.profiles:
                return dict(choose_image(formdata))
            try:
                return profile_from_form(formdata)
            except OptionsError as e:
                raise web.HTTPError(e.status, e.message) from None

        return options_from_form

    @default("apply_user_options")
    def _default_apply_user_options(self) -> Any:
        """Nothing for JupyterHub to apply: the options are this spawner's own, checked and applied when the
        server starts (the profile, or DockerSpawner's image choice), so the hub no longer warns of
        "unhandled user_options" at every spawn. An admin's own ``apply_user_options`` still runs."""
        return _applied_at_start

    @property
    def group_names(self) -> list[str]:
        """The JupyterHub groups of this server's user (who may use which profile, GPU quotas)."""
        return [g.name for g in self.user.groups]

    @property
    def holder(self) -> Holder:
        return Holder(user=self.user.name, server=self.name or "")

    async def device_claims(self, inventory: Inventory, *, max_age: float = 0) -> dict[str, Holder]:
        """UUID -> holder of every device in use now: what the engine's running containers hold
        (:func:`gpuspawner.gpus.engine_claims`; the form may show a read up to `max_age` seconds old)."""
        return await engine_claims(self.docker, self.hub_id, inventory, max_age=max_age)

    def nvml_reader(self) -> NVMLInventory:
        return resources.inventory(self.nvml_cache_seconds, self.nvml_timeout)


    async def resolved_profiles(self) -> tuple[Profile, ...]:
        """The configured profiles, calling the callable form; a bad result is the hub's fault (500)."""
        value = self.profiles
        if callable(value):
            value = await maybe_future(value(self))
        try:
            return parse_profiles(value, where=f"{type(self).__name__}.profiles", pinning=cast(images.Pinning, self.image_pinning))
        except settings.ConfigError as e:
            self.log.error("Bad profiles for %s: %s", self._log_name, e)
            raise web.HTTPError(500, f"The hub's profiles are misconfigured; tell an admin. ({e})") from None

    async def get_options_form(self) -> str:
        """The profile chooser with live availability; DockerSpawner's form without profiles."""
        configured = await self.resolved_profiles()
        if not configured:
            form: str = await super().get_options_form()
            return form
        mine = allowed_profiles(configured, user=self.user.name, groups=self.group_names)
        inventory, claims = Inventory(), {}
        if any(p.gpus.wants_gpu for p in mine):
            try:
                inventory = await self.nvml_reader().get()
            except NVMLTimeout as e:  # the form says so; CPU-only profiles still start
                inventory = Inventory(problem=str(e))
            claims = resources.book.merged(await self.device_claims(inventory, max_age=self.nvml_cache_seconds))
        waiting = self.gpu_wait_timeout > 0
        entries = form_entries(
            mine, inventory, claims, holder=self.holder, busy_memory_threshold=self.busy_memory_threshold,
            waiting=waiting, last_choice=(self.user_options or {}).get("profile"),
            queued=queue_lengths(list(resources.waiters.values())), unfit=await self._unfit_profiles(mine, inventory),
        )
        return render_form(entries, waiting=waiting, template_file=self.profile_form_template)

    async def _unfit_profiles(self, mine: Sequence[Profile], inventory: Inventory) -> dict[str, str]:
        """Slug -> why its image cannot start here, for each GPU profile whose image's CUDA requirements
        the driver does not meet (an image not on the engine yet is judged once pulled)."""
        if inventory.problem:
            return {}
        gpu_profiles = [p for p in mine if p.gpus.wants_gpu]
        verdicts = await asyncio.gather(*(self.image_fit(
            str(p.image), environment={**self._configured_environment(), **p.environment}, request=p.gpus,
            inventory=inventory) for p in gpu_profiles))
        return {p.slug: v.reason for p, v in zip(gpu_profiles, verdicts, strict=True) if v is not None and not v.met}

    def _configured_environment(self) -> dict[str, str]:
        """``DockerSpawner.environment``'s text values, as a spawn's plan takes them."""
        return {k: v for k, v in (self.environment or {}).items() if isinstance(v, str)}

    async def image_fit(
        self, image: str, *, environment: Mapping[str, str], request: GPURequest, inventory: Inventory,
        env: Sequence[str] | None = None, devices: Sequence[str] = (),
    ) -> cudareq.Verdict | None:
        """Whether a server of `image` with `environment` over the image's own and the GPUs of `request` can
        start here, as NVIDIA's container toolkit will judge it (:mod:`gpuspawner.cudareq`). None for a
        CPU-only server (the toolkit checks nothing for it) and for an image the engine does not have yet.
        `env`: the image's ``Config.Env`` where the caller has it; `devices`: the UUIDs granted, once they are."""
        if not request.wants_gpu:
            return None
        found = await self.image_requirements(image, environment=environment, env=env)
        if found is None:
            return None
        return self.judge_requirements(found, image=image, request=request, inventory=inventory, devices=devices)

    async def image_requirements(
        self, image: str, *, environment: Mapping[str, str], env: Sequence[str] | None = None,
    ) -> cudareq.ImageRequirements | None:
        """The CUDA requirements of a container of `image` with `environment` over the image's own; None where
        the engine does not have the image yet. `env`: the image's ``Config.Env`` where the caller has it."""
        if env is None:
            env = await local_image_env(image, call=self.docker, max_age=self.nvml_cache_seconds)
            if env is None:
                return None
        return cudareq.image_requirements(cudareq.environment_of(env, environment))

    def judge_requirements(
        self, found: cudareq.ImageRequirements, *, image: str, request: GPURequest, inventory: Inventory,
        devices: Sequence[str] = (),
    ) -> cudareq.Verdict:
        """`found` judged against the host's driver and the GPUs granted (`devices`), or before they are, those
        of `request`'s kind: met where one kind of them fits (override point: a swarm judges its nodes')."""
        host = cudareq.Host(driver=inventory.driver_version, cuda=inventory.cuda_driver_version)
        if devices:
            by_uuid = inventory.by_uuid()
            granted = tuple(gpu_facts(by_uuid[u]) for u in devices if u in by_uuid)
            return cudareq.judge(found, cudareq.Host(host.driver, host.cuda, gpus=granted), image=image)
        kinds = [gpu_facts(d) for d in inventory.devices if d.healthy and request.matches(d)]
        return cudareq.judge_kinds(found, host, kinds, image=image)[0]

    async def check_allowed(self, image: str) -> str:
        """DockerSpawner's check of a user's ``image`` option; within a spawn, the image it resolved."""
        if self.spawn_image is not None:
            return self.spawn_image
        allowed: str = await super().check_allowed(image)
        return allowed

    async def _allowed_image_option(self, image: Any) -> str:
        """DockerSpawner's check of a user's ``image`` option, quoting only a prefix of a refused name."""
        if not isinstance(image, str):
            raise web.HTTPError(400, f"'image' is {userinput.quote(image)}; it must be the name of an allowed image.")
        try:
            return await self.check_allowed(image)
        except web.HTTPError as e:
            head = f"Image {image} "
            if e.log_message and e.log_message.startswith(head):
                raise web.HTTPError(e.status_code, f"Image {userinput.quote(image)} {e.log_message[len(head):]}") from None
            raise


def gpu_facts(device: Device) -> cudareq.GPUFacts:
    """What ``brand=`` and ``arch=`` requirements compare of `device`."""
    return cudareq.GPUFacts(brand=device.brand, arch=device.compute_capability)


def _applied_at_start(spawner: UserChoice, user_options: dict[str, Any]) -> None:
    """UserChoice's ``apply_user_options``: its start applies them."""
