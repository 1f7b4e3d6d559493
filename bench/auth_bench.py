"""tether's tracker with authentication and TLS on against off, side by side, in one run.

    python bench/auth_bench.py [--seconds 3] [--rounds 3] [--runs 30] [--json out.json]

Each mode runs its own tracker process (``python -m tether tracker --port 0``): ``off``; ``auth``
(``--auth-file``); ``tls`` (``--tls-cert/--tls-key``, certificates from a throwaway CA made with ``openssl``);
``auth+tls``. Measured per mode: grants/s and grant latency (p50/p99) at 1 client x 1 server and 64x64
(``bench/loadgen.py``: every connection authenticates once, then requests and PUTs as TVM's peers do),
the cost of opening an authenticated tracker connection (tether's ``TrackerClient.connect``: magic, hello,
two AUTH steps), and request-to-first-call: ``connect_tracker`` + ``request`` + the first call on a tether
device server that registered with a server token. Ratios are auth over off; the target is under 20 % fewer
grants per second and under 1 ms more per request.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import Proc, machine_info, running, timed_run, write_report  # noqa: E402
from tracker_bench import loadgen  # noqa: E402

sys.path.insert(0, str(HERE.parent))  # tests.tls_pki: the throwaway certificates
from tests.tls_pki import Pki, have_openssl, make_pki  # noqa: E402

SECRETS = {"bench-user": "u" * 24, "bench-server": "s" * 24}
SCENARIOS = [("1 client x 1 server", 1, 1), ("64 x 64", 64, 64)]


def _keyring(directory: Path) -> Path:
    path = directory / "keyring"
    path.write_text(f"bench-user user {SECRETS['bench-user']}\nbench-server server {SECRETS['bench-server']}\n")
    return path


def _token(name: str) -> str:
    return f"{name}:{SECRETS[name]}"


@contextlib.contextmanager
def tracker(mode: str, directory: Path, pki: Pki | None) -> Iterator[Proc]:
    argv = [sys.executable, "-m", "tether", "tracker", "--port", "0", "--silent"]
    if "auth" in mode:
        argv += ["--auth-file", str(_keyring(directory))]
    if "tls" in mode:
        assert pki is not None
        argv += ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    with running(f"tracker ({mode})", argv) as proc:
        yield proc


def _tls(mode: str, pki: Pki | None) -> Any:
    if "tls" not in mode:
        return None
    import tether

    assert pki is not None
    return tether.TLSConfig(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))


def bench_grants(mode: str, port: int, seconds: float, pki: Pki | None) -> dict[str, Any]:
    out = {}
    env_before = dict(os.environ)
    if "auth" in mode:
        os.environ["LOADGEN_SERVER_TOKEN"] = _token("bench-server")
        os.environ["LOADGEN_CLIENT_TOKEN"] = _token("bench-user")
    if "tls" in mode:
        assert pki is not None
        os.environ["LOADGEN_TLS_CA"] = str(pki.ca)
    try:
        for label, clients, servers in SCENARIOS:
            res = loadgen("--one-send", "grants", "127.0.0.1", port, f"bench-{clients}", clients, servers, seconds)
            out[label] = res
            print(
                f"  {mode:8s} {label:22s} {res['grants_per_s']:9.0f} grants/s  p50 {res['p50_ms']:.3f} ms"
                f"  p99 {res['p99_ms']:.3f} ms",
                flush=True,
            )
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    return out


def bench_connect(mode: str, port: int, runs: int, pki: Pki | None) -> float:
    """Median seconds (as ms) to open a tracker connection the way tether's client does."""
    from tether.aio.tls import client_context
    from tether.client.tracker import TrackerClient

    token = _token("bench-user") if "auth" in mode else None
    tls = _tls(mode, pki)
    context = None if tls is None else client_context(tls)  # built once, as a long-lived client does
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        client = TrackerClient.connect("127.0.0.1", port, token=token, tls=context)
        if token is None:
            client.tether_version  # noqa: B018 - the same hello round trip as the authenticated path
        samples.append(time.perf_counter() - start)
        client.close()
    ms = statistics.median(samples) * 1e3
    steps = ("TLS, " if tls else "") + "magic, hello" + (", AUTH x2" if token else "")
    print(f"  {mode:8s} tracker connection ({steps}): {ms:.3f} ms", flush=True)
    return ms


