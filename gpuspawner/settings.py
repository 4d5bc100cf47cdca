"""Parsing and checking configuration values, with messages an admin can act on.

Every error names where the value came from (``GPUSpawner.gpu_request``, say), the key, the
bad value and what is allowed. The spawner's trait validators and the check at hub start
both call these functions, so a value is judged the same way everywhere.

Pure code: no docker, pynvml or jupyterhub imports.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .allocation import GPURequest

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_MIG_PROFILE = re.compile(r"^(\d+c\.)?\d+g\.\d+gb(\+[a-z0-9]+)*$")
GPU_REQUEST_KEYS = ("count", "mig_profile", "model", "min_memory")


class ConfigError(ValueError):
    """A configuration value gpuspawner cannot use; the message says where and why."""


def parse_bytes(value: Any, *, where: str) -> int:
    """A size in bytes from an int or a string like "40G", "40GiB", "512 MiB" (binary units)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} is {value!r}; allowed: a size such as 40G, 512M or a number of bytes.")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        m = _BYTES.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    raise ConfigError(f"{where} is {value!r}; allowed: a size such as 40G, 512M or a number of bytes.")


def parse_gpu_request(value: Any, *, where: str) -> GPURequest:
    """A :class:`GPURequest` from configuration: a number of whole GPUs, or a dict.

    Dict keys: ``count`` (whole GPUs), ``mig_profile`` (one MIG device, e.g. "1g.10gb"),
    ``model`` (a regular expression for the model name) and ``min_memory`` (e.g. "40G").
    """
    if value is None:
        return GPURequest()
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"count": value}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{where} is {value!r}; allowed: a number of GPUs, or a dict with keys {', '.join(GPU_REQUEST_KEYS)}."
        )
    unknown = sorted(set(value) - set(GPU_REQUEST_KEYS))
    if unknown:
        raise ConfigError(
            f"{where} has unknown key {unknown[0]!r}; allowed keys: {', '.join(GPU_REQUEST_KEYS)}."
        )
    count = value.get("count", 0)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigError(f"{where}: 'count' is {count!r}; allowed: a whole number of GPUs, 0 or more.")
    mig_profile = value.get("mig_profile")
    if mig_profile is not None:
        if not isinstance(mig_profile, str) or not _MIG_PROFILE.match(mig_profile):
            raise ConfigError(
                f"{where}: 'mig_profile' is {mig_profile!r}; allowed: a MIG profile name such as "
                "'1g.10gb', '2g.20gb' or '3g.40gb'."
            )
        if count not in (0, 1):
            raise ConfigError(
                f"{where}: 'count' is {count!r} with 'mig_profile' {mig_profile!r}; a server gets one MIG device. "
                "Ask for whole GPUs with 'count', or one MIG device with 'mig_profile'."
            )
    model = value.get("model")
    if model is not None:
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where}: 'model' is {model!r}; allowed: a regular expression such as 'A100|H100'.")
        try:
            re.compile(model)
        except re.error as e:
            raise ConfigError(
                f"{where}: 'model' is {model!r}, which is not a valid regular expression ({e})."
            ) from None
    min_memory = parse_bytes(value.get("min_memory", 0), where=f"{where}: 'min_memory'")
    if not count and mig_profile is None and (model is not None or min_memory):
        raise ConfigError(
            f"{where} sets 'model' or 'min_memory' but asks for no GPU; add 'count' or 'mig_profile'."
        )
    return GPURequest(
        count=0 if mig_profile else count, mig_profile=mig_profile, model=model, min_memory=min_memory
    )


def parse_seconds(value: Any, *, where: str) -> float:
    """A duration in seconds: a number, 0 or more."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{where} is {value!r}; allowed: a number of seconds, 0 or more.")
    return float(value)


def check_extra_host_config(value: Any, *, where: str) -> None:
    """GPUs come from GPUSpawner's requests only: a host config that injects devices is refused."""
    if isinstance(value, Mapping):
        for key in ("device_requests", "DeviceRequests"):
            if key in value:
                raise ConfigError(
                    f"{where} sets {key!r}; GPUSpawner hands out GPUs itself. "
                    "Remove it and ask for GPUs with GPUSpawner.gpu_request instead."
                )


def parse_count(value: Any, *, where: str) -> int:
    """A whole number, 0 or more."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where} is {value!r}; allowed: a whole number, 0 or more.")
    return value


def parse_threads(value: Any, *, where: str) -> int:
    """A number of worker threads: a whole number, 1 or more."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} is {value!r}; allowed: a whole number of threads, 1 or more.")
    return value
