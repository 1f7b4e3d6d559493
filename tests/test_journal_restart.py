"""History survives a tracker restart, end to end: ``tether tracker --db F`` as a process, a real
``tether server`` process registering, a client taking sessions and closing them; the tracker is stopped
(SIGTERM, by its pid) and a new one started on the same port and database; more sessions; then
``tether usage --db F --json`` counts the sessions of both runs. A server cordoned before the restart is
still cordoned after it (the journal's health states, given back to the new tracker)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tether
from tether.client.tracker import TrackerClient
from tether.journal import JournalReader
from tether.protocol.constants import TrackerCode

from .conftest import CliProcess, RawPeer, wait_until

pytestmark = pytest.mark.timeout(120)


def _free_slots(port: int, key: str) -> int:
    try:
        with TrackerClient.connect("127.0.0.1", port) as client:
            return int(client.summary()["queue_info"].get(key, {}).get("free", 0))
    except (tether.TransportError, OSError):
        return 0


def _standing(port: int, sid: str) -> str | None:
    """Server ``sid``'s health state in the tracker's SUMMARY; None while it is not registered."""
    with TrackerClient.connect("127.0.0.1", port) as client:
        for entry in client.summary(detail=True)["tether"]["servers"]:
            if entry.get("server") == sid:
                return str(entry.get("health", {}).get("state", "ok"))
    return None


def _sessions_ended(db: Path, n: int) -> bool:
    rows = JournalReader(db).sessions(limit=100)
    return len(rows) >= n and all(r["outcome"] is not None for r in rows)


def _take_sessions(port: int, user: str, n: int) -> None:
    with tether.connect_tracker("127.0.0.1", port, timeout=10) as pool:
        for _ in range(n):
            with pool.request("dev", user=user, timeout=30) as sess:
                sess.ping()


def _admin(port: int, op: str, server: str) -> dict[str, Any]:
    peer = RawPeer("127.0.0.1", port)
    try:
        code, result = peer.call([int(TrackerCode.ADMIN), {"op": op, "server": server, "reason": "maintenance"}])
    finally:
        peer.close()
    assert code == int(TrackerCode.SUCCESS), result
    return dict(result)


def test_history_and_standing_survive_a_restart(cli: Callable[..., CliProcess], tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    first = cli("tracker", "--host", "127.0.0.1", "--port", "0", "--db", str(db))
    _, port = first.listening()
    first.wait_line(f"history in {db}")
    device = cli(
        "server", "--host", "127.0.0.1", "--port", "0", "--key", "dev", "--preload", "none",
        "--tracker", f"127.0.0.1:{port}",
    )  # fmt: skip
    _, device_port = device.listening()
    sid = f"127.0.0.1:{device_port}"
    wait_until(lambda: _free_slots(port, "dev") == 1, timeout=20, what="the server registered")

    _take_sessions(port, "alice", 3)
    wait_until(lambda: _sessions_ended(db, 3), timeout=20, what="three sessions ended in the journal")
    assert _admin(port, "cordon", sid)["changed"]
    wait_until(lambda: sid in JournalReader(db).health_states(), timeout=10, what="the cordon journaled")
    assert first.stop() == 0  # SIGTERM: the journal is closed, everything queued written

    second = cli("tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1), "--db", str(db))
    assert second.listening()[1] == port
    line = second.wait_line("history in")
    assert f"{sid} cordoned" in line, line
    wait_until(lambda: _standing(port, sid) is not None, timeout=20, what="the server registered again")
    assert _standing(port, sid) == "cordoned"  # the new tracker was told
    assert _free_slots(port, "dev") == 0 and not _admin(port, "cordon", sid)["changed"]
    assert _admin(port, "uncordon", sid)["changed"]
    wait_until(lambda: _free_slots(port, "dev") == 1, timeout=20, what="the server granted again")
    _take_sessions(port, "bob", 2)
    wait_until(lambda: _sessions_ended(db, 5), timeout=20, what="five sessions ended in the journal")
    assert second.stop() == 0

    done = subprocess.run(
        [sys.executable, "-m", "tether", "usage", "--db", str(db), "--since", "1d", "--by", "user", "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    by_user = {g["by"]: g for g in report["groups"]}
    assert by_user["alice"]["sessions"] == 3 and by_user["bob"]["sessions"] == 2
    assert report["total"]["sessions"] == 5 and report["total"]["failures"] == 0
    assert report["total"]["outcomes"] == {"ok": 5} and report["total"]["devices"] == 1
    assert report["total"]["busy_s"] > 0 and report["total"]["wait_p50_s"] is not None

    reader = JournalReader(db)
    assert {r["server"] for r in reader.sessions()} == {sid}
    kinds = {e["kind"] for e in reader.events(limit=1000)}
    assert {"register", "request", "grant", "session_start", "session_end", "health", "unregister"} <= kinds
    assert reader.health_states() == {}  # uncordoned
