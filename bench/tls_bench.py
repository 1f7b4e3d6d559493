"""What TLS costs a tether session: the same transfers with and without TLS, in one run.

    python bench/tls_bench.py [--quick] [--json out.json]

A throwaway CA and certificates (``openssl``), then, every server in its own process (stopped by pid):
a plain ``tether server``, one with ``--tls-cert/--tls-key``, and the same two behind a ``tether proxy``
(``--through-proxy``, where TLS runs end to end through the proxy's relay). The client alternates between
them round by round, so background load hits all alike.

Measured per setup: an empty call's round trip (``sess.ping()``, p50 us), a session's connect (TCP, the
handshake, TLS and its first ``ping()``, p50 ms), upload of 64 MiB from a file, download of it, 64 MiB
tensors host to device and device to host (MiB/s, median of the rounds). With TLS every byte passes
through a relay on each side (two threads and a socketpair in the server, the same in the client, see
``tether.aio.tls``) besides the cipher: as a floor for the cipher alone, 64 MiB pushed through a pair of
``ssl.SSLObject`` on memory BIOs in one thread (encrypt and decrypt, AES-GCM as negotiated).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import benchlib
from benchlib import Proc, pct, timed_run, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.tls_pki: the throwaway certificates

from tests.tls_pki import Pki, make_pki

HOST = "127.0.0.1"
MIB = 1 << 20


def tether_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tether", *args]


@contextlib.contextmanager
def servers(pki: Pki, workdir: Path) -> Iterator[dict[str, tuple[Proc, str]]]:
    """name -> (the process a client connects to, key)."""
    tls_flags = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    common = ["--preload", "none", "--slots", "2"]
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(
            benchlib.running(
                "plain server",
                tether_argv(
                    "server", "--host", HOST, "--port", "0", "--key", "plain", *common, "--work-dir", str(workdir / "a")
                ),
            )
        )
        tls = stack.enter_context(
            benchlib.running(
                "TLS server",
                tether_argv(
                    "server",
                    "--host",
                    HOST,
                    "--port",
                    "0",
                    "--key",
                    "tls",
                    *common,
                    *tls_flags,
                    "--work-dir",
                    str(workdir / "b"),
                ),
            )
        )
        proxy = stack.enter_context(
            benchlib.running("proxy", tether_argv("proxy", "--host", HOST, "--port", "0", "--no-web", "--silent"))
        )
        for key, flags, sub in (("pplain", [], "c"), ("ptls", tls_flags, "d")):
            argv = tether_argv(
                "server", "--through-proxy", "--host", HOST, "--port", str(proxy.port), "--key", key,
                *common, *flags, "--work-dir", str(workdir / sub),
            )  # fmt: skip
            behind = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
            stack.callback(benchlib.stop_group, behind)  # (it prints no port: clients find it at the proxy)
        yield {
            "plain": (plain, "plain"),
            "tls": (tls, "tls"),
            "proxy plain": (proxy, "pplain"),
            "proxy tls": (proxy, "ptls"),
        }


def connect(proc: Proc, key: str, tls: Any) -> Any:
    import tether

    return benchlib.retry(
        lambda: tether.connect(HOST, proc.port, key=key, timeout=10, tls=tls if "tls" in key else None),
        timeout=30,
        errors=(tether.SessionRefused, tether.ConnectFailed),
    )


def cipher_floor(pki: Pki, nbytes: int) -> float:
    """MiB/s of 64 MiB encrypted and decrypted by two ``SSLObject`` on memory BIOs, one thread."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    chunk = os.urandom(MIB)
    buf = bytearray(MIB)
    t0 = time.perf_counter()
    for _ in range(nbytes // MIB):
        for start in range(0, MIB, MIB // 4):  # as TlsStream.sendall does
            client.write(chunk[start : start + MIB // 4])
            s_in.write(c_out.read())
        got = 0
        while got < MIB:
            got += server.read(MIB - got, memoryview(buf)[got:])  # type: ignore[operator]
    return nbytes / MIB / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from tether.aio.tls import TLSConfig

    nbytes = (16 if args.quick else 64) * MIB
    rounds = 3 if args.quick else args.rounds
    pings = 500 if args.quick else 3000
    connects = 10 if args.quick else 30
    report: dict[str, Any] = {"machine": benchlib.machine_info(), "bytes": nbytes, "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="tether-tls-bench-") as tmp:
        workdir = Path(tmp)
        pki = make_pki(workdir / "pki")
        tls = TLSConfig(ca=str(pki.ca), server_name="localhost")
        report["cipher_floor_mib_s"] = cipher_floor(pki, nbytes)
        blob = workdir / "blob.bin"
        blob.write_bytes(os.urandom(nbytes))
        arr = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
        times: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        with servers(pki, workdir) as setups:
            sessions = {name: connect(proc, key, tls) for name, (proc, key) in setups.items()}
            try:
                for index in range(rounds + 1):
                    for name, sess in sessions.items():
                        measure(times[name], sess, blob, arr, keep=index > 0)
                for name, sess in sessions.items():
                    for _ in range(pings):
                        t0 = time.perf_counter()
                        sess.ping()
                        times[name]["ping"].append(time.perf_counter() - t0)
            finally:
                for sess in sessions.values():
                    sess.close()
            for _ in range(connects):
                for name, (proc, key) in setups.items():
                    t0 = time.perf_counter()
                    with connect(proc, key, tls) as sess:
                        sess.ping()
                        times[name]["connect"].append(time.perf_counter() - t0)
    report["setups"] = {name: summarize(t, nbytes) for name, t in times.items()}
    return report


def measure(times: dict[str, list[float]], sess: Any, blob: Path, arr: Any, *, keep: bool) -> None:
    def timed(name: str, call: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = call()
        if keep:
            times[name].append(time.perf_counter() - t0)
        return value

    timed("upload", lambda: sess.upload(blob, "blob.bin"))
    data = timed("download", lambda: sess.download("blob.bin"))
    remote = timed("h2d", lambda: sess.tensor(arr))
    back = timed("d2h", remote.numpy)
    if not keep:
        assert data == blob.read_bytes() and (back == arr).all()
    remote.free()


def summarize(times: dict[str, list[float]], nbytes: int) -> dict[str, float]:
    out = {
        f"{name}_mib_s": nbytes / MIB / statistics.median(times[name]) for name in ("upload", "download", "h2d", "d2h")
    }
    out["ping_p50_us"] = pct(times["ping"], 50) * 1e6
    out["connect_p50_ms"] = pct(times["connect"], 50) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 MiB, 3 rounds")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the transfers (default 5)")
    parser.add_argument("--json", type=Path, default=None, help="where to write every number")
    args = parser.parse_args()
    report = timed_run(run, args)
    setups = report["setups"]
    print(f"\n{report['bytes'] // MIB} MiB, {report['rounds']} rounds; cipher alone (one thread, memory BIOs): "
          f"{report['cipher_floor_mib_s']:,.0f} MiB/s")  # fmt: skip
    metrics = ["upload_mib_s", "download_mib_s", "h2d_mib_s", "d2h_mib_s", "ping_p50_us", "connect_p50_ms"]
    print(f"{'':16}" + "".join(f"{m:>16}" for m in metrics))
    for name, row in setups.items():
        print(f"{name:16}" + "".join(f"{row[m]:>16,.1f}" for m in metrics))
    for base, tls in (("plain", "tls"), ("proxy plain", "proxy tls")):
        ratios = ", ".join(f"{m} {setups[tls][m] / setups[base][m]:.2f}x" for m in metrics)
        print(f"{tls} / {base}: {ratios}")
    write_report(report, args.json, "tls")


if __name__ == "__main__":
    main()
