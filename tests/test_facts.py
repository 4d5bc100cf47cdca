"""What a spawn learns of its image and devices, as its audit record keeps it."""

from __future__ import annotations

from gpuspawner.audit import RecordedDevice
from gpuspawner.devices import Device, GiB
from gpuspawner.facts import DeviceFacts, ResolvedImage, device_facts, resolved_image

D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
PUSHED = {
    "Id": "sha256:aaa", "RepoDigests": [f"other/repo@{D1}", f"lab/pytorch@{D2}"],
    "Config": {"Labels": {"org.opencontainers.image.version": "2.4", "maintainer": "someone"}},
}


def test_a_pushed_image_is_known_by_the_digest_of_the_repository_asked_for() -> None:
    assert resolved_image("lab/pytorch:2024.10", PUSHED) == ResolvedImage(
        requested="lab/pytorch:2024.10", image_id="sha256:aaa", repo_digest=f"docker.io/lab/pytorch@{D2}",
        labels={"org.opencontainers.image.version": "2.4"}, note=None,
    )


def test_an_image_never_pushed_says_it_cannot_be_pulled_elsewhere() -> None:
    found = resolved_image("local/built:1", {"Id": "sha256:bbb", "RepoDigests": [], "Config": None})
    assert (found.repo_digest, found.shown, dict(found.labels)) == (None, "sha256:bbb", {})
    assert found.note == (
        "Image local/built:1 (sha256:bbb) has no repository digest: it was built here or never pushed, "
        "so it cannot be pulled on another host."
    )


def test_device_facts_keep_what_the_record_needs() -> None:
    device = Device(uuid="GPU-1", index=0, name="NVIDIA A100-SXM4-40GB", memory_total=40 * GiB, memory_used=0)
    assert device_facts((device,), driver_version="550.54", cuda_driver_version="12.4") == DeviceFacts(
        devices=(RecordedDevice(uuid="GPU-1", model="NVIDIA A100-SXM4-40GB", memory_total=40 * GiB),),
        driver_version="550.54", cuda_driver_version="12.4",
    )
