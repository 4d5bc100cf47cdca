"""Whether an image's CUDA requirements hold on a host, judged as NVIDIA's container toolkit judges them.

A CUDA image says what it needs in its environment, and NVIDIA's hook checks that when the
container starts (``docker start`` then fails with "requirement error: unsatisfied condition:
cuda>=13.0"). gpuspawner reads the same variables from the image's ``Config.Env`` (with the
spawn's own environment over them, as the container gets it) and asks the same question before
anything is claimed, so a spawn that cannot run is refused with a sentence instead.

The rules, as libnvidia-container (``src/cli/dsl.c``, ``configure.c``) and nvidia-container-toolkit
(``internal/config/image/cuda_image.go``) apply them:

- every ``NVIDIA_REQUIRE_*`` variable but ``NVIDIA_REQUIRE_JETPACK`` is one requirement, and all
  must hold. An image with ``CUDA_VERSION`` and no (or an empty) ``NVIDIA_REQUIRE_CUDA`` (a "legacy"
  image) requires ``cuda>=MAJOR.MINOR`` of that version; a version that is not one stops the container;
- ``NVIDIA_DISABLE_REQUIRE`` set to a true value (Go's ``ParseBool``: 1, t, T, TRUE, true, True)
  turns every check off; any other value leaves them on;
- within a requirement, space-separated groups are alternatives (one must hold) and the
  comma-separated constraints of a group must all hold; groups are tried left to right, a group's
  constraints until one fails;
- a constraint is ``name op value`` with the names ``cuda``, ``driver``, ``arch``, ``brand`` (any
  case) and the operators ``=``, ``!=``, ``<``, ``<=``, ``>``, ``>=``. ``cuda`` compares the CUDA
  version the driver supports, ``driver`` the driver's version, ``arch`` a GPU's compute capability:
  as dotted numbers, trailing zeros ignored (12.4 = 12.4.0). ``brand`` compares a GPU's brand as text
  in any case, with ``=`` or ``!=`` only. A fact the host cannot tell holds (so a requirement on
  ``arch`` or ``brand`` holds where the GPUs' are unknown), as in the toolkit;
- ``arch`` and ``brand`` are judged for each GPU the container gets, and every one must pass;
- anything else (an unknown name or operator, no value, a version with letters) is an invalid
  expression: the toolkit refuses to start the container, and so does gpuspawner, saying why.

Pure code: no docker, pynvml, jupyterhub or database imports.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

REQUIRE_PREFIX = "NVIDIA_REQUIRE_"
REQUIRE_CUDA = "NVIDIA_REQUIRE_CUDA"
REQUIRE_JETPACK = "NVIDIA_REQUIRE_JETPACK"  # Jetson's own, which the toolkit does not check
DISABLE_REQUIRE = "NVIDIA_DISABLE_REQUIRE"
CUDA_VERSION = "CUDA_VERSION"
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # Go's strconv.ParseBool
_OPERATORS = ("=", "!=", "<", "<=", ">", ">=")
_OPERATOR_CHARS = "<>=!"
_NAMES = ("cuda", "driver", "arch", "brand")
_VERSION = re.compile(r"[0-9][0-9.]*")
# golang.org/x/mod/semver's valid versions, after the toolkit puts a "v" before CUDA_VERSION.
_SEMVER = re.compile(r"v?(0|[1-9]\d*)(\.(0|[1-9]\d*)(\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?)?)?")
FIX_HINT = "Choose a profile whose image fits, or ask an admin to update the driver."
BROKEN_HINT = "Choose another profile, or ask the image's maintainer to fix it."
SHOWN_CHARS = 60  # a longer requirement is quoted by its first group in a sentence (the record keeps all of it)

# NVML's nvmlBrandType_t as libnvidia-container names each brand (what ``brand=`` compares, in any case).
NVML_BRANDS = {
    1: "quadro", 2: "tesla", 3: "nvs", 4: "grid", 5: "geforce", 6: "titan", 7: "vapps", 8: "vpc", 9: "vcs",
    10: "vws", 11: "cloudgaming", 12: "quadrortx", 13: "nvidiartx", 14: "nvidia", 15: "geforcertx", 16: "titanrtx",
}


def brand_name(nvml_brand: int) -> str:
    """The brand a ``brand=`` constraint compares, from NVML's brand number ("unknown" for one it lacks)."""
    return NVML_BRANDS.get(nvml_brand, "unknown")


@dataclass(frozen=True)
class Requirement:
    """One requirement: the variable it comes from and its text (``cuda>=12.4 brand=tesla,driver>=470``)."""

    variable: str  # "NVIDIA_REQUIRE_CUDA", or "CUDA_VERSION" for one derived from it
    text: str
    derived_from: str = ""  # the CUDA_VERSION a legacy image's requirement comes from

    def shown(self, *, limit: int = SHOWN_CHARS) -> str:
        """``NVIDIA_REQUIRE_CUDA="cuda>=13.0 …"``: how a sentence quotes it, a long one by its first group."""
        if self.derived_from:
            return f'{CUDA_VERSION}="{self.derived_from}"'
        groups = self.text.split()
        text = self.text if len(self.text) <= limit or len(groups) < 2 else f"{groups[0]} …"
        return f'{self.variable}="{text}"'

    def __str__(self) -> str:
        if self.derived_from:
            return f'{self.text} (from {CUDA_VERSION}="{self.derived_from}")'
        return f'{self.variable}="{self.text}"'


