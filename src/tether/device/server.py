"""The device server: listener, handshake, tracker registration, and a supervisor of session workers.

Threads, each with one job:

- **accept**: takes connections and answers each handshake on a short-lived thread: a client must
  name a free slot's current matchkey (with a tracker) or the server's key (without one). tether clients
  (``-tether=1``) get tether's native session; plain TVM clients get TVM's own session loop when tvm is
  importable, else MISMATCH and a log line. Handshakes are bounded: ``handshake_timeout_s`` each,
  ``max_handshakes`` at once, ``max_handshakes_per_peer`` per peer address; a connection past a bound sheds
  the oldest handshake still being read (a slowloris' connections are the oldest) rather than being refused.
- **registration**: the only thread that talks to the tracker. UPDATE_INFO with the device's facts,
  one PUT per free slot, GET_PENDING_MATCHKEYS every second (also the heartbeat), a fresh matchkey when
  a grant is not redeemed, SESSION start/end on a tether tracker. A lost tracker is retried forever with
  backoff (TVM's server gives up after 60 s).
- **one watcher per session**: the session runs in a worker process (its own process group and
  workspace directory) started ahead of time; when the worker exits, or its session outlives the timeout
  plus a grace period, the watcher kills the process group, tells a tether client why if the worker
  could not, removes the workspace and frees the slot. A crashed session is a finished session.
- **one hang-up watcher per session** (Linux): polls the server's copy of the session's socket for the
  client's end of it (``POLLRDHUP``, ``POLLHUP``; it never reads). A client that goes away, even while
  its worker is deep in a benchmark that reads nothing, ends the session at once: the worker is killed.
  (A client that shuts down only its sending side counts as gone: tether's and TVM's clients never do.)

With ``through_proxy`` there is no listener and no tracker link: each slot connects out to the proxy as
``server:KEY`` and waits, forever, for a client to be paired with it.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import logging
import os
import queue
import secrets
import select
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..aio.auth import prove_token, reload_auth_file, verify_peer
from ..aio.net import bind_listener, connect_tcp, finish_sending, format_hostport
from ..aio.tls import TLS_OPTION, TLSConfig, client_context, server_context, start_server_tls
from ..client.tracker import TrackerClient
from ..errors import AuthError, ConfigError, RemoteProtocolError, TetherError, TLSError
from ..protocol.auth import (
    AUTH_OPTION,
    TOKEN_OPTION,
    AuthSettings,
    Keyring,
    Role,
    encode_step,
    token_from_env,
)
from ..protocol.constants import DEFAULT_HEARTBEAT_S, HandshakeCode
from ..protocol.framing import HandshakeDecoder, HandshakeReplyDecoder, encode_handshake, encode_handshake_reply
from ..protocol.keys import PeerKey, format_peer_key, parse_peer_key
from ..protocol.session import BINARY_OPTION, MAX_PAYLOAD_BYTES, FrameKind, encode_frame_head
from .facts import device_facts
from .rundir import RunDir
from .workers import Worker, WorkerPool, describe_exit

__all__ = ["DeviceServer", "ServerConfig", "default_preload"]

logger = logging.getLogger("tether.server")

PROTOCOL_TETHER = "tether"
PROTOCOL_TVM = "tvm"


def default_preload() -> list[str]:
    """What a pre-started worker imports: the installed runtimes (the slow part of a first call)."""
    return [m for m in ("numpy", "onnxruntime", "tvm") if importlib.util.find_spec(m) is not None]


def _binary_option(client: PeerKey) -> dict[str, str]:
    """``-bin=1`` for a client that offered it: its session's workers take CALL frames (binary headers)."""
    return {BINARY_OPTION: "1"} if client.options.get(BINARY_OPTION) == "1" else {}


