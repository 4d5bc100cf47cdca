"""A multi-host test bed: a Docker Swarm of a manager and GPU workers, each a Docker engine of its own.

Test scaffolding only; nothing here is imported by gpuspawner itself.

Design. Every node is a container of the host's engine running Debian's own dockerd (the image is
built from ``tests/testbed/swarm-node/`` on the test bed's Debian base, cached by content like the
other test images). A node container has its own network, mount, PID and cgroup namespaces, so
each engine keeps its own iptables, bridges, overlay sandboxes and state, and stopping a worker's
engine is ``docker stop`` of its container. Nodes are not ``--privileged``: a host whose bounding
set lacks a capability (CAP_SYS_RESOURCE here) refuses that, so they get every capability the
host has, no seccomp or AppArmor profile, and their entrypoint mounts sysfs and the cgroups
afresh, read-write. ``/var/lib/docker`` of each node is a named volume (overlay2 needs a
filesystem that is not itself overlayfs); ``/run`` is a tmpfs, so a restarted engine starts clean.

What is where (k is a free "slot", 1..249, chosen at start):

- ``10.213.k.0/24``: the bed's bridge network on the host's engine; the host is ``.1``, the
  manager ``.10``, worker i ``.(11+i)``, each node keeps its address across a stop and start.
- ``10.214.k.0/24``: the attachable overlay network ``gpuspawner`` that spans all nodes.
- the registry: Debian's docker-registry twice on one storage folder, on ``127.0.0.1:P`` (the
  host's engine pushes there: it trusts plain HTTP only on loopback) and on ``10.213.k.1:P``
  (the nodes pull from there, an insecure registry in their daemon.json). ``push()`` returns
  ``10.213.k.1:P/repo@sha256:...``, the reference a service uses.
- The hub (as in a real Swarm deployment: the hub and its proxy on the manager, on the overlay
  network, servers reached at their addresses on it and reaching the hub by its address there)
  keeps running as a process of this host, so that tests drive it as all other end-to-end tests
  do. Its place on the overlay is ``gpuspawner-hub``, a container on the manager attached to the
  overlay, joined to this host by a veth pair (``gpsw<id>`` here, ``169.254.k.1/30``; ``hub0``
  there, ``169.254.k.2``): this host routes the overlay subnet through it (masqueraded to the
  container's overlay address), and every TCP connection that reaches the container's overlay
  address is forwarded to ``169.254.k.1``. So a hub bound to ``hub_ip`` with
  ``hub_connect_ip`` set to ``hub_connect_ip`` is reached by servers on every node, and the hub
  and its proxy reach a server at its task's address on the overlay (``task_address()``).
- On every node, dockerd's default runtime is a stand-in for NVIDIA's container runtime
  (``swarm-node/gpuspawner-standin-runtime``): it records which ``DOCKER_RESOURCE_*`` (and
  ``NVIDIA_VISIBLE_DEVICES``) each container received, in ``<workdir>/<node>/records/<id>.json``
  on this host (``records()``, ``record()``), then runs runc.

Limits of this machine's kernel that the bed works around (a real GPU server has them): no IPVS,
so neither Swarm's routing mesh (published ports) nor a service's virtual IP works: services
must use ``EndpointSpec(mode="dnsrr")`` and be reached at their tasks' addresses.

A Swarm bug to know (docker 20.10; the code is the same in the latest swarmkit source read):
whenever a node is updated (its labels, availability or status; seemingly also its first address on an overlay
network), the manager's constraint enforcer rejects one running task of that node that holds a
generic resource (it checks the task's resources with ``genericresource.HasResource`` the wrong
way round); a replicated service then gets a new task, possibly on another GPU. The bed sets node
labels and gives every node its overlay address before any test service exists; see
``set_node_labels``.

Everything the bed makes on the host's engine carries the label ``gpuspawner.swarm-bed=<id>``;
``stop()`` removes it all, with the host's veth end, the registries and the work folder, and
``leftovers()`` says what, if anything, remains. A bed whose process died is cleaned up by the
next ``start()`` (``cleanup_stale()``).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
from docker.types import EndpointSpec, IPAMConfig, IPAMPool, ServiceMode

from . import Registry, free_port, wait_for

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NODE_DIR = HERE / "swarm-node"
BASE_IMAGE = "gpuspawner/debian-base:bookworm"
NODE_REPO = "gpuspawner-test/swarm-node"
LABEL = "gpuspawner.swarm-bed"
HOLDING = {"assigned", "accepted", "preparing", "ready", "starting", "running"}  # a task's states that hold resources
OWNER_LABEL = "gpuspawner.swarm-bed.owner"  # "<pid>:<process start time>" of the test process
WORK_ROOT = Path("/var/tmp")  # short paths: the node sockets live here, and a socket path has at most 107 bytes
OVERLAY = "gpuspawner"
HUB_CONTAINER = "gpuspawner-hub"
WARM_SERVICE = "gpuspawner-bed-warm"
STANDIN_RUNTIME = "/usr/local/bin/gpuspawner-standin-runtime"
RECORDS_IN_NODE = "/var/lib/gpuspawner-standin/records"
SOCKET_DIR_IN_NODE = "/gpuspawner"
# Networks inside every node (its own namespaces): never routed on the host, only kept off the bed's own.
NODE_BRIDGE_IP = "10.216.0.1/24"
NODE_ADDRESS_POOL = {"base": "10.215.0.0/16", "size": 24}
SWARM_ADDRESS_POOL = "10.217.0.0/16"  # overlay networks made without a subnet (Swarm's ingress)
# Linux capability numbers, for the ones the host's bounding set lacks (a node gets all the others).
CAPABILITIES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE NET_BIND_SERVICE "
    "NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN "
    "SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE "
    "MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ"
).split()


@dataclass(frozen=True)
class WorkerSpec:
    """One GPU worker: the generic resources its engine advertises (kind -> named values, as
    ``node-generic-resources`` in daemon.json), the Swarm node labels the manager gives it
    (``node.labels.*`` in constraints), the engine labels of its daemon.json (``engine.labels.*``),
    and any further daemon.json settings (e.g. the output of gpuspawner's ``node_daemon_config``,
    whose ``node-generic-resources`` and ``labels`` then add to those above)."""

    resources: Mapping[str, Sequence[str]]
    labels: Mapping[str, str] = field(default_factory=dict)
    engine_labels: Mapping[str, str] = field(default_factory=dict)
    daemon: Mapping[str, Any] = field(default_factory=dict)


DEFAULT_WORKERS = (
    WorkerSpec(
        resources={"NVIDIA-GPU": ("GPU-w1-0", "GPU-w1-1"), "NVIDIA-MIG-1g.10gb": ("MIG-w1-1-0",)},
        labels={"gpuspawner.gpu-model": "NVIDIA A100-SXM4-40GB", "gpuspawner.gpu-memory": str(40 * 2**30)},
        # as `gpuspawner swarm-node-config` writes them into daemon.json on a GPU node
        engine_labels={"gpuspawner.gpu-model": "NVIDIA A100-SXM4-40GB", "gpuspawner.nvidia-driver": "550.54.15",
                       "gpuspawner.cuda": "12.4"},
    ),
    WorkerSpec(
        resources={"NVIDIA-GPU": ("GPU-w2-0", "GPU-w2-1")},
        labels={"gpuspawner.gpu-model": "Tesla T4"},
        engine_labels={"gpuspawner.gpu-model": "Tesla T4"},
    ),
)


@dataclass
class Node:
    """One engine of the bed. ``name`` is its host name, as the manager lists it."""

    name: str
    address: str  # on the bed's network, kept across a stop and start
    container: str  # the node's container on the host's engine
    workdir: Path
    resources: Mapping[str, Sequence[str]] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    engine_labels: Mapping[str, str] = field(default_factory=dict)
    daemon: Mapping[str, Any] = field(default_factory=dict)
    node_id: str = ""  # its Swarm node ID, set once it has joined

    @property
    def socket(self) -> Path:
        return self.workdir / "run" / "docker.sock"

    @property
    def url(self) -> str:
        """The engine's API (a unix socket of this host), e.g. for docker-py's base_url."""
        return f"unix://{self.socket}"

    @property
    def records_dir(self) -> Path:
        return self.workdir / "records"

    def client(self, *, timeout: int = 60) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, version="auto", timeout=timeout)


class SwarmBedError(RuntimeError):
    """The bed could not be set up; the message says which step failed and shows the evidence."""


def node_image(host: docker.DockerClient) -> str:
    """The swarm node image (tests/testbed/swarm-node/ on the Debian base), built once per content."""
    base = subprocess.run([str(ROOT / "docker/base/build-debian-base.sh"), BASE_IMAGE], capture_output=True, text=True)
    if base.returncode != 0:
        raise SwarmBedError(f"the Debian base image {BASE_IMAGE} could not be built: {base.stderr.strip()}")
    digest = hashlib.sha256(host.api.inspect_image(BASE_IMAGE)["Id"].encode())
    for file in sorted(p for p in NODE_DIR.rglob("*") if p.is_file()):
        digest.update(b"\0" + file.relative_to(NODE_DIR).as_posix().encode() + b"\0" + file.read_bytes())
    tag = f"{NODE_REPO}:{digest.hexdigest()[:12]}"
    try:
        host.api.inspect_image(tag)
    except docker.errors.ImageNotFound:
        # apt-get inside the build reaches Debian's mirror through the host's network.
        try:
            host.images.build(path=str(NODE_DIR), tag=tag, rm=True, network_mode="host", buildargs={"BASE": BASE_IMAGE})
        except docker.errors.BuildError as e:
            log = "".join(str(line.get("stream") or line.get("error") or "") for line in e.build_log)
            raise SwarmBedError(f"building {tag} from {NODE_DIR} failed: {e.msg}\n{log[-3000:]}") from None
    return tag


def _process_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> str:
    return f"{os.getpid()}:{_process_start(os.getpid())}"


def _owner_alive(owner: str) -> bool:
    pid, _, start = owner.partition(":")
    return pid.isdigit() and _process_start(int(pid)) == start


def _missing_capabilities() -> list[str]:
    """Capabilities absent from this process's bounding set (the engine's, on this host): a node
    asks for all capabilities but these, which the kernel would refuse."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            bounding = int(line.split()[1], 16)
            return [name for bit, name in enumerate(CAPABILITIES) if not bounding >> bit & 1]
    return []


