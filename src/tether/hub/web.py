"""The web page and the JSON API, served by aiohttp on the tracker's own event loop.

Routes (all ``GET``; answers are JSON but for ``/`` and the event stream):

=======================  ===============================================================================
``/``                    the page (``static/index.html``)
``/api/v1/servers``      ``key``, ``label=name=value`` (repeatable), ``user``, ``state``, ``offset``, ``limit``
``/api/v1/queues``       ``key``, ``user``
``/api/v1/sessions``     ``key``, ``user``, ``offset``, ``limit``: sessions in progress
``/api/v1/history``      ``key``, ``user``, ``limit``: the last finished sessions (the journal's, when
                         the tracker keeps one, else the last ``history_size`` kept in memory)
``/api/v1/health``       ``key``, ``label``: servers whose standing is not "ok", with the reasons
``/api/v1/summary``      counts
``/api/v1/events``       server-sent events: each tracker event as ``data: {json}``, ``: keepalive``
                         comments every ``keepalive_s``
=======================  ===============================================================================

Errors are JSON, ``{"error": code, "message": text}``, with the status: 400 (``bad_request``: an unknown
parameter, a bad value), 404 (``not_found``), 405 (``method_not_allowed``), 413 (``too_large``), 503
(``too_many_streams``), 500 (``internal``; logged).

Everything here runs on the tracker's loop and reads the core directly (it is single-threaded); only the
journal is read in a thread. aiohttp is imported when a :class:`Hub` starts, never at import time.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import importlib.resources
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..aio.net import bind_listener, format_hostport
from ..tracker.core import TrackerCore
from ..tracker.events import TrackerEvent
from . import views
from .config import HUB_INSTALL_HINT, HubConfig, HubUnavailable
from .history import History
from .stream import EventStreams

if TYPE_CHECKING:
    from aiohttp import web

    from .metrics import TrackerMetrics

__all__ = ["Handler", "Hub", "SessionJournal", "require_aiohttp"]

logger = logging.getLogger("tether.hub")

API = "/api/v1"
Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]
_FILTERS = ("key", "label", "user", "state")
_PAGING = ("offset", "limit")
_ERROR_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


class SessionJournal(Protocol):
    """What the hub needs of a journal (``tether tracker --db``): finished sessions, newest first, as rows
    like :meth:`History.rows`'s. Called in a worker thread."""

    def finished(self, *, limit: int, key: str | None = None, user: str | None = None) -> list[dict[str, Any]]: ...


def require_aiohttp() -> None:
    """Raise :class:`HubUnavailable` (naming the extra to install) when aiohttp or prometheus-client cannot
    be imported."""
    try:
        import aiohttp.web  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise HubUnavailable(
            f"the web page, API and metrics need aiohttp and prometheus-client ({exc}): {HUB_INSTALL_HINT}"
        ) from exc


