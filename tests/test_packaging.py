"""gpuspawner installs as a JupyterHub spawner plugin, with NVIDIA's NVML bindings."""

import subprocess
import sys
import warnings
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_jupyterhub_finds_the_spawner_by_its_entry_point_name() -> None:
    from jupyterhub.app import JupyterHub

    from gpuspawner import GPUSpawner

    (ep,) = [ep for ep in entry_points(group="jupyterhub.spawners") if ep.name == "gpu"]
    assert ep.load() is GPUSpawner
    # The same lookup the hub does for c.JupyterHub.spawner_class = "gpu".
    hub = JupyterHub()
    hub.spawner_class = "gpu"
    assert hub.spawner_class is GPUSpawner


def test_pynvml_comes_from_nvidia_ml_py_and_imports_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import pynvml

    assert hasattr(pynvml, "nvmlInit")
    files = [str(f) for f in (__import__("importlib.metadata").metadata.files("nvidia-ml-py") or [])]
    assert "pynvml.py" in files


def test_wheel_declares_runtime_requirements_and_entry_point(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("gpuspawner-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith("METADATA"))).decode()
        eps = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    runtime = {r.split(";")[0].split(">")[0].split("=")[0].strip().lower() for r in requires if "extra ==" not in r}
    assert runtime == {"jupyterhub", "dockerspawner", "traitlets", "docker", "nvidia-ml-py", "jinja2", "sqlalchemy", "jupyterhub-idle-culler"}
    assert "pynvml" not in runtime
    assert "[jupyterhub.spawners]\ngpu = gpuspawner:GPUSpawner" in eps
    assert not any(n.startswith("tests/") for n in names)
    assert {"gpuspawner/templates/profiles.html", "gpuspawner/templates/audit.html",
            "gpuspawner/templates/hub/home.html"} <= set(names)
