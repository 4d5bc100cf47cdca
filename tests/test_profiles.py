"""Profiles: checked when the configuration loads; chosen by slug, and by slug only."""

from __future__ import annotations

import pytest

from gpuspawner.allocation import GPURequest
from gpuspawner.devices import GiB
from gpuspawner.profiles import OptionsError, choose_profile, options_from_form, parse_profiles
from gpuspawner.settings import ConfigError
from gpuspawner.userinput import check_options_size, clip, parse_max_options_bytes, quote

CPU = {"slug": "cpu", "display_name": "CPU only", "image": "lab/notebook:2024.10"}
A100 = {
    "slug": "a100-1", "display_name": "1 × A100", "image": "lab/pytorch:2024.10",
    "gpus": {"count": 1, "model": "A100"}, "cpu_limit": 8, "mem_limit": "64G",
    "environment": {"OMP_NUM_THREADS": "8"}, "allowed_groups": ["ml-lab"], "default": True,
}
COURSE = {"slug": "course", "display_name": "MIG slice", "image": "lab/course:1", "gpus": {"mig_profile": "1g.10gb"},
          "allowed_users": ["tutor"], "allowed_groups": ["students"]}


def test_a_full_profile_parses() -> None:
    (cpu, a100) = parse_profiles([CPU, A100])
    assert cpu.gpus == GPURequest() and not cpu.default
    assert a100.gpus == GPURequest(count=1, model="A100")
    assert (a100.cpu_limit, a100.mem_limit, a100.default) == (8.0, 64 * GiB, True)
    assert a100.environment == {"OMP_NUM_THREADS": "8"}
    assert str(a100.image) == "lab/pytorch:2024.10"
    assert a100.resources() == "1 × A100 · 8 CPUs · 64 GiB memory"


