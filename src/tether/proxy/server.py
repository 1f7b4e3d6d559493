"""The proxy: listeners, handshakes, pairing, relays, and the tracker link, on one asyncio loop.

Peers reach the proxy over TCP (``port``) or WebSocket (``ws://host:web_port/ws``) and say who they are
with TVM's handshake (``RPC_MAGIC``, key length, ``server:K``/``client:K ...``); over WebSocket the same
bytes arrive as binary messages (TVM's web runtime sends magic, length and key as three). The
:class:`~tether.proxy.matcher.Matcher` decides; a pair gets ``SUCCESS`` and the other side's full key
(three binary messages for a WebSocket peer, as TVM's proxy sends them) and then a
:class:`~tether.proxy.relay.Relay` carries its bytes.

Every connection is driven by readiness callbacks on non-blocking sockets: no thread, no coroutine
per connection, nothing that blocks the loop (the tracker is talked to with non-blocking streams too,
so relayed sessions never stall while the proxy registers servers). Bad input never hangs a peer: a wrong
magic or an oversized key closes the connection, a key that names nothing gets MISMATCH, bytes sent
before pairing close it, a handshake not finished within ``handshake_timeout`` closes it, a waiting
peer that goes away leaves its pool (and the tracker, where the tracker is tether's).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..aio.auth import reload_auth_file
from ..aio.loop_thread import LoopThread
from ..aio.net import Keepalive, bind_listener, format_hostport, tune_socket
from ..aio.tls import TLSConfig, server_context, start_server_tls
from ..errors import AuthError, ConfigError, RemoteProtocolError
from ..loglimit import PeerLogLimit
from ..protocol.auth import (
    AUTH_OPTION,
    MAX_STEP_BYTES,
    OFF,
    TOKEN_OPTION,
    AuthSettings,
    Keyring,
    Responder,
    Role,
    decode_step,
    encode_step,
    step_length,
    token_from_env,
)
from ..protocol.constants import MAX_HANDSHAKE_KEY_BYTES, HandshakeCode
from ..protocol.framing import HandshakeDecoder, encode_handshake_reply
from ..protocol.keys import PeerKey
from ..protocol.websocket import FrameDecoder as WsDecoder
from ..protocol.websocket import (
    HttpError,
    Opcode,
    WebSocketError,
    build_http_response,
    build_upgrade_response,
    encode_frame,
    find_head_end,
    parse_upgrade_request,
)
from .matcher import Matcher, Refuse, Wait, lenient_key
from .registrar import Registrar
from .relay import MAX_WS_MESSAGE, SOCKET_BUFFER, Endpoint, Relay

__all__ = ["ProxyConfig", "ProxyServer", "ProxyThread"]

logger = logging.getLogger("tether.proxy")

_ACCEPT_BATCH = 64
_HTTP_HEAD_LIMIT = 16 * 1024
_PROBE_S = 0.05
_LINGER_S = 5.0
_ACCEPT_PAUSE_S = 0.5


@dataclass(slots=True)
class ProxyConfig:
    """What ``tether proxy`` takes. ``web_port=None`` serves no WebSocket; 0 lets the OS choose a port."""

    host: str = "127.0.0.1"
    port: int = 9090
    port_end: int = 9199
    web_port: int | None = 8888
    tracker: tuple[str, int] | None = None
    timeout_client: float = 600.0
    timeout_server: float = 600.0
    #: tracker mode: a matchkey handed out but not redeemed for this long is renamed and re-offered
    timeout_alloc: float = 5.0
    #: seconds a peer has to finish its handshake (TVM waits forever)
    handshake_timeout: float = 10.0
    #: tracker mode: the address clients should use to reach this proxy (default: what the tracker sees)
    custom_addr: str | None = None
    #: tracker mode: seconds between GET_PENDING_MATCHKEYS rounds (TVM: 2)
    tracker_period: float = 1.0
    index_page: Path | None = None
    backlog: int = 1024
    #: servers parked (waiting for a client) at once from one peer address; one more gets MISMATCH and a
    #: log line (0: no limit). TVM's proxy keeps every one forever, and offers each to the tracker.
    max_parked_per_peer: int = 64
    #: servers parked at once in all (0: no limit); tether's tracker takes 4096 slots from a proxy
    max_parked: int = 4096
    #: Keyring file (``name role secret`` a line): servers must prove a server token (``-token=1``) before
    #: they wait here, and in plain mode must authenticate their clients themselves (``-auth=1``); TVM
    #: peers only from ``allow_tvm``. None: anyone may park a server or reach one, as at TVM's proxy.
    auth_file: str | None = None
    allow_tvm: tuple[str, ...] = ()
    #: The proxy's own token for a tracker that requires one (``name:secret``); None: ``$TETHER_TOKEN``.
    token: str | None = field(default=None, repr=False)
    #: TLS: with any of it, the tracker link is TLS (``ca`` checks the tracker, ``cert``/``key`` are the
    #: proxy's client certificate); with ``cert``, the web port serves ``wss://`` (client certificates
    #: required when ``ca`` is set). Sessions relayed are not touched: a client and a server with TLS speak
    #: it end to end, after the handshake the proxy reads.
    tls: TLSConfig | None = None


def _sysctl(name: str) -> int:
    try:
        return int(Path(f"/proc/sys/net/core/{name}").read_text())
    except (OSError, ValueError):
        return 0


_BIG_BUFFERS = min(_sysctl("rmem_max"), _sysctl("wmem_max")) >= SOCKET_BUFFER


class _Peer:
    """A connection before (and while) it is paired."""

    __slots__ = (
        "addr",
        "auth",
        "authbuf",
        "ep",
        "hello",
        "host",
        "http",
        "key",
        "kind",
        "pending",
        "relay",
        "state",
        "timer",
    )

    def __init__(self, sock: socket.socket, addr: str, kind: str, host: str = "") -> None:
        self.addr = addr
        self.host = host  # the address alone, without the port
        self.kind = kind  # "tcp" or "ws"
        self.ep = Endpoint(sock, f"{kind} {addr}")
        self.hello = HandshakeDecoder()
        self.http: bytearray | None = bytearray() if kind == "ws" else None
        self.key: PeerKey | None = None
        self.state = "http" if kind == "ws" else "hello"  # then "waiting", "paired", "closed"
        self.timer: asyncio.TimerHandle | None = None
        self.relay: Relay | None = None
        #: state "auth": the exchange (None: authentication is off, the hello is answered "off"), the bytes
        #: of steps received so far, and the key that waits for the exchange's outcome
        self.auth: Responder | None = None
        self.authbuf = bytearray()
        self.pending = ""

    @property
    def raw_key(self) -> str:
        return self.key.raw if self.key else "?"

    def describe(self) -> str:
        return f"{self.kind} {self.addr} {self.raw_key!r}" if self.key else f"{self.kind} {self.addr}"


class ProxyServer:
    """``await start()`` binds (:class:`ConfigError` when no port is free); ``serve_until_stopped()``."""

    def __init__(self, config: ProxyConfig | None = None) -> None:
        self.config = cfg = config or ProxyConfig()
        self.matcher = Matcher(
            tracker_mode=cfg.tracker is not None,
            timeout_client=cfg.timeout_client,
            timeout_server=cfg.timeout_server,
            alloc_timeout=cfg.timeout_alloc,
            max_servers_per_host=cfg.max_parked_per_peer,
            max_servers=cfg.max_parked,
        )
        self.host = cfg.host
        self.port = 0
        self.web_port: int | None = None
        self.registrar: Registrar | None = None
        self.relays: set[Relay] = set()
        self.stats = {"accepted": 0, "paired": 0, "refused": 0, "dropped": 0, "bytes": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[socket.socket] = []
        self._peers: set[_Peer] = set()
        self._lingering: set[Endpoint] = set()  # unpaired sockets finishing a last answer
        self._stopped: asyncio.Event | None = None
        self._keepalive = Keepalive(30, 10, 3)
        #: one line per refused handshake, a few per window when one address floods
        self._refusal_log = PeerLogLimit(logger=logger, about="refused handshakes")
        #: how late the loop ran a timer due every ``_PROBE_S``: a stalled loop stalls every relay
        self.loop_lag = {"probes": 0, "max_ms": 0.0, "over_5ms": 0}
        self._probe_handle: asyncio.TimerHandle | None = None
        self._web_tls: ssl.SSLContext | None = None
        self.auth = AuthSettings(cfg.auth_file, cfg.allow_tvm)
        self.token = token_from_env(cfg.token)

    def describe_auth(self) -> str:
        """The startup line's account of who may park servers and reach them."""
        return self.auth.describe(
            "authentication off: anyone may park a server here or reach one (TVM compatible)", "TVM peers"
        )

    def reload_auth(self) -> None:
        """Read ``auth_file`` again (SIGHUP); a file that does not parse leaves the keyring as it was."""
        reload_auth_file(self.auth, logger)

    @property
    def keyring(self) -> Keyring | None:
        return self.auth.keyring

    @property
    def address(self) -> str:
        return format_hostport(self.host, self.port)

    @property
    def ws_url(self) -> str | None:
        scheme = "wss" if self.config.tls is not None and self.config.tls.cert else "ws"
        return None if self.web_port is None else f"{scheme}://{format_hostport(self.host, self.web_port)}/ws"

    async def start(self) -> None:
        cfg = self.config
        self._loop = loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        sock = bind_listener(cfg.host, cfg.port, cfg.port_end, cfg.backlog)
        name = sock.getsockname()
        self.host, self.port = str(name[0]), int(name[1])
        self._listen(sock, "tcp")
        if cfg.web_port is not None:
            try:
                web = bind_listener(cfg.host, cfg.web_port, None, cfg.backlog)
            except ConfigError:
                loop.remove_reader(sock.fileno())
                self._listeners.remove(sock)
                sock.close()
                raise
            self.web_port = int(web.getsockname()[1])
            self._listen(web, self._web_kind())
        if cfg.tracker is not None:
            self.registrar = Registrar(self, cfg.tracker, cfg.tracker_period, cfg.custom_addr, self.token)
            self.registrar.start(loop)
        self._probe_handle = loop.call_at(loop.time() + _PROBE_S, self._probe, loop.time() + _PROBE_S)
        logger.info(
            "proxy on %s%s%s",
            self.address,
            f", WebSocket on {self.ws_url}" if self.ws_url else "",
            f", registering with tracker {format_hostport(*cfg.tracker)}" if cfg.tracker else " (plain mode)",
        )
        logger.info("%s", self.describe_auth())

    def _listen(self, sock: socket.socket, kind: str) -> None:
        assert self._loop is not None
        sock.setblocking(False)
        self._listeners.append(sock)
        self._loop.add_reader(sock.fileno(), self._on_accept, sock, kind)

    def _probe(self, due: float) -> None:
        assert self._loop is not None
        now = self._loop.time()
        lag_ms = (now - due) * 1e3
        lag = self.loop_lag
        lag["probes"] += 1
        lag["max_ms"] = max(lag["max_ms"], round(lag_ms, 3))
        lag["over_5ms"] += lag_ms > 5.0
        self._probe_handle = self._loop.call_at(now + _PROBE_S, self._probe, now + _PROBE_S)

    async def serve_until_stopped(self) -> None:
        assert self._stopped is not None, "start() first"
        await self._stopped.wait()
        await self._shutdown()

    def stop(self) -> None:
        """Ask the proxy to stop (from the loop's thread)."""
        if self._stopped is not None:
            self._stopped.set()

    async def _shutdown(self) -> None:
        assert self._loop is not None
        if self._probe_handle is not None:
            self._probe_handle.cancel()
        for sock in self._listeners:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()
        if self.registrar is not None:
            await self.registrar.stop()
        for peer in list(self._peers):
            self._drop(peer, "proxy stopping", quiet=True)
        for relay in list(self.relays):
            relay.end(relay.a, "proxy stopping")
        for ep in list(self._lingering):
            self._linger_over(ep)
        logger.info("proxy on %s stopped", self.address)

    def status(self) -> dict[str, Any]:
        """What the proxy holds now: waiting peers, relays, counters, the tracker link."""
        return {
            "address": self.address,
            "websocket": self.ws_url,
            "mode": "tracker" if self.config.tracker else "plain",
            "waiting": [{"key": key.raw, "matchkey": mk, "role": key.role} for mk, key in self.matcher.servers()]
            + [
                {"key": p.raw_key, "role": "client", "addr": p.addr}
                for p in self._peers
                if p.state == "waiting" and p.key is not None and p.key.role == "client"
            ],
            "relays": [
                {
                    "a": r.a.label,
                    "b": r.b.label,
                    "bytes": [r.bytes_ab, r.bytes_ba],
                    "queued": [r.a.out_bytes, r.b.out_bytes],
                    "since_s": round(time.monotonic() - r.started, 3),
                }
                for r in self.relays
            ],
            "stats": dict(self.stats),
            "loop_lag": dict(self.loop_lag),
            "tracker": self.registrar.status() if self.registrar else None,
        }

    # -- accepting ---------------------------------------------------------------------------------

    def _on_accept(self, listener: socket.socket, kind: str) -> None:
        assert self._loop is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: serve the connections we have, try again later
                logger.warning("accept on %s failed: %s; pausing accepts for %.1f s", kind, exc, _ACCEPT_PAUSE_S)
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(_ACCEPT_PAUSE_S, self._resume_accepts, listener, kind)
                return
            if kind == "wss":
                self._accept_tls(sock, format_hostport(str(addr[0]), int(addr[1])))
                continue
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                tune_socket(sock, self._keepalive)
                if _BIG_BUFFERS:  # only where the system allows them; else the kernel's autotuning does better
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            peer = _Peer(sock, format_hostport(str(addr[0]), int(addr[1])), kind, str(addr[0]))
            self.stats["accepted"] += 1
            self._peers.add(peer)
            peer.timer = self._loop.call_later(self.config.handshake_timeout, self._handshake_timeout, peer)
            self._loop.add_reader(peer.ep.fd, self._on_readable, peer)

    # -- the web port over TLS ---------------------------------------------------------------------

    def _web_kind(self) -> str:
        """``wss`` when the web port speaks TLS (a certificate was given), else ``ws``."""
        tls = self.config.tls
        if tls is None or not tls.cert:
            return "ws"
        self._web_tls = server_context(tls)
        return "wss"

    def _accept_tls(self, sock: socket.socket, where: str) -> None:
        """A connection to the TLS web port: its TLS handshake on a worker thread, then (the TLS kept by a
        relay's two threads, :mod:`tether.aio.tls`) its clear side is served like any WebSocket peer. The
        one place the proxy uses threads: TLS peers of the web port are devices and browsers, not many."""
        assert self._loop is not None and self._web_tls is not None
        loop = self._loop
        sock.setblocking(True)
        handshake = functools.partial(
            start_server_tls, sock, self._web_tls, self.config.handshake_timeout, where, ready=False
        )
        future = loop.run_in_executor(None, handshake)

        def done(fut: asyncio.Future[socket.socket]) -> None:
            if fut.cancelled():
                sock.close()
                return
            exc = fut.exception()
            if exc is not None:
                logger.info("web port: %s", exc)
                return
            local = fut.result()
            if self._stopped is None or self._stopped.is_set():
                local.close()
                return
            local.setblocking(False)
            peer = _Peer(local, where, "ws")
            self.stats["accepted"] += 1
            self._peers.add(peer)
            peer.timer = loop.call_later(self.config.handshake_timeout, self._handshake_timeout, peer)
            loop.add_reader(peer.ep.fd, self._on_readable, peer)

        future.add_done_callback(done)

    def _resume_accepts(self, listener: socket.socket, kind: str) -> None:
        assert self._loop is not None
        if listener in self._listeners:
            self._loop.add_reader(listener.fileno(), self._on_accept, listener, kind)

    def _handshake_timeout(self, peer: _Peer) -> None:
        peer.timer = None
        if peer.state in ("http", "hello", "auth"):
            logger.info("%s: no handshake within %.0f s; closed", peer.describe(), self.config.handshake_timeout)
            self._drop(peer, "handshake timeout", ws_code=1002)

    # -- before pairing ----------------------------------------------------------------------------

    def _on_readable(self, peer: _Peer) -> None:
        try:
            if peer.kind == "tcp":
                self._read_tcp(peer)
            else:
                self._read_ws(peer)
        except (RemoteProtocolError, ValueError) as exc:
            code = exc.code if isinstance(exc, WebSocketError) else 1002
            logger.info("%s: %s; closed", peer.describe(), exc)
            self._drop(peer, str(exc), ws_code=code)
        except OSError as exc:
            self._drop(peer, f"gone ({exc})", quiet=peer.state != "waiting")

    def _read_tcp(self, peer: _Peer) -> None:
        sock = peer.ep.sock
        if peer.state == "hello":
            try:
                data = sock.recv(peer.hello.needed())  # exactly the handshake: nothing of the session
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                self._drop(peer, "closed during the handshake", quiet=True)
                return
            key = peer.hello.feed(data)
            if key is not None:
                self._arrived(peer, key)
            return
        if peer.state == "auth":
            try:
                data = sock.recv(MAX_STEP_BYTES + 8)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                self._drop(peer, "closed during authentication", quiet=True)
                return
            self._auth_feed(peer, data)
            return
        # waiting: the peer must stay silent until it is paired
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self._drop(peer, "went away while waiting")
        else:
            raise RemoteProtocolError(f"{len(data)} byte(s) sent before pairing")

    def _read_ws(self, peer: _Peer) -> None:
        sock = peer.ep.sock
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self._drop(peer, "closed" if peer.state != "waiting" else "went away while waiting", quiet=True)
            return
        if peer.state == "http":
            assert peer.http is not None
            peer.http += data
            try:
                end = find_head_end(peer.http, _HTTP_HEAD_LIMIT)
            except HttpError as exc:
                self._write(peer, [exc.response()])
                self._drop(peer, f"HTTP {exc.status}", quiet=True, ws=False)
                return
            if end < 0:
                return
            head, rest = bytes(peer.http[:end]), bytes(peer.http[end:])
            peer.http = None
            if not self._http(peer, head):
                return
            data = rest
            if not data:
                return
        assert peer.ep.ws is not None
        messages = peer.ep.ws.feed(data)
        for i, msg in enumerate(messages):
            if msg.opcode in (Opcode.BINARY, Opcode.TEXT) and peer.state == "auth":
                self._auth_feed(peer, msg.data)
                if peer.state == "waiting" and any(m.opcode != Opcode.PING for m in messages[i + 1 :]):
                    raise RemoteProtocolError("bytes sent before pairing")
                if peer.state != "auth":
                    return
            elif msg.opcode in (Opcode.BINARY, Opcode.TEXT):
                if peer.state != "hello":
                    raise RemoteProtocolError(f"{len(msg.data)} byte(s) sent before pairing")
                key = peer.hello.feed(msg.data)
                if key is None:
                    continue
                unused, after = peer.hello.unused, messages[i + 1 :]
                self._arrived(peer, key)
                if peer.relay is not None:  # paired at once: what followed the key belongs to the session
                    peer.relay.inject(peer.ep, unused, after)
                    return
                if peer.state == "auth":
                    if unused:
                        self._auth_feed(peer, unused)
                    continue
                if peer.state == "waiting" and (unused or any(m.opcode != Opcode.PING for m in after)):
                    raise RemoteProtocolError("bytes sent before pairing")
                if peer.state != "waiting":
                    return
            elif msg.opcode == Opcode.PING:
                self._write(peer, peer.ep.pong(msg.data))
            elif msg.opcode == Opcode.CLOSE:
                self._drop(peer, "WebSocket closed" if peer.state != "waiting" else "went away while waiting")
                return

    def _http(self, peer: _Peer, head: bytes) -> bool:
        """Answer the HTTP request on the web port; True when it became a WebSocket on ``/ws``."""
        path = _request_path(head)
        if path != "/ws":
            if path in ("/", "/status"):
                self._answer_page(peer, path)
            else:
                self._write(peer, [build_http_response(404, "Not Found", b"the WebSocket endpoint is /ws\n")])
                self._drop(peer, "HTTP 404", quiet=True, ws=False)
            return False
        try:
            req = parse_upgrade_request(head)
        except HttpError as exc:
            self._write(peer, [exc.response()])
            logger.info("%s: HTTP %d %s", peer.describe(), exc.status, exc.reason)
            self._drop(peer, f"HTTP {exc.status}", quiet=True, ws=False)
            return False
        self._write(peer, [build_upgrade_response(req)])
        peer.ep.ws = WsDecoder(expect_masked=True, max_message=MAX_HANDSHAKE_KEY_BYTES + 64)
        peer.state = "hello"
        return True

    def _answer_page(self, peer: _Peer, path: str) -> None:
        if path == "/status":
            body = json.dumps(self.status(), indent=1).encode()
            response = build_http_response(200, "OK", body, "application/json")
        elif self.config.index_page is not None:
            try:
                body = self.config.index_page.read_bytes()
                response = build_http_response(200, "OK", body, "text/html; charset=utf-8")
            except OSError as exc:
                response = build_http_response(500, "Internal Server Error", f"{exc}\n".encode())
        else:
            text = f"tether proxy: WebSocket endpoint {self.ws_url}, TCP on {self.address}, status at /status\n"
            response = build_http_response(200, "OK", text.encode())
        self._write(peer, [response])
        self._drop(peer, "HTTP page served", quiet=True, ws=False)

    def _write(self, peer: _Peer, parts: list[bytes | bytearray | memoryview]) -> None:
        """A write before pairing (replies, HTTP answers); what the socket does not take now is sent when
        it can take more (the relay takes over the queue once paired)."""
        peer.ep.queue(parts)
        self._flush_unpaired(peer.ep)

    def _flush_unpaired(self, ep: Endpoint, closing: bool = False) -> None:
        assert self._loop is not None
        try:
            done = ep.flush()
        except OSError as exc:
            logger.debug("%s: write failed: %s", ep.label, exc)
            ep.out.clear()
            ep.out_bytes = 0
            done = True
        if done and ep.writing:
            ep.writing = False
            self._loop.remove_writer(ep.fd)
        elif not done and not ep.writing:
            ep.writing = True
            self._loop.add_writer(ep.fd, self._flush_unpaired, ep, closing)
        if done and closing:
            ep.close()

    # -- authentication ----------------------------------------------------------------------------

    def _arrived(self, peer: _Peer, raw_key: str) -> None:
        """A whole handshake key: who may go on (with a keyring), maybe after an exchange; then decide."""
        key = lenient_key(raw_key)
        wants_exchange = key is not None and key.role == "server" and key.options.get(TOKEN_OPTION) == "1"
        if self.keyring is not None and key is not None:
            refusal = self._refusal(peer, key, wants_exchange)
            if refusal is not None:
                self.stats["refused"] += 1
                logger.warning("%s refused: %s", peer.describe(), refusal)
                self._reply(peer, encode_handshake_reply(HandshakeCode.MISMATCH))
                self._drop(peer, "refused", quiet=True)
                return
        if wants_exchange:  # the server proves its token first (or learns that this proxy asks for none)
            peer.state, peer.pending = "auth", raw_key
            peer.auth = Responder(self.keyring, "proxy") if self.keyring is not None else None
            return
        self._decide(peer, raw_key)

    def _refusal(self, peer: _Peer, key: PeerKey, exchange: bool) -> str | None:
        """Why a peer may not go on with authentication on (None: it may)."""
        tvm_ok = self.auth.tvm_allowed(peer.host)
        plain = self.config.tracker is None
        if key.role == "server":
            if plain and key.options.get(AUTH_OPTION) != "1":
                return "in plain mode with authentication on, a server must authenticate its clients (an auth file)"
            if not exchange and not tvm_ok:
                return "authentication is on: a server must prove a server token (TETHER_TOKEN) to park here"
        elif plain and not key.is_tether and not tvm_ok:
            return "authentication is on: plain TVM clients are served only from --allow-tvm networks"
        return None

    def _auth_feed(self, peer: _Peer, data: bytes) -> None:
        """Bytes of a parking server's exchange: answer each whole step; once proven, decide."""
        buf = peer.authbuf
        buf += data
        while len(buf) >= 4:
            length = step_length(bytes(buf[:4]))
            if len(buf) < 4 + length:
                return
            step = decode_step(bytes(buf[4 : 4 + length]))
            del buf[: 4 + length]
            if peer.auth is None:  # authentication off here: the server goes on without
                self._send_step(peer, {"error": OFF, "message": "authentication is off at this proxy"})
                done = True
            else:
                done = self._auth_step(peer, peer.auth, step)
            if done:
                if buf:
                    raise RemoteProtocolError(f"{len(buf)} byte(s) sent before pairing")
                if peer.state == "auth":
                    self._decide(peer, peer.pending)
                return

    def _auth_step(self, peer: _Peer, exchange: Responder, step: dict[str, Any]) -> bool:
        try:
            if exchange.claimed is None:
                self._send_step(peer, exchange.challenge(step))
                return False
            cred, verdict = exchange.verify(step)
            if not cred.role.allows(Role.SERVER):
                raise AuthError(f"token {cred.name!r} has role {cred.role.value}; parking a server needs server")
        except AuthError as exc:
            self.stats["refused"] += 1
            logger.warning("%s refused: %s", peer.describe(), exc)
            self._send_step(peer, Responder.refusal(str(exc)))
            self._drop(peer, "refused", quiet=True)
            return True
        self._send_step(peer, verdict)
        logger.info("%s authenticated as %s", peer.describe(), cred.name)
        return True

    def _send_step(self, peer: _Peer, step: dict[str, Any]) -> None:
        data = encode_step(step)
        if peer.kind == "tcp":
            self._write(peer, [data])
        else:
            self._write(peer, [encode_frame(Opcode.BINARY, data, mask=False)])

    # -- deciding ----------------------------------------------------------------------------------

    def _decide(self, peer: _Peer, raw_key: str) -> None:
        assert self._loop is not None
        if peer.timer is not None:
            peer.timer.cancel()
            peer.timer = None
        decision = self.matcher.arrive(peer, raw_key, self._loop.time(), peer.host)
        if isinstance(decision, Refuse):
            peer.key = None
            self.stats["refused"] += 1
            if self._refusal_log.allow(peer.host):
                logger.info("%s %r %s: %s", peer.describe(), raw_key[:80], decision.code.name, decision.reason)
            self._reply(peer, encode_handshake_reply(decision.code))
            self._drop(peer, decision.code.name, quiet=True)
            return
        key = self.matcher.key_of(peer) if isinstance(decision, Wait) else None
        if isinstance(decision, Wait):
            assert key is not None
            peer.key, peer.state = key, "waiting"
            logger.info("%s waits as %r", peer.describe(), decision.matchkey)
            if decision.deadline is not None:
                peer.timer = self._loop.call_at(decision.deadline, self._wait_timeout, peer)
            if self.registrar is not None and key.role == "server":
                self.registrar.offer(decision.matchkey)
            return
        other = decision.other
        assert isinstance(other, _Peer)
        peer.key = lenient_key(raw_key)
        self._pair(other, peer, decision.matchkey)

    def _wait_timeout(self, peer: _Peer) -> None:
        assert self._loop is not None
        peer.timer = None
        if peer.state == "waiting" and self.matcher.waiting(peer) and not self.matcher.expire(peer, self._loop.time()):
            peer.timer = self._loop.call_later(0.01, self._wait_timeout, peer)  # fired a tick early
            return
        if peer.state == "waiting":
            logger.info("%s: no match within the wait timeout; MISMATCH", peer.describe())
            self.stats["refused"] += 1
            self._reply(peer, encode_handshake_reply(HandshakeCode.MISMATCH))
            self._drop(peer, "wait timeout", quiet=True)

    def _reply(self, peer: _Peer, reply: bytes) -> None:
        """A handshake reply: raw bytes for TCP, binary messages for a WebSocket (code, length, key)."""
        if peer.kind == "tcp":
            self._write(peer, [reply])
        else:
            parts = [reply[:4], reply[4:8], reply[8:]] if len(reply) > 4 else [reply]
            self._write(peer, [encode_frame(Opcode.BINARY, p, mask=False) for p in parts])

    def _pair(self, waiting: _Peer, arriving: _Peer, matchkey: str) -> None:
        assert self._loop is not None and waiting.key is not None and arriving.key is not None
        for p in (waiting, arriving):
            self._peers.discard(p)
            self._loop.remove_reader(p.ep.fd)
            if p.ep.writing:  # the relay's own writer takes over what is still queued
                p.ep.writing = False
                self._loop.remove_writer(p.ep.fd)
            if p.timer is not None:
                p.timer.cancel()
                p.timer = None
            p.state = "paired"
        self._reply(waiting, encode_handshake_reply(HandshakeCode.SUCCESS, arriving.key.raw))
        self._reply(arriving, encode_handshake_reply(HandshakeCode.SUCCESS, waiting.key.raw))
        server, client = (waiting, arriving) if waiting.key.role == "server" else (arriving, waiting)
        server.ep.label, client.ep.label = f"server {server.describe()}", f"client {client.describe()}"
        relay = Relay(self._loop, client.ep, server.ep, self._relay_done)
        waiting.relay = arriving.relay = relay
        for p in (waiting, arriving):
            if p.ep.ws is not None:
                p.ep.ws.max_message = MAX_WS_MESSAGE
        self.relays.add(relay)
        self.stats["paired"] += 1
        logger.info("paired %s with %s", client.describe(), server.describe())
        if self.registrar is not None and server.key is not None:
            self.registrar.session(relay, matchkey, server.key, client.addr)
        relay.start()

    def _relay_done(self, relay: Relay, reason: str) -> None:
        self.relays.discard(relay)
        self.stats["bytes"] += relay.bytes_ab + relay.bytes_ba
        logger.info(
            "relay ended (%s) after %.1f s: %d bytes to the server, %d back",
            reason,
            time.monotonic() - relay.started,
            relay.bytes_ab,
            relay.bytes_ba,
        )
        if self.registrar is not None:
            self.registrar.session_over(relay)

    def _drop(self, peer: _Peer, reason: str, *, quiet: bool = False, ws_code: int = 1000, ws: bool = True) -> None:
        """Close a peer that is not paired; it leaves its pool (and the tracker) if it waited."""
        if peer.state in ("paired", "closed"):
            return
        assert self._loop is not None
        was_waiting = peer.state == "waiting"
        peer.state = "closed"
        self._peers.discard(peer)
        if peer.timer is not None:
            peer.timer.cancel()
            peer.timer = None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(peer.ep.fd)
        matchkey = self.matcher.leave(peer)
        if was_waiting:
            self.stats["dropped"] += 1
            if not quiet:
                logger.info("%s: %s", peer.describe(), reason)
            if matchkey is not None and self.registrar is not None and peer.key and peer.key.role == "server":
                self.registrar.withdraw(matchkey)
        if peer.ep.ws is None or not ws:
            peer.ep.ws = None
        if peer.ep.out:  # a reply still queued: close once it left (or after _LINGER_S)
            ep = peer.ep
            if ep.writing:
                self._loop.remove_writer(ep.fd)
                ep.writing = False
            self._flush_unpaired(ep, closing=True)
            if not ep.closed:
                self._lingering.add(ep)
                self._loop.call_later(_LINGER_S, self._linger_over, ep)
        else:
            peer.ep.close(ws_code, reason)

    def _linger_over(self, ep: Endpoint) -> None:
        assert self._loop is not None
        self._lingering.discard(ep)
        if not ep.closed:
            if ep.writing:
                ep.writing = False
                self._loop.remove_writer(ep.fd)
            ep.close()


def _request_path(head: bytes) -> str:
    line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace").split()
    return line[1].split("?", 1)[0] if len(line) >= 2 else ""


class ProxyThread(LoopThread[ProxyServer]):
    """A proxy on its own event loop in a background thread: for tests, notebooks and the demo.

    Not in a process that also runs TVM's client on sessions through it: TVM's client keeps the GIL during
    some blocking socket calls (freeing a remote object, for one), so the proxy's thread never gets to
    relay what that call waits for. Run ``tether proxy`` as its own process there.
    """

    def __init__(self, config: ProxyConfig | None = None, start_timeout: float = 10.0) -> None:
        super().__init__(ProxyServer(config or ProxyConfig(port=0, web_port=0)), "tether-proxy", start_timeout)

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def ws_url(self) -> str | None:
        return self.server.ws_url

    @property
    def web_port(self) -> int | None:
        return self.server.web_port

    def status(self) -> dict[str, Any]:
        return dict(self.call(self.server.status))
