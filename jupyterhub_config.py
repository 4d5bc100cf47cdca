"""JupyterHub configuration for a shared GPU server with gpuspawner.

`make run` starts the hub with this file; copy it and edit it for your lab. Every setting an
admin is likely to change can also come from the environment:

    GPUSPAWNER_IP           address the hub's public proxy listens on   (default 127.0.0.1)
    GPUSPAWNER_PORT         its port                                     (default 8000)
    GPUSPAWNER_DATA_DIR     hub database, cookie secret, passwords       (default ./.data)
    GPUSPAWNER_IMAGE        the single-user image                        (default: DockerSpawner's,
                            quay.io/jupyterhub/singleuser:<hub version>; `make run` sets a local one)
    GPUSPAWNER_ADMIN_USERS  comma-separated admin user names             (default: none)

Login. The default authenticator is JupyterHub's shared-password one: every user logs in
with one password, generated on first start into $GPUSPAWNER_DATA_DIR/user-password (mode
0600); admins listed in GPUSPAWNER_ADMIN_USERS use $GPUSPAWNER_DATA_DIR/admin-password. No
login works without a password, so exposing the port (GPUSPAWNER_IP=0.0.0.0) is not an open
door, but for a real lab switch to your institution's logins:

    c.JupyterHub.authenticator_class = "pam"          # the server's Unix accounts
    c.JupyterHub.authenticator_class = "github"       # pip install oauthenticator, then see its docs
    c.JupyterHub.authenticator_class = "ldapauthenticator.LDAPAuthenticator"   # pip install jupyterhub-ldapauthenticator
"""

import os
import secrets
import sys
from pathlib import Path

c = get_config()  # noqa: F821 - provided by JupyterHub when it loads this file

here = Path(__file__).resolve().parent
data_dir = Path(os.environ.get("GPUSPAWNER_DATA_DIR", here / ".data")).resolve()
data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


def secret_file(name: str, *, length: int) -> str:
    """A secret kept in the data dir, created with mode 0600 on first use."""
    path = data_dir / name
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
c.JupyterHub.hub_ip = docker_bridge_address()
c.JupyterHub.db_url = f"sqlite:///{data_dir / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(data_dir / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(data_dir / "jupyterhub-proxy.pid")

# --- Login (see the module docstring to switch authenticators) ---------------------------
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = secret_file("user-password", length=24)
c.Authenticator.allow_all = True  # anyone who knows the shared password may have an account
admins = {name.strip() for name in os.environ.get("GPUSPAWNER_ADMIN_USERS", "").split(",") if name.strip()}
if admins:
    c.Authenticator.admin_users = admins
    c.SharedPasswordAuthenticator.admin_password = secret_file("admin-password", length=40)

# --- Spawner ------------------------------------------------------------------------------
c.JupyterHub.spawner_class = "gpu"
if os.environ.get("GPUSPAWNER_IMAGE"):
    c.DockerSpawner.image = os.environ["GPUSPAWNER_IMAGE"]
# Every server's environment is recorded (gpuspawner-audit.sqlite beside the hub database);
# admins browse and download the records at /services/audit/.
from gpuspawner.service import audit_service  # noqa: E402

audit_service(c, config_file=__file__)
# Containers are removed when servers stop; user work belongs in volumes.
c.DockerSpawner.remove = True
c.DockerSpawner.volumes = {"gpuspawner-{username}": "/home/jovyan/work"}
