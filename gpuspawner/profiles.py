"""Profiles: what a user may choose at login, checked when the configuration loads.

A profile pins an image, asks for GPUs and sets limits; admins say who may use it. The shape
is close to KubeSpawner's ``profile_list`` (``slug``, ``display_name``, ``description``,
``default``), with the settings as plain keys rather than a ``kubespawner_override`` dict::

    {
        "slug": "a100-1",
        "display_name": "1 × A100 · PyTorch",
        "description": "One whole A100 for training.",
        "image": "quay.io/jupyter/pytorch-notebook:cuda12-2026-08-24",
        "gpus": {"count": 1, "model": "A100"},
        "cpu_limit": 8,
        "mem_limit": "64G",
        "environment": {"OMP_NUM_THREADS": "8"},
        "allowed_groups": ["ml-lab"],
        "allowed_users": ["ada"],
        "default": True,
    }

A user asks for one with ``user_options = {"profile": "<slug>"}``, from the form or the REST
API, and for nothing else: a user never names an image, a device or a limit.

Pure code: no docker, pynvml or jupyterhub imports.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .allocation import GPURequest
from .devices import format_bytes
from .images import ImageRef, ImageReferenceError, Pinning, is_pinned, parse_image, pinning_rule
from .limits import format_duration, parse_duration, parse_percent
from .serverinfo import ReservedName, check_names
from .settings import ConfigError, parse_bytes, parse_gpu_request
from .userinput import OptionsError as OptionsError  # raised here; its home is userinput
from .userinput import quote

PROFILE_KEYS = (
    "slug", "display_name", "description", "default", "image", "gpus", "cpu_limit", "mem_limit",
    "environment", "allowed_groups", "allowed_users", "max_runtime", "gpu_idle_timeout", "gpu_idle_threshold",
)
REQUIRED_KEYS = ("slug", "display_name", "image")
_SLUG = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$")


@dataclass(frozen=True)
class Profile:
    slug: str
    display_name: str
    image: ImageRef
    description: str = ""
    default: bool = False
    gpus: GPURequest = GPURequest()
    cpu_limit: float | None = None
    mem_limit: int | None = None  # bytes
    environment: Mapping[str, str] = field(default_factory=dict)
    allowed_groups: frozenset[str] = frozenset()
    allowed_users: frozenset[str] = frozenset()
    max_runtime: float | None = None  # seconds after its start that the server is stopped
    gpu_idle_timeout: float | None = None  # seconds of idle GPUs after which the server is stopped
    gpu_idle_threshold: float | None = None  # percent utilisation under which a GPU counts as idle

    def allows(self, user: str, groups: Iterable[str]) -> bool:
        """Everyone, unless the profile names users or groups."""
        if not self.allowed_groups and not self.allowed_users:
            return True
        return user in self.allowed_users or bool(self.allowed_groups & set(groups))

    def resources(self) -> str:
        """The profile's resources in words, e.g. "1 × A100 · 8 CPUs · 64 GiB"."""
        parts = [self.gpus.describe() if self.gpus.wants_gpu else "CPU only"]
        if self.cpu_limit is not None:
            parts.append(f"{self.cpu_limit:g} CPU{'s' if self.cpu_limit != 1 else ''}")
        if self.mem_limit is not None:
            parts.append(f"{format_bytes(self.mem_limit)} memory")
        if self.max_runtime is not None:
            parts.append(f"at most {format_duration(self.max_runtime)}")
        if self.gpu_idle_timeout is not None:
            parts.append(f"stopped after {format_duration(self.gpu_idle_timeout)} of idle GPU")
        return " · ".join(parts)


