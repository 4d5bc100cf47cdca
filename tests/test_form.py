"""The spawn form: which profile is checked, which can be chosen, and the HTML a user sees."""

from __future__ import annotations

import os
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from gpuspawner.allocation import GPURequest, Holder
from gpuspawner.devices import Device, GiB, Inventory
from gpuspawner.form import TEMPLATES, form_entries, render_form, template_environment
from gpuspawner.profiles import Profile, parse_profiles

ME = Holder("ada")
BOB = Holder("bob")
A100 = Device(uuid="GPU-0", index=0, name="NVIDIA A100-SXM4-80GB", memory_total=80 * GiB, memory_used=0,
              pci_bus_id="00000000:10:00.0")
ONE_GPU = Inventory(devices=(A100,), driver_version="550.54.15", cuda_driver_version="12.4")
FREE: dict[str, Holder] = {}
HELD = {"GPU-0": BOB}  # another user's server holds the only GPU


def profiles(*slugs: str, default: str | None = None) -> list[Profile]:
    """Profiles named by slug: "gpu…" ones want the one A100, the others need no GPU."""
    return list(parse_profiles([
        {"slug": s, "display_name": s.upper(), "image": "lab/pytorch:2024.10", "default": s == default,
         **({"gpus": 1} if s.startswith("gpu") else {})}
        for s in slugs
    ]))


def entries(mine: list[Profile], claims: dict[str, Holder], *, waiting: bool = False, last_choice: Any = None) -> list[dict[str, Any]]:
    return form_entries(mine, ONE_GPU, claims, holder=ME, busy_memory_threshold=GiB, waiting=waiting,
                        last_choice=last_choice)


def checked(found: list[dict[str, Any]]) -> list[str]:
    return [e["slug"] for e in found if e["checked"]]


# --- Which entry is checked ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mine", "claims", "waiting", "last_choice", "expected"),
    [
        (profiles("cpu", "gpu", default="cpu"), FREE, False, "gpu", ["gpu"]),
        (profiles("gpu", "cpu", default="cpu"), FREE, False, None, ["cpu"]),
        (profiles("gpu", "cpu"), FREE, False, None, ["gpu"]),
        (profiles("cpu", "gpu", default="cpu"), FREE, False, "since-removed", ["cpu"]),
        (profiles("cpu", "gpu", default="cpu"), HELD, False, "gpu", ["cpu"]),
        (profiles("gpu", "cpu", "cpu2", default="gpu"), HELD, False, None, ["cpu"]),
        (profiles("gpu", "cpu", default="gpu"), HELD, True, None, ["gpu"]),
        (profiles("cpu", "gpu", default="cpu"), HELD, True, "gpu", ["gpu"]),
        (profiles("gpu", "cpu", default="gpu"), {"GPU-0": ME}, False, None, ["gpu"]),
        (profiles("gpu", "gpu2"), HELD, False, "gpu", []),
        ([], FREE, False, "gpu", []),
    ],
    ids=[
        "last-choice-when-selectable", "default-profile-without-last-choice", "first-profile-when-none-is-default",
        "unknown-last-choice-gives-the-default", "last-choice-that-cannot-start-gives-the-default",
        "default-that-cannot-start-gives-the-first-selectable", "default-that-cannot-start-when-spawns-wait",
        "last-choice-that-cannot-start-when-spawns-wait", "a-gpu-held-by-my-own-server-is-free-for-me",
        "nothing-selectable-nothing-checked", "no-profiles",
    ],
)
def test_the_checked_entry(mine: list[Profile], claims: dict[str, Holder], waiting: bool, last_choice: Any, expected: list[str]) -> None:
    assert checked(entries(mine, claims, waiting=waiting, last_choice=last_choice)) == expected


@pytest.mark.parametrize(
    ("claims", "waiting", "startable", "selectable"),
    [(FREE, False, True, True), (FREE, True, True, True), (HELD, False, False, False), (HELD, True, False, True)],
    ids=["free", "free-waiting", "held", "held-waiting"],
)
def test_a_profile_that_cannot_start_is_selectable_only_where_spawns_wait(
    claims: dict[str, Holder], waiting: bool, startable: bool, selectable: bool
) -> None:
    gpu, cpu = entries(profiles("gpu", "cpu"), claims, waiting=waiting)
    assert (gpu["startable"], gpu["selectable"]) == (startable, selectable)
    assert (cpu["startable"], cpu["selectable"]) == (True, True)  # needs no GPU: always


def test_an_entry_says_what_the_profile_gives_and_whether_it_can_start() -> None:
    (mine,) = list(parse_profiles([{
        "slug": "a100", "display_name": "One A100", "description": "For training.", "image": "lab/pytorch:2024.10",
        "gpus": 1, "cpu_limit": 8,
    }]))
    (free,) = entries([mine], FREE)
    assert {k: free[k] for k in ("slug", "display_name", "description", "image", "resources", "availability")} == {
        "slug": "a100", "display_name": "One A100", "description": "For training.",
        "image": "lab/pytorch:2024.10", "resources": "1 × any GPU · 8 CPUs",
        "availability": "1 of 1 NVIDIA A100-SXM4-80GB free",
    }
    (held,) = entries([mine], HELD)
    assert held["availability"] == "none free (1 × NVIDIA A100-SXM4-80GB, all in use)"


# --- The HTML ----------------------------------------------------------------------------------


