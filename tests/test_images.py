"""Image references: parsed and normalised with Docker's defaults; pinned or not."""

import pytest

from gpuspawner.images import (
    ImageRef,
    ImageReferenceError,
    is_pinned,
    must_look_up,
    parse_image,
    pull_arguments,
    pull_step,
    repo_digest_for,
)

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("python", ImageRef("docker.io", "library/python")),
        ("python:3.11", ImageRef("docker.io", "library/python", tag="3.11")),
        ("jupyter/base-notebook:2024-10-07", ImageRef("docker.io", "jupyter/base-notebook", tag="2024-10-07")),
        ("quay.io/jupyter/pytorch-notebook:cuda12-2024-10-07", ImageRef("quay.io", "jupyter/pytorch-notebook", tag="cuda12-2024-10-07")),
        ("127.0.0.1:5000/lab/img", ImageRef("127.0.0.1:5000", "lab/img")),
        ("127.0.0.1:5000/lab/img:v1", ImageRef("127.0.0.1:5000", "lab/img", tag="v1")),
        (f"localhost/img@{D}", ImageRef("localhost", "img", digest=D)),
        (f"nvcr.io/nvidia/pytorch:24.09-py3@{D}", ImageRef("nvcr.io", "nvidia/pytorch", tag="24.09-py3", digest=D)),
    ],
    ids=["bare", "tag", "user-repo", "other-registry", "registry-port-no-tag", "registry-port-tag", "localhost-digest", "tag-and-digest"],
)
def test_references_normalise_like_docker(reference: str, expected: ImageRef) -> None:
    assert parse_image(reference) == expected


@pytest.mark.parametrize("reference", ["", " python", "Python", "python:", "python@sha256:abc", "python:bad tag", "a//b"])
def test_invalid_references_are_refused(reference: str) -> None:
    with pytest.raises(ImageReferenceError):
        parse_image(reference)


def test_round_trip_to_the_familiar_form() -> None:
    assert str(parse_image("python:3.11")) == "python:3.11"
    assert str(parse_image("127.0.0.1:5000/lab/img:v1")) == "127.0.0.1:5000/lab/img:v1"
    assert parse_image("python:3.11").by_digest(D) == f"python@{D}"


@pytest.mark.parametrize(
    ("reference", "tag_policy", "digest_policy"),
    [("python", False, False), ("python:latest", False, False), ("python:3.11", True, False), (f"python@{D}", True, True)],
)
def test_what_counts_as_pinned(reference: str, tag_policy: bool, digest_policy: bool) -> None:
    ref = parse_image(reference)
    assert is_pinned(ref, pinning="tag") is tag_policy
    assert is_pinned(ref, pinning="digest") is digest_policy


def test_the_repo_digest_is_the_one_of_the_repository_asked_for() -> None:
    digests = [f"127.0.0.1:5000/lab/img@{D}", "quay.io/jupyter/base-notebook@sha256:" + "b" * 64]
    assert repo_digest_for(parse_image("quay.io/jupyter/base-notebook:2024-10-07"), digests) == (
        "quay.io/jupyter/base-notebook@sha256:" + "b" * 64
    )
    assert repo_digest_for(parse_image("127.0.0.1:5000/lab/img:v1"), digests) == f"127.0.0.1:5000/lab/img@{D}"
    assert repo_digest_for(parse_image("lab/img:v1"), digests) is None  # docker.io/lab/img: another repository
    assert repo_digest_for(parse_image("127.0.0.1:5000/lab/img@sha256:" + "e" * 64), digests) is None


# --- What a spawn does for its image under DockerSpawner.pull_policy --------------------------------


@pytest.mark.parametrize(("policy", "present", "step"), [
    ("ifnotpresent", True, "use"),
    ("ifnotpresent", False, "pull"),
    ("IfNotPresent", False, "pull"),  # DockerSpawner's trait ignores case
    ("always", None, "pull"),
    ("Always", None, "pull"),
    ("never", True, "use"),
    ("never", False, "refuse"),
    ("skip", True, "use"),
    ("skip", False, "refuse"),
])
def test_the_pull_policy_decides_whether_a_spawn_pulls(policy: str, present: bool | None, step: str) -> None:
    assert must_look_up(policy) == (present is not None)
    assert pull_step(policy, present=present) == step


@pytest.mark.parametrize(("reference", "arguments"), [
    ("lab/scipy:2026-08", ("lab/scipy", "2026-08")),
    ("ubuntu", ("ubuntu", "latest")),
    ("docker.io/library/ubuntu:24.04", ("ubuntu", "24.04")),
    ("127.0.0.1:5000/lab/torch:cu12", ("127.0.0.1:5000/lab/torch", "cu12")),
    ("127.0.0.1:5000/lab/torch", ("127.0.0.1:5000/lab/torch", "latest")),
    ("127.0.0.1:5000/lab/torch@sha256:" + "a" * 64, ("127.0.0.1:5000/lab/torch", "sha256:" + "a" * 64)),
    ("lab/torch:cu12@sha256:" + "b" * 64, ("lab/torch", "sha256:" + "b" * 64)),  # the digest is what is pulled
], ids=["tag", "no-tag", "docker-hub-long-form", "registry-with-port", "registry-no-tag", "digest", "tag-and-digest"])
def test_a_pull_names_the_repository_and_the_tag_or_digest(reference: str, arguments: tuple[str, str]) -> None:
    assert pull_arguments(reference) == arguments