def parse_profiles(value: Any, *, where: str = "GPUSpawner.profiles", pinning: Pinning = "tag") -> tuple[Profile, ...]:
    """Profiles from configuration; ConfigError names the profile, the key, the value and what is allowed."""
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise ConfigError(f"{where} is {value!r}; allowed: a list of profile dicts, or a callable returning one.")
    profiles = tuple(
        _parse_profile(item, where=f"{where}[{i}]", pinning=pinning) for i, item in enumerate(value)
    )
    seen: dict[str, int] = {}
    for i, p in enumerate(profiles):
        if p.slug in seen:
            raise ConfigError(
                f"{where}: profiles {seen[p.slug]} and {i} both have slug {p.slug!r}; slugs must be unique."
            )
        seen[p.slug] = i
    defaults = [p.slug for p in profiles if p.default]
    if len(defaults) > 1:
        raise ConfigError(f"{where}: profiles {', '.join(map(repr, defaults))} are all marked default; mark one.")
    return profiles


def _parse_profile(item: Any, *, where: str, pinning: Pinning) -> Profile:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where} is {item!r}; allowed: a dict with keys {', '.join(PROFILE_KEYS)}.")
    name = f"{where} (slug {item['slug']!r})" if isinstance(item.get("slug"), str) else where
    unknown = sorted(set(item) - set(PROFILE_KEYS))
    if unknown:
        hint = ""
        if "kubespawner_override" in unknown:
            hint = " GPUSpawner takes image, gpus, cpu_limit, mem_limit and environment as keys of the profile itself."
        raise ConfigError(f"{name} has unknown key {unknown[0]!r}; allowed keys: {', '.join(PROFILE_KEYS)}.{hint}")
    for key in REQUIRED_KEYS:
        if key not in item:
            raise ConfigError(f"{name} has no {key!r}; every profile needs {', '.join(REQUIRED_KEYS)}.")
    slug = item["slug"]
    if not isinstance(slug, str) or not _SLUG.match(slug):
        raise ConfigError(
            f"{name}: 'slug' is {slug!r}; allowed: lowercase letters, digits and '-', such as 'a100-1'."
        )
    for key in ("display_name", "description"):
        if key in item and not isinstance(item[key], str):
            raise ConfigError(f"{name}: {key!r} is {item[key]!r}; allowed: text.")
    if "default" in item and not isinstance(item["default"], bool):
        raise ConfigError(f"{name}: 'default' is {item['default']!r}; allowed: True or False.")
    return Profile(
        slug=slug,
        display_name=item["display_name"],
        description=item.get("description", ""),
        default=item.get("default", False),
        image=_parse_pinned_image(item["image"], where=name, pinning=pinning),
        gpus=parse_gpu_request(item.get("gpus", 0), where=f"{name}: 'gpus'"),
        cpu_limit=_parse_cpus(item.get("cpu_limit"), where=name),
        mem_limit=None if item.get("mem_limit") is None else parse_bytes(item["mem_limit"], where=f"{name}: 'mem_limit'"),
        environment=_parse_environment(item.get("environment", {}), where=name),
        allowed_groups=_parse_names(item.get("allowed_groups", ()), key="allowed_groups", where=name),
        allowed_users=_parse_names(item.get("allowed_users", ()), key="allowed_users", where=name),
        max_runtime=parse_duration(item.get("max_runtime"), where=f"{name}: 'max_runtime'"),
        gpu_idle_timeout=parse_duration(item.get("gpu_idle_timeout"), where=f"{name}: 'gpu_idle_timeout'"),
        gpu_idle_threshold=None if item.get("gpu_idle_threshold") is None
        else parse_percent(item["gpu_idle_threshold"], where=f"{name}: 'gpu_idle_threshold'"),
    )


def _parse_pinned_image(value: Any, *, where: str, pinning: Pinning) -> ImageRef:
    try:
        ref = parse_image(value)
    except ImageReferenceError as e:
        raise ConfigError(f"{where}: 'image' is {value!r}; {e}.") from None
    if not is_pinned(ref, pinning=pinning):
        raise ConfigError(
            f"{where}: 'image' is {value!r}, which is not pinned; allowed: {pinning_rule(pinning)} "
            "(GPUSpawner.image_pinning)."
        )
    return ref


