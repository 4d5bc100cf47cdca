"""Image references: parse, normalise, and say whether one is pinned.

``registry[:port]/repository[:tag][@sha256:<64 hex>]``, with Docker's defaults: no registry
means ``docker.io``, and a one-part repository there means ``library/<name>``.

Pure code: no docker, pynvml or jupyterhub imports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

DEFAULT_REGISTRY = "docker.io"
Pinning = Literal["tag", "digest"]

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class ImageReferenceError(ValueError):
    """Not an image reference Docker would accept."""


@dataclass(frozen=True)
class ImageRef:
    registry: str  # "docker.io", "127.0.0.1:5000", "nvcr.io"
    repository: str  # "library/python", "jupyter/base-notebook"
    tag: str | None = None  # None: no tag given (Docker would use "latest")
    digest: str | None = None  # "sha256:…"

    @property
    def name(self) -> str:
        """registry/repository, fully qualified."""
        return f"{self.registry}/{self.repository}"

    @property
    def familiar_name(self) -> str:
        """The repository as Docker prints it: "python" for docker.io/library/python."""
        if self.registry == DEFAULT_REGISTRY:
            return self.repository.removeprefix("library/")
        return self.name

    def by_digest(self, digest: str | None = None) -> str:
        """``repository@sha256:…``: exactly one image, wherever it is pulled."""
        d = digest or self.digest
        if not d:
            raise ValueError(f"{self} has no digest")
        return f"{self.familiar_name}@{d}"

    def __str__(self) -> str:
        text = self.familiar_name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_image(reference: str) -> ImageRef:
    """Parse and normalise an image reference; raise ImageReferenceError if Docker would refuse it."""
    if not isinstance(reference, str) or not reference or reference != reference.strip():
        raise ImageReferenceError(f"{reference!r} is not an image reference")
    rest, digest = reference, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.match(digest):
            raise ImageReferenceError(f"{reference!r}: the digest must be sha256: and 64 hex digits")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:  # a colon after the last slash is a tag; before it, a registry port
        rest, tag = rest.rsplit(":", 1)
        if not _TAG.match(tag):
            raise ImageReferenceError(f"{reference!r}: {tag!r} is not a valid tag")
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, remainder
    else:
        registry, repository = DEFAULT_REGISTRY, rest
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    if not _REPOSITORY.match(repository):
        raise ImageReferenceError(f"{reference!r}: {repository!r} is not a valid repository name")
    return ImageRef(registry=registry, repository=repository, tag=tag, digest=digest)


def is_pinned(ref: ImageRef, *, pinning: Pinning) -> bool:
    """``tag``: an explicit tag other than latest, or a digest. ``digest``: a digest."""
    if ref.digest:
        return True
    return pinning == "tag" and ref.tag is not None and ref.tag != "latest"


def pinning_rule(pinning: Pinning) -> str:
    """What counts as pinned, in words, for error messages."""
    if pinning == "digest":
        return "a digest (name@sha256:…)"
    return "an explicit tag other than 'latest' (name:2024.10), or a digest (name@sha256:…)"


def repo_digest_for(ref: ImageRef, repo_digests: list[str]) -> str | None:
    """The entry of an image's RepoDigests that belongs to `ref`'s repository.

    An image carries one ``name@sha256:…`` per repository it was pulled from or pushed to; only
    the one for the repository asked for says what that name pointed at.
    """
    for entry in repo_digests:
        try:
            candidate = parse_image(entry)
        except ImageReferenceError:
            continue
        if candidate.name == ref.name and candidate.digest and (ref.digest in (None, candidate.digest)):
            return f"{candidate.name}@{candidate.digest}"
    return None


PullStep = Literal["use", "pull", "refuse"]


def pull_step(policy: str, *, present: bool | None) -> PullStep:
    """What a spawn does for its image under ``DockerSpawner.pull_policy`` (any case): use the copy
    on the host, pull it, or refuse. `present`: whether the host has it (None: not looked up,
    which only ``always`` skips: see :func:`must_look_up`)."""
    policy = policy.lower()
    if policy == "always":
        return "pull"
    if present:
        return "use"
    return "refuse" if policy in ("never", "skip") else "pull"


def must_look_up(policy: str) -> bool:
    """Whether the host's copy is looked up before deciding (every policy but ``always``)."""
    return policy.lower() != "always"


def pull_arguments(reference: str) -> tuple[str, str]:
    """(repository, tag or digest) for docker-py's ``pull`` of `reference`: a digest stays a digest
    (DockerSpawner would split ``name@sha256:…`` at its colon), no tag means ``latest``."""
    ref = parse_image(reference)
    repository = ref.familiar_name if ref.registry == DEFAULT_REGISTRY else ref.name
    return repository, ref.digest or ref.tag or "latest"
