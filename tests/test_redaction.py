"""Redaction: what the audit record keeps of a server's environment, before anything is sealed.

The credentials below are made up. Those with a published prefix are written in two pieces
("sk_" "live_…") so that secret scanners on this repository do not take the fixtures for leaks.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from traitlets import TraitError
from traitlets.config import Config

from gpuspawner.redaction import REDACTED, is_secret, parse_redact_names, redact_value, without_secrets
from gpuspawner.settings import ConfigError

# --- By name -------------------------------------------------------------------------------------

SECRET_NAMES = [
    "DATABASE_PASSWORD", "db_password", "PGPASS", "PGPASSWORD", "MYSQL_PWD", "LDAP_PASSWD", "S3_CREDENTIALS",
    "GOOGLE_APPLICATION_CREDENTIAL", "GITHUB_PAT", "MLFLOW_TRACKING_AUTH", "HF_TOKEN", "JUPYTER_TOKEN",
    "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "SSH_PRIVATE_KEY", "GPG_PASSPHRASE",
    "SESSION_COOKIE", "FLASK_SESSION", "NPM_AUTH", "client-secret", "GHTOKEN", "SIGNING_KEYS",
]
# What an attacker's review found the first rules missed: words joined without a separator,
# webhooks and DSNs.
JOINED_AND_MISSED_NAMES = [
    "APP_SECRETKEY", "SSH_PRIVATEKEY", "S3_ACCESSKEY", "S3_ACCESSKEYID", "OPENAI_APIKEY", "TWILIO_AUTHTOKEN",
    "OAUTH_CLIENTSECRET", "awsSecretAccessKey", "SLACK_WEBHOOK_URL", "DISCORD_WEBHOOK", "TEAMS_WEBHOOKURL",
    "SENTRY_DSN", "DATABASE_DSN", "MASTERKEY", "LICENSEKEY",
]
ORDINARY_NAMES = [
    "PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "KEYBOARD_LAYOUT", "PWD", "OLDPWD", "TOKENIZERS_PARALLELISM",
    "GIT_AUTHOR_NAME", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES", "MONKEY_PATCH", "PASSENGER_COUNT", "HOME", "DATABASE_URL", "KEYRING_BACKEND",
    "HOTKEY", "CONDA_PREFIX", "NCCL_SOCKET_IFNAME", "HF_HUB_CACHE", "LANG",
]


@pytest.mark.parametrize("name", SECRET_NAMES + JOINED_AND_MISSED_NAMES)
def test_variables_named_like_a_secret_are_redacted(name: str) -> None:
    assert is_secret(name)
    assert without_secrets({name: "s3cr3t", "OMP_NUM_THREADS": "8"}) == {name: REDACTED, "OMP_NUM_THREADS": "8"}


@pytest.mark.parametrize("name", ORDINARY_NAMES)
def test_ordinary_variables_are_kept(name: str) -> None:
    assert not is_secret(name)
    assert without_secrets({name: "/usr/bin"}) == {name: "/usr/bin"}


def test_the_hubs_own_per_server_secrets_are_dropped_entirely() -> None:
    env = {"JUPYTERHUB_API_TOKEN": "t", "JPY_API_TOKEN": "t", "JUPYTERHUB_USER": "ada", "OMP_NUM_THREADS": "8"}
    assert without_secrets(env) == {"OMP_NUM_THREADS": "8"}


@pytest.mark.parametrize(
    ("extra", "name", "secret"),
    [
        (["LICENSE_SERVER"], "LICENSE_SERVER", True),
        (["LICENSE_SERVER"], "license_server", True),
        (["MYCORP_*"], "MYCORP_DB", True),
        (["MYCORP_*"], "OTHERCORP_DB", False),
        (["*_DSN"], "SENTRY_DSN", True),
        (["S3_BUCKET_?"], "S3_BUCKET_A", True),
        ([], "LICENSE_SERVER", False),
    ],
    ids=["name", "name-any-case", "glob-match", "glob-no-match", "glob-suffix", "glob-one-char", "not-added"],
)
def test_admins_add_names_and_glob_patterns(extra: list[str], name: str, secret: bool) -> None:
    assert without_secrets({name: "27000@flexlm"}, extra_names=extra) == {name: REDACTED if secret else "27000@flexlm"}


# --- By shape: a part of the value ----------------------------------------------------------------

PARTLY_SECRET = [
    pytest.param("postgresql://u:pw@db.example.org/audit", f"postgresql://u:{REDACTED}@db.example.org/audit",
                 id="url-password"),
    pytest.param("https://user:tok@host.example.org/repo.git", f"https://user:{REDACTED}@host.example.org/repo.git",
                 id="url-token"),
    pytest.param("redis://:hunter2@cache:6379/0", f"redis://:{REDACTED}@cache:6379/0", id="url-password-only"),
    pytest.param("https://ghp_abc123@github.com/lab/x.git", f"https://{REDACTED}@github.com/lab/x.git", id="url-token-as-user"),
    pytest.param("postgresql://u:p@ss@db/x", f"postgresql://u:{REDACTED}@db/x", id="url-at-in-password"),
    pytest.param("http://a:1@p1:3128,http://b:2@p2:3128", f"http://a:{REDACTED}@p1:3128,http://b:{REDACTED}@p2:3128",
                 id="two-urls"),
    pytest.param("postgresql://db/x?password=hunter2", f"postgresql://db/x?password={REDACTED}", id="query-password"),
    pytest.param("postgresql://db/x?sslmode=require&password=hunter2&application_name=hub",
                 f"postgresql://db/x?sslmode=require&password={REDACTED}&application_name=hub", id="query-password-among-others"),
    pytest.param("https://api.example.org/v1?token=abc123", f"https://api.example.org/v1?token={REDACTED}", id="query-token"),
    pytest.param("https://api.example.org/cb#access_token=abc123&state=x",
                 f"https://api.example.org/cb#access_token={REDACTED}&state=x", id="fragment-access-token"),
    pytest.param("https://maps.example.org/api?api_key=abc123", f"https://maps.example.org/api?api_key={REDACTED}", id="query-api-key"),
    pytest.param("https://maps.example.org/api?key=abc123", f"https://maps.example.org/api?key={REDACTED}", id="query-key"),
    pytest.param("https://x.example.org/?client_secret=abc", f"https://x.example.org/?client_secret={REDACTED}", id="query-secret"),
    pytest.param("https://lab.blob.core.windows.net/c/f?sv=2021-08-06&sp=r&sig=abc%2Bdef%3D",
                 f"https://lab.blob.core.windows.net/c/f?sv=2021-08-06&sp=r&sig={REDACTED}", id="azure-sas-sig"),
    pytest.param("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=fe5f80f7&X-Amz-Expires=60",
                 f"https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={REDACTED}&X-Amz-Expires=60",
                 id="s3-presigned-signature"),
    pytest.param("Server=db;Database=lab;Uid=ada;Pwd=hunter2;", f"Server=db;Database=lab;Uid=ada;Pwd={REDACTED};",
                 id="connection-string-pwd"),
    pytest.param("DefaultEndpointsProtocol=https;AccountName=lab;AccountKey=Zm9vYmFy==;EndpointSuffix=core.windows.net",
                 f"DefaultEndpointsProtocol=https;AccountName=lab;AccountKey={REDACTED};EndpointSuffix=core.windows.net",
                 id="azure-account-key"),
    pytest.param("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZGEifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ",
                 f"Authorization: Bearer {REDACTED}", id="jwt-in-a-header"),
    pytest.param("--region eu-west-1 --key " + "AKIA" + "IOSFODNN7EXAMPLE", f"--region eu-west-1 --key {REDACTED}",
                 id="aws-key-id-among-words"),
]


@pytest.mark.parametrize(("value", "recorded"), PARTLY_SECRET)
def test_only_the_secret_part_of_a_value_is_redacted(value: str, recorded: str) -> None:
    assert without_secrets({"SOME_SETTING": value}) == {"SOME_SETTING": recorded}


# --- By shape: the value is itself a credential ---------------------------------------------------

CREDENTIALS = [
    pytest.param("AKIA" + "IOSFODNN7EXAMPLE", id="aws-access-key-id"),
    pytest.param("ASIA" + "Y34FZKBOKMUTVV7A", id="aws-temporary-key-id"),
    pytest.param("ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", id="github-classic-token"),
    pytest.param("gho_" + "16C7e42F292c6912E7710c838347Ae178B4a", id="github-oauth-token"),
    pytest.param("ghu_" + "16C7e42F292c6912E7710c838347Ae178B4a", id="github-user-token"),
    pytest.param("ghs_" + "16C7e42F292c6912E7710c838347Ae178B4a", id="github-app-token"),
    pytest.param("ghr_" + "16C7e42F292c6912E7710c838347Ae178B4a", id="github-refresh-token"),
    pytest.param("github_pat_" + "11ABCDEFG0abcdefghijkl_mnopqrstuvwxyzABCDEFGHIJ0123456789abcdefghijklmnopqrstu",
                 id="github-fine-grained-token"),
    pytest.param("glpat-" + "9Zx7Qw3Er5Ty1Ui8Op2A", id="gitlab-token"),
    pytest.param("xoxb-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", id="slack-bot-token"),
    pytest.param("xoxp-" + "123456789012-123456789012-1234567890123-0123456789abcdef", id="slack-user-token"),
    pytest.param("sk_" + "live_" + "4eC39HqLyjWDarjtT1zdp7dc", id="stripe-secret-key"),
    pytest.param("AIza" + "SyA-1234567890abcdefghijklmnopqrstu", id="google-api-key"),
    pytest.param("hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ01234567", id="hugging-face-token"),
    pytest.param("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
                 "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", id="jwt"),
    pytest.param("https://hooks.slack.com/services/" + "T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX", id="slack-webhook"),
    pytest.param("https://discord.com/api/webhooks/" + "123456789012345678/abcDEF_ghiJKL-mnoPQR", id="discord-webhook"),
    pytest.param("https://lab.webhook.office.com/webhookb2/" + "1234/IncomingWebhook/abcd/5678", id="teams-webhook"),
    pytest.param("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----", id="pem-private-key"),
    pytest.param("-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBF\n-----END PGP PRIVATE KEY BLOCK-----", id="pgp-private-key"),
    # High entropy, no known prefix: what `openssl rand` and the like print.
    pytest.param("gCop/L9UVK0vxRzf7yE4eleN4jy7kqMkKR26WHwC", id="aws-secret-access-key-shaped"),
    pytest.param("z+dw749SJFUNbJVJSADO6WkJm5LgfiIgIlM0oK9jHT0=", id="base64-32-bytes"),
    pytest.param("estJNwRxxSfdyCgm3axhgoDqgWVKrtbzV-SR_fIEzGI", id="base64url-32-bytes"),
    pytest.param("me2LUldmu80z01Ymk0dJLw", id="base64url-16-bytes"),
    pytest.param("OtJG05wf14ovMoIU7mfNQMmzHZkNIiY8Jw5H", id="alphanumeric-36"),
    pytest.param("40eff3bd836a3afa1f6be59f94a2c877", id="hex-16-bytes"),
    pytest.param("1d5e8d89d9a61bf150080f075f00c09d04fe5cfdddba184828b5e1dbfdca2383", id="hex-32-bytes"),
]


@pytest.mark.parametrize("value", CREDENTIALS)
def test_a_value_that_is_a_credential_is_redacted_whole(value: str) -> None:
    assert redact_value(value) == REDACTED
    assert without_secrets({"SOME_SETTING": value}) == {"SOME_SETTING": REDACTED}


# --- What stays ----------------------------------------------------------------------------------

ORDINARY_VALUES = [
    pytest.param("/opt/conda/envs/pytorch-2.4/bin:/usr/local/cuda-12.4/bin:/usr/local/sbin:/usr/local/bin:/usr/bin",
                 id="path"),
    pytest.param("/usr/local/nvidia/lib:/usr/local/nvidia/lib64:/usr/local/cuda/lib64", id="ld-library-path"),
    pytest.param("/home/ada/src:/opt/conda/envs/pytorch-2.4/lib/python3.11/site-packages", id="pythonpath"),
    pytest.param("/opt/conda/envs/pytorch-2.4", id="conda-prefix"),
    pytest.param("12.4.1", id="cuda-version"),
    pytest.param("cuda>=12.4 brand=tesla,driver>=470,driver<471 brand=nvidia,driver>=470,driver<471", id="nvidia-require-cuda"),
    pytest.param("libnccl2=2.21.5-1+cuda12.4", id="package-pin"),
    pytest.param("sha256:" + "9b2c6e1f0a8d7e4b3c5f2a1d0e9b8c7f6a5d4e3b2c1f0a9e8d7c6b5a4f3e2d1c", id="image-digest"),
    pytest.param("127.0.0.1:5000/lab/pytorch@sha256:9b2c6e1f0a8d7e4b3c5f2a1d0e9b8c7f6a5d4e3b2c1f0a9e8d7c6b5a4f3e2d1c",
                 id="image-by-digest"),
    pytest.param("nvcr.io/nvidia/pytorch:24.10-py3", id="image-by-tag"),
    pytest.param("GPU-5fb1e2a3-9c4d-4e7f-8a1b-2c3d4e5f6a7b", id="gpu-uuid"),
    pytest.param("GPU-5fb1e2a3-9c4d-4e7f-8a1b-2c3d4e5f6a7b,GPU-0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", id="gpu-uuids"),
    pytest.param("MIG-GPU-5fb1e2a3-9c4d-4e7f-8a1b-2c3d4e5f6a7b/1/0", id="mig-legacy-id"),
    pytest.param("MIG-4f3e2d1c-9a8b-5c7d-8e6f-0a1b2c3d4e5f", id="mig-uuid"),
    pytest.param("gpu-node-07.cluster.example.org", id="hostname"),
    pytest.param("8", id="omp-num-threads"),
    pytest.param("en_US.UTF-8", id="locale"),
    pytest.param("compute,utility", id="driver-capabilities"),
    pytest.param("expandable_segments:True,garbage_collection_threshold:0.6", id="pytorch-alloc-conf"),
    pytest.param("--xla_gpu_enable_triton_softmax_fusion=true --xla_gpu_triton_gemm_any=True", id="xla-flags"),
    pytest.param("7.0;7.5;8.0;8.6;8.9;9.0+PTX", id="torch-cuda-arch-list"),
    pytest.param("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", id="model-name"),
    pytest.param("meta-llama/Meta-Llama-3.1-405B-Instruct-FP8", id="model-name-with-version"),
    pytest.param("OpenGVLab/InternVL2-Llama3-76B", id="model-name-camel-case"),
    pytest.param("HuggingFaceH4/zephyr-7b-beta", id="model-name-mixed"),
    pytest.param("ExperimentName2024DecemberRun3", id="run-name"),
    pytest.param("s3://lab-datasets/imagenet/ILSVRC2012_img_train", id="bucket-url"),
    pytest.param("https://git.example.org/lab/pytorch", id="plain-url"),
    pytest.param("https://host.example.org/search?q=a@b&sort_by=date", id="url-with-harmless-query"),
    pytest.param("ada@example.org", id="email"),
    pytest.param("27000@flexlm", id="license-server"),
    pytest.param("rs=0:di=01;34:ln=01;36:mh=00:pi=40;33", id="ls-colors"),
    pytest.param("https://x.example.org/?token=", id="empty-query-token"),
    pytest.param("Europe/Berlin", id="timezone"),
]


@pytest.mark.parametrize("value", ORDINARY_VALUES)
def test_ordinary_values_are_kept(value: str) -> None:
    assert redact_value(value) == value


@pytest.mark.parametrize(
    ("name", "kept"),
    [("GIT_COMMIT", True), ("CI_COMMIT_SHA", True), ("SOURCE_DIGEST", True), ("MLFLOW_RUN_ID", True), ("LAB_SETTING", False)],
    ids=["commit", "commit-sha", "digest", "run-id", "other-name"],
)
def test_a_hex_value_is_kept_only_in_a_variable_named_for_a_hash_or_an_id(name: str, kept: bool) -> None:
    value = "40eff3bd836a3afa1f6be59f94a2c877d9a61bf1"
    assert without_secrets({name: value}) == {name: value if kept else REDACTED}


@pytest.mark.parametrize(
    "value", [pytest.param(p.values[0], id=p.id) for p in PARTLY_SECRET + CREDENTIALS + ORDINARY_VALUES],
)
def test_redacting_twice_changes_nothing(value: str) -> None:
    once = redact_value(value)
    assert redact_value(once) == once
    env = {"SOME_SETTING": value, "APP_SECRETKEY": value}
    assert without_secrets(without_secrets(env)) == without_secrets(env)



@pytest.mark.parametrize(
    "value",
    ["https://" * 5000, "eyJ" + "a." * 50000, "a@" * 50000, "https://" + "a:" * 50000, "x=1&" * 25000,
     "0" * 100000 + "g", ("Ab1" * 10 + "/") * 3000],
    ids=["many-schemes", "dotted-run", "many-ats", "long-userinfo", "many-parameters", "long-hex-run", "long-base64-runs"],
)
def test_a_hostile_value_of_100_kb_is_redacted_in_linear_time(value: str) -> None:
    # A backtracking pattern took 8 s on such a value; a spawn must not wait on its environment's text.
    started = time.perf_counter()
    redact_value(value)
    assert time.perf_counter() - started < 1.5

# --- The admin's names ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("MYCORP_*", "GPUSpawner.audit_redact_names is 'MYCORP_*'; allowed: a list of"),
        (["OK", "MY VAR"], "GPUSpawner.audit_redact_names[1] is 'MY VAR'; allowed: an environment variable name"),
        ([""], "GPUSpawner.audit_redact_names[0] is ''; allowed: an environment variable name"),
        (["OK", 3], "GPUSpawner.audit_redact_names[1] is 3; allowed: an environment variable name"),
    ],
    ids=["not-a-list", "space", "empty", "not-text"],
)
def test_bad_redact_names_stop_the_hub_with_a_message_naming_the_setting(value: Any, message: str) -> None:
    from gpuspawner.hubconfig import spawner_settings
    from gpuspawner.spawner import GPUSpawner
    from gpuspawner.upkeep import checked_config

    with pytest.raises(ConfigError) as e:
        parse_redact_names(value, where="GPUSpawner.audit_redact_names")
    assert str(e.value).startswith(message)
    config = Config({"GPUSpawner": {"audit_redact_names": value}})
    if isinstance(value, str):  # traitlets takes one name for a list of one, which is then fine
        assert spawner_settings(config).audit_redact_names == checked_config(config).audit_redact_names == [value]
        return
    if not all(isinstance(v, str) for v in value):  # traitlets' own type check says it first
        message = "The 'audit_redact_names' trait of a GPUSpawner instance contains an Unicode of a List which expected a unicode string, not the int 3."
    for check in (spawner_settings, checked_config):  # the commands' check, and the hub's at start
        with pytest.raises(ConfigError) as e:
            check(config)
        assert str(e.value).startswith(message)
    with pytest.raises(TraitError, match=re.escape(message)):
        GPUSpawner(config=config)
