"""JupyterHub configuration for a shared GPU server with gpuspawner.

`make run` starts the hub with this file, and the hub image (docker/hub) ships it. Copy it
and edit it for your lab: every section says what it does and what to change. The settings an
admin changes most can also come from the environment:

    GPUSPAWNER_IP            address the public proxy listens on        (default 127.0.0.1)
    GPUSPAWNER_PORT          its port                                    (default 8000)
    GPUSPAWNER_DATA_DIR      hub and audit databases, cookie secret,     (default ./.data)
                             generated passwords
    GPUSPAWNER_ADMIN_USERS   comma-separated admin user names            (default: none)
    GPUSPAWNER_AUTH          how people log in: native (each person's own account, approved
                             by an admin) or shared-password (a loopback demo; `make run`
                             sets it)                                    (default: native)
    GPUSPAWNER_NETWORK       Docker network the user containers join; set it when the hub
                             itself runs in a container on that network  (default: the host's
                             default bridge)
    GPUSPAWNER_HUB_CONNECT_IP  how containers reach the hub on that network (default: the hub
                             container's host name)
    GPUSPAWNER_IMAGE         image of the CPU-only profile               (default: a pinned
                             Jupyter Docker Stacks image; `make run` sets a locally built one)
    GPUSPAWNER_GPU_IMAGE     image of the GPU profiles                   (default: a pinned
                             CUDA PyTorch image of Jupyter Docker Stacks)
    GPUSPAWNER_IDLE_TIMEOUT  seconds of inactivity before a server is stopped and its GPUs
                             given back (default 3600; 0 turns culling off)
    GPUSPAWNER_METRICS_TOKEN a token Prometheus uses to scrape /hub/metrics (default: none);
                             it reads the audit witness's /services/audit/metrics too
    GPUSPAWNER_AUDIT_KEY_FILE  the audit log's sealing key, in a folder of its own apart from
                             the data folder; the log's head file goes beside it (default:
                             both in the data folder)
    GPUSPAWNER_AUDIT_SERVICE_URL  where the audit service runs when the hub does not start it
                             (a container of its own, e.g. http://audit:10101; default: the
                             hub starts it)
    GPUSPAWNER_AUDIT_SERVICE_TOKEN  that service's API token (default: generated beside the
                             sealing key, audit-service.token)

Login. By default each person has an account of their own (NativeAuthenticator): they sign
up at /hub/signup, and an admin listed in GPUSPAWNER_ADMIN_USERS authorises them at
/hub/authorize. Admins sign up too, under their listed names, and are authorised at once: sign
them up as soon as the hub first starts, before others can reach it. For a real lab you may
prefer your institution's logins (see "Login" below).
"""

import os
import secrets
import socket
import sys
from pathlib import Path

c = get_config()  # noqa: F821 - provided by JupyterHub when it loads this file

here = Path(__file__).resolve().parent
data_dir = Path(os.environ.get("GPUSPAWNER_DATA_DIR", here / ".data")).resolve()
data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
network = os.environ.get("GPUSPAWNER_NETWORK", "")


