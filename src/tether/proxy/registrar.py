"""Tracker mode: offer every server waiting at the proxy to a tracker, the way TVM's proxy does, without
ever blocking the proxy's loop.

One connection to the tracker (non-blocking streams on the proxy's loop), for the proxy as a whole:

- each server waiting at the proxy is PUT as ``[3, K, [proxy_port, matchkey], custom_addr]``;
- UPDATE_INFO ``{"key": "server:proxy[k1,k2]", "addr": [custom_addr, proxy_port]}`` names the keys of the
  servers the proxy holds (waiting or in a session), sent whenever that set changes;
- every ``period`` seconds GET_PENDING_MATCHKEYS: a matchkey the tracker handed out and no client redeemed
  within ``timeout_alloc`` is renamed and PUT again (:meth:`Matcher.stale`);
- a lost tracker is reconnected forever (backoff up to 2 s); on every connection all waiting servers get
  fresh matchkeys and are PUT again.

With tether's tracker (it answers the hello ping) the proxy says more, in messages TVM's tracker never
sees: each PUT carries the server's protocols and labels (from its key's ``-tether``, ``-protocols`` and
``-labels`` options), a waiting server that goes away is WITHDRAWn at once (TVM's tracker keeps handing
it out until a client meets MISMATCH), and sessions are reported (SESSION start/end) so that query shows
them busy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import urllib.parse
from typing import TYPE_CHECKING, Any

from ..aio.net import format_hostport
from ..aio.tls import client_context, server_name
from ..errors import AuthError, AuthFailed, RemoteProtocolError
from ..protocol.auth import Initiator, Token
from ..protocol.keys import PROXY_PREFIX, PeerKey
from ..protocol.tracker import (
    Auth,
    GetPendingMatchkeys,
    Ping,
    Put,
    SessionEvent,
    TrackerClientStream,
    TrackerMessage,
    UpdateInfo,
    Withdraw,
    encode_message,
    raise_refusal,
)

if TYPE_CHECKING:
    from .relay import Relay
    from .server import ProxyServer

__all__ = ["Registrar", "server_terms"]

logger = logging.getLogger("tether.proxy")

_REPLY_TIMEOUT_S = 10.0
_CONNECT_TIMEOUT_S = 5.0
_BACKOFF_MAX_S = 2.0
_MAX_INFO_KEYS_BYTES = 64 << 10


def server_terms(key: PeerKey) -> tuple[frozenset[str], dict[str, str]]:
    """Protocols and labels a server behind the proxy announced in its handshake key.

    ``-protocols=tether,tvm`` lists them; a bare ``-tether=1`` means tether's and TVM's; no option means a
    TVM server. ``-labels=gpu=a100&os=linux`` (URL-encoded) carries labels.
    """
    raw = key.options.get("protocols")
    if raw:
        protocols = frozenset(p for p in raw.split(",") if p)
    elif key.is_tether:
        protocols = frozenset({"tether", "tvm"})
    else:
        protocols = frozenset({"tvm"})
    labels = dict(urllib.parse.parse_qsl(key.options.get("labels", ""), keep_blank_values=True))
    return protocols or frozenset({"tvm"}), labels


class Registrar:
    """The proxy's tracker link. Methods other than :meth:`start`/:meth:`stop` only queue work."""

    def __init__(
        self,
        proxy: ProxyServer,
        addr: tuple[str, int],
        period: float = 1.0,
        custom_addr: str | None = None,
        token: Token | None = None,
    ) -> None:
        self.proxy = proxy
        self._token = token
        self.matcher = proxy.matcher
        self.addr = addr
        self.period = period
        self.custom_addr = custom_addr
        self.connected = False
        self.tether_version: str | None = None
        self.connects = 0
        self.last_error: str | None = None
        self.refused_puts = 0  # PUTs the tracker answered -1 (at its limit)
        self.offered: set[str] = set()  # matchkeys this tracker connection holds for us
        self._ops: collections.deque[tuple[str, ...]] = collections.deque()
        self._sessions: dict[Relay, tuple[str, str]] = {}  # relay -> (matchkey, key name)
        self._reported: str | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._stream = TrackerClientStream()
        self._values: collections.deque[Any] = collections.deque()

    @property
    def where(self) -> str:
        return format_hostport(*self.addr)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="tether-proxy-tracker")

    async def stop(self) -> None:
        self._stopping = True
        task = self._task
        # Python 3.11's wait_for returns the inner result when a cancel arrives as it completes: the cancel
        # is lost, so cancel until the task is over (it also sees _stopping at its next turn)
        for _ in range(100):
            if task is None or task.done():
                break
            task.cancel()
            await asyncio.wait({task}, timeout=0.05)
        else:
            logger.warning("tracker link to %s did not stop", self.where)
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            logger.warning("tracker link to %s ended with %r", self.where, task.exception())
        if self._writer is not None and self.proxy.config.tls is not None:
            self._writer.transport.abort()  # a TLS close would need the loop that is about to stop
        self._close()

    def status(self) -> dict[str, Any]:
        return {
            "tracker": self.where,
            "connected": self.connected,
            "tether": self.tether_version,
            "offered": len(self.offered),
            "connects": self.connects,
            "last_error": self.last_error,
            "refused_puts": self.refused_puts,
        }

    # -- queued by the proxy ----------------------------------------------------------------------

    def _queue(self, *op: str) -> None:
        if not self.connected:
            return  # a new connection re-offers everything anyway
        self._ops.append(op)
        if self._wake is not None:
            self._wake.set()

    def offer(self, matchkey: str) -> None:
        self._queue("put", matchkey)

    def withdraw(self, matchkey: str) -> None:
        self._queue("withdraw", matchkey)

    def session(self, relay: Relay, matchkey: str, key: PeerKey, peer: str) -> None:
        self._sessions[relay] = (matchkey, key.name)
        self._queue("start", matchkey, peer)

    def session_over(self, relay: Relay) -> None:
        entry = self._sessions.pop(relay, None)
        if entry is not None:
            self._queue("end", entry[0])

    # -- the link -------------------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.25
        while not self._stopping:
            try:
                await self._connect()
                delay = 0.25
                await self._serve()
            except (OSError, EOFError, RemoteProtocolError, AuthError, asyncio.TimeoutError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                level = logging.WARNING if self.connected or self.connects == 0 else logging.INFO
                logger.log(
                    level, "tracker %s: %s; reconnecting in %.2g s (forever)", self.where, self.last_error, delay
                )
            except Exception as exc:  # a bug here must not end the link for good
                self.last_error = f"internal error: {exc!r:.200}"
                logger.exception("tracker %s: internal error; reconnecting in %.2g s", self.where, delay)
            self._close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)

    def _close(self) -> None:
        self.connected = False
        self.offered.clear()
        self._reported = None
        if self._writer is not None:
            self._writer.close()
            self._writer = self._reader = None

    async def _connect(self) -> None:
        host, port = self.addr
        tls = self.proxy.config.tls  # with TLS settings, the tracker's port is a TLS port
        options: dict[str, Any] = {}
        if tls is not None:
            options = {"ssl": client_context(tls), "server_hostname": server_name(tls, host)}
            options["ssl_handshake_timeout"] = _CONNECT_TIMEOUT_S
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, **options), _CONNECT_TIMEOUT_S)
        self._reader, self._writer = reader, writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._stream = TrackerClientStream()
        self._values.clear()
        # The magic alone, then wait for its echo: TVM's tracker drops a connection whose first read
        # holds more than the 4 bytes of magic.
        writer.write(self._stream.initial_bytes())
        while not self._stream.connected:
            data = await asyncio.wait_for(reader.read(4), _REPLY_TIMEOUT_S)
            if not data:
                raise EOFError("the tracker closed the connection")
            self._values.extend(self._stream.receive_data(data))
        hello = await self._call(Ping(hello=True))
        self.tether_version = None
        if isinstance(hello, list) and len(hello) == 2 and isinstance(hello[1], dict):
            self.tether_version = str(hello[1].get("tether", "?"))
            if hello[1].get("auth") is True and self._token is not None:
                await self._authenticate(self._token)
        self.connects += 1
        self.connected = True
        self.last_error = None
        logger.info(
            "registered with tracker %s (%s)",
            self.where,
            f"tether {self.tether_version}" if self.tether_version else "TVM's tracker",
        )
        # The tracker holds none of our matchkeys now: fresh ones for everyone, then offer them all.
        self._ops.clear()
        self.matcher.rename_all()
        await self._update_info()
        for matchkey, _ in self.matcher.servers():
            await self._put(matchkey)

    async def _authenticate(self, token: Token) -> None:
        exchange = Initiator(token, "tracker")
        challenge = await self._auth_step(exchange.hello())
        exchange.finish(await self._auth_step(exchange.answer(challenge)))
        logger.info("authenticated with tracker %s as %s", self.where, token.name)

    async def _auth_step(self, step: dict[str, Any]) -> Any:
        reply = await self._call(Auth(step))
        if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], dict)) or reply[0] != 0:
            raise AuthFailed(f"tracker {self.where} answered AUTH with {reply!r:.120}")
        return reply[1]

    async def _serve(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + self.period
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_poll - loop.time()))
            self._wake.clear()
            while self._ops:
                await self._do(self._ops.popleft())
            await self._update_info()
            if loop.time() >= next_poll:
                pending = await self._call(GetPendingMatchkeys())
                if not isinstance(pending, list):
                    raise RemoteProtocolError(f"GET_PENDING_MATCHKEYS answered {pending!r:.80}")
                for old, new in self.matcher.stale({str(k) for k in pending}, loop.time()):
                    logger.info("matchkey %r handed out but never used: re-offered as %r", old, new)
                    self.offered.discard(old)
                    if self.tether_version:
                        await self._call(SessionEvent("end", old))
                    await self._put(new)
                next_poll = loop.time() + self.period

    async def _do(self, op: tuple[str, ...]) -> None:
        kind, matchkey = op[0], op[1]
        if kind == "put":
            if matchkey not in self.offered and self.matcher.key_for(matchkey) is not None:
                await self._update_info()
                await self._put(matchkey)
        elif kind == "withdraw":
            if matchkey in self.offered:
                self.offered.discard(matchkey)
                if self.tether_version:
                    await self._call(Withdraw(matchkey))
                else:
                    logger.info("TVM's tracker cannot forget %r: a client given it will get MISMATCH", matchkey)
        elif kind == "start":
            if matchkey in self.offered:
                self.offered.discard(matchkey)
                if self.tether_version:
                    await self._call(SessionEvent("start", matchkey, op[2]))
        elif kind == "end" and self.tether_version:
            await self._call(SessionEvent("end", matchkey))

    async def _put(self, matchkey: str) -> None:
        key = self.matcher.key_for(matchkey)
        if key is None:
            return
        protocols: frozenset[str] | None = None
        labels: dict[str, str] | None = None
        if self.tether_version:
            protocols, labels = server_terms(key)
        reply = await self._call(Put(key.name, self.proxy.port, matchkey, self.custom_addr, protocols, labels or None))
        if reply == -1:  # tether's tracker at its limit of slots per proxy: the server waits unoffered
            self.refused_puts += 1
            if self.refused_puts == 1 or self.refused_puts % 1000 == 0:
                logger.warning(
                    "tracker %s refused to take server %r (%d refused so far): it takes no more slots from one "
                    "proxy (tether tracker --max-proxy-slots)",
                    self.where,
                    key.name,
                    self.refused_puts,
                )
            return
        if reply != 0:
            raise RemoteProtocolError(f"PUT answered {reply!r:.80}")
        self.offered.add(matchkey)

    async def _update_info(self) -> None:
        names = {key.name for _, key in self.matcher.servers()} | {name for _, name in self._sessions.values()}
        listed = sorted(names)
        while len(listed) > 1 and sum(len(n) + 1 for n in listed) > _MAX_INFO_KEYS_BYTES:
            listed.pop()  # the listing is for people; the PUTs are what the tracker counts
        info_key = PROXY_PREFIX + ",".join(listed) + "]"
        if info_key == self._reported:
            return
        reply = await self._call(UpdateInfo({"key": info_key, "addr": [self.custom_addr, self.proxy.port]}))
        if reply != 0:
            raise RemoteProtocolError(f"UPDATE_INFO answered {reply!r:.80}")
        self._reported = info_key

    async def _call(self, msg: TrackerMessage) -> Any:
        """Send one message and wait for its reply (the proxy never sends REQUEST: replies come in order)."""
        assert self._writer is not None and self._reader is not None
        self._writer.write(encode_message(msg))
        await asyncio.wait_for(self._writer.drain(), _REPLY_TIMEOUT_S)
        while not self._values:
            data = await asyncio.wait_for(self._reader.read(65536), _REPLY_TIMEOUT_S)
            if not data:
                raise EOFError("the tracker closed the connection")
            self._values.extend(self._stream.receive_data(data))
        value = self._values.popleft()
        raise_refusal(value)  # authentication on at the tracker, and refused: say why, reconnect later
        return value
