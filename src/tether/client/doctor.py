"""``tether doctor``: why "Cannot get remote devices from the tracker", checked step by step.

::

    from tether.client.doctor import diagnose
    report = diagnose("tracker.lab", 9190, key="android")
    print(report.ok)
    for check in report.checks:
        print(check.status, check.name, check.detail, check.fix)

The checks, in order; each says what it saw and, when it is not ``ok``, what to fix:

1. ``tracker``: something listens at the address (a TCP connect that fails is one mistake: nothing runs
   there, or a firewall) and it is a tracker (a peer that does not answer the tracker magic is another: the
   port of something else); tether's tracker (with its version) or TVM's.
2. ``key``: servers are registered under the key (every key without one); a key nobody registered comes
   with the keys that exist and the close names (``andriod`` -> ``android``).
3. ``reachable``: each server's advertised address (what the tracker hands to clients) accepts a TCP
   connection from here. A server that advertises an address nobody can reach (loopback advertised to a
   remote tracker, a NAT address) is the classic cause: ``--custom-addr``, or the proxy.
4. ``proxy``: each proxy registered with the tracker answers a handshake at its address.
5. ``session``: through the tracker like a client (request the key, connect, handshake, close): a tether
   session (opened, pinged, closed) on a tether server, TVM's handshake on a TVM server. One device at a
   time, each released at once, each bounded by ``session_timeout`` on the device too.
6. ``tvm``: the local apache-tvm and apache-tvm-ffi versions go together (read from package metadata;
   tvm is never imported).

Every network step is bounded by ``timeout`` seconds: a doctor never hangs. Standard library only.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from ..aio.net import format_hostport
from ..aio.tls import TLSLike
from ..errors import (
    AuthError,
    ConnectFailed,
    ConnectionClosed,
    NotTetherServer,
    RemoteError,
    RemoteProtocolError,
    RequestTimeout,
    SessionRefused,
    TetherError,
    TLSError,
    TrackerError,
    TransportError,
)
from ..protocol.auth import Token
from ..protocol.keys import proxied_keys, server_key_name
from .tracker import TrackerClient

__all__ = [
    "OK",
    "FAIL",
    "WARN",
    "SKIP",
    "Check",
    "Report",
    "advertise_hint",
    "check_tvm_versions",
    "diagnose",
    "is_loopback",
]

OK, FAIL, WARN, SKIP = "ok", "FAIL", "warn", "skip"

#: apache-tvm release (major, minor) -> the apache-tvm-ffi versions it works with: (lowest, first too new).
TVM_FFI_COMPAT: dict[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...]]] = {
    (0, 27): ((0, 1, 0), (0, 1, 15)),
}

_FIX_PROXY = (
    "or, when no address of the device can be reached (NAT), run it through a proxy "
    "(`tether server --through-proxy --host PROXY --port PROXY_PORT`)"
)


@dataclass(frozen=True, slots=True)
class Check:
    """One finding. ``status``: ``ok``, ``FAIL``, ``warn`` (works here, may not elsewhere) or ``skip``."""

    name: str
    status: str
    detail: str
    fix: str | None = None
    subject: str | None = None  # the key or address the check is about, if any

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Report:
    tracker: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings and skips pass)."""
        return all(c.status != FAIL for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def to_json(self) -> dict[str, Any]:
        return {"tracker": self.tracker, "ok": self.ok, "checks": [c.to_json() for c in self.checks]}


# -- addresses -------------------------------------------------------------------------------------


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, ``localhost``); no DNS lookup."""
    if not host:
        return False
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def advertise_hint(bind_host: str, tracker_host: str | None, custom_addr: str | None = None) -> str | None:
    """Why clients of a server registered with ``tracker_host`` could not reach it, with the fix; None
    when nothing looks wrong. ``bind_host``: the address the server listens on; ``custom_addr``: the
    address it advertises (None: the tracker uses the address the server connects from).

    Only what can be told without traffic: a loopback address advertised to a tracker that is not on
    loopback (its other clients cannot reach it), or a server that listens on loopback only while the
    tracker, elsewhere, hands out the server's outside address.
    """
    if tracker_host is None or is_loopback(tracker_host):
        return None  # a tracker on this machine: its clients (on this machine too, or through it) decide
    if custom_addr is not None and is_loopback(custom_addr):
        return (
            f"--custom-addr {custom_addr} is a loopback address, but the tracker {tracker_host} is not on this "
            "machine: its clients will be sent to their own machine. fix: --custom-addr ADDRESS that clients "
            "can reach (this machine's LAN address), or run through a proxy (--through-proxy)"
        )
    if is_loopback(bind_host):
        advertised = custom_addr or "the address this machine connects to the tracker from"
        return (
            f"listening on {bind_host} only, while the tracker {tracker_host} hands clients {advertised}: "
            "nobody else can connect. fix: --host 0.0.0.0 (or this machine's LAN address), plus --custom-addr "
            "ADDRESS when clients must use another address (NAT, tunnels), or run through a proxy (--through-proxy)"
        )
    return None


def _addr(value: Any) -> tuple[str | None, int | None]:
    """``[host, port]`` as a tracker reports it (port an int, or a string from C++ and Java servers)."""
    if isinstance(value, list | tuple) and len(value) == 2:
        host, port = value
        try:
            return (str(host) if host is not None else None), int(port)
        except (TypeError, ValueError):
            return (str(host) if host is not None else None), None
    return None, None


@dataclass(frozen=True, slots=True)
class _Probe:
    connected: bool
    why: str = ""  # why it did not connect, or did not answer the handshake
    answered: bool = False  # answered the probe's handshake (MISMATCH is an answer)
    seconds: float = 0.0


#: The key a probe offers: nobody's matchkey, so a server or proxy answers MISMATCH and carries on.
_PROBE_KEY = "client:tether-doctor-probe"


def _probe(host: str, port: int, timeout: float, *, handshake: bool = False) -> _Probe:
    """One TCP connect (every address of ``host`` tried), then with ``handshake`` a TVM handshake with a key
    nobody has. A server is never left with a bare connect-and-close: TVM's Python server takes one for a
    broken tracker link and registers again under a new matchkey, so a grant made meanwhile fails."""
    from ..protocol.framing import HandshakeReplyDecoder, encode_handshake

    start = time.perf_counter()
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return _Probe(False, f"cannot resolve {host!r}: {exc}")
    errors = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(sockaddr)
            except TimeoutError:
                errors.append(f"no answer within {timeout:g} s (dropped: a firewall, NAT, or no route)")
                continue
            except OSError as exc:
                errors.append(exc.strerror or str(exc))
                continue
            took = time.perf_counter() - start
            if not handshake:
                return _Probe(True, seconds=took)
            try:
                sock.sendall(encode_handshake(f"{_PROBE_KEY}:{time.monotonic_ns()}"))
                decoder, reply = HandshakeReplyDecoder(), None
                while reply is None:
                    data = sock.recv(4096)
                    if not data:
                        return _Probe(True, "closed the connection without answering the handshake", seconds=took)
                    reply = decoder.feed(data)
            except TimeoutError:
                return _Probe(True, f"no handshake answer within {timeout:g} s", seconds=took)
            except (OSError, RemoteProtocolError) as exc:
                return _Probe(True, f"no handshake answer ({exc})", seconds=took)
            return _Probe(True, answered=True, seconds=took)
    return _Probe(False, "; ".join(dict.fromkeys(errors)), seconds=time.perf_counter() - start)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# -- the checks ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Server:
    key: str  # the key clients request (for a proxy: "proxy[a,b]")
    host: str | None
    port: int | None
    peer: str | None = None  # where the tracker sees it connect from (tether's tracker)
    protocols: tuple[str, ...] = ()
    proxy_keys: tuple[str, ...] = ()
    busy: bool = False
    health: str | None = None

    @property
    def address(self) -> str:
        if self.host is None or self.port is None:
            return f"{self.host}:{self.port}"
        return format_hostport(self.host, self.port)


def diagnose(
    host: str,
    port: int,
    key: str | None = None,
    *,
    timeout: float = 3.0,
    session_timeout: float = 15.0,
    sessions: bool = True,
    tls: TLSLike | None = None,
    token: Token | str | None = None,
    versions: Callable[[str], str | None] | None = None,
) -> Report:
    """Run every check against the tracker at ``host:port`` (of ``key`` only, when given) and return them.

    ``timeout``: seconds for each connect, handshake, reply and queue wait. ``session_timeout``: seconds
    a device may keep a doctor's session (it is closed long before). ``sessions=False`` skips check 5
    (no device is taken at all). ``versions``: package name -> version or None (tests); default
    :func:`importlib.metadata.version`. Never raises for what a peer does.
    """
    report = Report(format_hostport(host, port))
    client = _check_tracker(report, host, port, timeout, tls=tls, token=token)
    if client is None:
        for name in ("key", "reachable", "proxy", "session"):
            report.add(Check(name, SKIP, "not checked: the tracker did not answer"))
    else:
        with client:
            try:
                summary = client.summary(detail=True, timeout=timeout)
            except (TetherError, TimeoutError, OSError) as exc:
                report.add(
                    Check(
                        "key",
                        FAIL,
                        f"the tracker did not answer SUMMARY: {exc or type(exc).__name__}",
                        "see the tracker's log",
                    )
                )
                summary = None
        if summary is not None:
            tether = client.tether_version is not None
            servers = _servers(summary)
            keys = _check_keys(report, summary, servers, key)
            wanted = [s for s in servers if s.key in keys or any(k in keys for k in s.proxy_keys)]
            if keys:
                _check_reachable(report, host, [s for s in wanted if not s.proxy_keys], timeout)
                _check_proxies(report, [s for s in wanted if s.proxy_keys], timeout)
            else:
                for name in ("reachable", "proxy"):
                    report.add(Check(name, SKIP, "not checked: no key with a server"))
            if not sessions:
                report.add(Check("session", SKIP, "not checked (--no-session)"))
            elif not keys:
                report.add(Check("session", SKIP, "not checked: no key with a server"))
            else:
                how = _How(host, port, timeout, session_timeout, tls, token)
                for k in keys:
                    _check_sessions(report, how, k, summary, servers, tether=tether)
    report.add(check_tvm_versions(versions))
    return report


def _check_tracker(
    report: Report, host: str, port: int, timeout: float, *, tls: TLSLike | None, token: Token | str | None
) -> TrackerClient | None:
    where = format_hostport(host, port)
    probe = _probe(host, port, timeout)
    why = probe.why
    if not probe.connected:
        fix = (
            f"start a tracker there (`tether tracker --host 0.0.0.0 --port {port}`), or point --tracker at the "
            "address it prints (`listening on ...`)"
        )
        if "no answer within" in why:
            fix = "a firewall drops the connection, or the address is wrong: open the port, or " + fix
        report.add(Check("tracker", FAIL, f"nothing answers at {where}: {why}", fix, where))
        return None
    start = time.perf_counter()
    try:
        client = TrackerClient.connect(host, port, timeout, tls=tls, token=token)
        version = client.tether_version
    except TLSError as exc:
        report.add(Check("tracker", FAIL, f"{where}: {exc}", "match the tracker's TLS (--tls-ca ...)", where))
        return None
    except AuthError as exc:
        report.add(Check("tracker", FAIL, f"{where}: {exc}", "set TETHER_TOKEN=name:secret (tether token)", where))
        return None
    except (RemoteProtocolError, TransportError, TimeoutError, OSError) as exc:
        report.add(
            Check(
                "tracker",
                FAIL,
                f"{where} accepts connections but is not a tracker ({exc or type(exc).__name__})",
                f"{where} is something else (a device server's or a proxy's port?): use the port `tether tracker` "
                "prints (TVM's default 9190)",
                where,
            )
        )
        return None
    kind = f"tether tracker {version}" if version is not None else "TVM tracker (or another non-tether tracker)"
    report.add(Check("tracker", OK, f"{kind} answers at {where} ({_ms(time.perf_counter() - start)})", None, where))
    return client


def _servers(summary: dict[str, Any]) -> list[_Server]:
    detail = summary.get("tether")
    out = []
    if isinstance(detail, dict):
        for entry in detail.get("servers", []):
            info_key = str(entry.get("key") or "")
            host, port = _addr(entry.get("addr"))
            slots = entry.get("slots", [])
            health = entry.get("health") if isinstance(entry.get("health"), dict) else None
            out.append(
                _Server(
                    key=server_key_name(info_key) or info_key,
                    host=host,
                    port=port,
                    peer=entry.get("peer"),
                    protocols=tuple(str(p) for p in entry.get("protocols", [])),
                    proxy_keys=tuple(proxied_keys(info_key)),
                    busy=bool(slots) and all(s.get("state") != "free" for s in slots),
                    health=None if health is None else str(health.get("state")),
                )
            )
        return out
    for info in summary.get("server_info", []):
        info_key = str(info.get("key", ""))
        host, port = _addr(info.get("addr"))
        name = server_key_name(info_key) or info_key
        out.append(_Server(key=name, host=host, port=port, proxy_keys=tuple(proxied_keys(info_key))))
    return out


def _key_counts(summary: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """key -> (servers, free): tether's own totals; TVM's from its registrations and free counts."""
    detail = summary.get("tether")
    if isinstance(detail, dict):
        return {str(k): (int(v.get("total", 0)), int(v.get("free", 0))) for k, v in detail.get("keys", {}).items()}
    totals: dict[str, int] = {}
    for info in summary.get("server_info", []):
        name = server_key_name(str(info.get("key", "")))
        if name is not None:
            totals[name] = totals.get(name, 0) + 1
    out = {}
    for k in set(totals) | set(summary.get("queue_info", {})):
        free = int(summary.get("queue_info", {}).get(k, {}).get("free", 0))
        out[k] = (max(totals.get(k, 0), free), free)
    return out


def _check_keys(report: Report, summary: dict[str, Any], servers: list[_Server], key: str | None) -> list[str]:
    """The keys with servers to check further."""
    counts = _key_counts(summary)
    present = sorted(k for k, (total, _) in counts.items() if total)
    if key is None:
        if not present:
            report.add(
                Check(
                    "key",
                    FAIL,
                    "no server is registered with this tracker",
                    "start one with `tether server --tracker HOST:PORT --key KEY` (or TVM's "
                    "`python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`); its log says whether it "
                    "registered",
                )
            )
        for k in present:
            report.add(_key_ok(k, counts[k], servers))
        for k in sorted(k for k, (total, _) in counts.items() if not total):
            pending = int(summary.get("queue_info", {}).get(k, {}).get("pending", 0))
            if pending:
                detail, fix = _missing_key(k, present)
                report.add(Check("key", WARN, f"{pending} client(s) wait for {detail}", fix, k))
        return present
    if key in present:
        report.add(_key_ok(key, counts[key], servers))
        return [key]
    detail, fix = _missing_key(key, present)
    report.add(Check("key", FAIL, detail, fix, key))
    return []


def _key_ok(key: str, counts: tuple[int, int], servers: list[_Server]) -> Check:
    total, free = counts
    proxied = sum(1 for s in servers if key in s.proxy_keys)
    via = f", {proxied} of them through a proxy" if proxied else ""
    withheld = [s for s in servers if s.key == key and s.health not in (None, "ok")]
    if withheld:
        states = ", ".join(f"{s.address} {s.health}" for s in withheld)
        return Check(
            "key",
            WARN,
            f"key {key!r}: {total} server(s), {free} free{via}; withheld: {states}",
            "the tracker grants nothing from a cordoned or quarantined server: `tether admin uncordon SERVER`, or "
            "see `tether query`",
            key,
        )
    if not free:
        return Check(
            "key",
            WARN,
            f"key {key!r}: {total} server(s){via}, none free now (all busy)",
            "wait, or add servers of this key; `tether query` shows who holds them",
            key,
        )
    return Check("key", OK, f"key {key!r}: {total} server(s), {free} free{via}", None, key)


def _missing_key(key: str, present: list[str]) -> tuple[str, str]:
    detail = f"no server is registered with key {key!r}"
    detail += f"; keys with servers: {', '.join(present)}" if present else "; no key has a server"
    hints = []
    near = difflib.get_close_matches(key, present, n=3, cutoff=0.6)
    if near:
        hints.append(f"did you mean {' or '.join(map(repr, near))}?")
    for prefix in ("server:", "client:"):
        if key.startswith(prefix):
            hints.append(f"keys are requested without the {prefix!r} prefix: the handshake adds it ({key[7:]!r});")
    if " " in key:
        hints.append(f"a key ends at its first space: the rest are options ({key.split(maxsplit=1)[0]!r});")
    longer = [k for k in present if k != key and (k.startswith(key) or key.startswith(k))]
    if longer:
        hints.append(f"keys match exactly, not by prefix ({', '.join(map(repr, longer))} is another key);")
    hints.append(
        f"request a key that exists, or start the device's server with --key {key} (check its log for "
        "'registered'; a server that cannot reach the tracker says so)"
    )
    return detail, " ".join(hints)


def _check_reachable(report: Report, tracker_host: str, servers: list[_Server], timeout: float) -> None:
    if not servers:
        report.add(Check("reachable", SKIP, "no direct server to check"))
        return
    for s in servers:
        subject = f"{s.key} at {s.address}"
        if s.host is None or s.port is None:
            report.add(Check("reachable", FAIL, f"{subject}: the tracker has no usable address", None, s.address))
            continue
        probe = _probe(s.host, s.port, timeout, handshake=True)
        why, took = probe.why, probe.seconds
        if not probe.connected:
            fix = "start the server with --custom-addr ADDRESS that clients can reach (the tracker hands out " + (
                "what the server connects from otherwise), " + _FIX_PROXY
            )
            if is_loopback(s.host) and not is_loopback(tracker_host):
                fix = f"it advertises loopback to a tracker elsewhere: {fix}"
            report.add(
                Check(
                    "reachable",
                    FAIL,
                    f"{subject}: the address the tracker hands to clients does not answer from here ({why})",
                    fix,
                    s.address,
                )
            )
        elif is_loopback(s.host) and not is_loopback(tracker_host):
            report.add(
                Check(
                    "reachable",
                    WARN,
                    f"{subject}: reachable from this machine only (a loopback address, advertised by a tracker "
                    "elsewhere)",
                    "start the server with --host 0.0.0.0 --custom-addr ADDRESS other machines can reach",
                    s.address,
                )
            )
        else:
            answers = "answers handshakes" if probe.answered else f"accepts TCP, but {why}"
            report.add(Check("reachable", OK, f"{subject}: reachable, {answers} ({_ms(took)})", None, s.address))


def _check_proxies(report: Report, proxies: list[_Server], timeout: float) -> None:
    if not proxies:
        report.add(Check("proxy", SKIP, "no proxy is registered"))
        return
    for p in proxies:
        keys = ",".join(p.proxy_keys)
        subject = f"proxy for {keys} at {p.address}"
        fix = (
            "is `tether proxy --tracker ...` still running there? its --custom-addr must be an address clients "
            "can reach"
        )
        if p.host is None or p.port is None:
            report.add(Check("proxy", FAIL, f"{subject}: no usable address", fix, p.address))
            continue
        probe = _probe(p.host, p.port, timeout, handshake=True)
        if probe.answered:
            report.add(Check("proxy", OK, f"{subject}: answers handshakes ({_ms(probe.seconds)})", None, p.address))
        else:
            report.add(Check("proxy", FAIL, f"{subject}: {probe.why}", fix, p.address))


@dataclass(frozen=True, slots=True)
class _How:
    """How to reach the tracker and its servers, and how long each step may take (seconds)."""

    host: str
    port: int
    timeout: float
    session_timeout: float
    tls: TLSLike | None
    token: Token | str | None


def _check_sessions(
    report: Report, how: _How, key: str, summary: dict[str, Any], servers: list[_Server], *, tether: bool
) -> None:
    free = _key_counts(summary).get(key, (0, 0))[1]
    if not free:
        report.add(
            Check("session", WARN, f"key {key!r}: no free server; not checked (the doctor takes only free ones)")
        )
        return
    of_key = [s for s in servers if s.key == key]
    tvm_only = bool(of_key) and all("tether" not in s.protocols for s in of_key) if tether else False
    protocol = "tvm" if (not tether or tvm_only) else "tether"
    for _ in range(min(free, 8)):  # each server of the key once, as their re-offers come back in turn
        report.add(_one_session(how, key, protocol))


def _one_session(how: _How, key: str, protocol: str) -> Check:
    from .session import Session

    host, port, timeout, tls, token = how.host, how.port, how.timeout, how.tls, how.token

    start = time.perf_counter()
    try:
        tracker = TrackerClient.connect(host, port, timeout, tls=tls, token=token)
    except (TetherError, TimeoutError, OSError) as exc:
        return Check("session", FAIL, f"key {key!r}: cannot reach the tracker again: {exc}", None, key)
    with tracker:
        try:
            grant = tracker.request_grant(
                key,
                user="tether-doctor",
                timeout=timeout,
                protocol=protocol,
                unservable_after=timeout if tracker.tether_version else None,
            )
        except RequestTimeout:
            return Check(
                "session",
                WARN,
                f"key {key!r}: no server granted within {timeout:g} s (taken meanwhile?)",
                "run again, with a longer --timeout",
                key,
            )
        except (TrackerError, TetherError, TimeoutError, OSError) as exc:
            return Check("session", FAIL, f"key {key!r}: the tracker refused the request: {exc}", None, key)
    where = format_hostport(grant.host, grant.port)
    subject = f"{key} at {where}"
    try:
        session = Session.connect(
            grant.host,
            grant.port,
            grant.matchkey,
            session_timeout=how.session_timeout,
            timeout=timeout,
            tls=tls,
            token=token,
        )
    except NotTetherServer:
        return Check(
            "session", OK, f"{subject}: TVM server, handshake ok ({_ms(time.perf_counter() - start)})", None, where
        )
    except ConnectFailed as exc:
        return Check(
            "session",
            FAIL,
            f"{subject}: granted, but cannot connect ({exc})",
            "the server advertises an address clients cannot reach: --custom-addr ADDRESS, " + _FIX_PROXY,
            where,
        )
    except SessionRefused as exc:
        return Check(
            "session",
            FAIL,
            f"{subject}: refused the handshake ({exc})",
            "another process answers at that address (a stale registration, or a server restarted with a new "
            "port): restart the device's server and check its log",
            where,
        )
    except (ConnectionClosed, RemoteProtocolError) as exc:
        return Check(
            "session",
            FAIL,
            f"{subject}: accepts TCP but the session failed ({exc})",
            "is it a tether or TVM server? check its log (a worker that cannot start, a crash at handshake); "
            "something else may listen on the advertised port",
            where,
        )
    except (TetherError, TimeoutError, OSError) as exc:
        return Check("session", FAIL, f"{subject}: {type(exc).__name__}: {exc}", "check the server's log", where)
    try:
        session.io_timeout = timeout
        session.ping()
    except (RemoteError, TransportError, TetherError, OSError) as exc:
        return Check(
            "session", FAIL, f"{subject}: opened, then failed ({exc})", "check the server's log (its worker)", where
        )
    finally:
        session.close()
    return Check(
        "session", OK, f"{subject}: tether session opened and closed ({_ms(time.perf_counter() - start)})", None, where
    )


# -- local TVM -------------------------------------------------------------------------------------


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_tvm_versions(versions: Callable[[str], str | None] | None = None) -> Check:
    """Whether the installed apache-tvm and apache-tvm-ffi go together (from package metadata only)."""
    get = versions or _installed
    tvm, ffi = get("apache-tvm"), get("apache-tvm-ffi")
    if tvm is None:
        return Check(
            "tvm",
            OK,
            "apache-tvm not installed (only needed on this machine to compile with TVM, use tvm.rpc, or serve "
            "TVM clients from `tether server`)",
        )
    pair = f"apache-tvm {tvm}, apache-tvm-ffi {ffi or 'not installed'}"
    want = TVM_FFI_COMPAT.get(_version_tuple(tvm)[:2])
    if ffi is None:
        return Check("tvm", FAIL, pair, "pip install apache-tvm-ffi (apache-tvm needs it)")
    if want is None:
        return Check("tvm", OK, f"{pair} (no known constraint for this release)")
    low, high = want
    if not low <= _version_tuple(ffi) < high:
        spec = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
        return Check(
            "tvm",
            FAIL,
            f"{pair}: apache-tvm {'.'.join(map(str, _version_tuple(tvm)[:2]))} needs apache-tvm-ffi{spec}",
            f"pip install 'apache-tvm-ffi{spec}'",
        )
    return Check("tvm", OK, pair)
