"""An asyncio service (tracker, proxy) on its own event loop in a background thread.

For tests, notebooks and the demo: ``with TrackerThread(...) as t:`` starts the service, returns once it
is bound (or raises what binding raised), and stops it on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from ..errors import ConfigError

__all__ = ["LoopThread", "Service"]


class Service(Protocol):
    async def start(self) -> None: ...

    async def serve_until_stopped(self) -> None: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=Service)
T = TypeVar("T", bound="LoopThread[Any]")


class LoopThread(Generic[S]):
    """Runs ``server`` (``start``, then ``serve_until_stopped``) on a new loop in a daemon thread."""

    def __init__(self, server: S, name: str, start_timeout: float = 10.0) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout):
            raise ConfigError(f"{name} did not start in time")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self.server.serve_until_stopped()

        try:
            self._loop.run_until_complete(main())
        finally:
            try:
                self._finish()
            finally:
                self._loop.close()

    def _finish(self) -> None:
        """What the service left behind: tasks cancelled and awaited, callbacks (a transport's close) run."""
        loop = self._loop
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=2.0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(asyncio.sleep(0))  # closes scheduled by the cancelled tasks

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the service's loop and return its result (to read state safely)."""

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the service has stopped; False on timeout."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self.server.stop)
            self._thread.join(timeout)

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