def _run(*argv: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise SwarmBedError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def _host_routes() -> list[ipaddress.IPv4Network]:
    routes = json.loads(_run("ip", "-j", "-4", "route", "show", "table", "all"))
    nets = []
    for route in routes:
        dst = route.get("dst", "")
        if dst and dst != "default" and route.get("type", "unicast") == "unicast":
            nets.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


class _Registries:
    """Debian's docker-registry on two addresses over one storage folder (see the module docstring)."""

    def __init__(self, binary: str, workdir: Path, node_side: str) -> None:
        port, storage = free_port(), workdir / "registry"
        self.host = Registry.start(binary, workdir, port=port, storage=storage, name="registry-host", wait=False)
        self.nodes = Registry.start(binary, workdir, host=node_side, port=port, storage=storage, name="registry-nodes",
                                    wait=False)
        self.host_side, self.node_side = self.host.address, self.nodes.address

    def wait(self) -> None:
        self.host.wait()
        self.nodes.wait()

    def manifest_digest(self, repo: str, tag: str) -> str:
        return self.host.manifest_digest(repo, tag)

    def stop(self) -> None:
        self.host.stop()
        self.nodes.stop()

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [self.host.process, self.nodes.process]


class SwarmBed:
    """A Swarm of one manager and ``len(workers)`` GPU workers on this machine; see the module docstring.

    Use it as a context manager, or call ``start()`` and then ``stop()`` (also registered with
    atexit). What a test uses: ``manager`` (docker-py client of the manager), ``manager_url``,
    ``workers`` / ``manager_node`` (``Node``), ``push(image)``, ``base_ref`` (``base_image`` as
    the nodes pull it), ``network``, ``hub_ip`` / ``hub_connect_ip``, ``task_address(task)``,
    ``records(node)`` / ``record(node, container_id)``, ``stop_worker(i)`` / ``start_worker(i)``.
    """

    def __init__(
        self,
        workers: Sequence[WorkerSpec] = DEFAULT_WORKERS,
        *,
        base_image: str,
        heartbeat_s: int = 1,
        host: docker.DockerClient | None = None,
    ) -> None:
        """``base_image``: an image on the host's engine that runs ``sleep`` (the light test image):
        the bed pushes it to its registry and runs it on every node (its hub gateway, and a global
        service that makes every node pull it and take its address on the overlay before any test
        service is created). ``heartbeat_s``: Swarm's dispatcher heartbeat; a stopped worker is seen
        down after a few of them."""
        self.worker_specs = list(workers)
        self.base_image = base_image
        self.heartbeat_s = heartbeat_s
        self.host = host or docker.from_env(version="auto", timeout=120)
        self.id = secrets.token_hex(3)
        self.timings: dict[str, float] = {}
        self.nodes: list[Node] = []
        self.workdir: Path | None = None
        self.slot = 0
        self.base_ref = ""
        self._registries: _Registries | None = None
        self._manager: docker.DockerClient | None = None
        self._hub_overlay_ip = ""
        self._container_ids: list[str] = []
        self._started = False

    # --- names and addresses ---------------------------------------------------------------

    @property
    def bed_network(self) -> str:
        return f"gpsw-{self.id}"

    @property
    def bed_subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.213.{self.slot}.0/24")

    @property
    def overlay_subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.214.{self.slot}.0/24")

    @property
    def link_subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"169.254.{self.slot}.0/30")

    @property
    def gateway(self) -> str:
        """This host's address on the bed's network (what node engines reach the registry at)."""
        return str(self.bed_subnet[1])

    @property
    def hub_ip(self) -> str:
        """Where a hub on this host listens so that servers on the overlay reach it (JupyterHub.hub_ip)."""
        return str(self.link_subnet[1])

    @property
    def hub_connect_ip(self) -> str:
        """What servers connect to to reach that hub (JupyterHub.hub_connect_ip): the overlay
        address of the hub's gateway on the manager (also named ``gpuspawner-hub`` there)."""
        return self._hub_overlay_ip

    @property
    def host_veth(self) -> str:
        return f"gpsw{self.id}"

    @property
    def network(self) -> str:
        """The attachable overlay network that spans every node."""
        return OVERLAY

    @property
    def registry(self) -> str:
        """The registry as the nodes reach it (host:port), for image references."""
        assert self._registries is not None
        return self._registries.node_side

    @property
    def manager_node(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return self.nodes[1:]

    @property
    def manager(self) -> docker.DockerClient:
        """docker-py client of the manager's engine (what GPUSwarmSpawner talks to)."""
        if self._manager is None:
            self._manager = self.manager_node.client(timeout=120)
        return self._manager

    @property
    def manager_url(self) -> str:
        return self.manager_node.url

    def worker(self, which: int | str | Node) -> Node:
        """A worker by index (0-based), or any node by host name ("manager", "worker1", ...)."""
        if isinstance(which, Node):
            return which
        if isinstance(which, int):
            return self.workers[which]
        (node,) = [n for n in self.nodes if n.name == which]
        return node

    # --- start ----------------------------------------------------------------------------------

    def __enter__(self) -> SwarmBed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> SwarmBed:
        """Start everything and wait until the Swarm is settled (every node ready, holding its
        address on the overlay, with ``base_image`` pulled). Raises SwarmBedError, with the
        evidence, if a step fails; what was made by then is removed."""
        binary = shutil.which("docker-registry")
        if binary is None:
            raise SwarmBedError("docker-registry is not installed (Debian package docker-registry)")
        for tool in ("ip", "nsenter"):
            if shutil.which(tool) is None:
                raise SwarmBedError(f"{tool} is not installed (Debian packages iproute2 and util-linux)")
        cleanup_stale(self.host)
        self._started = True
        atexit.register(self.stop)
        t0 = time.monotonic()
        try:
            with self._timed("node image"):
                image = node_image(self.host)
            self.workdir = Path(tempfile.mkdtemp(prefix=f"gpsw-{self.id}-", dir=WORK_ROOT))
            (self.workdir / "owner").write_text(_owner())
            with self._timed("bed network"):
                self._create_bed_network()
            self._registries = _Registries(binary, self.workdir, self.gateway)
            self._registries.wait()
            with ThreadPoolExecutor(max_workers=2) as pool:
                pushed = pool.submit(self.push, self.base_image, "gpuspawner-bed/base")
                with self._timed("engines"):
                    self._start_engines(image)
                with self._timed("swarm"):
                    self._form_swarm()
                with self._timed("push base image (in parallel)"):
                    self.base_ref = pushed.result()
            with self._timed("overlay, hub gateway, every node pulls the base image"):
                self._create_overlay()
                self._create_warm_service()  # its pulls run while the gateway's starts
                self._start_hub_gateway()
                self.wait_settled(timeout=180)
        except BaseException:
            self.stop()
            raise
        self.timings["start, in all"] = time.monotonic() - t0
        return self

    @contextlib.contextmanager
    def _timed(self, what: str) -> Iterator[None]:
        t = time.monotonic()
        yield
        self.timings[what] = time.monotonic() - t

    def _create_bed_network(self) -> None:
        taken = _host_routes()
        for network in self.host.api.networks():
            for cfg in (network.get("IPAM") or {}).get("Config") or []:
                if cfg.get("Subnet") and ":" not in cfg["Subnet"]:
                    taken.append(ipaddress.IPv4Network(cfg["Subnet"], strict=False))
        for slot in secrets.SystemRandom().sample(range(1, 250), 249):
            self.slot = slot
            wanted = (self.bed_subnet, self.overlay_subnet, self.link_subnet)
            if any(w.overlaps(t) for w in wanted for t in taken):
                continue
            try:
                self.host.api.create_network(
                    self.bed_network,
                    driver="bridge",
                    ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=str(self.bed_subnet), gateway=self.gateway)]),
                    labels={LABEL: self.id, OWNER_LABEL: _owner()},
                )
                return
            except docker.errors.APIError as e:
                if "overlap" not in str(e).lower():
                    raise
        raise SwarmBedError("no free 10.213.k.0/24, 10.214.k.0/24 and 169.254.k.0/30 for the bed's networks")

    def _start_engines(self, image: str) -> None:
        assert self.workdir is not None
        specs = [WorkerSpec(resources={})] + self.worker_specs
        for i, spec in enumerate(specs):
            name = "manager" if i == 0 else f"worker{i}"
            node = Node(
                name=name,
                address=str(self.bed_subnet[10 + i]),
                container=f"gpsw-{self.id}-{name}",
                workdir=self.workdir / name,
                resources={k: tuple(v) for k, v in spec.resources.items()},
                labels=dict(spec.labels),
                engine_labels=dict(spec.engine_labels),
                daemon=dict(spec.daemon),
            )
            self.nodes.append(node)
            self._create_node_container(node, image)
        for node in self.nodes:
            self.host.api.start(node.container)
        for node in self.nodes:
            self._wait_engine(node)

    def _daemon_json(self, node: Node) -> dict[str, Any]:
        config: dict[str, Any] = {
            "insecure-registries": [self.registry],
            "bip": NODE_BRIDGE_IP,
            "default-address-pools": [NODE_ADDRESS_POOL],
            "runtimes": {"gpuspawner-standin": {"path": STANDIN_RUNTIME}},
            "default-runtime": "gpuspawner-standin",
            "storage-driver": "overlay2",
        }
        extra = dict(node.daemon)
        resources = [f"{kind}={v}" for kind, values in node.resources.items() for v in values]
        resources += list(extra.pop("node-generic-resources", []))
        labels = [f"{k}={v}" for k, v in node.engine_labels.items()] + list(extra.pop("labels", []))
        config.update(extra)
        if resources:
            config["node-generic-resources"] = resources
        if labels:
            config["labels"] = labels
        return config

    def _create_node_container(self, node: Node, image: str) -> None:
        for sub in ("run", "records"):
            (node.workdir / sub).mkdir(parents=True)
        (node.workdir / "daemon.json").write_text(json.dumps(self._daemon_json(node), indent=1))
        labels = {LABEL: self.id, OWNER_LABEL: _owner()}
        volume = f"{node.container}-data"
        self.host.api.create_volume(volume, labels=labels)
        api = self.host.api
        host_config = api.create_host_config(
            binds={
                volume: {"bind": "/var/lib/docker", "mode": "rw"},
                str(node.workdir / "run"): {"bind": SOCKET_DIR_IN_NODE, "mode": "rw"},
                str(node.records_dir): {"bind": RECORDS_IN_NODE, "mode": "rw"},
                str(node.workdir / "daemon.json"): {"bind": "/etc/docker/daemon.json", "mode": "ro"},
            },
            cap_add=["ALL"],
            cap_drop=_missing_capabilities() or None,
            security_opt=["seccomp=unconfined", "apparmor=unconfined"],
            device_cgroup_rules=["a *:* rwm"],
            cgroupns="private",
            tmpfs={"/run": "", "/tmp": ""},
            network_mode=self.bed_network,
        )
        # What `--security-opt systempaths=unconfined` asks (the CLI's spelling): dockerd writes /proc/sys.
        host_config.update(MaskedPaths=[], ReadonlyPaths=[])
        created = api.create_container(
            image,
            command=["dockerd", "-H", "unix:///var/run/docker.sock", "-H", f"unix://{SOCKET_DIR_IN_NODE}/docker.sock"],
            name=node.container,
            hostname=node.name,
            labels=labels,
            host_config=host_config,
            networking_config=api.create_networking_config(
                {self.bed_network: api.create_endpoint_config(ipv4_address=node.address)}
            ),
        )
        self._container_ids.append(created["Id"])

    def _wait_engine(self, node: Node, *, timeout: float = 60) -> None:
        def answers() -> bool:
            state = self.host.api.inspect_container(node.container)["State"]
            if not state["Running"]:
                raise SwarmBedError(f"{node.name}'s engine exited ({state['ExitCode']}):\n{self.logs(node)}")
            if not node.socket.exists():
                return False
            try:
                with contextlib.closing(node.client(timeout=5)) as c:
                    return bool(c.ping())
            except (docker.errors.DockerException, requests.RequestException):
                return False

        try:
            wait_for(answers, timeout=timeout, interval=0.1, what=f"{node.name}'s engine")
        except TimeoutError as e:
            raise SwarmBedError(f"{e}:\n{self.logs(node)}") from None

    def _form_swarm(self) -> None:
        manager = self.manager_node
        self.manager.swarm.init(
            advertise_addr=manager.address,
            listen_addr=f"{manager.address}:2377",
            default_addr_pool=[SWARM_ADDRESS_POOL],
            subnet_size=24,
            dispatcher_heartbeat_period=self.heartbeat_s * 1_000_000_000,
        )
        manager.node_id = self.manager.info()["Swarm"]["NodeID"]
        token = self.manager.swarm.attrs["JoinTokens"]["Worker"]

        def join(node: Node) -> None:
            with contextlib.closing(node.client()) as c:
                c.swarm.join(
                    remote_addrs=[f"{manager.address}:2377"],
                    join_token=token,
                    listen_addr=f"{node.address}:2377",
                    advertise_addr=node.address,
                )
                node.node_id = c.info()["Swarm"]["NodeID"]

        with ThreadPoolExecutor(max_workers=len(self.workers) or 1) as pool:
            list(pool.map(join, self.workers))
        # Labels before any service: in Swarm (20.10 and since), every update of a node makes the
        # constraint enforcer reject one task of that node that holds a generic resource.
        for node in self.workers:
            if node.labels:
                self.set_node_labels(node, node.labels)

    def set_node_labels(self, which: int | str | Node, labels: Mapping[str, str]) -> None:
        """Replace a node's Swarm labels. Beware: Swarm's constraint enforcer then rejects one task
        holding a generic resource on that node (swarmkit bug: it tests a task's resources with
        HasResource the wrong way round), so change labels while no GPU service runs there."""
        node = self.worker(which)
        attrs = self.manager.api.inspect_node(node.node_id)
        spec = dict(attrs["Spec"], Labels=dict(labels))
        self.manager.api.update_node(node.node_id, attrs["Version"]["Index"], spec)
        node.labels = dict(labels)

    def _create_overlay(self) -> None:
        self.manager.api.create_network(
            OVERLAY,
            driver="overlay",
            attachable=True,
            ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=str(self.overlay_subnet))]),
            labels={LABEL: self.id},
        )

    def _start_hub_gateway(self) -> None:
        """The hub's place on the overlay: a container on the manager, joined to this host by a veth pair."""
        gateway = self.manager.containers.run(
            self.base_ref,
            ["sleep", "infinity"],
            name=HUB_CONTAINER,
            network=OVERLAY,
            init=True,
            detach=True,
            sysctls={"net.ipv4.ip_forward": "1"},
            labels={LABEL: self.id},
        )
        attrs = self.manager.api.inspect_container(gateway.id)
        self._hub_overlay_ip = attrs["NetworkSettings"]["Networks"][OVERLAY]["IPAddress"]
        netns_in_node = "/run/docker/netns/" + Path(attrs["NetworkSettings"]["SandboxKey"]).name
        manager_pid = self.host.api.inspect_container(self.manager_node.container)["State"]["Pid"]
        host_end, link = self.host_veth, self.link_subnet
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "hub0", "netns", f"/proc/{manager_pid}/root{netns_in_node}")
        _run("ip", "addr", "add", f"{link[1]}/{link.prefixlen}", "dev", host_end)
        _run("ip", "link", "set", host_end, "up")
        _run("ip", "route", "add", str(self.overlay_subnet), "via", str(link[2]), "dev", host_end)
        # In the gateway's namespace, with the node's own tools (its iptables is the one its dockerd uses).
        script = (
            f"ip addr add {link[2]}/{link.prefixlen} dev hub0 && ip link set hub0 up && "
            f"iptables -t nat -A POSTROUTING -s {link[1]}/32 -d {self.overlay_subnet} -j MASQUERADE && "
            f"iptables -t nat -A PREROUTING -d {self._hub_overlay_ip}/32 -p tcp -j DNAT --to-destination {link[1]}"
        )
        code, output = self.host.containers.get(self.manager_node.container).exec_run(
            ["nsenter", f"--net={netns_in_node}", "sh", "-c", script]
        )
        if code != 0:
            raise SwarmBedError(f"setting up the hub gateway failed: {output.decode(errors='replace')}")

    def _create_warm_service(self) -> None:
        """A global service on the overlay: every node pulls the base image and takes its address on
        the overlay now (that address is a node update, see set_node_labels), not under a test."""
        self.manager.services.create(
            self.base_ref,
            ["sleep", "infinity"],
            name=WARM_SERVICE,
            mode=ServiceMode("global"),
            networks=[OVERLAY],
            endpoint_spec=EndpointSpec(mode="dnsrr"),
            init=True,
            labels={LABEL: self.id},
        )

    def wait_settled(self, *, timeout: float = 120) -> None:
        """Every node ready and active, the bed's global service running on each of them, and no task of a
        removed service still holding a node's resources."""

        def settled() -> bool:
            nodes = self.manager.api.nodes()
            if len(nodes) != len(self.nodes) or any(n["Status"]["State"] != "ready" for n in nodes):
                return False
            if any(n["Spec"].get("Availability", "active") != "active" for n in nodes):
                return False
            services = {s["ID"] for s in self.manager.api.services()}
            if any(t["ServiceID"] not in services and t["Status"]["State"] in HOLDING for t in self.manager.api.tasks()):
                return False
            running = {
                t["NodeID"]
                for t in self.manager.api.tasks(filters={"service": WARM_SERVICE, "desired-state": "running"})
                if t["Status"]["State"] == "running"
            }
            return running == {n["ID"] for n in nodes}

        try:
            wait_for(settled, timeout=timeout, interval=0.3, what="every node ready and running the bed's global service")
        except TimeoutError as e:
            tasks = self.manager.api.tasks(filters={"service": WARM_SERVICE})
            states = [(t.get("NodeID"), t["Status"]["State"], t["Status"].get("Err")) for t in tasks]
            raise SwarmBedError(f"{e}: {states}") from None

    # --- images -----------------------------------------------------------------------------------

    def push(self, image: str, repo: str | None = None) -> str:
        """Push an image of the host's engine to the bed's registry; returns the reference the nodes
        run it by, ``<registry>/<repo>@sha256:...``. The host's engine keeps no tag of it."""
        assert self._registries is not None
        if repo is None:  # gpuspawner-test/light:abc -> gpuspawner-bed/light
            name = image.split("@")[0].rsplit("/", 1)[-1]
            repo = "gpuspawner-bed/" + name.split(":")[0]
        local, tag = f"{self._registries.host_side}/{repo}", secrets.token_hex(4)
        self.host.api.tag(image, local, tag)
        try:
            for line in self.host.api.push(local, tag, stream=True, decode=True):
                if "error" in line:
                    raise SwarmBedError(f"pushing {image} to the bed's registry failed: {line['error']}")
        finally:
            self.host.api.remove_image(f"{local}:{tag}")
        return f"{self.registry}/{repo}@{self._registries.manifest_digest(repo, tag)}"

    # --- what happened on the nodes ------------------------------------------------------------

    def record(self, which: int | str | Node, container_id: str, *, timeout: float = 10) -> dict[str, Any]:
        """What one container received, as the stand-in runtime of its node recorded it."""
        path = self.worker(which).records_dir / f"{container_id}.json"
        wait_for(path.exists, timeout=timeout, what=f"a stand-in runtime record at {path}")
        record: dict[str, Any] = json.loads(path.read_text())
        return record

    def node_of(self, node_id: str) -> Node:
        (node,) = [n for n in self.nodes if n.node_id == node_id]
        return node

    def task_address(self, task: Mapping[str, Any]) -> str:
        """A task's address on the bed's overlay network (where the hub reaches its server)."""
        for attachment in task.get("NetworksAttachments") or []:
            if attachment["Network"]["Spec"]["Name"] == OVERLAY:
                return str(attachment["Addresses"][0]).split("/")[0]
        raise LookupError(f"task {task.get('ID')} has no address on {OVERLAY}")

    def logs(self, which: int | str | Node, *, lines: int = 40) -> str:
        """The end of a node's engine log."""
        node = self.worker(which)
        try:
            return self.host.api.logs(node.container, tail=lines).decode(errors="replace")
        except docker.errors.APIError as e:
            return f"(no log: {e})"

    # --- a worker's engine going down and coming back ------------------------------------------

    def node_state(self, which: int | str | Node) -> str:
        """The node's state as the manager sees it: "ready", "down", "unknown", ..."""
        return str(self.manager.api.inspect_node(self.worker(which).node_id)["Status"]["State"])

    def stop_worker(self, which: int | str | Node, *, timeout: float = 60) -> None:
        """Stop a worker's engine (dockerd stops its containers, then exits) and wait until the
        manager sees the node down."""
        node = self.worker(which)
        self.host.api.stop(node.container, timeout=30)
        wait_for(lambda: self.node_state(node) == "down", timeout=timeout, what=f"the manager to see {node.name} down")

    def start_worker(self, which: int | str | Node, *, timeout: float = 60) -> None:
        """Start a stopped worker's engine again and wait until the manager sees the node ready, as
        the same Swarm node (its state, and so its identity, lives in the node's volume)."""
        node = self.worker(which)
        self.host.api.start(node.container)
        self._wait_engine(node)
        with contextlib.closing(node.client()) as c:
            node_id = c.info()["Swarm"]["NodeID"]
        if node_id != node.node_id:
            raise SwarmBedError(f"{node.name} came back as Swarm node {node_id}, not {node.node_id}")
        wait_for(lambda: self.node_state(node) == "ready", timeout=timeout, what=f"the manager to see {node.name} ready")

    # --- teardown --------------------------------------------------------------------------

    def stop(self) -> None:
        """Remove everything the bed made. Safe to call twice, and after a failed start."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.stop)
        t = time.monotonic()
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        _remove_bed(self.host, self.id)
        if self._registries is not None:
            self._registries.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.timings["stop"] = time.monotonic() - t

    def leftovers(self) -> list[str]:
        """What of this bed is still there (nothing, after stop())."""
        processes = self._registries.processes if self._registries else []
        return _leftovers(self.host, self.id, self.workdir, processes, self._container_ids)


def _remove_bed(host: docker.DockerClient, bed_id: str) -> None:
    """Remove a bed's containers (which ends its engines, their containers, namespaces, mounts and
    iptables), its volumes, its network and the host's end of its veth pair."""
    label = f"{LABEL}={bed_id}"
    containers = host.api.containers(all=True, filters={"label": label})
    with ThreadPoolExecutor(max_workers=max(1, len(containers))) as pool:
        list(pool.map(lambda c: host.api.remove_container(c["Id"], force=True), containers))
    for volume in host.api.volumes(filters={"label": label}).get("Volumes") or []:
        host.api.remove_volume(volume["Name"], force=True)
    for network in host.api.networks(filters={"label": label}):
        host.api.remove_network(network["Id"])
    veth = f"gpsw{bed_id}"
    if Path(f"/sys/class/net/{veth}").exists():  # gone with the gateway's namespace, normally
        subprocess.run(["ip", "link", "del", veth], capture_output=True)


