"""The profile chooser (the spawn form): its entries, and their rendering as HTML.

Each profile the user may use becomes an entry saying whether it can start now; the entries
are rendered with gpuspawner's Jinja2 template or the admin's (``GPUSpawner.profile_form_template``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

from . import profiles
from .allocation import GPURequest, Holder, availability
from .devices import Inventory
from .gpuqueue import kind_of

TEMPLATES = Path(__file__).parent / "templates"
UNFIT_BADGE = "image cannot run here"  # the availability of a profile whose image's requirements the driver does not meet


def form_entries(
    mine: Sequence[profiles.Profile], inventory: Inventory, claims: Mapping[str, Holder], *, holder: Holder,
    busy_memory_threshold: int, waiting: bool, last_choice: Any, queued: Mapping[GPURequest, int] | None = None,
    unfit: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One entry per profile the user may use, as the template reads them.

    A profile that cannot start now is selectable only where spawns wait for devices
    (`waiting`). The user's last choice is checked, else the default profile, else the first
    that can be selected. `queued`: how many spawns wait in the GPU queue for each kind of
    device (:func:`gpuspawner.gpuqueue.queue_lengths`); a profile shows how many wait before it.
    `unfit`: slug -> why the profile's image cannot start on this host (its CUDA requirements,
    :mod:`gpuspawner.cudareq`): such a profile says so, with the reason in ``unfit``, and is never
    selectable, as waiting would not help.
    """
    entries = []
    for p in mine:
        avail = availability(p.gpus, inventory, claims, holder=holder, busy_memory_threshold=busy_memory_threshold)
        in_line = (queued or {}).get(kind_of(p.gpus), 0) if p.gpus.wants_gpu else 0
        reason = (unfit or {}).get(p.slug)
        startable = avail.startable and not in_line and not reason
        entries.append({
            "slug": p.slug, "display_name": p.display_name, "description": p.description,
            "image": str(p.image), "resources": p.resources(),
            "availability": UNFIT_BADGE if reason else avail.text, "unfit": reason or "",
            "startable": startable, "selectable": not reason and (startable or waiting),
            "queued": in_line, "checked": False,
        })
    default_slug = (profiles.default_profile(mine) or mine[0]).slug if mine else None
    wanted = [last_choice, default_slug]
    selectable = [e for e in entries if e["selectable"]]
    chosen = next((e for slug in wanted for e in selectable if e["slug"] == slug), selectable[0] if selectable else None)
    if chosen is not None:
        chosen["checked"] = True
    return entries


def render_form(entries: list[dict[str, Any]], *, waiting: bool, template_file: str = "") -> str:
    """The form's HTML, from `template_file` (GPUSpawner.profile_form_template) or gpuspawner's own."""
    if template_file:
        path = Path(template_file).absolute()
        folder, name = path.parent, path.name
    else:
        folder, name = TEMPLATES, "profiles.html"
    return template_environment(folder).get_template(name).render(profiles=entries, waiting=waiting)


@functools.cache
def template_environment(folder: Path) -> jinja2.Environment:
    """The one autoescaping Jinja2 environment for the templates in `folder`, made on first use.

    Building an environment per form view costs about 4 ms on the hub's event loop; a kept one
    compiles each template once and still reloads a template whose file has changed since.
    """
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)), autoescape=True)
