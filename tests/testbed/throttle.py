"""A TCP proxy on 127.0.0.1 that slows one direction down: a registry reached through it pulls slowly.

Used to make an image pull take a known, long time (for the tests that show a slow pull holds
nobody else up, and for the benchmarks), with a real registry and a real Docker engine.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import threading
import time

from . import DockerBed, free_port


class ThrottledProxy:
    """Forwards 127.0.0.1:<port> to `target`; the target's replies flow at `bytes_per_second` at most."""

    def __init__(self, target: str, *, bytes_per_second: int) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.rate = bytes_per_second
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="throttled-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._budget_lock: asyncio.Lock | None = None
        self._next_send = 0.0

    def start(self) -> ThrottledProxy:
        self._thread.start()
        self._started.wait(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._budget_lock = asyncio.Lock()
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self._started.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pipe(client_r, upstream_w, throttle=False), self._pipe(upstream_r, client_w, throttle=True))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, throttle: bool) -> None:
        try:
            while True:
                chunk = await reader.read(16384)
                if not chunk:
                    break
                if throttle:
                    await self._wait_for_budget(len(chunk))
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _wait_for_budget(self, n: int) -> None:
        """All connections together share the rate, as one slow link would."""
        assert self._budget_lock is not None
        async with self._budget_lock:
            now = time.monotonic()
            start = max(now, self._next_send)
            self._next_send = start + n / self.rate
        delay = start - now
        if delay > 0:
            await asyncio.sleep(delay)


def push_slow_image(
    bed: DockerBed, registry_address: str, *, base: str, repo: str, megabytes: int, seconds: float,
) -> tuple[str, ThrottledProxy]:
    """An image `megabytes` larger than `base`, pushed to the registry and removed from the engine.

    Returns its reference through a new throttled proxy, whose pull takes about `seconds`, and
    the proxy (the caller stops it).
    """
    tag = "v" + secrets.token_hex(4)
    pushed = f"{registry_address}/{repo}"
    dockerfile = f"FROM {base}\nUSER root\nRUN head -c {megabytes}M /dev/urandom > /blob-{tag}\nUSER jovyan\n"
    image, _ = bed.client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=f"{pushed}:{tag}", rm=True)
    for line in bed.api.push(pushed, tag, stream=True, decode=True):
        if "error" in line:
            raise RuntimeError(f"pushing {pushed}:{tag} failed: {line['error']}")
    bed.api.remove_image(image.id, force=True)
    proxy = ThrottledProxy(registry_address, bytes_per_second=int(megabytes * 2**20 / seconds)).start()
    return f"{proxy.address}/{repo}:{tag}", proxy