class Inputs(HTMLParser):
    """The form's radio inputs, by value, with their attributes."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.found: dict[str, dict[str, str | None]] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "input":
            found = dict(attrs)
            self.found[found["value"] or ""] = found


def test_the_form_checks_the_chosen_entry_and_disables_those_that_cannot_be_chosen() -> None:
    html = render_form(entries(profiles("gpu", "cpu", "cpu2", default="gpu"), HELD), waiting=False)
    inputs = Inputs(html).found
    assert list(inputs) == ["gpu", "cpu", "cpu2"]
    assert [v for v, a in inputs.items() if "checked" in a] == ["cpu"]
    assert [v for v, a in inputs.items() if "disabled" in a] == ["gpu"]
    assert all(a["name"] == "profile" and a["type"] == "radio" for a in inputs.values())
    assert "your server then waits for one" not in html


def test_the_form_says_a_busy_profile_waits_where_spawns_wait() -> None:
    html = render_form(entries(profiles("gpu"), HELD, waiting=True), waiting=True)
    assert "A profile whose GPUs are all in use can still be chosen: your server then waits for one." in html
    assert "disabled" not in Inputs(html).found["gpu"]


def test_the_form_escapes_what_admins_and_images_put_in_it() -> None:
    (mine,) = list(parse_profiles([{
        "slug": "x", "display_name": "<script>alert(1)</script>", "description": 'Fast & "new" <b>',
        "image": "lab/pytorch:2024.10",
    }]))
    html = render_form(entries([mine], FREE), waiting=False)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>" not in html and "Fast &amp; &#34;new&#34; &lt;b&gt;" in html


def test_a_user_with_no_profile_is_told_to_ask_an_admin() -> None:
    assert "No profile is open to you. Ask an admin for access." in render_form([], waiting=False)


def test_the_admins_template_file_is_used_with_the_same_variables_and_escaping(tmp_path: Path) -> None:
    template = tmp_path / "profiles.html"
    template.write_text("{% for p in profiles %}[{{ p.display_name }}{% if p.checked %}*{% endif %}]{% endfor %} wait={{ waiting }}")
    mine = profiles("cpu", "gpu", default="cpu") + list(parse_profiles([{"slug": "odd", "display_name": "<i>", "image": "x:1"}]))
    assert render_form(entries(mine, FREE), waiting=True, template_file=str(template)) == "[CPU*][GPU][&lt;i&gt;] wait=True"


def test_an_edited_admin_template_is_read_again(tmp_path: Path) -> None:
    template = tmp_path / "form.html"
    template.write_text("first")
    assert render_form([], waiting=False, template_file=str(template)) == "first"
    template.write_text("second")
    later = template.stat().st_mtime + 10  # the template's time changes even on a coarse-grained file system
    os.utime(template, (later, later))
    assert render_form([], waiting=False, template_file=str(template)) == "second"


def test_each_template_folder_has_one_environment_kept_between_forms(tmp_path: Path) -> None:
    assert template_environment(TEMPLATES) is template_environment(TEMPLATES)
    assert template_environment(tmp_path) is not template_environment(TEMPLATES)
    assert template_environment(TEMPLATES).autoescape is True


# --- The GPU queue --------------------------------------------------------------------------------


def test_a_profile_shows_how_many_wait_ahead_and_is_not_startable_past_them() -> None:
    queued = {GPURequest(count=1): 2}  # two spawns wait for one GPU, though GPU-0 looks free (kept for them)
    mine = profiles("gpu", "cpu")
    gpu, cpu = form_entries(mine, ONE_GPU, FREE, holder=ME, busy_memory_threshold=GiB, waiting=True,
                            last_choice=None, queued=queued)
    assert (gpu["queued"], gpu["startable"], gpu["selectable"]) == (2, False, True)
    assert (cpu["queued"], cpu["startable"]) == (0, True)
    html = render_form([gpu, cpu], waiting=True)
    assert 'data-queued="gpu">2 waiting ahead</span>' in html and 'data-queued="cpu"' not in html
    alone = form_entries(mine, ONE_GPU, FREE, holder=ME, busy_memory_threshold=GiB, waiting=False, last_choice=None)
    assert (alone[0]["queued"], alone[0]["startable"]) == (0, True)


# --- An image the host's driver cannot run ------------------------------------------------------------

NEEDS_CUDA_13 = ("Image lab/pytorch:2024.10 requires CUDA >= 13.0 (NVIDIA_REQUIRE_CUDA=\"cuda>=13.0\"), but this host's "
                 "NVIDIA driver 550.54.15 supports CUDA 12.4. Choose a profile whose image fits, or ask an admin to update the driver.")


@pytest.mark.parametrize("waiting", [False, True], ids=["no-waiting", "spawns-wait"])
def test_a_profile_whose_image_cannot_run_here_says_why_and_cannot_be_chosen(waiting: bool) -> None:
    mine = profiles("gpu", "gpu2", "cpu")
    found = form_entries(mine, ONE_GPU, FREE, holder=ME, busy_memory_threshold=GiB, waiting=waiting,
                         last_choice="gpu", unfit={"gpu": NEEDS_CUDA_13})
    by_slug = {e["slug"]: e for e in found}
    assert {k: by_slug["gpu"][k] for k in ("availability", "unfit", "startable", "selectable", "checked")} == {
        "availability": "image cannot run here", "unfit": NEEDS_CUDA_13, "startable": False, "selectable": False,
        "checked": False,
    }
    assert (by_slug["gpu2"]["unfit"], by_slug["gpu2"]["startable"], by_slug["gpu2"]["checked"]) == ("", True, True)
    html = render_form(found, waiting=waiting)
    assert "disabled" in Inputs(html).found["gpu"]
    assert 'data-unfit="gpu">Image lab/pytorch:2024.10 requires CUDA &gt;= 13.0' in html
    assert 'data-unfit="gpu2"' not in html
