"""The web side's cost at scale: API latency with 5,000 servers, and what it costs the tracker's loop.

    PYTHONPATH=src python bench/hub_api_bench.py [--servers 5000] [--waiters 1000] [--requests 200] [--json out.json]

A tracker and its web side run in a child process (``TrackerHubThread``, loopback, port 0). The pool is made
in the core directly, without sockets (each server a connection with a fake link: UPDATE_INFO with device
facts and labels, then a PUT), so 5,000 servers need no 5,000 descriptors: half of them are then granted to
users (a third of those report their session started) and ``--waiters`` requests wait on a key with no
free server. Then, for each endpoint the page reads, ``--requests`` GETs one after another and the same
from 8 clients at once: the latency percentiles seen by the client (p50, p99, max; milliseconds) and the
time the view took on the tracker's loop (the loop is blocked meanwhile: that is what the tracker pays).

``--browser N``: then Debian's chromium (headless, Selenium) shows the page, and N grants of a probe server
(on the first page, among all the others) are timed from the request to the holder shown on the page.

Nothing is asserted: numbers to read (the issue's target is p99 under 200 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tether.client.tracker import TrackerClient
from tether.hub import HubConfig, views
from tether.hub.service import TrackerHubThread
from tether.protocol.tracker import Put, Request, RequestOptions, SessionEvent, UpdateInfo
from tether.tracker import TrackerConfig

DEVICE = {"os": "Linux", "arch": "aarch64", "cpu": "Cortex-A78", "cores": 8, "memory": 8 << 30, "backends": ["tvm"]}
ENDPOINTS = [
    "/api/v1/servers?limit=100",
    "/api/v1/servers?limit=100&offset=4900",
    "/api/v1/servers?key=k7&label=rack=3",
    "/api/v1/servers?state=busy&limit=100",
    "/api/v1/queues",
    "/api/v1/sessions?limit=200",
    "/api/v1/history?limit=50",
    "/api/v1/health",
    "/api/v1/summary",
]


class NullLink:
    """Replies go nowhere (the core's Link)."""

    def send(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def populate(t: TrackerHubThread, servers: int, waiters: int) -> None:
    def build() -> None:
        core = t.core
        conns = []
        for i in range(servers):
            key = f"k{i % 20}"
            host = f"10.{i // 65000}.{(i // 250) % 256}.{i % 250 + 1}"
            conn = core.connect(NullLink(), host, 40000 + i % 20000)
            tether = {"protocols": ["tether", "tvm"], "labels": {"rack": str(i % 7), "soc": "sd8"}, "device": DEVICE}
            core.receive(conn, UpdateInfo({"key": f"server:{key}", "addr": [None, 9090], "tether": tether}))
            core.receive(conn, Put(key, 9090, f"{key}:{i}"))
            conns.append((conn, f"{key}:{i}"))
        client = core.connect(NullLink(), "10.200.0.1", 50000)
        for i in range(servers // 2):
            core.receive(
                client, Request(f"k{i % 20}", f"user{i % 37}", 1, RequestOptions(f"g{i}", user=f"user{i % 37}"))
            )
        for conn, matchkey in conns[: servers // 6]:
            if matchkey in conn.held:
                core.receive(conn, SessionEvent("start", matchkey, "10.200.0.9:1234"))
        waiting = core.connect(NullLink(), "10.201.0.1", 50001)
        for i in range(waiters):
            core.receive(
                waiting, Request("nobody", f"user{i % 37}", i % 5, RequestOptions(f"w{i}", user=f"user{i % 37}"))
            )

    t.call(build, timeout=300)


def fetch(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as resp:
        resp.read()
    return (time.perf_counter() - start) * 1000


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "max_ms": round(ordered[-1], 2),
    }


def loop_cost(t: TrackerHubThread, path: str, repeat: int = 20) -> float:
    """Milliseconds the view of ``path`` takes on the tracker's loop (median of ``repeat``)."""
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(path)
    params = parse_qsl(parts.query)
    name = parts.path.rsplit("/", 1)[1]
    hub = t.server.hub
    order = views.ServerOrder()  # as the hub keeps one: sorted once, then reused

    def once() -> float:
        clocks = views.Clocks(t.core.clock(), time.time())
        start = time.perf_counter()
        health = views.HealthView(t.core)
        if name == "servers":
            filters = views.parse_filters(params, ("key", "label", "user", "state"), extra=("offset", "limit"))
            views.servers(t.core, clocks, filters, views.parse_paging(params, 100, 1000), health, order=order)
        elif name == "queues":
            views.queues(t.core, clocks, views.Filters())
        elif name == "sessions":
            views.sessions(t.core, clocks, views.Filters(), views.parse_paging(params, 100, 1000))
        elif name == "history":
            hub.history.rows(50)
        elif name == "health":
            views.health(t.core, clocks, views.Filters(), health)
        elif name == "summary":
            views.summary(t.core, clocks, health)
        return (time.perf_counter() - start) * 1000

    return round(statistics.median(t.call(once) for _ in range(repeat)), 2)


def serve(args: argparse.Namespace) -> int:
    """The child: make the pool, measure the views on the loop, print one JSON line, serve until stdin ends."""
    config = TrackerConfig(host="127.0.0.1", port=0, max_waiters_per_connection=0, max_waiters_per_peer=0)
    with TrackerHubThread(config, HubConfig(host="127.0.0.1", port=0)) as t:
        started = time.perf_counter()
        populate(t, args.servers, args.waiters)
        made_s = time.perf_counter() - started
        loop = {path: loop_cost(t, path) for path in ENDPOINTS}
        ready = {"url": t.web_url, "tracker": [t.host, t.port], "made_s": made_s, "loop_ms": loop}
        print(json.dumps(ready), flush=True)
        sys.stdin.read()
    return 0


def page_latency(url: str, tracker: tuple[str, int], grants: int) -> dict[str, float]:
    """Milliseconds from a grant at the tracker to the page showing its holder, ``grants`` times (the
    page's own work included: the event, its 200 ms throttle, the fetches, the rendering). The probe
    server's key sorts first, so it is on the first page of 100 among all the others."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"), options=options)
    cell = "const r = document.querySelector('#servers tbody tr[data-id=\"10.255.0.1:9999\"] td.holder'); return r ? r.textContent : null;"
    samples: list[float] = []
    refresh: list[float] = []  # what the page's last refresh took (its fetches and rendering), ms
    try:
        with TrackerClient.connect(*tracker) as server, TrackerClient.connect(*tracker) as client:
            info = {"key": "server:a-probe", "addr": ["10.255.0.1", 9999], "tether": {"protocols": ["tvm", "tether"]}}
            server.call(UpdateInfo(info))
            server.put("a-probe", 9999, "a-probe:0", "10.255.0.1")
            driver.get(url)
            deadline = time.monotonic() + 30
            while driver.execute_script(cell) != "" and time.monotonic() < deadline:
                time.sleep(0.05)  # (waiting for the first render, not timing it)
            for i in range(grants):
                user = f"probe{i}"
                started = time.perf_counter()
                grant = client.request_grant("a-probe", user=user, timeout=10)
                while driver.execute_script(cell) != user:
                    if time.perf_counter() - started > 10:
                        raise TimeoutError("the page did not show the grant within 10 s")
                samples.append((time.perf_counter() - started) * 1000)
                refresh.append(float(driver.execute_script("return document.body.dataset.refreshMs || 0")))
                server.call(SessionEvent("end", grant.matchkey, outcome="ok"))
                server.put("a-probe", 9999, f"a-probe:{i + 1}", "10.255.0.1")
                while driver.execute_script(cell) != "":
                    time.sleep(0.01)
    finally:
        driver.quit()
    out = percentiles(samples)
    out["refresh_p50_ms"] = round(statistics.median(refresh), 1)
    print(
        f"page: a grant shown after p50 {out['p50_ms']:.0f} ms, p99 {out['p99_ms']:.0f} ms, max {out['max_ms']:.0f} ms "
        f"(one refresh of the page: p50 {out['refresh_p50_ms']:.0f} ms)"
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=5000)
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--browser", type=int, default=0, metavar="N", help="then N grants watched on the page in Debian's chromium"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args)
    # the tracker in its own process: the clients here do not share its interpreter lock
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--servers", str(args.servers), "--waiters", str(args.waiters)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    ready = json.loads(child.stdout.readline())
    results: dict[str, Any] = {"servers": args.servers, "waiters": args.waiters, "endpoints": {}}
    print(f"pool of {args.servers} servers and {args.waiters} waiters made in {ready['made_s']:.1f} s")
    base = ready["url"].rstrip("/")
    print(f"{'endpoint':42} {'bytes':>8} {'loop ms':>8} {'seq p50':>8} {'p99':>8} {'8x p50':>8} {'p99':>8} {'max':>8}")
    try:
        for path in ENDPOINTS:
            url = base + path
            with urllib.request.urlopen(url, timeout=30) as resp:
                size = len(resp.read())
            sequential = [fetch(url) for _ in range(args.requests)]
            with ThreadPoolExecutor(8) as pool:
                concurrent = list(pool.map(fetch, [url] * args.requests))
            row = {
                "bytes": size,
                "loop_ms": ready["loop_ms"][path],
                "sequential": percentiles(sequential),
                "concurrent8": percentiles(concurrent),
            }
            results["endpoints"][path] = row
            s, c = row["sequential"], row["concurrent8"]
            print(
                f"{path:42} {size:8d} {row['loop_ms']:8.2f} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} "
                f"{c['p50_ms']:8.2f} {c['p99_ms']:8.2f} {c['max_ms']:8.2f}"
            )
        if args.browser:
            results["page"] = page_latency(ready["url"], tuple(ready["tracker"]), args.browser)
    finally:
        child.stdin.close()
        child.wait(30)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