def _leftovers(
    host: docker.DockerClient,
    bed_id: str,
    workdir: Path | None,
    processes: Sequence[subprocess.Popen[bytes]],
    container_ids: Sequence[str],
) -> list[str]:
    label = f"{LABEL}={bed_id}"
    found = [f"container {c['Names'][0]}" for c in host.api.containers(all=True, filters={"label": label})]
    found += [f"volume {v['Name']}" for v in host.api.volumes(filters={"label": label}).get("Volumes") or []]
    found += [f"network {n['Name']}" for n in host.api.networks(filters={"label": label})]
    if Path(f"/sys/class/net/gpsw{bed_id}").exists():
        found.append(f"host interface gpsw{bed_id}")
    if workdir is not None and workdir.exists():
        found.append(f"folder {workdir}")
    found += [f"registry process {p.pid}" for p in processes if p.poll() is None]
    # the nodes' cgroups (their containers' nest inside): cgroupfs driver (v1 and v2) and systemd's
    for cid in container_ids:
        found += [f"cgroup {p}" for pattern in (f"*/docker/{cid}", f"docker/{cid}", f"*/*/docker-{cid}.scope")
                  for p in Path("/sys/fs/cgroup").glob(pattern)]
    return found


def cleanup_stale(host: docker.DockerClient) -> list[str]:
    """Remove the beds whose test process has died (a run killed before its teardown); returns their IDs."""
    stale: set[str] = set()
    for c in host.api.containers(all=True, filters={"label": LABEL}):
        if not _owner_alive(c["Labels"].get(OWNER_LABEL, "")):
            stale.add(c["Labels"][LABEL])
    for n in host.api.networks(filters={"label": LABEL}):
        if not _owner_alive((n.get("Labels") or {}).get(OWNER_LABEL, "")):
            stale.add(n["Labels"][LABEL])
    for bed_id in sorted(stale):
        _remove_bed(host, bed_id)
    for workdir in WORK_ROOT.glob("gpsw-*-*"):
        owner = workdir / "owner"
        if owner.exists() and not _owner_alive(owner.read_text()):
            for pid_dir in Path("/proc").glob("[0-9]*"):
                with contextlib.suppress(OSError):
                    argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
                    if argv[0].endswith(b"docker-registry") and any(str(workdir).encode() in a for a in argv):
                        os.kill(int(pid_dir.name), 15)
            shutil.rmtree(workdir, ignore_errors=True)
            stale.add(workdir.name.split("-")[1])
    return sorted(stale)

