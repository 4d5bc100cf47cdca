"""End to end: an image whose CUDA requirements the NVIDIA driver does not meet is refused before anything
is claimed, recorded or created, the form says so, and a spawn that runs records the requirement it met.

The simulated driver is 550.54.15 with CUDA 12.4; the images are the test bed's single-user image with
nothing but environment variables added, as NVIDIA's CUDA images set them."""

from __future__ import annotations

import hashlib
import html
import io
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import docker.errors
import pytest
import requests

import simnvml
from gpuspawner.images import parse_image
from helpers import container_of, gpus_cli, login, records_of, sim_config
from testbed import DockerBed, Registry, wait_for
from testbed.hub import RunningHub

pytestmark = pytest.mark.docker

NEEDS_13 = "cuda>=13.0 brand=tesla,driver>=535,driver<536 brand=nvidia,driver>=535,driver<536"
FITS = "cuda>=12.2 brand=tesla,driver>=470,driver<471"
ENVIRONMENTS = {
    "needs13": f'NVIDIA_REQUIRE_CUDA="{NEEDS_13}" CUDA_VERSION=13.0.1',
    "legacy13": "CUDA_VERSION=13.0.1",  # no NVIDIA_REQUIRE_CUDA: the toolkit requires cuda>=13.0 from it
    "fits": f'NVIDIA_REQUIRE_CUDA="{FITS}" CUDA_VERSION=12.2.2',
    "disabled": 'NVIDIA_REQUIRE_CUDA="cuda>=13.0" NVIDIA_DISABLE_REQUIRE=true',
    "hopper": 'NVIDIA_REQUIRE_ARCH="arch>=9.0"',  # no GPU of the host has compute capability 9.0
    "tesla": 'NVIDIA_REQUIRE_BRAND="brand=tesla"',  # one GPU of the host is a Tesla
}
HINT = "Choose a profile whose image fits, or ask an admin to update the driver."


@pytest.fixture(scope="module")
def cuda_images(docker_bed: DockerBed, singleuser_image: str) -> Iterator[dict[str, str]]:
    """name -> tag: one image per environment above, FROM the single-user image (no layer but ENV)."""
    made = {}
    for name, env in ENVIRONMENTS.items():
        dockerfile = f"FROM {singleuser_image}\nENV {env}\n"
        tag = f"gpuspawner-test/cudareq:{name}-{hashlib.sha256(dockerfile.encode()).hexdigest()[:12]}"
        docker_bed.client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
        made[name] = tag
    yield made
    for tag in made.values():
        try:
            docker_bed.api.remove_image(tag)
        except Exception:
            pass  # a container of another test still uses it, or it is gone


@pytest.fixture
def hub(start_hub: Callable[..., RunningHub], cuda_images: dict[str, str], tmp_path: Path) -> RunningHub:
    spec = simnvml.write_spec(tmp_path / "gpus.json", [  # driver 550.54.15, CUDA 12.4
        simnvml.gpu(0), simnvml.gpu(1),  # brand NVIDIA, compute capability 8.0
        simnvml.gpu(2, name="Tesla V100-SXM2-32GB", memory_gib=32, brand=2, compute_capability="7.0"),  # NVML_BRAND_TESLA
    ])
    gpu = {"gpus": 1}
    profiles = [
        {"slug": "needs13", "display_name": "CUDA 13", "image": cuda_images["needs13"], **gpu},
        {"slug": "legacy13", "display_name": "CUDA 13, legacy", "image": cuda_images["legacy13"], **gpu},
        {"slug": "fits", "display_name": "CUDA 12.2", "image": cuda_images["fits"], "default": True, **gpu},
        {"slug": "disabled", "display_name": "Not checked", "image": cuda_images["disabled"], **gpu},
        {"slug": "overridden", "display_name": "CUDA 13, check off", "image": cuda_images["needs13"],
         "environment": {"NVIDIA_DISABLE_REQUIRE": "1"}, **gpu},
        {"slug": "cpu13", "display_name": "CUDA 13 image, CPU only", "image": cuda_images["needs13"]},
        {"slug": "hopper", "display_name": "Hopper only", "image": cuda_images["hopper"], **gpu},
        {"slug": "tesla", "display_name": "Tesla only", "image": cuda_images["tesla"], **gpu},
    ]
    return start_hub(extra=sim_config(spec, f"c.GPUSpawner.profiles = {profiles!r}\n"
                                            "c.JupyterHub.authenticate_prometheus = False\n"))


def refusal(image: str, requires: str, quoted: str) -> str:
    return (f"Image {parse_image(image)} requires {requires} ({quoted}), but this host's NVIDIA driver 550.54.15 "
            f"supports CUDA 12.4. {HINT}")


