"""Device health end to end: a real tracker process, a real tether server whose session workers die,
quarantine, the canary that brings it back, and `tether admin` over the wire."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

import tether
from tether.client.tracker import TrackerClient
from tether.device.canary import check, expected_output, run_canary
from tether.errors import RequestTimeout, SessionLost

from .conftest import CliProcess, wait_until

pytestmark = pytest.mark.timeout(120)


def _server_row(port: int) -> dict[str, Any]:
    with TrackerClient.connect("127.0.0.1", port) as client:
        (entry,) = client.summary(detail=True)["tether"]["servers"]
    return entry  # type: ignore[no-any-return]


def _admin(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", "admin", *args, "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _kill_a_session(pool: Any) -> None:
    with pool.request("dev", timeout=10) as sess:
        os.kill(sess.info()["pid"], signal.SIGKILL)
        with pytest.raises(SessionLost):
            sess.ping()


def test_failing_sessions_quarantine_a_server_until_its_canary_passes(
    cli: Callable[..., CliProcess], device_server: Any
) -> None:
    tracker = cli("tracker", "--port", "0", "--quarantine-after", "2", "--canary-interval", "0.5")
    _, port = tracker.listening()
    server = device_server(key="dev", tracker=("127.0.0.1", port), poll_s=0.2)
    sid = f"127.0.0.1:{server.port}"
    with tether.connect_tracker("127.0.0.1", port) as pool:
        _kill_a_session(pool)
        _kill_a_session(pool)
        tracker.wait_line(f"server {sid} (dev) quarantined: 2 failed sessions in a row")
        # the canary runs on the server (asked through its poll) and passes: the server is back
        tracker.wait_line(f"server {sid} passed its canary")
        wait_until(lambda: "health" not in _server_row(port), timeout=10, what="the server back in the pool")
        with pool.request("dev", timeout=10) as sess:
            sess.ping()


def test_tether_admin_cordons_drains_releases_and_uncordons(cli: Callable[..., CliProcess], device_server: Any) -> None:
    tracker = cli("tracker", "--port", "0")
    _, port = tracker.listening()
    server = device_server(key="dev", tracker=("127.0.0.1", port), poll_s=0.2)
    sid = f"127.0.0.1:{server.port}"

    done = _admin(port, "cordon", sid, "--reason", "new firmware")
    assert done.returncode == 0 and "cordon" in done.stdout and "now cordoned (new firmware)" in done.stdout
    assert _admin(port, "cordon", sid).stdout.count("nothing to change") == 1  # idempotent
    query = subprocess.run(
        [sys.executable, "-m", "tether", "query", "--port", str(port)], capture_output=True, text=True, timeout=60
    )
    assert f"{sid}: cordoned by 127.0.0.1" in query.stdout and "new firmware" in query.stdout
    with tether.connect_tracker("127.0.0.1", port) as pool:
        with pytest.raises(RequestTimeout, match="cordoned"):
            pool.request("dev", timeout=0.5)  # cordoned: nothing is granted
        assert _admin(port, "uncordon", sid).returncode == 0
        with pool.request("dev", timeout=10) as sess:
            sess.ping()
            # drain: the session goes on; the server is cordoned once it ends
            out = json.loads(_admin(port, "drain", sid, "--json").stdout)
            assert out["standing"]["state"] == "draining"
            sess.ping()
        wait_until(lambda: _server_row(port)["health"]["state"] == "cordoned", timeout=10, what="drained")
        assert _admin(port, "uncordon", sid).returncode == 0
        # release: a stuck session is ended at the tracker and on the server
        sess = pool.request("dev", timeout=10)
        sess.ping()
        out = json.loads(_admin(port, "release", sid, "--json").stdout)
        assert out["released"] == 1
        wait_until(lambda: not server.busy_slots(), timeout=10, what="the server ended the released session")
        with pytest.raises(SessionLost, match="tether admin release"):
            sess.ping()
        sess.close()
    unknown = _admin(port, "cordon", "127.0.0.1:1")
    assert unknown.returncode == 1 and "no server '127.0.0.1:1'" in unknown.stderr


def test_the_canary_checks_a_real_model() -> None:
    result = check()
    assert result["ok"] is True, result
    assert expected_output() == pytest.approx([6.1, 0.0, 5.8])
    ok, detail = run_canary(timeout=60)
    assert ok, detail
    ok, detail = run_canary(timeout=60, python="/nonexistent/python")
    assert not ok and "could not start" in detail