@pytest.mark.parametrize(
    ("profiles", "message"),
    [
        ([{**CPU, "cpus": 2}], "GPUSpawner.profiles[0] (slug 'cpu') has unknown key 'cpus'; allowed keys: slug, display_name"),
        ([{**CPU, "kubespawner_override": {}}], "GPUSpawner.profiles[0] (slug 'cpu') has unknown key 'kubespawner_override'"),
        ([CPU, {**A100, "slug": "cpu"}], "GPUSpawner.profiles: profiles 0 and 1 both have slug 'cpu'; slugs must be unique."),
        ([{k: v for k, v in CPU.items() if k != "image"}], "GPUSpawner.profiles[0] (slug 'cpu') has no 'image'"),
        ([{**CPU, "image": "lab/notebook"}], "GPUSpawner.profiles[0] (slug 'cpu'): 'image' is 'lab/notebook', which is not pinned; allowed: an explicit tag other than 'latest'"),
        ([{**CPU, "image": "lab/notebook:latest"}], "GPUSpawner.profiles[0] (slug 'cpu'): 'image' is 'lab/notebook:latest', which is not pinned"),
        ([{**CPU, "image": "Lab/Notebook:1"}], "GPUSpawner.profiles[0] (slug 'cpu'): 'image' is 'Lab/Notebook:1';"),
        ([{**CPU, "gpus": {"count": -2}}], "GPUSpawner.profiles[0] (slug 'cpu'): 'gpus': 'count' is -2; allowed: a whole number of GPUs, 0 or more."),
        ([{**CPU, "gpus": {"count": 2, "mig_profile": "1g.10gb"}}], "GPUSpawner.profiles[0] (slug 'cpu'): 'gpus': 'count' is 2 with 'mig_profile'"),
        ([{**CPU, "cpu_limit": 0}], "GPUSpawner.profiles[0] (slug 'cpu'): 'cpu_limit' is 0; allowed: a number of CPUs above 0"),
        ([{**CPU, "slug": "CPU Only"}], "GPUSpawner.profiles[0] (slug 'CPU Only'): 'slug' is 'CPU Only'; allowed: lowercase letters"),
        ([{**CPU, "allowed_groups": "ml-lab"}], "GPUSpawner.profiles[0] (slug 'cpu'): 'allowed_groups' is 'ml-lab'; allowed: a list of names."),
        ([{**CPU, "environment": {"N": 1}}], "GPUSpawner.profiles[0] (slug 'cpu'): 'environment' is {'N': 1}; allowed: a dict of text to text."),
        ([{**CPU, "environment": {"GPUSPAWNER_GPUS": "GPU-x"}}], "GPUSpawner.profiles[0] (slug 'cpu'): 'environment': 'GPUSPAWNER_GPUS' is a variable of gpuspawner's own"),
        ([{**CPU, "default": True}, A100], "GPUSpawner.profiles: profiles 'cpu', 'a100-1' are all marked default; mark one."),
        ({"slug": "cpu"}, "GPUSpawner.profiles is {'slug': 'cpu'}; allowed: a list of profile dicts"),
        ([{**CPU, "max_runtime": "8 hours"}], "GPUSpawner.profiles[0] (slug 'cpu'): 'max_runtime' is '8 hours'; allowed: a duration such as '8h'"),
        ([{**CPU, "gpu_idle_timeout": -1}], "GPUSpawner.profiles[0] (slug 'cpu'): 'gpu_idle_timeout' is -1; allowed: a duration"),
        ([{**CPU, "gpu_idle_threshold": 150}], "GPUSpawner.profiles[0] (slug 'cpu'): 'gpu_idle_threshold' is 150; allowed: a percentage from 0 to 100"),
    ],
    ids=["unknown-key", "kubespawner-override", "duplicate-slug", "missing-image", "untagged-image", "latest-image",
         "invalid-image", "negative-gpus", "mig-with-count", "zero-cpus", "bad-slug", "groups-not-a-list",
         "env-not-text", "env-named-as-gpuspawners", "two-defaults", "not-a-list", "bad-runtime", "negative-idle-timeout", "threshold-over-100"],
)
def test_bad_profiles_are_refused_naming_profile_key_value_and_what_is_allowed(profiles: object, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_profiles(profiles)
    assert str(e.value).startswith(message), str(e.value)


def test_digest_pinning_refuses_tags() -> None:
    with pytest.raises(ConfigError, match="not pinned; allowed: a digest"):
        parse_profiles([CPU], pinning="digest")
    parse_profiles([{**CPU, "image": "lab/notebook@sha256:" + "b" * 64}], pinning="digest")


PROFILES = parse_profiles([CPU, A100, COURSE])


@pytest.mark.parametrize(
    ("user", "groups", "options", "slug"),
    [
        ("ada", ["ml-lab"], {}, "a100-1"),
        ("bob", [], {}, "cpu"),
        ("ada", ["ml-lab"], {"profile": "cpu"}, "cpu"),
        ("tutor", [], {"profile": "course"}, "course"),
        ("sam", ["students"], {"profile": "course"}, "course"),
        ("bob", [], {"profile": ""}, "cpu"),
    ],
    ids=["default-profile", "default-not-allowed-falls-to-first-allowed", "chosen", "allowed-by-user", "allowed-by-group", "empty-slug"],
)
def test_choosing(user: str, groups: list[str], options: dict, slug: str) -> None:
    assert choose_profile(PROFILES, options, user=user, groups=groups).slug == slug


@pytest.mark.parametrize(
    ("options", "status", "message"),
    [
        ({"profile": "h100-8"}, 400, "Unknown profile 'h100-8'; the profiles you may use: 'cpu'."),
        ({"profile": "a100-1"}, 403, "Profile 'a100-1' is not open to bob; the profiles you may use: 'cpu'."),
        ({"profile": "cpu", "image": "evil/miner:1"}, 400, "Unknown option 'image': a server is chosen by profile only"),
        ({"devices": ["GPU-1"]}, 400, "Unknown option 'devices'"),
        ({"environment": {"A": "b"}}, 400, "Unknown option 'environment'"),
        ({"mem_limit": "1T"}, 400, "Unknown option 'mem_limit'"),
        ({"profile": ["cpu"]}, 400, "'profile' is ['cpu']; it must be a profile slug such as 'cpu'."),
    ],
    ids=["unknown-slug", "not-allowed", "image", "devices", "environment", "limits", "slug-not-text"],
)
def test_refusals(options: dict, status: int, message: str) -> None:
    with pytest.raises(OptionsError) as e:
        choose_profile(PROFILES, options, user="bob", groups=[])
    assert e.value.status == status
    assert e.value.message.startswith(message), e.value.message


def test_no_open_profile_is_a_403() -> None:
    only_lab = parse_profiles([A100])
    with pytest.raises(OptionsError) as e:
        choose_profile(only_lab, {}, user="bob", groups=[])
    assert (e.value.status, e.value.message) == (403, "No profile is open to bob; ask an admin for access.")


def test_form_data_becomes_a_profile_choice_and_nothing_else() -> None:
    assert options_from_form({"profile": ["a100-1"], "image": ["evil:1"]}) == {"profile": "a100-1"}
    assert options_from_form({}) == {}
    with pytest.raises(OptionsError):
        options_from_form({"profile": ["cpu", "a100-1"]})


# --- What users send is bounded before it reaches a message or a record ----------------------

LONG = "x" * 5_000_000


@pytest.mark.parametrize(
    ("options", "status", "message"),
    [
        ({"profile": LONG}, 400, "Unknown profile '" + "x" * 40 + "'…; the profiles you may use: 'cpu'."),
        ({"profile": "a100-1", LONG: 1}, 400, "Unknown option '" + "x" * 40 + "'…: a server is chosen by profile only"),
        ({"profile": [LONG]}, 400, "'profile' is ['xxxxxxxxxxxxxxxxx…xxxxxxxxxxxxxxxxxx']; it must be a profile slug"),
    ],
    ids=["long-slug", "long-key", "long-list"],
)
def test_refusals_quote_only_a_short_prefix_of_what_the_user_sent(options: dict, status: int, message: str) -> None:
    with pytest.raises(OptionsError) as e:
        choose_profile(PROFILES, options, user="bob", groups=[])
    assert e.value.status == status
    assert e.value.message.startswith(message), e.value.message[:300]
    assert len(e.value.message) < 250


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("cpu", "'cpu'"),
        ("x" * 40, repr("x" * 40)),
        ("x" * 41, repr("x" * 40) + "…"),
        ("it's", '"it\'s"'),
        (["cpu"], "['cpu']"),
        (12, "12"),
        ({"a": "y" * 1000}, "{'a': 'yyyyyyyyyyyyyyyyy…yyyyyyyyyyyyyyy…"),
        (list(range(1000)), "[0, 1, 2, 3, …]"),
    ],
    ids=["short", "at-limit", "past-limit", "quotes", "list", "number", "nested-long", "long-list"],
)
def test_quote_reads_as_repr_until_it_is_long(value: object, quoted: str) -> None:
    assert quote(value) == quoted


