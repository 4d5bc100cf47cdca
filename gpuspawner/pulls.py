"""A spawn's image on the host: pulled as ``DockerSpawner.pull_policy`` says, and the engine's inspection of it.

What to do is :func:`gpuspawner.images.pull_step` (pure); this module asks the engine and pulls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import docker.errors

from .images import must_look_up, pull_arguments, pull_step


class ImageMissing(Exception):
    """The image is not on the host and the pull policy forbids pulling it."""


async def pulled_image_info(
    image: str, *, policy: str, call: Callable[..., Awaitable[Any]], say: Callable[[str], None], log: Any, name: str,
) -> dict[str, Any]:
    """The engine's inspection of `image`, pulled first where `policy` says so."""
    present, info = None, {}
    if must_look_up(policy):
        try:
            info = await call("inspect_image", image)
            present = True
        except docker.errors.NotFound:
            present = False
    step = pull_step(policy, present=present)
    if step == "use":
        return info
    if step == "refuse":
        raise ImageMissing(f"Image {image} is not on this host and DockerSpawner.pull_policy is {policy!r}.")
    say(f"Pulling image {image}")
    log.info("Pulling %s for %s", image, name)
    repository, tag = pull_arguments(image)
    await call("pull", repository, tag=tag)
    pulled: dict[str, Any] = await call("inspect_image", image)
    return pulled
