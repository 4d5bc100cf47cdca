"""The hub-wide resources: one object per hub process, made afresh by reset()."""

from __future__ import annotations

from gpuspawner.hubwide import HubResources


def fresh(hub: HubResources) -> bool:
    return not (hub.pools or hub.stores or hub.foreign or hub.tasks) and (hub.hub_id, hub.docker_version, hub.nvml) == (
        None, None, None
    )


def test_reset_forgets_everything_and_shuts_the_pools_down() -> None:
    hub = HubResources()
    pool = hub.pool("docker", 2)
    hub.foreign["c1"] = {}
    book = hub.book
    hub.reset()
    assert fresh(hub) and hub.book is not book
    assert pool._shutdown
    assert hub.pool("docker", 2) is not pool


def test_a_pool_is_made_once_with_the_threads_first_asked_for() -> None:
    hub = HubResources()
    assert hub.pool("pull", 2) is hub.pool("pull", 8)
    assert hub.pool("pull", 2)._max_workers == 2
    hub.reset()


async def test_reset_cancels_the_background_tasks() -> None:
    import asyncio

    hub = HubResources()
    task = hub.keep(asyncio.sleep(3600))
    done = hub.keep(asyncio.sleep(0))
    await done
    assert hub.tasks == {task}  # a finished task is let go at once
    hub.reset()
    await asyncio.sleep(0)
    assert task.cancelled() and fresh(hub)
