"""Secrets kept out of the audit record: the hub's own variables dropped, secret-looking values redacted.

Redaction happens before anything is written (and so before anything is sealed): a value
recorded once stays in the append-only log for good. A variable is redacted by its name
(:func:`is_secret`), and a value by its shape (:func:`redact_value`): URL passwords and
credential query parameters, webhook URLs, known token formats and high-entropy strings.

The rules are our own, small and table-driven, rather than detect-secrets' plugins: those import
requests (and so urllib3 and http.client) into this pure module at ~150 ms, keep their
configuration in a process-wide singleton, carry verifiers that post a found token to its
service, and still miss GitHub's fine-grained tokens, Google API keys, webhook URLs and
credential query parameters. The token formats below follow theirs where they have one.

Pure code: no docker, pynvml, jupyterhub or database imports.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .settings import ConfigError

# Environment variables dropped from the record entirely: the hub's per-server secrets, which
# mean nothing outside this hub anyway.
SECRET_PREFIXES = ("JUPYTERHUB_", "JPY_")
# A variable is redacted when a part of its name (split at "_", "-" or ".") is one of these words.
# Whole parts, so PATH (not PAT), KEYBOARD_LAYOUT (not KEY), GIT_AUTHOR_NAME (not AUTH) and
# TOKENIZERS_PARALLELISM (not TOKEN) are kept. CERT is not here: SSL_CERT_FILE and the like
# name public certificates; a private key is caught by KEY or PRIVATE, or by its value.
SECRET_WORDS = frozenset({
    "TOKEN", "TOKENS", "SECRET", "SECRETS", "PASSWORD", "PASSWORDS", "PASSWD", "PASS", "PWD", "PASSPHRASE",
    "KEY", "KEYS", "APIKEY", "CREDENTIAL", "CREDENTIALS", "CREDS", "AUTH", "PAT", "COOKIE", "COOKIES",
    "SESSION", "PRIVATE", "BEARER", "DSN",
})
# ...or ends with one of these (PGPASS, GHTOKEN, CLIENTSECRET, SENTRYDSN): words no ordinary one ends with.
SECRET_ENDINGS = ("TOKEN", "SECRET", "PGPASS", "DSN")
# ...or holds one of these anywhere: words joined without a separator (APP_SECRETKEY, S3_ACCESSKEYID,
# SLACKWEBHOOKURL). KEY alone is not enough inside a part (MONKEY, HOTKEY): only a kind of key is.
_KEY_KINDS = (
    "SECRET", "PRIVATE", "ACCESS", "API", "AUTH", "SIGNING", "SIGN", "MASTER", "ACCOUNT", "ENCRYPTION", "SSH",
    "LICENSE", "DEPLOY", "APP", "PASS", "HMAC", "SHARED", "SESSION", "CLIENT", "SERVICE",
)
SECRET_INFIXES = (
    "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL", "WEBHOOK", "AUTHTOKEN", "ACCESSTOKEN", "CLIENTSECRET",
    *(kind + "KEY" for kind in _KEY_KINDS),
)
NOT_SECRET_NAMES = frozenset({"PWD"})  # the shell's working directory
# What a redacted value, or the password of a URL in a value, becomes in the record.
REDACTED = "<redacted>"


def is_hub_secret(name: str) -> bool:
    """The hub's own per-server variables (API token, URLs of this hub): dropped, not redacted."""
    return name.upper().startswith(SECRET_PREFIXES)


def _name_parts(name: str) -> list[str]:
    return [p for p in re.split(r"[^A-Z0-9]+", name.upper()) if p]


def _part_says_secret(part: str) -> bool:
    return part in SECRET_WORDS or part.endswith(SECRET_ENDINGS) or any(w in part for w in SECRET_INFIXES)


def _name_says_secret(name: str) -> bool:
    return any(_part_says_secret(p) for p in _name_parts(name))


def is_secret(name: str, extra_names: Iterable[str] = ()) -> bool:
    """Whether a variable's name says its value is a secret; `extra_names` are an admin's
    names or glob patterns (``GPUSpawner.audit_redact_names``), compared in any case.

    A name is secret when a part of it is a secret word (``HF_TOKEN``, ``SENTRY_DSN``,
    ``SLACK_WEBHOOK_URL``), ends with one (``GHTOKEN``) or joins one to another
    (``APP_SECRETKEY``, ``SSH_PRIVATEKEY``, ``S3_ACCESSKEY``); the hub's own variables are too.
    """
    upper = name.upper()
    if is_hub_secret(upper):
        return True
    if upper in NOT_SECRET_NAMES:
        return False
    if _name_says_secret(upper):
        return True
    return any(fnmatch.fnmatchcase(upper, pattern.upper()) for pattern in extra_names)


# --- Values -----------------------------------------------------------------------------------

