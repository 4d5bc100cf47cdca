"""What users send (spawn options, form fields), kept small before it reaches a message or a record.

A user's options can end up in error messages, in the hub's log and, through an error, in an
audit record, which is sealed and can never be deleted. So options larger than
``GPUSpawner.max_user_options_bytes`` are refused before any record is written
(:func:`check_options_size`), a message quotes at most a short prefix of what a user sent
(:func:`quote`), and the error text kept in a record is clipped (:func:`clip`).

Pure code: no docker, pynvml, jupyterhub or database imports.
"""

from __future__ import annotations

import json
import reprlib
from typing import Any

from .settings import ConfigError

QUOTE_CHARS = 40  # the most of a user's value that a message repeats
ERROR_CHARS = 2000  # the most error text an audit record keeps
DEFAULT_MAX_OPTIONS_BYTES = 4096
MIN_OPTIONS_BYTES = 256  # room for {"profile": "<slug>"} (slugs are at most 64 characters) or an image name
MAX_OPTIONS_BYTES = 1024 * 1024

_short = reprlib.Repr()
_short.maxstring = _short.maxother = QUOTE_CHARS
_short.maxdict = _short.maxlist = _short.maxtuple = _short.maxset = 4
_short.maxlevel = 3
_short.fillvalue = "…"


class OptionsError(Exception):
    """A user's choice that cannot be honoured; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def quote(value: Any, *, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters with "…" where cut.

    A short value reads exactly as ``{value!r}`` would; a long one costs no more to quote
    than a short one.
    """
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else repr(value[:limit]) + "…"
    text = _short.repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def clip(text: str, *, limit: int = ERROR_CHARS) -> str:
    """``text``, or its first ``limit`` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def encoded_size_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` as UTF-8 JSON is more than ``limit`` bytes; stops counting once it is."""
    size = 0
    try:
        for chunk in json.JSONEncoder(ensure_ascii=False, default=str).iterencode(value):
            size += len(chunk.encode("utf-8", "surrogatepass"))
            if size > limit:
                return True
    except (TypeError, ValueError):  # not JSON (a key of another type, a cycle): judge its text
        return len(repr(value).encode("utf-8", "surrogatepass")) > limit
    return False


def check_options_size(options: Any, *, max_bytes: int) -> None:
    """Refuse (:class:`OptionsError`, 400) options larger than ``max_bytes`` as JSON."""
    if encoded_size_exceeds(options, max_bytes):
        raise OptionsError(
            400,
            f"Your server options are larger than this hub takes ({max_bytes} bytes, "
            f"GPUSpawner.max_user_options_bytes); they begin {quote(options)}. "
            'Send only what the spawn form offers, such as {"profile": "<slug>"}.',
        )


def parse_max_options_bytes(value: Any, *, where: str) -> int:
    """A limit on the size of user options: whole bytes, from MIN_OPTIONS_BYTES to MAX_OPTIONS_BYTES."""
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_OPTIONS_BYTES <= value <= MAX_OPTIONS_BYTES:
        raise ConfigError(
            f"{where} is {quote(value)}; allowed: a whole number of bytes from {MIN_OPTIONS_BYTES} "
            f"to {MAX_OPTIONS_BYTES} (1 MiB), such as {DEFAULT_MAX_OPTIONS_BYTES}."
        )
    return value
