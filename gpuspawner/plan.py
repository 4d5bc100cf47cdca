"""A spawn's settings (image, limits, environment, GPU request, profile), built fresh for each spawn.

Pure: :func:`spawn_plan` takes the chosen profile and the spawner's values as configured when
the spawn begins, and returns a frozen :class:`SpawnPlan`. Nothing configured is changed, so one
spawn's profile never leaks into the next (see kubespawner #390).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import audit, labels, profiles, redaction
from .allocation import GPURequest
from .limits import Limits


@dataclass(frozen=True)
class Configured:
    """The spawner's values as they stand when a spawn begins (configuration, group overrides,
    a pre-spawn hook)."""

    image: str
    mem_limit: int | None  # bytes (DockerSpawner.mem_limit)
    cpu_limit: float | None
    environment: Mapping[str, Any]  # DockerSpawner.environment: values are strings or callables
    gpu_request: GPURequest  # GPUSpawner.gpu_request
    limits: Limits = Limits()  # GPUSpawner.max_runtime, gpu_idle_timeout, gpu_idle_threshold: for GPU servers


@dataclass(frozen=True)
class SpawnPlan:
    """What one spawn asks for. ``environment`` is what the audit record keeps (before secrets are
    redacted): the configured string values and the profile's; ``profile_environment`` is what
    the profile adds to the server's environment."""

    image: str
    mem_limit: int | None
    cpu_limit: float | None
    gpus: GPURequest
    environment: Mapping[str, str] = field(default_factory=dict)
    profile: profiles.Profile | None = None
    profile_hash: str | None = None  # the hash of the profile as configured, for the record
    limits: Limits = Limits()  # when the hub stops the server (see gpuspawner.limits)

    @property
    def profile_slug(self) -> str:
        """The profile's slug; "" without profiles."""
        return self.profile.slug if self.profile is not None else ""

    @property
    def profile_environment(self) -> Mapping[str, str]:
        return self.profile.environment if self.profile is not None else {}

    def recorded_environment(self, redact_names: Sequence[str] = ()) -> dict[str, str]:
        """The environment as the audit record keeps it: secrets' values redacted (see :mod:`gpuspawner.audit`)."""
        return redaction.without_secrets(self.environment, extra_names=redact_names)

    def settings_hash(self, *, image: str, image_id: str | None, devices: Sequence[str], redact_names: Sequence[str] = (),
                      server_environment: Mapping[str, str] | None = None) -> str:
        """The hash of what this spawn's container is made from (its label ``gpuspawner.settings``):
        a kept container (``remove = False``) is reused only when it equals the new spawn's.
        `server_environment`: the variables gpuspawner sets that last as long as the container
        (:func:`gpuspawner.serverinfo.server_environment`), so a driver upgrade makes a new one."""
        settings: dict[str, object] = {
            "image": image, "image_id": image_id, "devices": tuple(devices), "cpu_limit": self.cpu_limit,
            "mem_limit": self.mem_limit, "environment": self.recorded_environment(redact_names),
            "profile": self.profile_slug or None, "profile_hash": self.profile_hash,
        }
        if server_environment is not None:
            settings["server_environment"] = dict(server_environment)
        return labels.settings_hash(settings)


def spawn_plan(profile: profiles.Profile | None, configured: Configured, *, image_option: str | None = None) -> SpawnPlan:
    """The settings of a spawn with `profile` (None: no profiles) over the `configured` values.

    A profile's image, GPUs and environment are its own; its limits, where it sets them, win over
    the configured ones. The configured time limits hold for servers with GPUs; a profile's own
    time limits hold whatever it asks for. `image_option` (without profiles) is the image the user chose from
    ``DockerSpawner.allowed_images``, already checked.
    """
    environment = {k: v for k, v in configured.environment.items() if isinstance(v, str)}
    if profile is None:
        return SpawnPlan(
            image=image_option if image_option is not None else configured.image,
            mem_limit=configured.mem_limit,
            cpu_limit=configured.cpu_limit,
            gpus=configured.gpu_request,
            environment=environment,
            limits=configured.limits if configured.gpu_request.wants_gpu else Limits(),
        )
    hub_wide = configured.limits if profile.gpus.wants_gpu else Limits(warn_before=configured.limits.warn_before)
    return SpawnPlan(
        image=str(profile.image),
        mem_limit=profile.mem_limit if profile.mem_limit is not None else configured.mem_limit,
        cpu_limit=profile.cpu_limit if profile.cpu_limit is not None else configured.cpu_limit,
        gpus=profile.gpus,
        environment={**environment, **profile.environment},
        profile=profile,
        profile_hash=audit.content_hash(profiles.profile_config(profile)),
        limits=replace(
            hub_wide,
            max_runtime=_first(profile.max_runtime, hub_wide.max_runtime),
            idle_timeout=_first(profile.gpu_idle_timeout, hub_wide.idle_timeout),
            idle_threshold=_first(profile.gpu_idle_threshold, hub_wide.idle_threshold),
        ),
    )


def _first(own: float | None, otherwise: float | None) -> Any:
    return own if own is not None else otherwise