@dataclass(frozen=True)
class ImageRequirements:
    """What an image's environment requires of the NVIDIA driver and GPUs (see the module's docstring)."""

    requirements: tuple[Requirement, ...] = ()
    disabled: str = ""  # NVIDIA_DISABLE_REQUIRE's value, where it turns the checks off
    broken: str = ""  # why the toolkit cannot read them (a CUDA_VERSION that is no version)
    broken_text: str = ""  # what it cannot read, as the record keeps it

    @property
    def text(self) -> str:
        """All requirements as one line, for the record; "" where there are none or they are turned off."""
        if self.disabled:
            return f'{DISABLE_REQUIRE}="{self.disabled}" (not checked)'
        return "; ".join(str(r) for r in self.requirements)


def environment_of(entries: Iterable[str], overrides: Mapping[str, str] = {}) -> dict[str, str]:
    """An image's ``Config.Env`` (``["NAME=value", …]``) as a dict, with `overrides` (the spawn's own
    environment, which the container gets over the image's) on top."""
    env = {}
    for entry in entries:
        name, sep, value = str(entry).partition("=")
        if sep:
            env[name] = value
    env.update(overrides)
    return env


def image_requirements(env: Mapping[str, str]) -> ImageRequirements:
    """The requirements of a container with environment `env`, as the toolkit collects them."""
    if env.get(DISABLE_REQUIRE, "") in _TRUE:
        return ImageRequirements(disabled=env[DISABLE_REQUIRE])
    found = [Requirement(name, value) for name, value in sorted(env.items())
             if name.startswith(REQUIRE_PREFIX) and not name.startswith(REQUIRE_JETPACK)]
    legacy = env.get(CUDA_VERSION, "")
    if legacy and not env.get(REQUIRE_CUDA):
        match = _SEMVER.fullmatch(legacy)
        if match is None:
            return ImageRequirements(tuple(found), broken_text=f'{CUDA_VERSION}="{legacy}"', broken=(
                f'it sets {CUDA_VERSION}="{legacy}", which NVIDIA\'s container toolkit cannot read as a version '
                "(it expects MAJOR.MINOR or MAJOR.MINOR.PATCH)"))
        major_minor = f"{match.group(1)}.{match.group(3) or 0}"
        found.append(Requirement(CUDA_VERSION, f"cuda>={major_minor}", derived_from=legacy))
    return ImageRequirements(tuple(found))


@dataclass(frozen=True)
class GPUFacts:
    """What ``brand`` and ``arch`` constraints compare for one GPU; None where it cannot be told."""

    brand: str | None = None  # "tesla", "nvidia", … (see :data:`NVML_BRANDS`)
    arch: str | None = None  # compute capability, "8.0"


@dataclass(frozen=True)
class Host:
    """What a requirement is judged against: the driver's versions and the GPUs a server would get."""

    driver: str | None  # "550.54.15"
    cuda: str | None  # the CUDA version the driver supports, "12.4"
    gpus: tuple[GPUFacts, ...] = ()  # none known: brand and arch hold, as in the toolkit with no device
    where: str = "this host"  # how a sentence names it: "this host", "node gpu-2"
    aside: str = ""  # said after its versions in a sentence: " (the newest of the swarm's 3 GPU nodes)"


@dataclass(frozen=True)
class Verdict:
    """Whether an image can run on a host: `met`, the `requirement` judged (as the record keeps it), and
    `reason`, the sentence a user reads where it cannot ("" where it can)."""

    met: bool
    requirement: str = ""
    reason: str = ""


class InvalidConstraint(ValueError):
    """A constraint the toolkit cannot read: its container would not start."""


@dataclass(frozen=True)
class _Constraint:
    name: str  # lower case
    op: str
    value: str
    text: str


def parse_constraint(text: str) -> _Constraint:
    """``cuda>=12.4`` as name, operator and value; InvalidConstraint for what the toolkit cannot read."""
    cut = next((i for i, ch in enumerate(text) if ch in _OPERATOR_CHARS), len(text))
    end = cut
    while end < len(text) and text[end] in _OPERATOR_CHARS:
        end += 1
    name, op, value = text[:cut], text[cut:end], text[end:]
    if not name or op not in _OPERATORS or not value:
        raise InvalidConstraint(f"'{text}' is not a constraint such as cuda>=12.4, driver>=550, brand=tesla or arch>=8.0")
    if name.lower() not in _NAMES:
        raise InvalidConstraint(f"'{text}' names '{name}', and only cuda, driver, arch and brand can be required")
    if name.lower() == "brand" and op not in ("=", "!="):
        raise InvalidConstraint(f"'{text}' compares a brand with '{op}'; a brand is compared with = or != only")
    if name.lower() != "brand" and _VERSION.fullmatch(value) is None:
        raise InvalidConstraint(f"'{text}' compares with '{value}', which is not a version such as 12.4")
    return _Constraint(name.lower(), op, value, text)


