"""The tracker's web side: a live page, a versioned JSON API and Prometheus metrics (``tether tracker
--web-port``).

It runs beside the tracker's core, on the tracker's own event loop, and only reads it: the core stays
standard-library only and knows nothing of HTTP. This package imports nothing beyond the standard library
at import time; :mod:`tether.hub.web` imports aiohttp when a hub starts (``pip install 'tether[hub]'``).

Modules:

- :mod:`.config`: :class:`HubConfig`, the web side's settings and bounds, written once;
- :mod:`.views`: pure snapshots of the core for the API (servers, queues, sessions, health, summary),
  filtered and paged: a page of rows costs the rows on it plus a cheap pass over the connections;
- :mod:`.history`: the last finished sessions, from the tracker's events (bounded);
- :mod:`.stream`: the fan-out of events to server-sent-event streams (bounded, slow readers dropped);
- :mod:`.web`: the aiohttp application and :class:`~tether.hub.web.Hub`, which serves it;
- :mod:`.metrics`: :class:`~tether.hub.metrics.TrackerMetrics`, ``/metrics`` in Prometheus' format;
- ``static/index.html``: the page, one file of HTML, CSS and plain JavaScript.
"""

from __future__ import annotations

from .config import HUB_INSTALL_HINT, HubConfig, HubUnavailable

__all__ = ["HUB_INSTALL_HINT", "HubConfig", "HubUnavailable"]
