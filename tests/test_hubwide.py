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


async def test_a_container_change_makes_the_form_read_again_and_the_metrics_keep_the_last_read() -> None:
    from gpuspawner.allocation import Holder
    from gpuspawner.gpus import remembered_claims
    from gpuspawner.hubwide import resources

    other = {"GPU-x": Holder("", "someone-elses-job")}
    reads = []

    async def read() -> dict[str, Holder]:
        reads.append(1)
        return dict(other)

    try:
        await remembered_claims("h", read, max_age=60)
        resources.containers_changed()
        assert resources.engine_claims["h"][1] == other  # the sampler still sees the other container's GPU
        await remembered_claims("h", read, max_age=60)
        assert len(reads) == 2  # the form reads the engine again
    finally:
        resources.reset()
