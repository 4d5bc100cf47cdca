"""A real JupyterHub process for end-to-end tests, driven through its REST API."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from . import free_port, wait_for

BIN = Path(sys.executable).parent


def chp_path() -> str | None:
    """configurable-http-proxy as the hub will find it: the venv's bin first, then PATH."""
    return shutil.which("configurable-http-proxy", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


@dataclass
class HubSetup:
    """What a test hub is made of; `extra` is appended to the generated jupyterhub_config.py."""

    workdir: Path
    image: str
    hub_ip: str
    token: str
    hub_id: str
    extra: str = ""
    spawner_class: str = "gpu"  # "docker" for DockerSpawner itself (benchmarks compare the two)
    debug: bool = True  # the benchmarks log less, so logging costs neither spawner time
    configure_hub_id: bool = True  # False: the hub makes and keeps its own (gpuspawner-hub-id)
    hostname: str | None = None  # run the hub in a UTS namespace of its own with this host name
    env: dict[str, str] = field(default_factory=dict)  # added to the hub's environment (benchmarks: PYTHONPATH)
    proxy_port: int = field(default_factory=free_port)
    hub_port: int = field(default_factory=free_port)
    proxy_api_port: int = field(default_factory=free_port)


class RunningHub:
    """One jupyterhub process (with its configurable-http-proxy), started and stopped by a test."""

    def __init__(self, settings: HubSetup) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.proxy_port}"
        self.api_url = f"{self.url}/hub/api"
        self.config_file = settings.workdir / "jupyterhub_config.py"
        self.log_file = settings.workdir / "hub.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"token {settings.token}"
        self._write_config()

    def _write_config(self) -> None:
        s = self.settings
        self.config_file.write_text(
            f"""
c = get_config()  # noqa
c.JupyterHub.spawner_class = {s.spawner_class!r}
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {s.proxy_port}
c.JupyterHub.hub_ip = {s.hub_ip!r}
c.JupyterHub.hub_port = {s.hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{s.proxy_api_port}"
c.ConfigurableHTTPProxy.pid_file = {str(s.workdir / 'proxy.pid')!r}
c.JupyterHub.db_url = {'sqlite:///' + str(s.workdir / 'jupyterhub.sqlite')!r}
c.JupyterHub.cookie_secret_file = {str(s.workdir / 'cookie_secret')!r}
c.JupyterHub.cleanup_servers = True
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.services = [{{"name": "test-driver", "api_token": {s.token!r}}}]
c.JupyterHub.load_roles = [{{
    "name": "test-driver",
    "scopes": ["admin:users", "admin:groups", "admin:servers", "access:servers", "read:hub"],
    "services": ["test-driver"],
}}]
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 60
c.DockerSpawner.image = {s.image!r}
c.DockerSpawner.remove = True
c.DockerSpawner.prefix = {'t-' + s.hub_id!r}
{f"c.GPUSpawner.hub_id = {s.hub_id!r}" if s.configure_hub_id else ""}
{s.extra}
"""
        )

    def start(self, *, timeout: float = 60) -> RunningHub:
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **self.settings.env,
               "PYTHONFAULTHANDLER": "1"}  # a crash of the hub process leaves its threads' stacks in hub.log
        log = open(self.log_file, "ab")
        command = [str(BIN / "jupyterhub"), "-f", str(self.config_file), *(["--debug"] if self.settings.debug else [])]
        if self.settings.hostname:  # as a hub whose container was recreated: same data, another host name
            command = ["unshare", "--uts", "sh", "-c", f'hostname {self.settings.hostname} && exec "$@"', "hub", *command]
        self.process = subprocess.Popen(
            command,
            cwd=self.settings.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            wait_for(self._answers, timeout=timeout, what=f"the hub at {self.api_url}")
        except TimeoutError as e:
            raise RuntimeError(f"{e}\n--- hub log ---\n{self.log_tail()}") from None
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"the hub exited with {self.process.returncode}\n--- hub log ---\n{self.log_tail()}")
        try:
            return self.session.get(f"{self.api_url}/", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    # --- REST API -----------------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return self.session.request(method, f"{self.api_url}{path}", **kwargs)

    def create_user(self, name: str) -> None:
        r = self.api("POST", f"/users/{name}")
        assert r.status_code in (201, 409), r.text

    def server_model(self, user: str, server: str = "") -> dict[str, Any] | None:
        r = self.api("GET", f"/users/{user}")
        r.raise_for_status()
        servers: dict[str, Any] = r.json().get("servers", {})
        return servers.get(server)

    def spawn(self, user: str, *, options: dict[str, Any] | None = None) -> requests.Response:
        self.create_user(user)
        return self.api("POST", f"/users/{user}/server", json=options or {})

    def spawn_named(self, user: str, server: str, *, options: dict[str, Any] | None = None) -> requests.Response:
        self.create_user(user)
        return self.api("POST", f"/users/{user}/servers/{server}", json=options or {})

    def wait_ready(self, user: str, server: str = "", *, timeout: float = 120) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            model = self.server_model(user, server)
            if model is None:
                raise AssertionError(f"{user}'s server {server!r} went away while starting\n{self.log_tail()}")
            return model if model.get("ready") else None

        try:
            return wait_for(ready, timeout=timeout, interval=0.5, what=f"{user}'s server {server!r} to be ready")  # type: ignore[no-any-return]
        except TimeoutError as e:
            raise AssertionError(f"{e}\n--- hub log ---\n{self.log_tail()}") from None

    def stop_server(self, user: str, *, timeout: float = 60) -> None:
        r = self.api("DELETE", f"/users/{user}/server")
        assert r.status_code in (202, 204), r.text
        wait_for(lambda: self.server_model(user) is None, timeout=timeout, interval=0.5, what=f"{user}'s server to stop")

    def user_get(self, user: str, path: str) -> requests.Response:
        """GET a path of the user's single-user server, through the hub's proxy, with our token."""
        return self.session.get(f"{self.url}/user/{user}/{path.lstrip('/')}", timeout=30)

    # --- process ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the hub as an admin would (SIGTERM); its servers are stopped on the way out."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self._kill_proxy()

    def kill(self) -> None:
        """Kill the hub outright (SIGKILL), as a crash would; the proxy and containers live on."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def _kill_proxy(self) -> None:
        pid_file = self.settings.workdir / "proxy.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