def bench_first_call(mode: str, port: int, runs: int, directory: Path, pki: Pki | None) -> float:
    """Median ms from connect_tracker to the first call's answer on a tether server (in the TLS modes, TLS
    sessions with client certificates, as a server with its CA runs them)."""
    import tether

    env = dict(os.environ)
    if "auth" in mode:
        env["TETHER_TOKEN"] = _token("bench-server")
    argv = [sys.executable, "-m", "tether", "server", "--host", "127.0.0.1", "--port", "0", "--key", "b"]
    argv += ["--tracker", f"127.0.0.1:{port}", "--preload", "none", "--work-dir", str(directory / f"srv-{mode}")]
    if "tls" in mode:
        assert pki is not None
        # TLS to the tracker (the CA checks it) and TLS sessions, as a TLS deployment runs them
        argv += ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    token = _token("bench-user") if "auth" in mode else None
    tls = _tls(mode, pki)
    old = os.environ.get("TETHER_TOKEN")
    os.environ.pop("TETHER_TOKEN", None)
    samples = []
    with running(f"server ({mode})", argv, env=env):
        for i in range(runs + 2):
            start = time.perf_counter()
            with tether.connect_tracker("127.0.0.1", port, timeout=30, token=token, tls=tls) as pool:
                sess = pool.request("b", timeout=60)
                sess.ping()
                took = time.perf_counter() - start
                sess.close()
            if i >= 2:  # warm-up: the first sessions start workers
                samples.append(took)
    if old is not None:
        os.environ["TETHER_TOKEN"] = old
    ms = statistics.median(samples) * 1e3
    print(f"  {mode:8s} request-to-first-call (connect, request, first call): {ms:.2f} ms", flush=True)
    return ms


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every mode's tracker runs at once; the modes take turns, ``--rounds`` times, so that a machine that gets
    busier or quieter meanwhile shifts all alike; each number is the median over the rounds."""
    report: dict[str, Any] = {"machine": machine_info(), "modes": {}}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        pki = make_pki(directory / "pki") if have_openssl() else None
        modes = ("off", "auth", "tls", "auth+tls") if pki is not None else ("off", "auth")
        if pki is None:
            print("no openssl command: the TLS modes are left out", flush=True)
        ports = {mode: stack.enter_context(tracker(mode, directory, pki)).port for mode in modes}
        rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode in modes:
                grants = bench_grants(mode, ports[mode], args.seconds, pki)
                rounds[mode].append({"grants": grants, "connect_ms": bench_connect(mode, ports[mode], 200, pki)})
        for mode in modes:
            merged: dict[str, Any] = {"grants": {}, "rounds": rounds[mode]}
            for label, _, _ in SCENARIOS:
                merged["grants"][label] = {
                    k: statistics.median(r["grants"][label][k] for r in rounds[mode])
                    for k in ("grants_per_s", "p50_ms", "p99_ms")
                }
            merged["connect_ms"] = statistics.median(r["connect_ms"] for r in rounds[mode])
            merged["first_call_ms"] = bench_first_call(mode, ports[mode], args.runs, directory, pki)
            report["modes"][mode] = merged
    off = report["modes"]["off"]
    print(f"\nagainst off (medians of {args.rounds} rounds):")
    for mode in modes[1:]:
        on = report["modes"][mode]
        for label, _, _ in SCENARIOS:
            ratio = on["grants"][label]["grants_per_s"] / off["grants"][label]["grants_per_s"]
            p50 = on["grants"][label]["p50_ms"] - off["grants"][label]["p50_ms"]
            print(f"  {mode:8s} grants/s {label:22s} x{ratio:.3f}, grant p50 {p50:+.3f} ms")
            report.setdefault("ratios", {}).setdefault(mode, {})[label] = ratio
        extra = on["connect_ms"] - off["connect_ms"]
        first = on["first_call_ms"] - off["first_call_ms"]
        print(f"  {mode:8s} opening a tracker connection {extra:+.3f} ms; request-to-first-call {first:+.3f} ms")
        report.setdefault("extra_ms", {})[mode] = {"connect": extra, "first_call": first}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per grant scenario")
    parser.add_argument("--rounds", type=int, default=3, help="turns each mode takes at grants and connections")
    parser.add_argument("--runs", type=int, default=30, help="request-to-first-call runs per mode")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    write_report(timed_run(run, args), args.json, "auth_bench")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
