"""A spawn's image on the host: pulled as ``DockerSpawner.pull_policy`` says, and the engine's inspection of it.

What to do is :func:`gpuspawner.images.pull_step` (pure); this module asks the engine and pulls. An
image's environment (``Config.Env``, where its CUDA requirements are) is remembered by image ID, which
names its content, so the spawn form and a spawn read it once per image.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import docker.errors

from .hubwide import resources
from .images import must_look_up, pull_arguments, pull_step


class ImageMissing(Exception):
    """The image is not on the host and the pull policy forbids pulling it."""


async def pulled_image_info(
    image: str, *, policy: str, call: Callable[..., Awaitable[Any]], say: Callable[[str], None], log: Any, name: str,
) -> dict[str, Any]:
    """The engine's inspection of `image`, pulled first where `policy` says so; its environment is remembered
    (:func:`image_env`)."""
    present, info = None, {}
    if must_look_up(policy):
        try:
            info = await call("inspect_image", image)
            present = True
        except docker.errors.NotFound:
            present = False
    step = pull_step(policy, present=present)
    if step == "use":
        image_env(image, info)
        return info
    if step == "refuse":
        raise ImageMissing(f"Image {image} is not on this host and DockerSpawner.pull_policy is {policy!r}.")
    say(f"Pulling image {image}")
    log.info("Pulling %s for %s", image, name)
    repository, tag = pull_arguments(image)
    await call("pull", repository, tag=tag)
    pulled: dict[str, Any] = await call("inspect_image", image)
    image_env(image, pulled)
    return pulled


def image_env(image: str, inspection: Mapping[str, Any]) -> tuple[str, ...]:
    """The environment of `image` (``["NAME=value", …]``) from the engine's inspection of it, remembered by its ID."""
    image_id = str(inspection.get("Id") or "")
    env = tuple(str(e) for e in ((inspection.get("Config") or {}).get("Env") or ()))
    if image_id:
        resources.image_envs[image_id] = env
        resources.image_ids[image] = (time.monotonic(), image_id)
    return env


async def local_image_env(image: str, *, call: Callable[..., Awaitable[Any]], max_age: float) -> tuple[str, ...] | None:
    """The environment of `image` as the engine has it now (a look up to `max_age` seconds old); None where
    the engine does not have it (it is judged once pulled)."""
    seen = resources.image_ids.get(image)
    if seen is not None and time.monotonic() - seen[0] <= max_age:
        if seen[1] is None:
            return None
        if seen[1] in resources.image_envs:
            return resources.image_envs[seen[1]]
    try:
        info = await call("inspect_image", image)
    except docker.errors.NotFound:
        resources.image_ids[image] = (time.monotonic(), None)
        return None
    return image_env(image, info)