# scheme://userinfo@ : userinfo runs to the last "@" before the host's "/", "?" or "#". The scheme's
# length is bounded so that a long "a.a.a…" without "://" costs linear time, not quadratic.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]{0,31}://)(?P<userinfo>[^/?#\s]+)@")
# name=value in a URL's query or fragment, or in a connection string ("Server=db;Password=…").
_PARAMETER = re.compile(r"(?:^|(?<=[?&;#]))(?P<name>[A-Za-z][A-Za-z0-9_.\-]*)=(?P<value>[^&;#\s,]+)")
# Query parameters that are secret though their names hold no secret word: signed URLs' signatures
# (sig=, X-Amz-Signature=, X-Goog-Signature=, SharedAccessSignature=).
_SIGNATURE_ENDINGS = ("SIG", "SIGNATURE")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----")
# A URL that is itself a credential: whoever has it may post to the channel. Each URL is matched
# whole and then tested, rather than searched for "webhook" by backtracking.
_URL = re.compile(r"(?i)\bhttps?://(?P<rest>[^\s,]+)")
# Credentials by their published formats, each replaced where it stands.
CREDENTIAL_SHAPES: tuple[tuple[str, str], ...] = (
    ("AWS access key id", r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b"),
    ("GitHub token", r"\bgh[pousr]_[A-Za-z0-9]{30,255}\b"),
    ("GitHub fine-grained token", r"\bgithub_pat_[A-Za-z0-9_]{22,255}"),
    ("GitLab token", r"\bgl(?:pat|dt|rt|ptt|soat)-[A-Za-z0-9_\-]{20,}"),
    ("Slack token", r"\bxox[abeoprs]-[A-Za-z0-9\-]{10,}"),
    ("Slack app token", r"\bxapp-[0-9]+-[A-Za-z0-9\-]{10,}"),
    ("Stripe secret key", r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,}"),
    ("Stripe webhook secret", r"\bwhsec_[A-Za-z0-9]{20,}"),
    ("Google API key", r"\bAIza[0-9A-Za-z_\-]{35}"),
    ("Hugging Face token", r"\bhf_[A-Za-z0-9]{30,}"),
    ("OpenAI or Anthropic key", r"\bsk-(?:proj-|ant-|svcacct-)?[A-Za-z0-9_\-]{32,}"),
    ("npm token", r"\bnpm_[A-Za-z0-9]{36}\b"),
    ("PyPI token", r"\bpypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,}"),
    ("JSON Web Token", r"\beyJ[A-Za-z0-9_\-]{10,}(?:\.[A-Za-z0-9_\-]*){2,4}"),
)
_CREDENTIAL = re.compile("|".join(f"(?:{pattern})" for _, pattern in CREDENTIAL_SHAPES))

# High-entropy strings: a run of base64 (or base64url) characters, or of hex digits.
_BASE64_RUN = re.compile(r"(?<![A-Za-z0-9+/_\-])[A-Za-z0-9+/_\-]{20,}={0,2}")
_HEX_RUN = re.compile(r"(?<![A-Za-z0-9])[0-9a-fA-F]{32,}(?![A-Za-z0-9])")
# Words in a run (Llama, Instruct, cuda): model names and paths are mostly words, random strings are not.
_WORD = re.compile(r"[A-Z]?[a-z]{3,}|[A-Z]{4,}")
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# GPU-<uuid>, MIG-<uuid>, MIG-GPU-<uuid>/1/0: device ids, not secrets.
_DEVICE_ID = re.compile(rf"(?:[A-Za-z]+-)*{_UUID}(?:/[0-9]+)*")
# An image digest (sha256:<hex>) names content anyone may fetch.
_DIGEST_PREFIXES = ("sha1:", "sha256:", "sha384:", "sha512:", "md5:")
# A hex value in a variable named for a hash or an id (GIT_COMMIT, MLFLOW_RUN_ID) is that, not a key.
HASH_NAME_WORDS = frozenset({
    "SHA", "SHA1", "SHA256", "COMMIT", "REVISION", "REV", "DIGEST", "HASH", "CHECKSUM", "ID", "UUID", "GUID",
})
# Random text of n characters has about log2(n) bits of entropy per character (at most 6 for base64):
# a base64 run must come within _ENTROPY_SHORTFALL of that, or reach _ENOUGH_ENTROPY, and be at most
# _MAX_WORDINESS words. Tuned on random keys against model names, image tags, paths and CUDA settings.
_ENTROPY_SHORTFALL = 0.75
_ENOUGH_ENTROPY = 4.4
_MAX_WORDINESS = 0.45
_MIN_HEX_ENTROPY = 3.0  # random hex has nearly 4; "0000…" or "cccc…" has almost none


def _entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in (text.count(ch) for ch in set(text)))


def _looks_random_base64(run: str) -> bool:
    """Whether a base64 run reads as a random key: upper and lower case and digits, nearly the
    entropy of random text of its length, and few words. About nine in ten random keys of 20
    characters or more pass; model names, paths and CUDA tags do not."""
    if run.startswith("/") or _DEVICE_ID.fullmatch(run):  # a path, or a GPU's id
        return False
    if not (any(c.isupper() for c in run) and any(c.islower() for c in run) and any(c.isdigit() for c in run)):
        return False
    if _entropy(run) < min(_ENOUGH_ENTROPY, math.log2(len(run)) - _ENTROPY_SHORTFALL):
        return False
    return sum(len(w) for w in _WORD.findall(run)) / len(run) <= _MAX_WORDINESS


