"""A large pool: 10,000 servers and 10,000 waiting requests (lightweight fake peers inside the tracker,
its replies over a real socket to the real client and CLI). The detailed summary is ~7 MiB, far over the
1 MiB that limited the client before."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

import tether
from tether.cli import main as cli_main
from tether.protocol import Put, Request, RequestOptions, UpdateInfo
from tether.tracker import TrackerConfig, TrackerThread

pytestmark = pytest.mark.timeout(120)

SERVERS = 10_000
WAITERS = 10_000
KEYS = 20
DEVICE = {"os": "Linux", "arch": "aarch64", "cores": 8, "memory_mb": 7680, "backends": {"tvm": "0.27.0"}}


class _Peer:
    """A fake connection: the tracker's replies to it are counted and dropped."""

    def __init__(self) -> None:
        self.sent = 0

    def send(self, data: bytes) -> None:
        self.sent += len(data)

    def close(self) -> None:
        pass


def _populate(tracker: TrackerThread) -> None:
    core = tracker.core
    for i in range(SERVERS):
        conn = core.connect(_Peer(), f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 40000)
        key = f"phone{i % KEYS}"
        info = {
            "key": f"server:{key}",
            "addr": [None, 9090],
            "tether": {"protocols": ["tether", "tvm"], "labels": {"soc": f"sd{i % 7}"}, "slots": 1, "device": DEVICE},
        }
        core.receive(conn, UpdateInfo(info))
        core.receive(conn, Put(key, 9090, f"{key}:{i:08x}"))
    for j in range(WAITERS):  # all for a key nobody serves: they stay waiting
        conn = core.connect(_Peer(), "10.200.0.1", 1024 + j % 60000)
        core.receive(conn, Request("board", f"user{j % 50}", 1, RequestOptions(f"r{j}", "tether", {}, None, None)))


@pytest.fixture(scope="module")
def big() -> Iterator[TrackerThread]:
    # 10,000 waiters from one address: more than a tracker takes from one peer by default
    with TrackerThread(TrackerConfig(host="127.0.0.1", port=0, max_waiters_per_peer=0)) as tracker:
        tracker.call(lambda: _populate(tracker), timeout=60)
        yield tracker


def test_status_of_10000_servers_and_10000_waiters(big: TrackerThread) -> None:
    with tether.connect_tracker(big.host, big.port) as pool:
        status = pool.status()
    assert len(status.servers) == SERVERS
    assert len(status.waiters) == WAITERS
    rows = {row.key: row for row in status.keys}
    assert rows["phone3"].total == SERVERS // KEYS and rows["phone3"].free == SERVERS // KEYS
    assert rows["board"].pending == WAITERS and rows["board"].total == 0
    assert [w.position for w in status.waiters] == list(range(1, WAITERS + 1))
    assert status.servers[0].device == DEVICE


def test_tether_query_json_and_table_at_that_size(big: TrackerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["query", "--host", big.host, "--port", str(big.port), "--json"]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert len(data["servers"]) == SERVERS and len(data["waiters"]) == WAITERS
    assert cli_main(["query", "--host", big.host, "--port", str(big.port)]) == 0
    out = capsys.readouterr().out
    assert "phone19" in out and "board" in out


def test_plain_summary_stays_small(big: TrackerThread) -> None:
    """TVM's SUMMARY lists each server's info as sent, less tether's extension (in the detail instead)."""
    with tether.TrackerClient.connect(big.host, big.port) as client:
        plain = client.summary()
    assert len(plain["server_info"]) == SERVERS
    assert "tether" not in plain["server_info"][0]
    assert plain["queue_info"]["board"] == {"free": 0, "pending": WAITERS}
    assert len(json.dumps(plain)) < 1 << 20