def _page() -> tuple[bytes, str]:
    """The page's bytes and its Content-Security-Policy: its one inline script and style allowed by hash,
    nothing from elsewhere."""
    html = importlib.resources.files("tether.hub").joinpath("static/index.html").read_text("utf-8")
    hashes = {}
    for tag in ("script", "style"):
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
        digests = [base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() for s in found]
        hashes[tag] = " ".join(f"'sha256-{d}'" for d in digests) or "'none'"
    csp = (
        f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html.encode(), csp


class Hub:
    """The web side of one tracker: ``await start()`` binds ``config.host:config.port`` (raising
    :class:`~tether.errors.ConfigError` when it cannot, :class:`HubUnavailable` without aiohttp), then
    ``host``, ``port`` and ``url`` tell where; ``await close()`` ends the event streams and the server.

    ``journal``: finished sessions are read from it (:class:`SessionJournal`) rather than from memory.
    More routes (``/metrics``, say) may be added with :meth:`add_route` before :meth:`start`.
    """

    def __init__(
        self,
        core: TrackerCore,
        config: HubConfig | None = None,
        *,
        journal: SessionJournal | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.config = config or HubConfig()
        self.journal = journal
        self._wall = wall
        self.history = History(self.config.history_size)
        self.streams = EventStreams(self.config.max_streams, self.config.stream_queue)
        self.host = self.config.host
        self.port = 0
        self._extra: list[tuple[str, str, Handler]] = []
        self._runner: Any = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._page: tuple[bytes, str] | None = None
        self._order = views.ServerOrder()
        #: ``/metrics``' counts (:class:`~tether.hub.metrics.TrackerMetrics`) while the hub runs with ``config.metrics``
        self.metrics: TrackerMetrics | None = None

    @property
    def url(self) -> str:
        return f"http://{format_hostport(self.host, self.port)}/"

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Serve ``handler`` (an aiohttp handler, run on the tracker's loop) at ``path``; before :meth:`start`."""
        if self._runner is not None:
            raise RuntimeError("add routes before start()")
        self._extra.append((method, path, handler))

    async def start(self) -> None:
        require_aiohttp()
        from aiohttp import web

        cfg = self.config
        self._page = _page()
        if cfg.metrics and self.metrics is None:
            from .metrics import mount_metrics

            self.metrics = mount_metrics(self.core, self._extra_route)
        sock = bind_listener(cfg.host, cfg.port, None, backlog=128)
        try:
            self.host, self.port = str(sock.getsockname()[0]), int(sock.getsockname()[1])
            runner = web.AppRunner(
                self._build_app(),
                access_log=None,
                handle_signals=False,
                shutdown_timeout=cfg.shutdown_timeout_s,
                handler_cancellation=True,  # a reader gone mid-answer ends its handler (event streams too)
            )
            await runner.setup()
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            self._close_metrics()
            raise
        self._runner = runner
        events = self.core.events
        self._unsubscribe = [
            events.subscribe(f) for f in (self._on_event, self.history.on_event, self.streams.on_event)
        ]
        logger.debug("web page on %s", self.url)

    async def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        self.streams.close_all()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._close_metrics()

    def _close_metrics(self) -> None:
        metrics, self.metrics = self.metrics, None
        if metrics is not None:
            metrics.close()
            self._extra = [route for route in self._extra if route[1] != "/metrics"]

    def _extra_route(self, method: str, path: str, handler: Handler) -> None:
        self._extra.append((method, path, handler))

    # -- the application ----------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        from aiohttp import web

        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[_errors_middleware()])
        app.on_response_prepare.append(_security_headers)
        add = app.router.add_get
        add("/", self._index)
        add(f"{API}/servers", self._json(self._servers))
        add(f"{API}/queues", self._json(self._queues))
        add(f"{API}/sessions", self._json(self._sessions))
        add(f"{API}/history", self._json(self._history))
        add(f"{API}/health", self._json(self._health))
        add(f"{API}/summary", self._json(self._summary))
        add(f"{API}/events", self._events)
        for method, path, handler in self._extra:
            app.router.add_route(method, path, handler)
        return app

    def _json(self, view: Callable[[web.Request], Awaitable[dict[str, Any]]]) -> Handler:
        @functools.wraps(view)
        async def handler(request: web.Request) -> web.StreamResponse:
            from aiohttp import web

            try:
                body = await view(request)
            except views.BadParam as exc:
                return _error(400, "bad_request", str(exc))
            return web.json_response(body, dumps=_dumps)

        return handler

    def _clocks(self) -> views.Clocks:
        return views.Clocks(self.core.clock(), self._wall())

    def _on_event(self, event: TrackerEvent) -> None:
        if event.kind in ("register", "unregister"):
            self._order.changed()

    def _paging(self, request: web.Request) -> views.Paging:
        cfg = self.config
        return views.parse_paging(request.query.items(), cfg.page_limit, cfg.max_page_limit)

    async def _index(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        assert self._page is not None
        body, csp = self._page
        headers = {"Content-Security-Policy": csp, "Cache-Control": "no-cache"}
        return web.Response(body=body, content_type="text/html", charset="utf-8", headers=headers)

    async def _servers(self, request: web.Request) -> dict[str, Any]:
        filters = views.parse_filters(request.query.items(), _FILTERS, extra=_PAGING)
        paging = self._paging(request)
        return views.servers(self.core, self._clocks(), filters, paging, views.HealthView(self.core), order=self._order)

    async def _queues(self, request: web.Request) -> dict[str, Any]:
        filters = views.parse_filters(request.query.items(), ("key", "user"))
        return views.queues(self.core, self._clocks(), filters)

    async def _sessions(self, request: web.Request) -> dict[str, Any]:
        filters = views.parse_filters(request.query.items(), ("key", "user"), extra=_PAGING)
        return views.sessions(self.core, self._clocks(), filters, self._paging(request))

    async def _history(self, request: web.Request) -> dict[str, Any]:
        filters = views.parse_filters(request.query.items(), ("key", "user", "limit"))
        cfg = self.config
        limit = views.parse_limit(request.query.items(), cfg.page_limit, max(cfg.max_page_limit, cfg.history_size))
        journal, source = self.journal, "memory"
        rows: list[dict[str, Any]] | None = None
        if journal is not None:
            read = functools.partial(journal.finished, limit=limit, key=filters.key, user=filters.user)
            try:
                rows = await asyncio.get_running_loop().run_in_executor(None, read)
                source = "journal"
            except Exception:
                logger.exception("reading the journal's sessions failed: answering from memory")
        if rows is None:
            rows = self.history.rows(limit, filters.key, filters.user)
        return {"time": self._wall(), "source": source, "limit": limit, "sessions": rows}

    async def _health(self, request: web.Request) -> dict[str, Any]:
        filters = views.parse_filters(request.query.items(), ("key", "label"))
        return views.health(self.core, self._clocks(), filters, views.HealthView(self.core))

    async def _summary(self, request: web.Request) -> dict[str, Any]:
        views.parse_filters(request.query.items(), ())
        extra = {"streams": len(self.streams), "history": len(self.history), "journal": self.journal is not None}
        return views.summary(self.core, self._clocks(), views.HealthView(self.core), web=extra)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        views.parse_filters(request.query.items(), ())
        stream = self.streams.open()
        if stream is None:
            message = f"{self.config.max_streams} event streams are open (the limit); try again later"
            return _error(503, "too_many_streams", message, headers={"Retry-After": "5"})
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        cfg = self.config
        try:
            await response.prepare(request)
            await response.write(b"retry: 2000\n: connected\n\n")
            while True:
                try:
                    first = await asyncio.wait_for(stream.queue.get(), cfg.keepalive_s)
                except asyncio.TimeoutError:
                    first = b": keepalive\n\n"
                chunks = [first]
                while chunks[-1] is not None and not stream.queue.empty():
                    chunks.append(stream.queue.get_nowait())  # all that is queued, in one write
                data = b"".join(c for c in chunks if c is not None)
                if data:
                    await asyncio.wait_for(response.write(data), cfg.stream_write_timeout_s)
                if chunks[-1] is None:
                    break
        except (ConnectionError, asyncio.TimeoutError):
            pass  # the reader left, or stopped reading
        finally:
            self.streams.discard(stream)
        return response


_dumps = functools.partial(json.dumps, ensure_ascii=False, default=str)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    from aiohttp import web

    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


def _errors_middleware() -> Any:
    from aiohttp import web

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _ERROR_CODES.get(exc.status, "http_error")
            message = exc.reason if exc.status != 404 else f"no such page: {request.path[:200]}"
            if exc.status == 405:
                message = f"{request.method} is not allowed here (GET only)"
            return _error(exc.status, code, message)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("internal error answering %s %s", request.method, request.path[:200])
            return _error(500, "internal", "internal error (logged at the tracker)")

    return errors


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Cache-Control", "no-store")
    if not request.path.startswith(API):
        response.headers.setdefault("X-Frame-Options", "DENY")