def test_an_image_the_driver_cannot_run_is_refused_before_anything_is_claimed_recorded_or_created(
    hub: RunningHub, docker_bed: DockerBed, cuda_images: dict[str, str],
) -> None:
    expected = {
        "needs13": refusal(cuda_images["needs13"], "CUDA >= 13.0", 'NVIDIA_REQUIRE_CUDA="cuda>=13.0 …"'),
        "legacy13": refusal(cuda_images["legacy13"], "CUDA >= 13.0", 'CUDA_VERSION="13.0.1"'),
        "hopper": (f"Image {parse_image(cuda_images['hopper'])} requires a GPU of compute capability >= 9.0 "
                   "(NVIDIA_REQUIRE_ARCH=\"arch>=9.0\"), but this host's NVIDIA driver 550.54.15 supports CUDA 12.4 and "
                   f"its GPUs are compute capability 7.0, compute capability 8.0. {HINT}"),
    }
    for slug, message in expected.items():
        r = hub.spawn("ada", options={"profile": slug})
        assert r.status_code == 409, r.text
        assert r.json()["message"] == message
    assert records_of(hub, "ada") == []  # no record opened, so none left open
    assert docker_bed.containers_labelled(f"gpuspawner.hub={hub.settings.hub_id}") == []
    assert [d["holder"] for d in gpus_cli(hub)["devices"] if d["holder"]] == []
    metrics = requests.get(f"{hub.url}/hub/metrics", timeout=30).text
    assert 'gpuspawner_spawn_refusals_total{reason="cuda_requirement"} 3.0' in metrics

    form = login(hub, "bob").get(f"{hub.url}/hub/spawn", timeout=60).content.decode()
    unfit = {slug: html.unescape(text) for slug, text in re.findall(r'data-unfit="([^"]+)">([^<]*)<', form)}
    assert unfit == expected  # fits, disabled, overridden (the profile turns the check off), cpu13 and tesla can start
    for slug in expected:
        assert f'data-availability="{slug}">image cannot run here<' in form
        assert re.search(rf'value="{slug}"[^>]*\bdisabled\b', form.replace("\n", " ")), slug


def test_a_spawn_that_runs_records_the_requirement_its_driver_met(hub: RunningHub, docker_bed: DockerBed) -> None:
    users = (("dan", "tesla"), ("ada", "fits"), ("bob", "disabled"), ("cyd", "cpu13"))
    for user, slug in users:
        r = hub.spawn(user, options={"profile": slug})
        assert r.status_code in (201, 202), r.text
        hub.wait_ready(user)
    held = {(r.user, r.cuda_requirement) for user, _ in users for r in records_of(hub, user)}
    assert held == {
        ("dan", 'NVIDIA_REQUIRE_BRAND="brand=tesla"'),
        ("ada", f'NVIDIA_REQUIRE_CUDA="{FITS}"'),
        ("bob", 'NVIDIA_DISABLE_REQUIRE="true" (not checked)'),
        ("cyd", None),  # CPU only: NVIDIA's hook checks nothing for a container without GPUs
    }
    # the first free GPU is not a Tesla: dan's server got the one that is
    assert container_of(docker_bed, hub, "dan")["Labels"]["gpuspawner.devices"] == simnvml.gpu(2)["uuid"]


def test_an_image_pulled_during_the_spawn_is_judged_once_pulled_and_its_spawn_ends_leaving_nothing(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, registry: Registry, singleuser_image: str, tmp_path: Path,
) -> None:
    # not on the engine when the spawn begins: its requirements are read once it is pulled, after the GPU was
    # claimed and the record opened; the refusal then gives the GPU back and ends the record
    repo, tag = f"{registry.address}/gpuspawner-test/cudareq", "needs13-" + secrets.token_hex(3)
    dockerfile = f"FROM {singleuser_image}\nENV {ENVIRONMENTS['legacy13']}\n"
    image, _ = docker_bed.client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=f"{repo}:{tag}", rm=True)
    try:
        for line in docker_bed.api.push(repo, tag, stream=True, decode=True):
            assert "error" not in line, line
        docker_bed.api.remove_image(image.id, force=True)
        spec = simnvml.write_spec(tmp_path / "gpus.json", [simnvml.gpu(0)])
        profiles = [{"slug": "gpu", "display_name": "CUDA 13", "image": f"{repo}:{tag}", "gpus": 1, "default": True}]
        hub = start_hub(extra=sim_config(spec, f"c.GPUSpawner.profiles = {profiles!r}\n"))
        r = hub.spawn("ada")
        assert r.status_code == 409, r.text
        message = refusal(f"{repo}:{tag}", "CUDA >= 13.0", 'CUDA_VERSION="13.0.1"')
        assert r.json()["message"] == message
        (record,) = wait_for(lambda: [x for x in records_of(hub, "ada") if x.sealed] or None, timeout=60, interval=0.3,
                             what="ada's record to end")
        assert (record.outcome, record.error, record.cuda_requirement) == ("failed", f"HTTP 409: {message}", None)
        assert docker_bed.containers_labelled(f"gpuspawner.hub={hub.settings.hub_id}") == []
        assert [d["holder"] for d in gpus_cli(hub)["devices"] if d["holder"]] == []
    finally:
        for ref in (image.id, f"{repo}:{tag}"):
            try:
                docker_bed.api.remove_image(ref, force=True)
            except docker.errors.NotFound:
                pass
