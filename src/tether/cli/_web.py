"""``tether tracker --web-port``: the flags of the web page and API, and starting it beside the tracker.

``tether.hub`` (and with it aiohttp) is imported only when ``--web-port`` is given: the tracker without it
runs on the standard library alone.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._args import port

if TYPE_CHECKING:
    from ..hub.config import HubConfig
    from ..hub.web import Handler, Hub, SessionJournal
    from ..tracker import TrackerServer

__all__ = ["add_web_flags", "hub_config_from_args", "start_hub"]


def add_web_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("web page and API", "a live page and a JSON API (needs pip install 'tether[hub]')")
    group.add_argument(
        "--web-port", type=port, default=None, metavar="PORT", help="serve them on this port (default: off; 0: any)"
    )
    group.add_argument(
        "--web-host", default=None, metavar="HOST", help="address the web port binds (default: the tracker's --host)"
    )


def hub_config_from_args(args: argparse.Namespace) -> HubConfig | None:
    """The web side's settings, None without ``--web-port``. Raises :class:`~tether.hub.HubUnavailable`
    (a ConfigError) when aiohttp is missing, before anything is bound."""
    if args.web_port is None:
        return None
    from ..hub import HubConfig
    from ..hub.web import require_aiohttp

    require_aiohttp()
    return HubConfig(host=args.web_host or args.host, port=args.web_port)


async def start_hub(
    server: TrackerServer,
    config: HubConfig,
    journal: SessionJournal | None = None,
    routes: Sequence[tuple[str, str, Handler]] = (),
) -> Hub:
    """Start the web side on the running loop (the tracker's) and print ``web page on http://HOST:PORT/``.
    ``journal``: finished sessions are read from it; ``routes``: (method, path, aiohttp handler) served
    beside the page and the API (``/metrics``, say)."""
    from ..hub.web import Hub

    hub = Hub(server.core, config, journal=journal)
    for method, path, handler in routes:
        hub.add_route(method, path, handler)
    await hub.start()
    print(f"web page on {hub.url}", flush=True)
    return hub