def _parse_cpus(value: Any, *, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}: 'cpu_limit' is {value!r}; allowed: a number of CPUs above 0, such as 4 or 0.5.")
    return float(value)


def _parse_environment(value: Any, *, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{where}: 'environment' is {value!r}; allowed: a dict of text to text.")
    try:
        check_names(list(value), where=f"{where}: 'environment'")
    except ReservedName as e:
        raise ConfigError(str(e)) from None
    return dict(value)


def _parse_names(value: Any, *, key: str, where: str) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key!r} is {value!r}; allowed: a list of names.")
    return frozenset(value)


# --- Choosing ---------------------------------------------------------------------------------


def allowed_profiles(profiles: Sequence[Profile], *, user: str, groups: Iterable[str]) -> list[Profile]:
    groups = set(groups)
    return [p for p in profiles if p.allows(user, groups)]


def default_profile(profiles: Sequence[Profile]) -> Profile | None:
    """The profile marked default, else the first one."""
    return next((p for p in profiles if p.default), profiles[0] if profiles else None)


def choose_profile(
    profiles: Sequence[Profile], user_options: Mapping[str, Any] | None, *, user: str, groups: Iterable[str]
) -> Profile:
    """The profile a user asked for, or an OptionsError with the status to answer.

    ``{"profile": slug}`` or ``{}`` (the user's default profile); any other key is refused,
    because a user must never choose an image, a device or a limit outside their profiles.
    """
    options = dict(user_options or {})
    others = sorted(k for k in options if k != "profile")
    if others:
        raise OptionsError(
            400,
            f"Unknown option {quote(others[0])}: a server is chosen by profile only, "
            '{"profile": "<slug>"}; images, devices and limits come with the profile.',
        )
    mine = allowed_profiles(profiles, user=user, groups=groups)
    slug = options.get("profile")
    if slug is None or slug == "":
        chosen = default_profile(mine)
        if chosen is None:
            raise OptionsError(403, f"No profile is open to {user}; ask an admin for access.")
        return chosen
    if not isinstance(slug, str):
        raise OptionsError(400, f"'profile' is {quote(slug)}; it must be a profile slug such as {_slugs(mine)}.")
    by_slug = {p.slug: p for p in profiles}
    if slug not in by_slug:
        raise OptionsError(400, f"Unknown profile {quote(slug)}; the profiles you may use: {_slugs(mine)}.")
    if by_slug[slug] not in mine:
        raise OptionsError(403, f"Profile {quote(slug)} is not open to {user}; the profiles you may use: {_slugs(mine)}.")
    return by_slug[slug]


def _slugs(profiles: Sequence[Profile]) -> str:
    return ", ".join(repr(p.slug) for p in profiles) or "none"


def options_from_form(formdata: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """The spawn form's fields as user_options: the chosen profile, nothing else."""
    values = formdata.get("profile") or []
    if len(values) > 1:
        raise OptionsError(400, "Choose one profile.")
    return {"profile": values[0]} if values else {}


def profile_config(profile: Profile) -> dict[str, Any]:
    """The profile as configured, as plain data: what the audit record's profile hash covers."""
    return {
        "slug": profile.slug, "display_name": profile.display_name, "description": profile.description,
        "default": profile.default, "image": str(profile.image),
        "gpus": {"count": profile.gpus.count, "mig_profile": profile.gpus.mig_profile,
                 "model": profile.gpus.model, "min_memory": profile.gpus.min_memory},
        "cpu_limit": profile.cpu_limit, "mem_limit": profile.mem_limit,
        "environment": dict(sorted(profile.environment.items())),
        "allowed_groups": sorted(profile.allowed_groups), "allowed_users": sorted(profile.allowed_users),
        # time limits only where set: the hash of a profile without them is what it always was
        **{k: v for k in ("max_runtime", "gpu_idle_timeout", "gpu_idle_threshold") if (v := getattr(profile, k)) is not None},
    }
