"""What a user chooses: the profiles open to them, the spawn form, and the image option.

:class:`UserChoice` (a base of :class:`gpuspawner.spawner.GPUSpawner`) turns the configured
profiles (a list, or a callable) into the spawn form with live availability and the GPU queue's
length per profile, turns the form's fields into ``user_options`` (DockerSpawner's
``@default("options_from_form")`` pattern, so an admin's own ``options_from_form`` is used), and
checks a user's ``image`` option as DockerSpawner does.
"""

from __future__ import annotations

from typing import Any, cast

from jupyterhub.utils import maybe_future
from tornado import web
from traitlets import default

from . import images, settings, userinput
from .allocation import Holder
from .devices import Inventory
from .dockerpath import DockerPath
from .form import form_entries, render_form
from .gpuqueue import queue_lengths
from .gpus import engine_claims
from .hubwide import resources
from .nvml import NVMLInventory, NVMLTimeout
from .profiles import OptionsError, Profile, allowed_profiles, parse_profiles
from .profiles import options_from_form as profile_from_form


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
            queued=queue_lengths(list(resources.waiters.values())),
        )
        return render_form(entries, waiting=waiting, template_file=self.profile_form_template)

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


def _applied_at_start(spawner: UserChoice, user_options: dict[str, Any]) -> None:
    """UserChoice's ``apply_user_options``: its start applies them."""