def _redact_base64_runs(value: str) -> str:
    return _BASE64_RUN.sub(lambda m: REDACTED if _looks_random_base64(m[0]) else m[0], value)


def _redact_hex_runs(value: str) -> str:
    lowered = value.lower()

    def hex_run(m: re.Match[str]) -> str:
        digest = lowered.endswith(_DIGEST_PREFIXES, 0, m.start())
        return m[0] if digest or _entropy(m[0].lower()) < _MIN_HEX_ENTROPY else REDACTED

    return _HEX_RUN.sub(hex_run, value)


def _redact_webhooks(value: str) -> str:
    def url(m: re.Match[str]) -> str:
        rest = m["rest"].lower()
        return REDACTED if rest.startswith("hooks.") or "webhook" in rest else m[0]

    return _URL.sub(url, value)


def _redact_userinfo(value: str) -> str:
    def userinfo(m: re.Match[str]) -> str:
        user, colon, _ = m["userinfo"].partition(":")
        return m["scheme"] + (f"{user}:{REDACTED}" if colon else REDACTED) + "@"

    return _URL_USERINFO.sub(userinfo, value)


def _is_secret_parameter(name: str) -> bool:
    return _name_says_secret(name) or any(p.endswith(_SIGNATURE_ENDINGS) for p in _name_parts(name))


def _redact_parameters(value: str) -> str:
    return _PARAMETER.sub(lambda m: f"{m['name']}={REDACTED}" if _is_secret_parameter(m["name"]) else m[0], value)


def _redact(value: str, *, hex_is_secret: bool = True) -> str:
    if _PRIVATE_KEY.search(value):
        return REDACTED
    value = _redact_webhooks(value)
    value = _redact_userinfo(value)
    value = _redact_parameters(value)
    value = _CREDENTIAL.sub(REDACTED, value)
    if hex_is_secret:
        value = _redact_hex_runs(value)
    return _redact_base64_runs(value)


def redact_value(value: str) -> str:
    """`value` without the credentials it carries; the rest of it stays as it was.

    Replaced by :data:`REDACTED`: the password of each URL in it (``postgresql://u:<redacted>@db/x``;
    a user part alone may be a token, so it goes too); the value of each query or
    connection-string parameter whose name is secret (``?password=``, ``&sig=``,
    ``X-Amz-Signature=``, ``;AccountKey=``); webhook URLs; tokens of a known format
    (:data:`CREDENTIAL_SHAPES`: AWS key ids, GitHub, GitLab, Slack, Stripe, Google, JWTs, …);
    hex runs of 32 digits or more, but for image digests (``sha256:…``); and base64 runs that look
    random. A private key makes all of it :data:`REDACTED`. Redacting twice changes nothing.
    """
    return _redact(value)


def _names_a_hash(name: str) -> bool:
    return any(p in HASH_NAME_WORDS for p in _name_parts(name))


def without_secrets(env: Mapping[str, str], *, extra_names: Iterable[str] = ()) -> dict[str, str]:
    """The environment as the audit record keeps it.

    The hub's per-server variables (``JUPYTERHUB_*``, ``JPY_*``) are left out. A variable
    whose name looks secret (:func:`is_secret`) stays, by name, with the value
    :data:`REDACTED`, so an auditor sees it was set; credentials inside other values are
    replaced by :data:`REDACTED` (:func:`redact_value`), except that a hex value in a variable
    named for a hash or an id (``GIT_COMMIT``, ``MLFLOW_RUN_ID``) is kept. Redacting twice
    changes nothing.
    """
    extra = tuple(extra_names)
    return {
        name: REDACTED if is_secret(name, extra) else _redact(value, hex_is_secret=not _names_a_hash(name))
        for name, value in env.items()
        if not is_hub_secret(name)
    }


def is_redacted(value: str) -> bool:
    """Whether a recorded value lost something to redaction (so a rerun must supply it)."""
    return REDACTED in value


_REDACT_NAME = re.compile(r"^[A-Za-z0-9_.\-*?\[\]!]+$")


def parse_redact_names(value: Any, *, where: str) -> tuple[str, ...]:
    """Check ``GPUSpawner.audit_redact_names``: a list of variable names or glob patterns."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(
            f"{where} is {value!r}; allowed: a list of environment variable names or glob patterns, "
            "such as ['LICENSE_SERVER', 'MYCORP_*']."
        )
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _REDACT_NAME.match(item):
            raise ConfigError(
                f"{where}[{i}] is {item!r}; allowed: an environment variable name or a glob pattern "
                "(letters, digits, _ . - and the wildcards * ? [...]), such as 'MYCORP_*'."
            )
    return tuple(value)
