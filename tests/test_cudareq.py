"""An image's CUDA requirements judged as NVIDIA's container toolkit judges them (gpuspawner.cudareq)."""

from __future__ import annotations

import pytest

from gpuspawner import cudareq
from gpuspawner.cudareq import GPUFacts, Host, environment_of, image_requirements, judge

HOST = Host(driver="550.54.15", cuda="12.4")
TESLA_80 = GPUFacts(brand="tesla", arch="8.0")
GEFORCE_86 = GPUFacts(brand="geforce", arch="8.6")
# NVIDIA's CUDA 12.4 images carry one like this: the CUDA version, or a driver branch with forward compatibility
CUDA_IMAGE = ("cuda>=12.4 brand=tesla,driver>=470,driver<471 brand=unknown,driver>=470,driver<471 "
              "brand=nvidia,driver>=535,driver<536 brand=geforce,driver>=535,driver<536")


@pytest.mark.parametrize(
    ("text", "host", "gpu", "met"),
    [
        ("cuda>=12.4", HOST, None, True),
        ("cuda>=12.5", HOST, None, False),
        ("cuda>=13.0", HOST, None, False),
        ("cuda>=12", HOST, None, True),
        ("cuda>12.4", HOST, None, False),
        ("cuda<=12.4.0", HOST, None, True),
        ("cuda<12.10", HOST, None, True),
        ("cuda=12.4", HOST, None, True),
        ("cuda=12.4.0.0", HOST, None, True),
        ("cuda!=12.4", HOST, None, False),
        ("CUDA>=12.4", HOST, None, True),
        ("driver>=550", HOST, None, True),
        ("driver>=550.54.16", HOST, None, False),
        ("driver>=535,driver<551", HOST, None, True),
        ("driver>=535,driver<550", HOST, None, False),
        ("cuda>=13.0 driver>=550", HOST, None, True),
        ("cuda>=13.0 driver>=560", HOST, None, False),
        ("cuda>=13.0 brand=tesla,driver>=550", HOST, TESLA_80, True),
        ("cuda>=13.0 brand=tesla,driver>=550", HOST, GEFORCE_86, False),
        ("brand=TESLA", HOST, TESLA_80, True),
        ("brand!=tesla", HOST, TESLA_80, False),
        ("arch>=8.0", HOST, TESLA_80, True),
        ("arch>=9.0", HOST, TESLA_80, False),
        ("arch>=9.0 arch=8.6", HOST, GEFORCE_86, True),
        ("brand=tesla", HOST, None, True),
        ("arch>=9.0", HOST, None, True),
        ("brand=tesla", HOST, GPUFacts(), True),
        ("cuda>=99", Host(driver=None, cuda=None), None, True),
        (CUDA_IMAGE, HOST, None, True),
        (CUDA_IMAGE.replace("cuda>=12.4", "cuda>=12.6"), Host(driver="535.104.05", cuda="12.2"), GEFORCE_86, True),
        (CUDA_IMAGE.replace("cuda>=12.4", "cuda>=12.6"), Host(driver="550.54.15", cuda="12.4"), GEFORCE_86, False),
        ("", HOST, None, True),
        ("   ", HOST, None, True),
        ("cuda>=13.0 ,,", HOST, None, False),
        (",,cuda>=12.0,,", HOST, None, True),
    ],
    ids=[
        "cuda-equal", "cuda-newer", "cuda-13", "cuda-major-only", "cuda-greater", "cuda-trailing-zero", "cuda-12.10",
        "cuda-exact", "cuda-exact-zeros", "cuda-not-equal", "name-in-any-case", "driver-major", "driver-newer-patch",
        "driver-and", "driver-and-fails", "or-second", "or-neither", "brand-and-driver", "brand-other",
        "brand-any-case", "brand-not", "arch-enough", "arch-too-old", "arch-or", "brand-no-gpu-holds",
        "arch-no-gpu-holds", "brand-unknown-holds", "unknown-driver-holds", "cuda-image-new-driver",
        "cuda-image-forward-compat", "cuda-image-no-branch", "empty", "only-spaces", "commas-end-the-search",
        "empty-constraints-skipped",
    ],
)
def test_a_requirement_holds_as_the_toolkit_says(text: str, host: Host, gpu: GPUFacts | None, met: bool) -> None:
    assert cudareq.satisfied(text, host, gpu) is met


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("cuda>>13", "is not a constraint such as cuda>=12.4"),
        ("cuda==13", "is not a constraint such as cuda>=12.4"),
        ("cuda=>13", "is not a constraint such as cuda>=12.4"),
        ("cuda13", "is not a constraint such as cuda>=12.4"),
        (">=13", "is not a constraint such as cuda>=12.4"),
        ("cuda>=", "is not a constraint such as cuda>=12.4"),
        ("toolkit>=13", "names 'toolkit', and only cuda, driver, arch and brand can be required"),
        ("brand>=tesla", "compares a brand with '>='"),
        ("cuda>=12.x", "compares with '12.x', which is not a version"),
        ("cuda>=.12", "compares with '.12', which is not a version"),
    ],
    ids=["double-greater", "double-equal", "reversed", "no-operator", "no-name", "no-value", "unknown-name",
         "brand-ordered", "letters", "leading-dot"],
)
def test_a_constraint_the_toolkit_cannot_read_is_refused_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(cudareq.InvalidConstraint, match=why):
        cudareq.satisfied(text, HOST)


