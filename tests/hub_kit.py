"""Helpers of the web side's tests: a tracker with its hub on loopback port 0, servers registered by raw
tracker-protocol peers, GETs of the API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from tether.hub import HubConfig
from tether.hub.service import TrackerHubThread
from tether.tracker import TrackerConfig

from .conftest import RawPeer

DEVICE = {"os": "Linux", "arch": "aarch64", "cpu": "Cortex-A78", "cores": 8, "memory": 8 << 30}


def start_hub(**hub_config: Any) -> TrackerHubThread:
    """A tracker and its web side on loopback, both on port 0 (use as a context manager)."""
    return TrackerHubThread(TrackerConfig(host="127.0.0.1", port=0), HubConfig(host="127.0.0.1", port=0, **hub_config))


def get(base: str, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET ``base`` + ``path``: (status, decoded JSON body)."""
    try:
        with urllib.request.urlopen(base.rstrip("/") + path, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def get_ok(base: str, path: str) -> Any:
    status, body = get(base, path)
    assert status == 200, body
    return body


class Device:
    """A tether server as the tracker sees it: UPDATE_INFO with tether's facts, then a free slot (PUT)."""

    def __init__(
        self,
        tracker: TrackerHubThread,
        key: str,
        port: int,
        labels: dict[str, str] | None = None,
        device: dict[str, Any] | None = None,
    ) -> None:
        self.key, self.port, self.labels = key, port, labels or {}
        self.peer = RawPeer(tracker.host, tracker.port)
        self.id = f"127.0.0.1:{port}"
        self.n = 0
        info = {
            "key": f"server:{key}",
            "addr": [None, port],
            "tether": {
                "protocols": ["tether", "tvm"],
                "labels": labels or {},
                "device": device if device is not None else DEVICE,
                "version": "test",
            },
        }
        assert self.peer.call([5, info]) == 0
        self.offer()

    def offer(self) -> str:
        """Offer a free slot again (a new matchkey, as a tether server does after each session)."""
        self.n += 1
        self.matchkey = f"{self.key}:{self.port}-{self.n}"
        assert self.peer.call([3, self.key, [self.port, self.matchkey], None]) == 0
        return self.matchkey

    def session(
        self, event: str, client: str = "127.0.0.1:40000", outcome: str | None = None, detail: str = ""
    ) -> None:
        """Report the granted session started or ended, and how (tether's SESSION message)."""
        body: dict[str, Any] = {"event": event, "matchkey": self.matchkey, "peer": client}
        if outcome is not None:
            body.update(outcome=outcome, detail=detail)
        assert self.peer.call([102, body]) == 0

    def close(self) -> None:
        self.peer.close()
