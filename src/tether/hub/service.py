"""A tracker and its web side as one service, on one event loop: for tests, notebooks and benches.

``with TrackerHubThread(TrackerConfig(port=0), HubConfig(port=0)) as t:`` then ``t.port`` (the tracker),
``t.web_url`` (the page); both stop on exit. ``tether tracker --web-port`` does the same from the CLI.
"""

from __future__ import annotations

from ..aio.loop_thread import LoopThread
from ..tracker import TrackerConfig, TrackerServer
from ..tracker.core import TrackerCore
from .config import HubConfig
from .web import Hub, SessionJournal

__all__ = ["TrackerHub", "TrackerHubThread"]


class TrackerHub:
    """``await start()`` binds the tracker, then the web side (closing the tracker again when that fails);
    ``await serve_until_stopped()`` returns after :meth:`stop` or a STOP message, the web side closed."""

    def __init__(
        self,
        tracker: TrackerConfig | None = None,
        hub: HubConfig | None = None,
        *,
        journal: SessionJournal | None = None,
    ) -> None:
        self.tracker = TrackerServer(tracker or TrackerConfig(port=0))
        self.hub = Hub(self.tracker.core, hub or HubConfig(host=self.tracker.config.host), journal=journal)

    async def start(self) -> None:
        await self.tracker.start()
        try:
            await self.hub.start()
        except BaseException:
            self.tracker.stop()
            await self.tracker.serve_until_stopped()
            raise

    async def serve_until_stopped(self) -> None:
        try:
            await self.tracker.serve_until_stopped()
        finally:
            await self.hub.close()

    def stop(self) -> None:
        self.tracker.stop()


class TrackerHubThread(LoopThread[TrackerHub]):
    """:class:`TrackerHub` on its own event loop in a background thread (see :class:`LoopThread`)."""

    def __init__(
        self,
        tracker: TrackerConfig | None = None,
        hub: HubConfig | None = None,
        *,
        journal: SessionJournal | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        super().__init__(TrackerHub(tracker, hub, journal=journal), "tether-tracker-hub", start_timeout)

    @property
    def host(self) -> str:
        return self.server.tracker.host

    @property
    def port(self) -> int:
        return self.server.tracker.port

    @property
    def core(self) -> TrackerCore:
        return self.server.tracker.core

    @property
    def web_url(self) -> str:
        return self.server.hub.url