def secret_file(name: str, *, length: int, folder: Path = data_dir) -> str:
    """A secret kept in `folder` (the data dir), created with mode 0600 on first use."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / name
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(length)[:length] + "\n")
        print(f"jupyterhub_config.py: created {path} (mode 0600)", file=sys.stderr)
    return path.read_text().strip()


def docker_bridge_address() -> str:
    """The host's address on Docker's default bridge, where user containers reach the hub.

    Binding the hub's own port there (not 0.0.0.0) keeps it off the machine's other networks.
    """
    import ipaddress

    import docker

    try:
        client = docker.from_env(version="auto", timeout=10)
        for cfg in client.api.inspect_network("bridge")["IPAM"]["Config"]:
            net = ipaddress.ip_network(cfg["Subnet"])
            if net.version == 4:
                return str(cfg.get("Gateway") or net[1])
    except Exception as e:  # no engine yet: the hub still starts, containers cannot reach it
        print(f"jupyterhub_config.py: Docker engine not reachable ({e}); hub API on 127.0.0.1", file=sys.stderr)
    return "127.0.0.1"


# --- The hub ----------------------------------------------------------------------------
c.JupyterHub.ip = os.environ.get("GPUSPAWNER_IP", "127.0.0.1")
c.JupyterHub.port = int(os.environ.get("GPUSPAWNER_PORT", "8000"))
c.JupyterHub.db_url = f"sqlite:///{data_dir / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(data_dir / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(data_dir / "jupyterhub-proxy.pid")
if network:
    # The hub runs in a container on `network` (docker-compose.yml): it listens on that
    # network only, and user containers reach it by its name there.
    c.JupyterHub.hub_ip = "0.0.0.0"
    c.JupyterHub.hub_connect_ip = os.environ.get("GPUSPAWNER_HUB_CONNECT_IP", socket.gethostname())
    c.DockerSpawner.network_name = network
    c.DockerSpawner.use_internal_ip = True
else:
    c.JupyterHub.hub_ip = docker_bridge_address()

# --- Login --------------------------------------------------------------------------------
# Every server, GPU quota and audit record belongs to a user name, so a name must mean one
# person. GPUSPAWNER_AUTH chooses how people prove theirs:
#   native           (default) NativeAuthenticator: each person signs up at /hub/signup with
#                    their own name and password and can log in once an admin has authorised
#                    them at /hub/authorize. Names in GPUSPAWNER_ADMIN_USERS are authorised when
#                    they sign up: claim them before the hub is reachable by others.
#   shared-password  one generated password ($GPUSPAWNER_DATA_DIR/user-password) for everyone,
#                    who may then log in under ANY name: no quota, group or audit record can be
#                    trusted. For a demo on this machine only (`make run`): refused unless the
#                    hub listens on a loopback address, or GPUSPAWNER_SHARED_PASSWORD_ANYWHERE=1.
# To use your institution's logins instead, replace this block, e.g.
#   c.JupyterHub.authenticator_class = "pam"                 # the server's Unix accounts
#   c.JupyterHub.authenticator_class = "github"              # pip install oauthenticator; set
#   c.GitHubOAuthenticator.oauth_callback_url / client_id / client_secret / allowed_organizations
#   c.JupyterHub.authenticator_class = "generic-oauth"       # Keycloak, Entra ID, … (OIDC)
#   c.JupyterHub.authenticator_class = "ldapauthenticator.LDAPAuthenticator"  # pip install
#   jupyterhub-ldapauthenticator; set c.LDAPAuthenticator.server_address / bind_dn_template
# and say who may log in (c.Authenticator.allowed_users, or the authenticator's own groups or
# organisations) rather than allow_all.
#
# User names become parts of container and volume names and of audit exports (CSV opened in a
# spreadsheet): lowercase letters, digits, "-", "_" and ".", starting with a letter, at most 32.
# Login names are lowercased first. Widen it if your institution's names need more.
c.Authenticator.username_pattern = r"^[a-z][a-z0-9._-]{0,31}$"
admins = {name.strip() for name in os.environ.get("GPUSPAWNER_ADMIN_USERS", "").split(",") if name.strip()}
c.Authenticator.admin_users = admins
auth = os.environ.get("GPUSPAWNER_AUTH", "native")
if auth == "native":
    # NativeAuthenticator, its login page mended for JupyterHub 6 (see gpuspawner/auth.py)
    from gpuspawner.auth import TEMPLATE_DIR, LabNativeAuthenticator

    c.JupyterHub.authenticator_class = LabNativeAuthenticator
    c.JupyterHub.template_paths = [TEMPLATE_DIR]  # its pages, for errors on the login form too
    # NativeAuthenticator lets in only the accounts an admin authorised; the hub adds no list
    # of its own.
    c.Authenticator.allow_all = True
    c.NativeAuthenticator.open_signup = False
    c.NativeAuthenticator.minimum_password_length = 10
    c.NativeAuthenticator.check_common_password = True
    c.NativeAuthenticator.allowed_failed_logins = 5  # then that name waits 10 minutes
    c.NativeAuthenticator.seconds_before_next_try = 600
elif auth == "shared-password":
    import ipaddress

    def is_loopback(host: str) -> bool:
        try:
            return host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    if not is_loopback(c.JupyterHub.ip) and os.environ.get("GPUSPAWNER_SHARED_PASSWORD_ANYWHERE") != "1":
        raise ValueError(
            f"GPUSPAWNER_AUTH=shared-password lets anyone who knows the one password log in under any name, "
            f"and the hub would listen on {c.JupyterHub.ip or 'every address'} (GPUSPAWNER_IP), not only on "
            f"this machine. Use GPUSPAWNER_AUTH=native (each person's own account), or set "
            f"GPUSPAWNER_SHARED_PASSWORD_ANYWHERE=1 if you really mean it."
        )
    c.JupyterHub.authenticator_class = "shared-password"
    c.SharedPasswordAuthenticator.user_password = secret_file("user-password", length=24)
    c.Authenticator.allow_all = True  # anyone who knows the shared password, under any name
    if admins:
        c.SharedPasswordAuthenticator.admin_password = secret_file("admin-password", length=40)
else:
    raise ValueError(f"GPUSPAWNER_AUTH is {auth!r}; it must be 'native' or 'shared-password'.")
# The home page warns before a time limit stops a server, and says why the hub stopped one
# (gpuspawner/reclaim.py); gpuspawner's page comes first, then the authenticator's.
from gpuspawner.reclaim import HUB_TEMPLATES, page_notices  # noqa: E402

c.JupyterHub.template_paths = [HUB_TEMPLATES, *(c.JupyterHub.template_paths if "template_paths" in c.JupyterHub else [])]
c.JupyterHub.template_vars = {"gpuspawner_notices": page_notices}
# Groups decide who may use which profile. Manage them in the admin page (/hub/admin) or here:
c.JupyterHub.load_groups = {"ml-lab": {"users": []}, "course": {"users": []}}

# --- Servers: gpuspawner --------------------------------------------------------------------
c.JupyterHub.spawner_class = "gpu"
c.JupyterHub.allow_named_servers = True  # one user, several servers (one per experiment)
c.JupyterHub.named_server_limit_per_user = 4
c.DockerSpawner.remove = True  # containers go when servers stop; user work lives in the volume
c.DockerSpawner.volumes = {"gpuspawner-{username}": "/home/jovyan/work"}
c.Spawner.start_timeout = 600  # first pull of a CUDA image can take minutes
c.Spawner.http_timeout = 120

cpu_image = os.environ.get("GPUSPAWNER_IMAGE", "quay.io/jupyter/scipy-notebook:2026-08-24")
gpu_image = os.environ.get("GPUSPAWNER_GPU_IMAGE", "quay.io/jupyter/pytorch-notebook:cuda12-2026-08-24")
# An image pinned by digest can never change under its name, e.g.
#   "quay.io/jupyter/pytorch-notebook@sha256:<64 hex digits>"
# (`docker buildx imagetools inspect <image:tag>` prints the digest of a tag). The multi-GPU
# profile below takes it from GPUSPAWNER_GPU_IMAGE_DIGEST, and the tag-pinned image otherwise.
gpu_image_by_digest = os.environ.get("GPUSPAWNER_GPU_IMAGE_DIGEST") or gpu_image

c.GPUSpawner.profiles = [
    {
        "slug": "cpu",
        "display_name": "CPU only",
        "description": "Data wrangling, plots, writing. No GPU.",
        "image": cpu_image,
        "cpu_limit": 2,
        "mem_limit": "8G",
        "default": True,
    },
    {
        "slug": "gpu-1",
        "display_name": "1 GPU · PyTorch",
        "description": "One whole GPU of any model.",
        "image": gpu_image,
        "gpus": 1,
        "cpu_limit": 8,
        "mem_limit": "64G",
    },
    {
        "slug": "a100-2",
        "display_name": "2 × A100 · PyTorch",
        "description": "Two A100s of at least 40 GiB, close together on the PCIe bus, for multi-GPU training.",
        "image": gpu_image_by_digest,
        "gpus": {"count": 2, "model": "A100", "min_memory": "40G"},
        "cpu_limit": 16,
        "mem_limit": "128G",
        "environment": {"NCCL_DEBUG": "WARN"},
        "allowed_groups": ["ml-lab"],
    },
    {
        "slug": "mig-small",
        "display_name": "MIG 1g.10gb slice · PyTorch",
        "description": "A seventh of an A100 80GB: enough for notebooks and small models.",
        "image": gpu_image,
        "gpus": {"mig_profile": "1g.10gb"},
        "cpu_limit": 2,
        "mem_limit": "16G",
    },
    {
        "slug": "course",
        "display_name": "Course · MIG slice",
        "description": "For the course: one MIG slice per student.",
        "image": gpu_image,
        "gpus": {"mig_profile": "1g.10gb"},
        "cpu_limit": 1,
        "mem_limit": "8G",
        "allowed_groups": ["course"],
    },
]
c.GPUSpawner.max_gpus_per_user = 2  # across a user's named servers
c.GPUSpawner.max_gpus_per_group = {"course": 1, "ml-lab": 4}
c.GPUSpawner.gpu_wait_timeout = 0  # fail at once when nothing is free; e.g. 300 to queue

services: list = []
roles: list = []

# --- Idle culling: idle servers stop, and their GPUs go back ------------------------------------
idle_timeout = int(os.environ.get("GPUSPAWNER_IDLE_TIMEOUT", "3600"))
if idle_timeout:
    services.append({
        "name": "idle-culler",
        "command": [sys.executable, "-m", "jupyterhub_idle_culler", f"--timeout={idle_timeout}"],
    })
    roles.append({
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    })

# --- Metrics: Prometheus scrapes /hub/metrics with this token ----------------------------------
metrics_token = os.environ.get("GPUSPAWNER_METRICS_TOKEN", "")
if metrics_token:
    services.append({"name": "prometheus", "api_token": metrics_token})
    roles.append({"name": "metrics", "scopes": ["read:metrics"], "services": ["prometheus"]})

c.JupyterHub.services = services
c.JupyterHub.load_roles = roles

# --- The audit log: every server's environment, at /services/audit/ (admins: all; users: their own) ---
# The sealing key and the log's head file live apart from the audit database (docker-compose.yml: a
# volume of their own, written by the hub only; GPUSPAWNER_AUDIT_KEY_FILE). The audit service is also the
# log's witness: in docker-compose.yml it runs in a container of its own (GPUSPAWNER_AUDIT_SERVICE_URL),
# keeping the heads it has seen where the hub cannot write.
from gpuspawner.service import audit_service, external_audit_service, users_read_own_records  # noqa: E402


def moved_audit_file(path: Path) -> Path:
    """`path`, where an audit file (the sealing key, the head file) now lives; one an earlier
    deployment kept in the data folder is moved there first (a new key would not open the
    existing log, and a new head file would forget how far it reached)."""
    old = data_dir / path.name
    if path.exists() or not old.exists() or old.resolve() == path.resolve():
        return path
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".moving")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(old.read_text())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        old.unlink()
        print(f"jupyterhub_config.py: moved {old} to {path}", file=sys.stderr)
    except OSError as e:  # the audit service's read-only mounts: the hub moves it
        print(f"jupyterhub_config.py: {old} is still there ({path}: {e.strerror or e})", file=sys.stderr)
    return path


audit_key_file = os.environ.get("GPUSPAWNER_AUDIT_KEY_FILE", "")
if audit_key_file:
    # The head file goes beside the key, apart from the database: whoever can write the database
    # (or restore an old copy of its volume) cannot move the head back with it.
    c.GPUSpawner.audit_key_file = str(moved_audit_file(Path(audit_key_file)))
    c.GPUSpawner.audit_head_file = str(moved_audit_file(Path(audit_key_file).with_name("gpuspawner-audit.head")))
audit_service_url = os.environ.get("GPUSPAWNER_AUDIT_SERVICE_URL", "")
if audit_service_url:
    token_folder = Path(audit_key_file).parent if audit_key_file else data_dir
    external_audit_service(
        c, url=audit_service_url,
        api_token=os.environ.get("GPUSPAWNER_AUDIT_SERVICE_TOKEN") or secret_file("audit-service.token", length=64, folder=token_folder),
    )
else:
    audit_service(c, config_file=__file__)
# Every user reads the records of their own servers there (CSV, JSONL, RO-Crate, the docker run line), and
# gets 403 for anyone else's; admins (and holders of custom:gpuspawner-audit:read) read everyone's.
users_read_own_records(c)

# --- The GPU page: every device, who holds it, its last hour, GPU-hours this month, at /services/gpus/ ---
# Admins and the audit's readers see it; it reads the hub's metrics with a token of its own (read:metrics).
from gpuspawner.gpupage import gpu_page_service  # noqa: E402

gpu_page_service(c, config_file=__file__)
