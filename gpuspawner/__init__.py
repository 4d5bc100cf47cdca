"""gpuspawner: a JupyterHub spawner for shared NVIDIA GPU servers.

Use it with ``c.JupyterHub.spawner_class = "gpu"``, or ``"gpu-swarm"`` on a Docker Swarm.
"""

from typing import Any

from ._version import __version__

__all__ = ["GPUSpawner", "GPUSwarmSpawner", "__version__"]


def __getattr__(name: str) -> Any:
    # GPUSpawner is looked up here when JupyterHub resolves its spawner_class: the moment to
    # have the hub's configuration checked before it serves anyone.
    if name == "GPUSpawner":
        from .spawner import GPUSpawner
        from .upkeep import check_when_the_hub_starts

        check_when_the_hub_starts()
        return GPUSpawner
    if name == "GPUSwarmSpawner":
        from .swarmspawner import GPUSwarmSpawner
        from .upkeep import check_when_the_hub_starts

        check_when_the_hub_starts()
        return GPUSwarmSpawner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
