"""Sessions through a tracker that is killed (SIGKILL) and restarted on the same port, again and again.

    python bench/chaos_tracker.py [--sessions 1000] [--every 15] [--clients 8] [--servers 3] [--think 0.8]

A tether tracker, ``--servers`` tether servers (2 slots each) and ``--clients`` client threads, each
opening sessions in a loop (``connect_tracker`` + ``request(timeout=60)`` + a call, held 50 ms, then
``--think`` seconds on average before the next, so that the run spans many restarts). Every
``--every`` seconds (+-20 %) the tracker process is killed and restarted after an outage of 0.5 to 3 s.
Counts every session that got a device and every one that failed, by error type: a client that rides out
the restarts fails none whose timeout outlasts the outage.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import tether


def _start(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on " in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, int(line.rsplit(":", 1)[1])
    raise RuntimeError(f"tether {args[0]} did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--every", type=float, default=15.0, help="seconds between tracker kills")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--think", type=float, default=0.8, help="mean seconds a client waits between sessions")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    tracker, port = _start("tracker", "--host", "127.0.0.1", "--port", "0")
    where = f"127.0.0.1:{port}"
    servers = [
        _start("server", "--host", "127.0.0.1", "--port", "0", "--tracker", where, "--key", "chaos", "--slots", "2",
               "--preload", "none")[0]
        for _ in range(args.servers)
    ]  # fmt: skip
    lock = threading.Lock()
    outcomes: collections.Counter[str] = collections.Counter()
    started = [0]
    done = threading.Event()
    outages: list[float] = []

    def client() -> None:
        while True:
            with lock:
                if started[0] >= args.sessions:
                    return
                started[0] += 1
            try:
                with (
                    tether.connect_tracker("127.0.0.1", port, timeout=30) as pool,
                    pool.request("chaos", timeout=60) as sess,
                ):
                    sess.ping()
                    time.sleep(0.05)  # a short job on the device
                outcome = "session"
            except Exception as exc:  # the point: what each failure was
                outcome = type(exc).__name__
            with lock:
                outcomes[outcome] += 1
                if sum(outcomes.values()) >= args.sessions:
                    done.set()
            time.sleep(random.uniform(0.5, 1.5) * args.think)  # the run spans many restarts

    def chaos() -> None:
        nonlocal tracker
        while not done.wait(args.every * random.uniform(0.8, 1.2)):
            tracker.send_signal(signal.SIGKILL)
            tracker.wait()
            down = random.uniform(0.5, 3.0)
            t0 = time.monotonic()
            if done.wait(down):
                return
            tracker, _ = _start("tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1))
            outages.append(time.monotonic() - t0)
            print(f"  tracker restarted after {outages[-1]:.1f} s down; {dict(outcomes)}", flush=True)

    t0 = time.monotonic()
    killer = threading.Thread(target=chaos, daemon=True)
    killer.start()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    killer.join()
    elapsed = time.monotonic() - t0
    for proc in [tracker, *servers]:
        proc.terminate()
        proc.wait(10)
    report: dict[str, Any] = {
        "sessions": args.sessions,
        "outcomes": dict(outcomes),
        "restarts": len(outages),
        "outage_s": [round(o, 2) for o in outages],
        "seconds": round(elapsed, 1),
    }
    print(
        f"{args.sessions} sessions in {elapsed:.0f} s, tracker killed and restarted {len(outages)} times "
        f"(down {min(outages, default=0):.1f}-{max(outages, default=0):.1f} s): "
        f"{outcomes['session']} got a device, {args.sessions - outcomes['session']} failed {dict(outcomes)}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if outcomes["session"] == args.sessions else 1


if __name__ == "__main__":
    sys.exit(main())