@pytest.mark.parametrize(
    ("text", "met"),
    [("cuda>=12.0 cuda>>13", True), ("cuda>=13.0,cuda>>13", False)],
    ids=["after-a-group-that-holds", "after-a-constraint-that-fails"],
)
def test_a_bad_constraint_the_toolkit_never_reaches_is_never_read(text: str, met: bool) -> None:
    assert cudareq.satisfied(text, HOST) is met


@pytest.mark.parametrize(
    ("env", "requirements", "disabled", "broken"),
    [
        ({"NVIDIA_REQUIRE_CUDA": "cuda>=12.4"}, [("NVIDIA_REQUIRE_CUDA", "cuda>=12.4")], "", ""),
        ({"CUDA_VERSION": "12.4.1"}, [("CUDA_VERSION", "cuda>=12.4")], "", ""),
        ({"CUDA_VERSION": "v13"}, [("CUDA_VERSION", "cuda>=13.0")], "", ""),
        ({"CUDA_VERSION": "12.4.1", "NVIDIA_REQUIRE_CUDA": "cuda>=12.2"}, [("NVIDIA_REQUIRE_CUDA", "cuda>=12.2")], "", ""),
        ({"CUDA_VERSION": "12.4.1", "NVIDIA_REQUIRE_CUDA": ""},
         [("NVIDIA_REQUIRE_CUDA", ""), ("CUDA_VERSION", "cuda>=12.4")], "", ""),
        ({"NVIDIA_REQUIRE_CUDA": "cuda>=12.4", "NVIDIA_REQUIRE_DRIVER": "driver>=550"},
         [("NVIDIA_REQUIRE_CUDA", "cuda>=12.4"), ("NVIDIA_REQUIRE_DRIVER", "driver>=550")], "", ""),
        ({"NVIDIA_REQUIRE_JETPACK": "csv-mounts=all"}, [], "", ""),
        ({"NVIDIA_REQUIRE_CUDA": "cuda>=99", "NVIDIA_DISABLE_REQUIRE": "true"}, [], "true", ""),
        ({"NVIDIA_REQUIRE_CUDA": "cuda>=99", "NVIDIA_DISABLE_REQUIRE": "1"}, [], "1", ""),
        ({"NVIDIA_REQUIRE_CUDA": "cuda>=99", "NVIDIA_DISABLE_REQUIRE": "yes"}, [("NVIDIA_REQUIRE_CUDA", "cuda>=99")], "", ""),
        ({"NVIDIA_REQUIRE_CUDA": "cuda>=99", "NVIDIA_DISABLE_REQUIRE": "false"}, [("NVIDIA_REQUIRE_CUDA", "cuda>=99")], "", ""),
        ({"CUDA_VERSION": "twelve"}, [], "", 'CUDA_VERSION="twelve"'),
        ({"CUDA_VERSION": "12.04"}, [], "", 'CUDA_VERSION="12.04"'),
        ({"PATH": "/usr/bin"}, [], "", ""),
    ],
    ids=["require-cuda", "legacy-cuda-version", "legacy-v-major", "require-wins-over-legacy", "empty-require-is-legacy",
         "every-require-variable", "jetpack-not-checked", "disabled-true", "disabled-1", "disable-yes-is-not-true",
         "disable-false", "cuda-version-no-version", "cuda-version-leading-zero", "none"],
)
def test_the_requirements_come_from_the_environment_as_the_toolkit_collects_them(
    env: dict[str, str], requirements: list[tuple[str, str]], disabled: str, broken: str,
) -> None:
    found = image_requirements(env)
    assert [(r.variable, r.text) for r in found.requirements] == requirements
    assert (found.disabled, found.broken_text) == (disabled, broken)