def compare_versions(left: str, op: str, right: str) -> bool:
    """Dotted numbers compared part by part, trailing zeros ignored: 12.4 = 12.4.0 < 12.10."""
    a, b = _parts(left), _parts(right)
    return {"=": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


def _parts(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in version.split(".") if p]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _holds(c: _Constraint, host: Host, gpu: GPUFacts | None) -> bool:
    if c.name == "brand":
        if gpu is None or gpu.brand is None:
            return True
        return (gpu.brand.lower() == c.value.lower()) == (c.op == "=")
    known = {"cuda": host.cuda, "driver": host.driver, "arch": gpu.arch if gpu is not None else None}[c.name]
    if not known or _VERSION.fullmatch(known) is None:
        return True  # what the host cannot tell holds, as in the toolkit
    return compare_versions(known, c.op, c.value)


def satisfied(text: str, host: Host, gpu: GPUFacts | None = None) -> bool:
    """Whether one requirement's text holds for `host` (and one of its GPUs). InvalidConstraint where the
    toolkit would meet a constraint it cannot read; those after the point it decides are never read."""
    result = True  # the last constraint's outcome decides, as in the toolkit's loop (a group of only commas adds none)
    for group in filter(None, text.split(" ")):
        for c in filter(None, group.split(",")):
            result = _holds(parse_constraint(c), host, gpu)
            if not result:
                break
        else:
            return result
    return result


def judge(found: ImageRequirements, host: Host, *, image: str) -> Verdict:
    """Whether a server of `image` with these requirements can start on `host`, and if not, why."""
    if found.broken:
        return Verdict(False, found.broken_text, f"Image {image} cannot start with a GPU: {found.broken}. {BROKEN_HINT}")
    if found.disabled:
        return Verdict(True, found.text)
    for requirement in found.requirements:
        try:
            if not all(satisfied(requirement.text, host, gpu) for gpu in (host.gpus or (None,))):
                return Verdict(False, found.text, _unmet(requirement, host, image=image))
        except InvalidConstraint as e:
            return Verdict(False, found.text, f"Image {image} cannot start with a GPU: its requirement "
                                              f"{requirement.shown()} cannot be read by NVIDIA's container toolkit: {e}. "
                                              f"{BROKEN_HINT}")
    return Verdict(True, found.text)


def judge_kinds(found: ImageRequirements, host: Host, kinds: Iterable[GPUFacts], *, image: str) -> tuple[Verdict, frozenset[GPUFacts]]:
    """Before the GPUs are chosen: whether a server of `image` can start on `host` with a GPU of one of
    `kinds` (met where one kind fits; with no kinds, on the driver alone), and the kinds that cannot."""
    verdicts = {kind: judge(found, replace(host, gpus=(kind,)), image=image) for kind in dict.fromkeys(kinds)}
    unfit = frozenset(kind for kind, v in verdicts.items() if not v.met)
    fitting = [v for v in verdicts.values() if v.met]
    if fitting:
        return fitting[0], unfit
    return judge(found, replace(host, gpus=tuple(verdicts)), image=image), unfit


def _unmet(requirement: Requirement, host: Host, *, image: str) -> str:
    first = next(g for g in requirement.text.split(" ") if g)
    needs = [parse_constraint(c) for c in first.split(",") if c]
    what = " and ".join(_described(c) for c in needs) or first
    has = (f"{host.where}'s NVIDIA driver {host.driver or 'of unknown version'} supports CUDA "
           f"{host.cuda or 'of unknown version'}{host.aside}")
    about_gpus = {c.name for c in needs} & {"brand", "arch"}
    if about_gpus and host.gpus:
        has += " and its GPUs are " + ", ".join(sorted({_gpu_text(g, about_gpus) for g in host.gpus}))
    return f"Image {image} requires {what} ({requirement.shown()}), but {has}. {FIX_HINT}"


def _described(c: _Constraint) -> str:
    other = c.op == "!="
    if c.name == "cuda":
        return f"a CUDA other than {c.value}" if other else f"CUDA {c.op} {c.value}"
    if c.name == "driver":
        return f"an NVIDIA driver other than {c.value}" if other else f"NVIDIA driver {c.op} {c.value}"
    if c.name == "brand":
        return f"a GPU of brand {'other than ' if other else ''}{c.value}"
    return f"a GPU of compute capability other than {c.value}" if other else f"a GPU of compute capability {c.op} {c.value}"


def _gpu_text(gpu: GPUFacts, about: set[str]) -> str:
    said = []
    if "brand" in about:
        said.append(f"brand {gpu.brand or 'unknown'}")
    if "arch" in about:
        said.append(f"compute capability {gpu.arch or 'unknown'}")
    return " ".join(said)


def version_key(version: str | None) -> tuple[int, ...]:
    """A driver or CUDA version as a sort key (unknown or unreadable: lowest)."""
    return _parts(version) if version and _VERSION.fullmatch(version) else ()