def test_clip_keeps_short_text_and_says_how_much_was_cut() -> None:
    assert clip("HTTP 400: no") == "HTTP 400: no"
    assert clip("e" * 2010) == "e" * 2000 + "… (10 more characters)"


@pytest.mark.parametrize(
    ("options", "refused"),
    [
        ({"profile": "a100-1"}, False),
        ({"profile": "p" * 4000}, False),
        ({"profile": "p" * 4096}, True),
        ({"profile": "é" * 2050}, True),  # bytes of UTF-8, not characters
        ({"profile": ["a"] * 2000}, True),
        ({"profile": [LONG]}, True),
    ],
    ids=["profile", "just-under", "just-over", "utf8-bytes", "many-small-values", "huge"],
)
def test_options_over_the_limit_are_refused(options: dict, refused: bool) -> None:
    if not refused:
        check_options_size(options, max_bytes=4096)
        return
    with pytest.raises(OptionsError) as e:
        check_options_size(options, max_bytes=4096)
    assert e.value.status == 400
    assert e.value.message.startswith(
        "Your server options are larger than this hub takes (4096 bytes, GPUSpawner.max_user_options_bytes); "
        "they begin {'profile': "
    ), e.value.message[:300]
    assert len(e.value.message) < 300


@pytest.mark.parametrize(
    "value", [0, 100, 255, 2 * 1024 * 1024, -1, "4K", 4096.0, True, None],
    ids=["zero", "too-small", "just-too-small", "too-large", "negative", "text", "float", "bool", "none"],
)
def test_a_bad_options_limit_is_refused_naming_the_setting_and_what_is_allowed(value: object) -> None:
    with pytest.raises(ConfigError) as e:
        parse_max_options_bytes(value, where="GPUSpawner.max_user_options_bytes")
    assert str(e.value) == (
        f"GPUSpawner.max_user_options_bytes is {value!r}; allowed: a whole number of bytes from 256 to 1048576 "
        "(1 MiB), such as 4096."
    )


def test_the_hub_refuses_to_start_with_a_bad_options_limit() -> None:
    from traitlets.config import Config

    from gpuspawner.upkeep import checked_config

    config = Config()
    config.GPUSpawner.max_user_options_bytes = 10
    with pytest.raises(ConfigError, match=r"^GPUSpawner.max_user_options_bytes is 10; allowed: a whole number"):
        checked_config(config)
    config.GPUSpawner.max_user_options_bytes = 8192
    checked_config(config)