def test_the_spawns_environment_goes_over_the_images() -> None:
    env = environment_of(["PATH=/usr/bin", "NVIDIA_REQUIRE_CUDA=cuda>=13.0", "NOEQUALS", "A=b=c"],
                         {"NVIDIA_DISABLE_REQUIRE": "true"})
    assert env == {"PATH": "/usr/bin", "NVIDIA_REQUIRE_CUDA": "cuda>=13.0", "A": "b=c", "NVIDIA_DISABLE_REQUIRE": "true"}
    assert image_requirements(env).disabled == "true"


@pytest.mark.parametrize(
    ("env", "host", "met", "requirement", "reason"),
    [
        ({"NVIDIA_REQUIRE_CUDA": "cuda>=13.0 brand=tesla,driver>=535,driver<536 brand=nvidia,driver>=535,driver<536"},
         HOST, False,
         'NVIDIA_REQUIRE_CUDA="cuda>=13.0 brand=tesla,driver>=535,driver<536 brand=nvidia,driver>=535,driver<536"',
         'Image lab/torch:2 requires CUDA >= 13.0 (NVIDIA_REQUIRE_CUDA="cuda>=13.0 …"), but this host\'s NVIDIA driver '
         "550.54.15 supports CUDA 12.4. Choose a profile whose image fits, or ask an admin to update the driver."),
        ({"CUDA_VERSION": "13.0.1"}, HOST, False, 'cuda>=13.0 (from CUDA_VERSION="13.0.1")',
         'Image lab/torch:2 requires CUDA >= 13.0 (CUDA_VERSION="13.0.1"), but this host\'s NVIDIA driver 550.54.15 '
         "supports CUDA 12.4. Choose a profile whose image fits, or ask an admin to update the driver."),
        ({"NVIDIA_REQUIRE_DRIVER": "driver>=560,cuda>=12.0"}, HOST, False, 'NVIDIA_REQUIRE_DRIVER="driver>=560,cuda>=12.0"',
         'Image lab/torch:2 requires NVIDIA driver >= 560 and CUDA >= 12.0 (NVIDIA_REQUIRE_DRIVER="driver>=560,cuda>=12.0"), '
         "but this host's NVIDIA driver 550.54.15 supports CUDA 12.4. Choose a profile whose image fits, or ask an "
         "admin to update the driver."),
        ({"NVIDIA_REQUIRE_ARCH": "arch>=9.0"}, Host(driver="550.54.15", cuda="12.4", gpus=(TESLA_80,)), False,
         'NVIDIA_REQUIRE_ARCH="arch>=9.0"',
         'Image lab/torch:2 requires a GPU of compute capability >= 9.0 (NVIDIA_REQUIRE_ARCH="arch>=9.0"), but this '
         "host's NVIDIA driver 550.54.15 supports CUDA 12.4 and its GPUs are compute capability 8.0. Choose a profile "
         "whose image fits, or ask an admin to update the driver."),
        ({"NVIDIA_REQUIRE_CUDA": "cuda>=12.4"}, HOST, True, 'NVIDIA_REQUIRE_CUDA="cuda>=12.4"', ""),
        ({"NVIDIA_REQUIRE_CUDA": "cuda>=13.0", "NVIDIA_DISABLE_REQUIRE": "true"}, HOST, True,
         'NVIDIA_DISABLE_REQUIRE="true" (not checked)', ""),
        ({"PATH": "/usr/bin"}, HOST, True, "", ""),
        ({"NVIDIA_REQUIRE_CUDA": "cuda>>13"}, HOST, False, 'NVIDIA_REQUIRE_CUDA="cuda>>13"',
         'Image lab/torch:2 cannot start with a GPU: its requirement NVIDIA_REQUIRE_CUDA="cuda>>13" cannot be read by '
         "NVIDIA's container toolkit: 'cuda>>13' is not a constraint such as cuda>=12.4, driver>=550, brand=tesla or "
         "arch>=8.0. Choose another profile, or ask the image's maintainer to fix it."),
        ({"CUDA_VERSION": "twelve"}, HOST, False, 'CUDA_VERSION="twelve"',
         'Image lab/torch:2 cannot start with a GPU: it sets CUDA_VERSION="twelve", which NVIDIA\'s container toolkit '
         "cannot read as a version (it expects MAJOR.MINOR or MAJOR.MINOR.PATCH). Choose another profile, or ask the "
         "image's maintainer to fix it."),
        ({"NVIDIA_REQUIRE_CUDA": "cuda>=12.0", "NVIDIA_REQUIRE_X": "cuda>=13.0"}, HOST, False,
         'NVIDIA_REQUIRE_CUDA="cuda>=12.0"; NVIDIA_REQUIRE_X="cuda>=13.0"',
         'Image lab/torch:2 requires CUDA >= 13.0 (NVIDIA_REQUIRE_X="cuda>=13.0"), but this host\'s NVIDIA driver '
         "550.54.15 supports CUDA 12.4. Choose a profile whose image fits, or ask an admin to update the driver."),
    ],
    ids=["newer-cuda", "legacy-newer-cuda", "driver-and-cuda", "arch-of-the-gpus", "met", "disabled", "none",
         "malformed", "malformed-cuda-version", "every-variable-must-hold"],
)
def test_the_verdict_says_what_is_required_and_what_the_host_has(
    env: dict[str, str], host: Host, met: bool, requirement: str, reason: str,
) -> None:
    assert judge(image_requirements(env), host, image="lab/torch:2") == cudareq.Verdict(met, requirement, reason)