@dataclass(slots=True)
class ServerConfig:
    """Settings of one device server; the flags of ``python -m tvm.exec.rpc_server`` plus tether's."""

    host: str = "0.0.0.0"
    port: int = 9090
    port_end: int = 9199
    key: str = ""
    tracker: tuple[str, int] | None = None
    custom_addr: str | None = None
    #: Connect out to the proxy at host:port instead of listening.
    through_proxy: bool = False
    #: ``ws://host:port/ws`` (or ``wss://``): reach the proxy over WebSocket instead of ``host:port``
    proxy_url: str | None = None
    #: Shared libraries (TVM's ``--load-library``) every session's worker loads (``ctypes``, RTLD_GLOBAL)
    #: before its session starts, whatever the backend: a vendor runtime's, a TVM custom-op library. One
    #: that fails to load ends that session with a LibraryLoadError; a path that is not a file is refused here.
    load_library: list[str] = field(default_factory=list)
    #: Upload cache (``cache/``) and one ``run-*`` directory per server instance; None: a temporary
    #: directory of its own. Directories of instances that are gone are removed (:mod:`.rundir`).
    work_dir: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    #: Concurrent sessions (one tracker slot each).
    slots: int = 1
    #: Modules a pre-started worker imports; None: every installed runtime.
    preload: list[str] | None = None
    #: Start each slot's next worker ahead of time.
    prestart: bool = True
    #: Fork workers from a process that imported the runtimes once (False: a fresh interpreter each, TVM's
    #: ``--no-fork``).
    fork: bool = True
    #: Serve TVM's protocol when tvm is importable (False: tether clients only).
    serve_tvm: bool = True
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    poll_s: float = 1.0
    reconnect_max_s: float = 5.0
    #: A matchkey granted by the tracker but not redeemed within this long is replaced.
    grant_timeout_s: float = 5.0
    #: Longest session, in seconds, whether or not the client asked for a ``session_timeout`` (a longer one
    #: is capped to it); past it the client gets the typed session timeout error. 0: no limit.
    max_session_s: float = 3600.0
    #: Seconds past a session's timeout before its process group is killed regardless.
    kill_grace_s: float = 1.0
    #: The canary (:mod:`.canary`, run when the tracker asks: device health) must finish within this.
    canary_timeout_s: float = 60.0
    #: Seconds a connection has to send its whole handshake.
    handshake_timeout_s: float = 10.0
    #: Connections in their handshake at once (reading it, or waiting in line for a slot). At the limit a
    #: new connection sheds the oldest one still reading its handshake; when none is, it is closed.
    max_handshakes: int = 64
    #: Handshakes one peer address may have in flight (still being read) at once; a connection past it sheds
    #: that address's oldest, never the newcomer: a slowloris from 127.0.0.1 must not lock out the real
    #: clients that come from the same address, whose handshakes arrive whole and finish in a moment.
    max_handshakes_per_peer: int = 8
    #: Without a tracker, a client that arrives while every slot is busy waits for one (TVM's server leaves
    #: it in the listen backlog until the running session ends): at most this many wait at once...
    max_queued: int = 16
    #: ...each at most this many seconds; then MISMATCH and a log line.
    queue_wait_s: float = 300.0
    #: Frame payloads past this many bytes break the session's protocol: it ends (FrameTooLarge).
    max_payload: int = MAX_PAYLOAD_BYTES
    #: The largest payload (a file, a request's tensors) one request may announce, in bytes: a larger one
    #: is refused from its header with QuotaExceeded, before anything is allocated, its bytes are skipped
    #: and the session goes on. 0: only ``max_payload``.
    max_upload_bytes: int = 1 << 30
    #: Bytes of files one session's workspace may hold: an upload (or cache fetch) past it is refused with
    #: QuotaExceeded before a byte is written. 0: no quota.
    workspace_quota_bytes: int = 4 << 30
    #: Bytes a session's worker may add to its address space (RLIMIT_AS) past what it has mapped when the
    #: session begins (the preloaded runtimes reserve far more than they use): past it an allocation fails,
    #: and the client gets WorkerMemoryExceeded (or SessionLost, if a native runtime aborts on it). 0: no
    #: limit, the default: onnxruntime's and TVM's thread pools and arenas reserve address space freely.
    worker_memory_bytes: int = 0
    #: The content-addressed cache of uploads shared by sessions (``<work_dir>/cache``); 0 turns it off.
    cache_bytes: int = 1 << 30
    #: Keyring file (``name role secret`` a line): a direct or proxied tether client must prove a user (or
    #: admin) token before its session; plain TVM clients are served only from ``allow_tvm`` networks.
    #: None: anyone who reaches the port may run code here, as with TVM's server.
    auth_file: str | None = None
    #: Networks (CIDR) whose plain TVM clients are served with ``auth_file`` on (behind a proxy, any
    #: entry lets the proxy's TVM clients through: the proxy checked their address).
    allow_tvm: tuple[str, ...] = ()
    #: This server's own token (``name:secret``, role server) for the tracker and the proxy; None:
    #: ``$TETHER_TOKEN`` if set.
    token: str | None = field(default=None, repr=False)
    #: TLS. With ``cert``: every session is TLS after its handshake (tether clients only: TVM's cannot speak
    #: it), client certificates required when ``ca`` is set. With any of it: TLS to the tracker (``ca`` its
    #: CA, ``cert``/``key`` this server's client certificate), and to a ``wss://`` proxy.
    tls: TLSConfig | None = None

    def __post_init__(self) -> None:
        if self.proxy_url:
            if not self.proxy_url.startswith(("ws://", "wss://")):
                raise ConfigError(f"--proxy-url must be ws:// or wss://, got {self.proxy_url!r}")
            self.through_proxy = True
        if not self.key and (self.tracker or self.through_proxy):
            raise ConfigError("--key is required with --tracker or --through-proxy")
        if self.slots < 1:
            raise ConfigError("--slots must be at least 1")
        if self.max_queued < 0 or self.queue_wait_s < 0:
            raise ConfigError("--max-queued and --queue-wait must not be negative")
        if self.max_upload_bytes < 0 or self.workspace_quota_bytes < 0 or self.worker_memory_bytes < 0:
            raise ConfigError("--max-upload-mb, --workspace-quota-mb and --worker-memory-mb must not be negative")
        if not 0 <= self.max_session_s < 1e9:
            raise ConfigError("--max-session-time must be 0 (no limit) or a positive number of seconds")
        if self.max_handshakes < 1 or self.max_handshakes_per_peer < 1:
            raise ConfigError("--max-handshakes-per-peer (and max_handshakes) must be at least 1")
        for name in self.labels:
            if not name or any(c in name for c in "=, "):
                raise ConfigError(f"bad label name {name!r}")
        for lib in self.load_library:  # a bare name is looked up by the dynamic linker, in each session
            if os.sep in lib and not os.path.isfile(lib):
                raise ConfigError(f"--load-library {lib}: no such file")


@dataclass(eq=False)
class _Session:
    id: str
    matchkey: str
    protocol: str
    peer: str
    #: The server's copy of the session's socket, kept for tether sessions only: to tell the client why
    #: its worker died. A TVM client gets EOF when the worker exits (nothing else can speak TVM's protocol).
    conn: socket.socket | None
    worker: Worker
    workspace: str
    timeout: float | None
    #: What the client is told when the session's time is over.
    timeout_message: str = ""
    started: float = field(default_factory=time.monotonic)
    #: The server's copy of the socket for either protocol, only to notice the client hang up (never read
    #: nor written; a TVM session's is never shut down either: its deadline guard may still be writing).
    watch: socket.socket | None = None
    #: Written to when the session is over: the hang-up watcher returns.
    wake: tuple[int, int] | None = None
    hangup_thread: threading.Thread | None = None
    #: The client went away, and its worker was killed for it.
    hung_up: bool = False
    #: An admin ended it at the tracker (``tether admin release``).
    released: bool = False
    #: How it ended, for the tracker's device health: "ok" or "failed" (and why).
    outcome: str = "ok"
    detail: str = ""


@dataclass(eq=False)
class _Handshake:
    """A connection between accept and the end of its handshake (its reply, or its wait for a slot)."""

    conn: socket.socket
    host: str
    #: Still reading the handshake's bytes (or, with an auth file, the client's proof): the only state in
    #: which it may be shed.
    reading: bool = True
    #: Shed for a newer connection: its socket was shut down, it no longer counts against any limit.
    shed: bool = False


