"""gpuspawner: a JupyterHub spawner for shared NVIDIA GPU servers.

Use it with ``c.JupyterHub.spawner_class = "gpu"``.
"""

from ._version import __version__
from .spawner import GPUSpawner

__all__ = ["GPUSpawner", "__version__"]