def test_every_gpu_the_server_gets_must_pass() -> None:
    found = image_requirements({"NVIDIA_REQUIRE_BRAND": "brand=tesla"})
    assert judge(found, Host("550.54.15", "12.4", gpus=(TESLA_80,)), image="x:1").met
    mixed = judge(found, Host("550.54.15", "12.4", gpus=(TESLA_80, GEFORCE_86)), image="x:1")
    assert not mixed.met
    assert "its GPUs are brand geforce, brand tesla" in mixed.reason


@pytest.mark.parametrize(
    ("nvml_brand", "name"), [(2, "tesla"), (5, "geforce"), (13, "nvidiartx"), (14, "nvidia"), (0, "unknown"), (99, "unknown")],
    ids=["tesla", "geforce", "nvidia-rtx", "nvidia", "unknown", "newer-than-known"],
)
def test_nvml_brands_are_named_as_the_toolkit_names_them(nvml_brand: int, name: str) -> None:
    assert cudareq.brand_name(nvml_brand) == name


@pytest.mark.parametrize(
    ("text", "kinds", "met", "unfit"),
    [
        ("brand=tesla", [TESLA_80, GEFORCE_86], True, {GEFORCE_86}),
        ("arch>=8.6", [TESLA_80, GEFORCE_86, TESLA_80], True, {TESLA_80}),
        ("arch>=9.0", [TESLA_80, GEFORCE_86], False, {TESLA_80, GEFORCE_86}),
        ("cuda>=12.0", [TESLA_80], True, set()),
        ("cuda>=13.0", [], False, set()),
        ("arch>=9.0", [], True, set()),
    ],
    ids=["one-brand-fits", "one-arch-fits", "none-fits", "all-fit", "driver-alone", "no-gpu-known"],
)
def test_before_the_gpus_are_chosen_a_kind_that_fits_is_enough_and_the_others_are_named(
    text: str, kinds: list[GPUFacts], met: bool, unfit: set[GPUFacts],
) -> None:
    found = image_requirements({"NVIDIA_REQUIRE_X": text})
    verdict, found_unfit = cudareq.judge_kinds(found, HOST, kinds, image="x:1")
    assert (verdict.met, set(found_unfit)) == (met, unfit)