@dataclass(eq=False)
class _Slot:
    index: int
    matchkey: str
    session: _Session | None = None
    reserved: bool = False
    granted_since: float | None = None
    worker: Worker | None = None
    #: The matchkey last PUT on the current tracker connection (a slot is PUT once per matchkey: a
    #: second PUT of a granted, unredeemed one would offer it twice).
    put_matchkey: str | None = None


class DeviceServer:
    """``start()`` binds and starts the threads; ``stop()`` ends them and every session."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.protocols = [PROTOCOL_TETHER]
        if config.serve_tvm and importlib.util.find_spec("tvm") is not None:
            self.protocols.append(PROTOCOL_TVM)
        self.preload = default_preload() if config.preload is None else list(config.preload)
        if PROTOCOL_TVM not in self.protocols and "tvm" in self.preload:
            self.preload.remove("tvm")
        #: Sessions' TLS (None: plain sessions). TVM's clients cannot speak TLS: a TLS server serves tether's only.
        self.tls_context = server_context(config.tls) if config.tls is not None and config.tls.cert else None
        if self.tls_context is not None and PROTOCOL_TVM in self.protocols:
            self.protocols.remove(PROTOCOL_TVM)
        self.facts = device_facts()
        #: What the tracker (or a proxy) is told: a ``backend.<name>`` label per plug-in backend, then --label's.
        self.labels = self._labels()
        self.auth = AuthSettings(config.auth_file, config.allow_tvm)
        self.token = token_from_env(config.token)
        self._lock = threading.Lock()
        #: Notified (under ``_lock``) whenever a slot may have come free, or the server stops.
        self._slot_freed = threading.Condition(self._lock)
        #: Direct mode: the connections waiting for a slot, first come first served.
        self._queued: collections.deque[object] = collections.deque()
        self._stop = threading.Event()
        #: A canary is running (the tracker may ask again meanwhile: one at a time).
        self._canary_running = threading.Event()
        #: (event, matchkey or canary id, peer or what happened, outcome) for the registration thread
        self._events: queue.Queue[tuple[str, str, str, str]] = queue.Queue()
        self._slots = [_Slot(i, self._new_matchkey()) for i in range(config.slots)]
        self._threads: list[threading.Thread] = []
        #: Handshakes that count against the limits, oldest first (a dict as an ordered set).
        self._handshakes: dict[_Handshake, None] = {}
        #: Handshakes still being read, by peer address.
        self._reading: collections.Counter[str] = collections.Counter()
        self._hs_lock = threading.Lock()
        #: Slow handshakes shut down to make room for newer connections (a test waits on it).
        self.handshakes_shed = 0
        self._shed_logged = (0.0, 0)  # (when, handshakes_shed then): the warning is rate-limited
        self._listener: socket.socket | None = None
        self.run_dir = RunDir(config.work_dir)
        self.run_dir.remove_dead_siblings()
        self.work_dir = str(self.run_dir.path)  # this instance's sessions live here
        lock = self.run_dir.lock_fd
        self.pool = WorkerPool(self.preload, self.work_dir, fork=config.fork, keep_fds=() if lock is None else (lock,))
        self.port = config.port
        self.sessions_served = 0
        #: Set when the tracker has this server's slots (a test waits on it; re-set after each reconnect).
        self.registered = threading.Event()

    def _labels(self) -> dict[str, str]:
        """``backend.<name>=<version>`` for each plug-in backend that loaded, then ``--label``'s (which win).
        (Plug-ins that failed were logged when :func:`device_facts` found them, and are in the facts.)"""
        from ..runtime import backend_labels

        labels = backend_labels()
        for name, value in self.config.labels.items():
            if name in labels and labels[name] != value:
                logger.warning(
                    "--label %s=%s replaces the label the backend plug-in gave (%s)", name, value, labels[name]
                )
        labels.update(self.config.labels)
        return labels

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        if cfg.through_proxy:
            for slot in self._slots:
                self._spawn(self._proxy_loop, slot, name=f"proxy-slot-{slot.index}")
        else:
            self._listener = bind_listener(cfg.host, cfg.port, cfg.port_end, backlog=128)
            self.port = self._listener.getsockname()[1]
            self._spawn(self._accept_loop, name="accept")
            if cfg.tracker:
                self._spawn(self._registration_loop, name="registration")
        if cfg.prestart:
            for slot in self._slots:
                self._prestart(slot)
        proxy = cfg.proxy_url or format_hostport(cfg.host, cfg.port)
        where = f"through proxy {proxy}" if cfg.through_proxy else f"on port {self.port}"
        logger.info(
            "serving key %r %s (protocols %s, %d slot(s), labels %s)",
            cfg.key,
            where,
            ",".join(self.protocols),
            cfg.slots,
            self.labels or "none",
        )
        logger.info("%s", self.describe_auth())

    def describe_auth(self) -> str:
        """The startup line's account of who may start a session here."""
        if self.config.tracker:
            off = "authentication off: clients need a matchkey granted by the tracker"
        else:
            off = "authentication off: anyone who reaches this server may run code on it (TVM compatible)"
        return self.auth.describe(off, "TVM clients")

    def reload_auth(self) -> None:
        """Read ``auth_file`` again (SIGHUP); a file that does not parse leaves the keyring as it was."""
        reload_auth_file(self.auth, logger)

    @property
    def keyring(self) -> Keyring | None:
        return self.auth.keyring

    def serve_forever(self) -> None:
        self.start()
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
        with self._slot_freed:
            self._slot_freed.notify_all()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        self.pool.stop()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        self.run_dir.close()

    def __enter__(self) -> DeviceServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Any, *args: Any, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=f"tether-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def busy_slots(self) -> int:
        with self._lock:
            return sum(1 for s in self._slots if s.session is not None or s.reserved)

    def waiting_clients(self) -> int:
        """Direct mode: connections waiting for a slot to come free."""
        with self._lock:
            return len(self._queued)

    # -- workers -------------------------------------------------------------------------------

    def _new_matchkey(self) -> str:
        return f"{self.config.key}:{secrets.token_hex(8)}"

    def _prestart(self, slot: _Slot) -> None:
        try:
            worker = self.pool.start()
        except TetherError as exc:
            if not self._stop.is_set():
                logger.warning("could not start a spare worker: %s", exc)
            return
        with self._lock:
            old, slot.worker = slot.worker, worker
        if old is not None:  # pragma: no cover - a slot holds one spare at a time
            old.kill()
            self.pool.reap(old)

    def _take_worker(self, slot: _Slot) -> Worker:
        with self._lock:
            worker, slot.worker = slot.worker, None
        if worker is not None and not worker.alive():
            self.pool.reap(worker)
            worker = None
        if worker is None:
            worker = self.pool.start()
        if not worker.ready.wait(120):
            worker.kill()
            self.pool.reap(worker)
            raise TetherError("a session worker did not start within 120 s")
        return worker

    # -- accepting -----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, addr = self._listener.accept()
            except OSError as exc:
                if self._stop.is_set():
                    return
                logger.warning("accept failed: %s", exc)  # EMFILE and the like: do not spin
                self._stop.wait(0.1)
                continue
            handshake = self._enter_handshake(conn, str(addr[0]))
            if handshake is None:
                logger.warning("too many handshakes in progress (--max-handshakes): closing %s", addr)
                conn.close()
                continue
            try:
                peer = format_hostport(str(addr[0]), int(addr[1]))
                threading.Thread(target=self._handshake, args=(handshake, peer), daemon=True).start()
            except Exception as exc:  # no thread to be had: refuse this one, keep accepting
                logger.warning("cannot serve %s: %s", addr, exc)
                self._leave_handshake(handshake)
                conn.close()

    def _enter_handshake(self, conn: socket.socket, host: str) -> _Handshake | None:
        """Count a new connection against the handshake limits, shedding the oldest slow handshake of
        its address (``max_handshakes_per_peer``) or of anyone (``max_handshakes``) to make room; None
        when every handshake in flight is past its reading (waiting in line for a slot)."""
        cfg = self.config
        shed = []
        with self._hs_lock:
            if self._reading[host] >= cfg.max_handshakes_per_peer:
                shed.append(next(h for h in self._handshakes if h.reading and h.host == host))
                self._shed_locked(shed[-1])
            if len(self._handshakes) >= cfg.max_handshakes:
                victim = next((h for h in self._handshakes if h.reading), None)
                if victim is None:
                    return None
                shed.append(victim)
                self._shed_locked(victim)
            handshake = _Handshake(conn, host)
            self._handshakes[handshake] = None
            self._reading[host] += 1
            now = time.monotonic()
            when, count = self._shed_logged
            if shed and now - when >= 10.0:
                self._shed_logged = (now, self.handshakes_shed)
        if shed and now - when >= 10.0:
            logger.warning(
                "slow handshakes: shed %d (%s; --max-handshakes-per-peer %d, --handshake-timeout %g s)",
                self.handshakes_shed - count,
                ", ".join(sorted({h.host for h in shed})),
                cfg.max_handshakes_per_peer,
                cfg.handshake_timeout_s,
            )
        return handshake

    def _shed_locked(self, handshake: _Handshake) -> None:
        """Shut a handshake's connection down (its thread's read returns at once, and it closes it)."""
        handshake.shed = True
        del self._handshakes[handshake]
        self._done_reading_locked(handshake)
        self.handshakes_shed += 1
        with contextlib.suppress(OSError):
            handshake.conn.shutdown(socket.SHUT_RDWR)

    def _done_reading_locked(self, handshake: _Handshake) -> None:
        if handshake.reading:
            handshake.reading = False
            self._reading[handshake.host] -= 1
            if not self._reading[handshake.host]:
                del self._reading[handshake.host]

    def _finish_reading(self, handshake: _Handshake) -> bool:
        """The handshake's bytes are read (or failed): from here on it cannot be shed. False when it was
        shed meanwhile (its socket is shut down: the connection is over)."""
        with self._hs_lock:
            self._done_reading_locked(handshake)
            return not handshake.shed

    def _leave_handshake(self, handshake: _Handshake) -> None:
        with self._hs_lock:
            self._done_reading_locked(handshake)
            if not handshake.shed:
                del self._handshakes[handshake]

    def _handshake(self, handshake: _Handshake, peer: str) -> None:
        conn = handshake.conn
        try:
            self._handshake_inner(handshake, peer)
        except Exception:
            logger.exception("handshake with %s failed", peer)
            self._finish_reading(handshake)  # before closing: nothing may shut down a closed descriptor
            conn.close()
        finally:
            self._leave_handshake(handshake)

    def _handshake_inner(self, handshake: _Handshake, peer: str) -> None:
        conn = handshake.conn
        decoder = HandshakeDecoder()
        deadline = time.monotonic() + self.config.handshake_timeout_s
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # exact reads: whatever follows the handshake belongs to the session's worker
            key = None
            while key is None:
                key = decoder.feed(_recv_exact(conn, decoder.needed(), deadline))
        except (OSError, ConnectionError, RemoteProtocolError) as exc:
            if self._finish_reading(handshake):  # (a shed one was logged with the others)
                logger.info("handshake from %s failed: %s", peer, exc)  # wrong magic, garbage: close, as TVM does
            conn.close()
            return
        try:
            client = parse_peer_key(key)
        except RemoteProtocolError as exc:
            logger.warning("refused %s: %s", peer, exc)
            with contextlib.suppress(OSError):
                conn.sendall(encode_handshake_reply(HandshakeCode.MISMATCH))
            conn.close()
            return
        authed = False
        if self.keyring is not None and not self.config.tracker:  # with a tracker, the matchkey is the proof
            if not client.is_tether:
                if not self.auth.tvm_allowed(_host_of(conn)):
                    logger.warning("refused TVM client %s: authentication is on and it is not in --allow-tvm", peer)
                    with contextlib.suppress(OSError):
                        conn.sendall(encode_handshake_reply(HandshakeCode.MISMATCH))
                    conn.close()
                    return
            else:
                options = {"tether": "1", AUTH_OPTION: "1", **_binary_option(client)}
                if self.tls_context is not None:
                    options[TLS_OPTION] = "1"
                try:
                    conn.sendall(
                        encode_handshake_reply(
                            HandshakeCode.SUCCESS, format_peer_key("server", self.config.key, options)
                        )
                    )
                    conn = self._start_tls(conn, client, peer)  # the exchange runs inside TLS when there is TLS
                    self._authenticate_client(conn, peer, deadline)
                except (OSError, TetherError) as exc:
                    if not handshake.shed:
                        logger.warning("refused %s: %s", peer, exc)
                    conn.close()
                    return
                authed = True
        # until here a stalled peer (its handshake, or its authentication) may be shed for a newcomer
        if not self._finish_reading(handshake):  # shed just as its last byte arrived
            conn.close()
            return
        self._admit(conn, client, peer, authed)

    def _authenticate_client(self, conn: socket.socket, peer: str, deadline: float) -> str:
        """The server's side of the exchange (steps after the handshake reply); the user's name. Sends the
        refusal and raises :class:`AuthError` when the client cannot prove a user or admin token. Holds no
        slot: a client that stalls here costs a handshake, not the device."""
        assert self.keyring is not None
        name = verify_peer(conn, self.keyring, "server", deadline, Role.USER)
        logger.info("%s authenticated as %s", peer, name)
        return name

    def _admit(self, conn: socket.socket, client: PeerKey, peer: str, authed: bool = False) -> None:
        """Check a client's key against the free slots; reply, and start its session or close. ``authed``:
        the handshake reply went out before the exchange, so the answer is a last step (``ready`` or an
        error) instead."""
        reason, slot = self._claim(client)
        if reason == _BUSY:
            reason, slot = self._wait_for_slot(conn, peer)
        if slot is None:
            logger.warning("refused %s (%s): %s", peer, client.raw, reason)
            with contextlib.suppress(OSError):
                if authed:
                    conn.sendall(encode_step({"error": "busy", "message": reason}))
                else:
                    conn.sendall(encode_handshake_reply(HandshakeCode.MISMATCH))
            conn.close()
            return
        options = {"tether": "1", **_binary_option(client)} if client.is_tether else None
        if options is not None and self.tls_context is not None:
            options[TLS_OPTION] = "1"  # TLS starts now (or, if the client did not ask for it, it learns why not)
        try:
            if authed:  # the handshake reply (and TLS) came before the client proved its token
                conn.sendall(encode_step({"ready": True}))
            else:
                conn.sendall(
                    encode_handshake_reply(HandshakeCode.SUCCESS, format_peer_key("server", self.config.key, options))
                )
                conn = self._start_tls(conn, client, peer)
            self._start_session(slot, conn, client, peer)
        except Exception as exc:
            logger.warning("could not start a session for %s: %s", peer, exc)
            conn.close()
            with self._lock:
                slot.reserved = False
                self._slot_freed.notify_all()
            self._post("rotate", slot.matchkey, "")

    def _claim(self, client: PeerKey) -> tuple[str, _Slot | None]:
        if client.role != "client":
            return f"role {client.role!r} is not a client", None
        if self.tls_context is not None and not client.is_tether:
            return (
                "a plain TVM client, and this server requires TLS (--tls-cert), which TVM's clients cannot speak",
                None,
            )
        try:
            client.session_timeout  # noqa: B018 - validates -timeout=
        except RemoteProtocolError as exc:
            return str(exc), None
        if not client.is_tether and PROTOCOL_TVM not in self.protocols:
            return "a plain TVM client, and this server cannot serve TVM sessions (tvm is not importable)", None
        with self._lock:
            if self.config.tracker:
                for slot in self._slots:
                    if slot.matchkey == client.name:
                        if slot.session or slot.reserved:
                            return "that matchkey's session is already running", None
                        slot.reserved = True
                        return "", slot
                return f"key {client.name!r} is not a current matchkey of this server", None
            if self.config.key and client.name != self.config.key and not self.config.through_proxy:
                return f"key {client.name!r} is not this server's key {self.config.key!r}", None
            free = None if self._queued else self._free_slot()  # no overtaking the line
            if free is not None:
                free.reserved = True
                return "", free
        return _BUSY, None

    def _free_slot(self) -> _Slot | None:
        """A slot with no session and no reservation (call with ``_lock`` held)."""
        return next((s for s in self._slots if not s.session and not s.reserved), None)

    def _wait_for_slot(self, conn: socket.socket, peer: str) -> tuple[str, _Slot | None]:
        """Direct mode with every slot busy: wait in line (FIFO, ``max_queued`` at once, ``queue_wait_s``
        each) for a slot, as TVM's server lets a client wait in its listen backlog; a client that hangs
        up meanwhile leaves the line."""
        cfg = self.config
        ticket = object()
        conn.settimeout(None)  # blocking: _hung_up's MSG_DONTWAIT peek must not wait out a timeout first
        with self._lock:
            if len(self._queued) >= cfg.max_queued:
                return f"every slot is busy and {len(self._queued)} connection(s) already wait (--max-queued)", None
            self._queued.append(ticket)
            ahead = len(self._queued) - 1
        logger.info("%s waits for a free slot (%d ahead of it)", peer, ahead)
        deadline = time.monotonic() + cfg.queue_wait_s
        try:
            with self._lock:
                while True:
                    if self._stop.is_set():
                        return "the server is stopping", None
                    if _hung_up(conn):  # first: a client that left must not take the slot
                        return "the client hung up while waiting for a slot", None
                    free = self._free_slot() if self._queued[0] is ticket else None
                    if free is not None:
                        free.reserved = True
                        return "", free
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return f"no slot came free within {cfg.queue_wait_s:g} s (--queue-wait)", None
                    self._slot_freed.wait(min(remaining, 0.5))  # woken when a slot frees; 0.5 s: hang-ups
        finally:
            conn.settimeout(cfg.handshake_timeout_s)  # the reply, like any handshake's, must not block forever
            with self._lock:
                self._queued.remove(ticket)
                self._slot_freed.notify_all()  # the next in line may go

    def _start_tls(self, conn: socket.socket, client: PeerKey, peer: str) -> socket.socket:
        """After the handshake reply: the socket that carries the session, a TLS relay's local end when the
        session is TLS (:mod:`tether.aio.tls`). Raises :class:`TLSError` when only one side speaks TLS (the
        reply told the client, which raises it too) or the TLS handshake fails."""
        wants = client.options.get(TLS_OPTION, "0") not in ("", "0")
        if self.tls_context is None:
            if wants:
                raise TLSError(f"{peer} asked for TLS, and this server has no certificate (--tls-cert)")
            return conn
        if not wants:
            raise TLSError(f"{peer} did not ask for TLS, and this server requires it (--tls-cert)")
        return start_server_tls(conn, self.tls_context, self.config.handshake_timeout_s, peer)

    # -- sessions ------------------------------------------------------------------------------

    def _start_session(self, slot: _Slot, conn: socket.socket, client: PeerKey, peer: str) -> None:
        protocol = PROTOCOL_TETHER if client.is_tether else PROTOCOL_TVM
        worker = self._take_worker(slot)
        session_id = secrets.token_hex(4)
        workspace = ""
        try:
            workspace = tempfile.mkdtemp(prefix=f"session-{session_id}-", dir=self.work_dir)
            timeout, timeout_message = self._session_limit(client.session_timeout)
            job = {
                "session": session_id,
                "protocol": protocol,
                "workspace": workspace,
                "timeout": timeout,
                "timeout_message": timeout_message,
                "load_library": self.config.load_library,
                "max_payload": self.config.max_payload,
                "max_upload": self.config.max_upload_bytes,
                "workspace_quota": self.config.workspace_quota_bytes,
                "worker_memory": self.config.worker_memory_bytes,
                "cache": {"dir": self.run_dir.cache_dir, "max_bytes": self.config.cache_bytes}
                if self.config.cache_bytes > 0
                else None,
                "info": {
                    "key": self.config.key,
                    "labels": self.labels,
                    "device": self.facts,
                    "version": __version__,
                },
            }
            with self._lock:
                matchkey = slot.matchkey
            session = _Session(session_id, matchkey, protocol, peer, conn, worker, workspace, timeout, timeout_message)
            socket.send_fds(worker.control, [json.dumps(job).encode()], [conn.fileno()])
        except BaseException:
            worker.kill()  # it would wait for its job forever
            self.pool.reap(worker)
            if workspace:
                shutil.rmtree(workspace, ignore_errors=True)
            raise
        session.watch = conn
        if protocol == PROTOCOL_TVM:
            session.conn = None  # nothing but the worker may write a byte of TVM's protocol
        with self._lock:
            slot.session, slot.reserved, slot.granted_since = session, False, None
        logger.info(
            "session %s: %s client %s%s (worker %d)",
            session_id,
            protocol,
            peer,
            f", timeout {timeout:g} s" if timeout else "",
            worker.pid,
        )
        self._post("start", matchkey, peer)
        self._start_hangup_watch(session)
        threading.Thread(target=self._watch, args=(slot, session), daemon=True, name="tether-session").start()
        if self.config.prestart:
            self._prestart(slot)

    def _session_limit(self, asked: float | None) -> tuple[float | None, str]:
        """The session's time limit in seconds (the client's, capped to ``max_session_s``) and what the
        client is told when it expires (TVM's client types an error that starts with its exception name)."""
        cap = self.config.max_session_s
        if cap and (asked is None or asked > cap):
            why = "the client asked for none" if asked is None else f"the client asked for {asked:g} s"
            message = (
                f"RPCSessionTimeoutError: the server's {cap:g} s limit on a session expired (--max-session-time; {why})"
            )
            return cap, message
        if asked is None:
            return None, ""
        return (
            asked,
            f"RPCSessionTimeoutError: the {asked:g} s session timeout expired; ask for a longer session_timeout",
        )

    def _watch(self, slot: _Slot, session: _Session) -> None:
        """Wait for the session's worker; whatever happens, free the slot and clean up after it."""
        try:
            self._end_session(session)
        except Exception:
            logger.exception("session %s: error while ending it", session.id)
            session.worker.kill()
            self.pool.reap(session.worker)
        finally:
            self._stop_hangup_watch(session)
            for sock in (session.conn, session.watch):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
            shutil.rmtree(session.workspace, ignore_errors=True)
            with self._lock:
                slot.session = None
                self.sessions_served += 1
                old, slot.matchkey = slot.matchkey, self._new_matchkey()
                self._slot_freed.notify_all()
            self._post("end", old, session.detail, session.outcome)
            self.run_dir.remove_dead_siblings()  # a predecessor's last orphaned session may be over now

    def _end_session(self, session: _Session) -> None:
        worker = session.worker
        limit = None if session.timeout is None else session.timeout + self.config.kill_grace_s
        code = worker.wait(limit)
        timed_out = code is None
        worker.kill()  # whatever the session started dies with it
        if code is None:
            code = worker.wait(10)
        self._stop_hangup_watch(session)  # before the socket is written to, shut down or closed
        reason = None
        if session.hung_up:
            reason = None  # nobody is there to tell
        elif session.released:
            reason = ("SessionLost", "an admin ended this session at the tracker (tether admin release)")
        elif timed_out:
            reason = ("SessionTimeout", session.timeout_message)
        elif code is not None and (why := describe_exit(code)):
            if self.config.worker_memory_bytes:  # a native runtime may abort on a failed allocation
                limit = self.config.worker_memory_bytes / (1 << 20)
                why += f" (its memory was limited to {limit:g} MiB past its start, --worker-memory-mb)"
            reason = ("SessionLost", why)
            session.outcome, session.detail = "failed", why
        if session.conn is not None:
            with contextlib.suppress(OSError):
                # The worker is gone; a client that stopped reading must not hold this thread (and the
                # slot) in a blocking send: one try, without waiting, for a frame of a few hundred bytes.
                session.conn.setblocking(False)
                if reason:
                    detail = {"type": reason[0], "message": reason[1], "traceback": ""}
                    session.conn.send(encode_frame_head(FrameKind.ERROR, 0, detail))
                    finish_sending(session.conn)  # a reset must not drop the reason (bounded: 2 s)
                session.conn.shutdown(socket.SHUT_RDWR)
            session.conn.close()
        self.pool.reap(session.worker)
        took = time.monotonic() - session.started
        why = ": the client hung up (worker killed)" if session.hung_up else f": {reason[1]}" if reason else ""
        logger.info("session %s ended after %.3f s%s", session.id, took, why)

    def _start_hangup_watch(self, session: _Session) -> None:
        """Kill the session's worker as soon as its client goes away (Linux: ``POLLRDHUP``). Elsewhere a
        client that leaves is noticed when the worker next reads, or at the session's time limit."""
        if session.watch is None or not hasattr(select, "poll") or not hasattr(select, "POLLRDHUP"):
            return
        session.wake = os.pipe()
        thread = threading.Thread(target=self._hangup_loop, args=(session,), daemon=True, name="tether-hangup")
        session.hangup_thread = thread
        thread.start()

    def _hangup_loop(self, session: _Session) -> None:
        assert session.watch is not None and session.wake is not None
        poller = select.poll()
        poller.register(session.watch, select.POLLRDHUP)  # (POLLHUP and POLLERR always count)
        poller.register(session.wake[0], select.POLLIN)
        gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
        while True:
            try:
                events = poller.poll()
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            if any(fd == session.wake[0] for fd, _ in events):
                return
            if any(mask & gone for _, mask in events):
                if session.worker.alive():  # (not a group whose id may be reused by now)
                    session.hung_up = True
                    logger.info("session %s: the client %s hung up; ending its worker", session.id, session.peer)
                    session.worker.kill()
                return

    def _stop_hangup_watch(self, session: _Session) -> None:
        thread, session.hangup_thread = session.hangup_thread, None
        if thread is None or session.wake is None:
            return
        with contextlib.suppress(OSError):
            os.write(session.wake[1], b"x")
        thread.join()  # it returns at once; then the socket may be closed under no one's poll
        for fd in session.wake:
            os.close(fd)
        session.wake = None

    def _post(self, event: str, matchkey: str, peer: str, outcome: str = "") -> None:
        if self.config.tracker and not self.config.through_proxy:  # only the registration thread reads these
            self._events.put((event, matchkey, peer, outcome))

    # -- the tracker's orders (device health) ------------------------------------------------------

    def _obey(self, orders: list[dict[str, Any]]) -> None:
        """Carry out the tracker's orders: end a session an admin released; run a canary."""
        for order in orders:
            op = order.get("op")
            if op == "release":
                with self._lock:
                    sessions = [
                        s.session for s in self._slots if s.session and s.session.matchkey == order.get("matchkey")
                    ]
                for session in sessions:
                    logger.warning("session %s released by the tracker (an admin): ending it", session.id)
                    session.released = True
                    session.worker.kill()
            elif op == "canary" and isinstance(order.get("id"), int) and not self._canary_running.is_set():
                self._canary_running.set()
                threading.Thread(target=self._canary, args=(order["id"],), daemon=True, name="tether-canary").start()

    def _canary(self, canary_id: int) -> None:
        from .canary import run_canary

        try:
            ok, detail = run_canary(timeout=self.config.canary_timeout_s)
        finally:
            self._canary_running.clear()
        logger.log(logging.INFO if ok else logging.WARNING, "canary %s: %s", "passed" if ok else "failed", detail)
        self._post("canary", str(canary_id), detail, "ok" if ok else "failed")

    # -- tracker -------------------------------------------------------------------------------

    def _info(self) -> dict[str, Any]:
        return {
            "key": f"server:{self.config.key}",
            "addr": [self.config.custom_addr, self.port],
            "tether": {
                "protocols": self.protocols,
                "labels": self.labels,
                "heartbeat": self.config.heartbeat_s,
                "slots": self.config.slots,
                "device": self.facts,
                "version": __version__,
            },
        }

    def _put(self, tracker: TrackerClient, slot: _Slot) -> None:
        with self._lock:
            matchkey = slot.matchkey
            if slot.session or slot.reserved or slot.put_matchkey == matchkey:
                return
        tracker.put(self.config.key, self.port, matchkey, self.config.custom_addr)
        with self._lock:
            slot.put_matchkey = matchkey
            slot.granted_since = None

    def _registration_loop(self) -> None:
        assert self.config.tracker is not None
        host, port = self.config.tracker
        delay = 0.2
        while not self._stop.is_set():
            tracker = None
            try:
                tracker = TrackerClient.connect(host, port, timeout=5.0, tls=self.config.tls, token=self.token)
                is_tether = tracker.tether_version is not None
                tracker.update_info(self._info())
                with self._lock:
                    for slot in self._slots:
                        slot.put_matchkey = None  # a new connection knows none of them
                    busy = [s for s in self._slots if s.session]
                for slot in self._slots:
                    self._put(tracker, slot)
                if is_tether:
                    for slot in busy:
                        tracker.session_event("start", slot.matchkey)
                logger.info("registered with tracker %s as key %r", format_hostport(host, port), self.config.key)
                self.registered.set()
                delay = 0.2
                self._serve_tracker(tracker, is_tether)
            except (TetherError, OSError, ValueError) as exc:
                self.registered.clear()
                if self._stop.is_set():
                    break
                logger.warning("tracker %s: %s; retrying in %.1f s (forever)", format_hostport(host, port), exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.config.reconnect_max_s)
            finally:
                if tracker is not None:
                    tracker.close()

    def _serve_tracker(self, tracker: TrackerClient, is_tether: bool) -> None:
        next_poll = time.monotonic()
        controlled = tracker.supports("control")
        while not self._stop.is_set():
            try:
                event, matchkey, peer, outcome = self._events.get(timeout=max(0.0, next_poll - time.monotonic()))
            except queue.Empty:
                event = ""
            if event == "start" and is_tether:
                tracker.session_event("start", matchkey, peer or None)
            elif event == "canary":
                if controlled:
                    tracker.report_canary(int(matchkey), outcome == "ok", peer)
            elif event in ("end", "rotate"):
                if event == "end" and is_tether:
                    tracker.session_event("end", matchkey, None, outcome or None, peer or None)
                if event == "rotate":
                    with self._lock:
                        for slot in self._slots:
                            if slot.matchkey == matchkey and not slot.session and not slot.reserved:
                                slot.matchkey = self._new_matchkey()
                    if is_tether:
                        tracker.withdraw(matchkey)  # its grant went nowhere: not "granted" forever
                for slot in self._slots:
                    self._put(tracker, slot)
            if time.monotonic() < next_poll:
                continue
            next_poll = time.monotonic() + self.config.poll_s
            pending = set(tracker.pending_matchkeys())  # also the heartbeat
            if controlled:
                self._obey(tracker.orders())
            now = time.monotonic()
            stale = []
            with self._lock:
                for slot in self._slots:
                    if slot.session or slot.reserved or slot.matchkey in pending:
                        slot.granted_since = None
                    elif slot.granted_since is None:
                        slot.granted_since = now
                    elif now - slot.granted_since > self.config.grant_timeout_s:
                        logger.info(
                            "grant of %s not redeemed in %.0f s: new matchkey",
                            slot.matchkey,
                            self.config.grant_timeout_s,
                        )
                        stale.append(slot.matchkey)
                        slot.matchkey = self._new_matchkey()
            for old in stale:
                if is_tether:  # the old grant was never redeemed: the tracker forgets it, so the query
                    tracker.withdraw(old)  # does not show a phantom "granted" slot beside the new free one
            for slot in self._slots:
                self._put(tracker, slot)  # a new matchkey: PUT once (_put skips the unchanged)

    # -- through a proxy -----------------------------------------------------------------------

    def _connect_proxy(self) -> socket.socket:
        cfg = self.config
        if cfg.proxy_url:
            from ..aio.ws import ws_open_socket

            context = client_context(cfg.tls) if cfg.tls is not None and cfg.proxy_url.startswith("wss:") else None
            return ws_open_socket(cfg.proxy_url, timeout=5.0, ssl_context=context)
        return connect_tcp(cfg.host, cfg.port, timeout=5.0)

    def _proxy_key(self) -> str:
        """``server:K -tether=1 -protocols=tether,tvm [-labels=k=v&...]``: a proxy in tracker mode offers the
        slot with these protocols and labels (TVM's proxy forwards the string and ignores the options)."""
        options = {"tether": "1", "protocols": ",".join(self.protocols)}
        if self.tls_context is not None:
            options[TLS_OPTION] = "1"
        if self.labels:
            options["labels"] = urllib.parse.urlencode(sorted(self.labels.items()))
        if self.keyring is not None:
            options[AUTH_OPTION] = "1"  # clients prove a token to this server, end to end through the proxy
        if self.token is not None:
            options[TOKEN_OPTION] = "1"  # this server proves its own token to the proxy
        return format_peer_key("server", self.config.key, options)

    def _proxy_loop(self, slot: _Slot) -> None:
        cfg = self.config
        delay = 0.2
        while not self._stop.is_set():
            with self._lock:
                busy = slot.session is not None or slot.reserved
            if busy:
                self._stop.wait(0.05)
                continue
            where = cfg.proxy_url or format_hostport(cfg.host, cfg.port)
            try:
                conn = self._connect_proxy()
            except (TetherError, OSError) as exc:
                logger.warning("proxy %s: %s; retrying in %.1f s (forever)", where, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, cfg.reconnect_max_s)
                continue
            try:
                conn.sendall(encode_handshake(self._proxy_key()))
                if self.token is not None:
                    prove_token(conn, self.token, "proxy", time.monotonic() + cfg.handshake_timeout_s)
                decoder = HandshakeReplyDecoder()
                reply = None
                while reply is None:
                    reply = decoder.feed(_recv_exact(conn, decoder.needed()))
                if reply.code != HandshakeCode.SUCCESS or reply.key is None:
                    raise ConnectionError(f"the proxy answered {HandshakeCode(reply.code).name}")
                client = parse_peer_key(reply.key)
            except (OSError, ConnectionError, TetherError, ValueError) as exc:
                conn.close()
                if not self._stop.is_set():
                    log = logger.warning if isinstance(exc, AuthError) else logger.info
                    log("proxy %s: %s; reconnecting", where, exc)
                    self._stop.wait(delay)
                    delay = min(delay * 2, cfg.reconnect_max_s)
                continue
            delay = 0.2
            with self._lock:
                slot.reserved = True
            protocol = PROTOCOL_TETHER if client.is_tether else PROTOCOL_TVM
            where = f"proxy:{client.raw}"
            refusal = None
            if protocol not in self.protocols:
                refusal = "proxy paired a plain TVM client, and this server cannot serve TVM sessions"
            elif self.keyring is not None and not client.is_tether and not self.auth.allow_tvm:
                refusal = "proxy paired a plain TVM client: authentication is on and --allow-tvm is not set"
            else:
                try:
                    conn = self._start_tls(conn, client, where)  # the exchange runs inside TLS when there is TLS
                    if self.keyring is not None and client.is_tether:
                        self._authenticate_client(conn, where, time.monotonic() + cfg.handshake_timeout_s)
                        conn.sendall(encode_step({"ready": True}))
                except (OSError, TetherError) as exc:
                    refusal = f"client through the proxy refused: {exc}"
            if refusal is not None:
                logger.warning("%s", refusal)
                conn.close()
                with self._lock:
                    slot.reserved = False
                continue
            try:
                self._start_session(slot, conn, client, where)
            except Exception as exc:
                logger.warning("could not start a session through the proxy: %s", exc)
                conn.close()
                with self._lock:
                    slot.reserved = False


_BUSY = "every slot is busy"


def _host_of(conn: socket.socket) -> str:
    try:
        return str(conn.getpeername()[0])
    except OSError:
        return ""


def _hung_up(conn: socket.socket) -> bool:
    """True when a client waiting for its handshake reply has closed its end (it sends nothing before)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """Exactly ``n`` bytes (the handshake must not consume a byte of the session that follows), all of
    them before ``deadline`` (``time.monotonic()``): a peer that trickles bytes is cut off."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("handshake took too long")
            sock.settimeout(remaining)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed during the handshake")
        buf += chunk
    return bytes(buf)
