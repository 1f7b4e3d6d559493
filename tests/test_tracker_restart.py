"""tether's clients ride out a tracker restart: the tracker process is killed (SIGKILL) while requests
wait and restarted on the same port while new clients arrive; every request whose timeout outlasts the
outage gets its session. Sessions already granted do not notice."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest

import tether
from tether.client.tracker import TrackerClient

from .conftest import CliProcess, wait_until

pytestmark = pytest.mark.timeout(120)


def _pending(port: int, key: str) -> int:
    with TrackerClient.connect("127.0.0.1", port) as client:
        return int(client.summary()["queue_info"].get(key, {}).get("pending", 0))


def test_requests_survive_a_tracker_killed_and_restarted(
    cli: Callable[..., CliProcess], device_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tether.client.api")
    first = cli("tracker", "--host", "127.0.0.1", "--port", "0")
    _, port = first.listening()
    server = device_server(key="dev", tracker=("127.0.0.1", port), reconnect_max_s=0.2)
    holder_pool = tether.connect_tracker("127.0.0.1", port)
    holder = holder_pool.request("dev", timeout=10)  # the only slot: everyone else waits

    outcomes: dict[str, str] = {}
    lock = threading.Lock()

    def client(name: str) -> None:
        try:
            with (
                tether.connect_tracker("127.0.0.1", port, timeout=60) as pool,
                pool.request("dev", timeout=60, user=name) as sess,
            ):
                sess.ping()
                outcome = "session"
        except Exception as exc:  # what the test reports
            outcome = f"{type(exc).__name__}: {exc}"
        with lock:
            outcomes[name] = outcome

    def start(name: str) -> threading.Thread:
        thread = threading.Thread(target=client, args=(name,), daemon=True)
        thread.start()
        return thread

    threads = [start(f"waiting{i}") for i in range(3)]
    wait_until(lambda: _pending(port, "dev") == 3, timeout=10, what="three requests waiting")

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    threads += [start(f"arriving{i}") for i in range(2)]  # they find no tracker at all

    def messages(needle: str) -> int:
        return sum(needle in r.getMessage() for r in caplog.records)

    # every waiting request noticed the loss, and the new clients are retrying their connection
    wait_until(lambda: messages("reconnecting to ask again") >= 3, timeout=10, what="waiters reconnecting")
    wait_until(lambda: messages("again in") >= 5, timeout=10, what="connection attempts during the outage")
    assert not outcomes, outcomes

    second = cli("tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1))
    assert second.listening()[1] == port
    wait_until(server.registered.is_set, timeout=10, what="the server registered again")
    holder.ping()  # the session granted before the restart is untouched
    holder.close()
    holder_pool.close()
    for thread in threads:
        thread.join(60)
    assert outcomes == {name: "session" for name in outcomes} and len(outcomes) == 5, outcomes


def test_a_request_whose_timeout_ends_during_the_outage_says_so(cli: Callable[..., CliProcess]) -> None:
    tracker = cli("tracker", "--host", "127.0.0.1", "--port", "0")
    _, port = tracker.listening()
    pool = tether.connect_tracker("127.0.0.1", port)
    tracker.proc.send_signal(signal.SIGKILL)
    tracker.proc.wait(10)
    with pytest.raises(tether.RequestTimeout, match=r"within 1 s.*unreachable"):
        pool.request("dev", timeout=1)
    pool.close()
    with pytest.raises(tether.ConnectFailed, match="unreachable"):
        tether.connect_tracker("127.0.0.1", port, timeout=0.5)


def test_an_interrupt_while_reconnecting_ends_the_request(
    cli: Callable[..., CliProcess], caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C in a bench (``Tracker.interrupt``) while the tracker is down: the request ends at once, it does
    not reconnect and wait on a connection nobody can interrupt any more."""
    caplog.set_level(logging.DEBUG, logger="tether.client.api")
    tracker = cli("tracker", "--host", "127.0.0.1", "--port", "0")
    _, port = tracker.listening()
    pool = tether.connect_tracker("127.0.0.1", port)
    errors: list[BaseException] = []

    def wait_forever() -> None:
        try:
            pool.request("dev", timeout=None)
        except BaseException as exc:  # what the test checks
            errors.append(exc)

    thread = threading.Thread(target=wait_forever, daemon=True)
    thread.start()
    wait_until(lambda: _pending(port, "dev") == 1, timeout=10, what="the request waiting")
    tracker.proc.send_signal(signal.SIGKILL)
    tracker.proc.wait(10)
    wait_until(lambda: any("again in" in r.getMessage() for r in caplog.records), timeout=10, what="reconnecting")
    # back up while the client waits out its backoff: its next attempt connects, after the interrupt
    cli("tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)).listening()
    pool.interrupt()
    thread.join(10)
    assert not thread.is_alive(), "the interrupted request is still waiting"
    assert len(errors) == 1 and isinstance(errors[0], tether.TransportError), errors
    pool.close()
