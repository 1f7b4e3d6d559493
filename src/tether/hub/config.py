"""The web side's settings (``tether tracker --web-port``), and the error when its extra is missing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ..errors import ConfigError

__all__ = ["HUB_INSTALL_HINT", "HubConfig", "HubUnavailable"]

#: What to run when the web side's dependencies are missing.
HUB_INSTALL_HINT: Final = "pip install 'tether[hub]'"


class HubUnavailable(ConfigError):
    """The web side was asked for, and aiohttp is not installed."""


@dataclass(frozen=True, slots=True)
class HubConfig:
    """Settings of the web page and API. Sizes in bytes, times in seconds.

    What a peer can make the web side hold is bounded: a request body (``max_body_bytes``; the API is
    read-only), concurrent event streams (``max_streams``; one more is answered 503), the events queued for
    one stream (``stream_queue``; a reader that falls that far behind is dropped, not buffered forever) and
    the time one write to a stream may take (``stream_write_timeout_s``).
    """

    host: str = "127.0.0.1"
    #: 0 lets the OS choose (the bound port is printed and kept in ``Hub.port``).
    port: int = 0
    max_body_bytes: int = 64 * 1024
    max_streams: int = 64
    stream_queue: int = 256
    stream_write_timeout_s: float = 10.0
    #: A ``: keepalive`` comment on each event stream this often, so proxies and browsers keep it open.
    keepalive_s: float = 15.0
    #: Finished sessions kept in memory for ``/api/v1/history`` (a journal, when there is one, keeps more).
    history_size: int = 1000
    #: Rows of a page when the request names no ``limit``, and the most it may name.
    page_limit: int = 100
    max_page_limit: int = 1000
    #: Seconds a graceful shutdown waits for requests in flight.
    shutdown_timeout_s: float = 2.0
    #: Serve ``GET /metrics`` (Prometheus' format, :mod:`tether.hub.metrics`) on the same port.
    metrics: bool = True
