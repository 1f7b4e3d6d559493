"""Who pairs with whom: the proxy's pools, without sockets or clocks of its own.

Peers arrive with a handshake key (``server:K ...`` or ``client:K ...``); the matcher answers what to do:

- **plain mode** (no tracker): a peer whose name ``K`` waits in the opposite pool is paired with it;
  otherwise it waits in its own pool until its deadline (``timeout_server`` / ``timeout_client``), then
  gets MISMATCH; a second waiter with the same name gets DUPLICATE;
- **tracker mode**: a server gets a fresh matchkey (``K:<random>``) and waits with no deadline (the
  tracker hands the matchkey to a client); a client must bring a matchkey that is waiting, else MISMATCH
  at once. A matchkey the tracker handed out but no client redeemed within ``alloc_timeout`` is renamed
  (:meth:`Matcher.stale`), so that a late client with the old one is refused instead of being paired.

Keys that name nothing (``client:``, ``server:   ``, no role) are refused at once: TVM's proxy hangs on
them. Peers are opaque objects, compared by identity.

Servers parked (waiting) at once are bounded, per peer address (``max_servers_per_host``) and in all
(``max_servers``): one more gets MISMATCH, so sockets posing as servers cannot pile up forever (nor
appear as slots at the tracker). 0 turns a limit off.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from ..protocol.constants import HandshakeCode
from ..protocol.keys import PeerKey

__all__ = ["MAX_TRACKED_NAME_BYTES", "Matcher", "Pair", "Refuse", "Wait", "lenient_key", "random_matchkey"]

#: Tracker mode: longest server key offered to the tracker (every PUT and the proxy's listing carry it).
MAX_TRACKED_NAME_BYTES = 256


def lenient_key(raw: str) -> PeerKey | None:
    """``role:name ...`` read as TVM's proxy reads it (the name is ``raw[7:].split()[0]``): later tokens
    are kept verbatim in ``raw`` and those shaped ``-k=v`` also in ``options``. None when there is no
    role or no name."""
    head, sep, rest = raw.partition(":")
    tokens = rest.split()
    if not sep or head not in ("client", "server") or not tokens:
        return None
    options = {}
    for token in tokens[1:]:
        if token.startswith("-") and len(token) > 1:
            name, _, value = token[1:].partition("=")
            options[name] = value
    return PeerKey(head, tokens[0], options, raw)


def random_matchkey(name: str) -> str:
    """``name:<random>``: TVM's ``random_key`` shape (the tracker and clients treat it as opaque)."""
    return f"{name}:{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class Pair:
    """Pair the arriving peer with ``other`` (whose key is ``other_key``) now."""

    other: Hashable
    other_key: PeerKey
    matchkey: str


@dataclass(frozen=True, slots=True)
class Wait:
    """The peer waits in a pool under ``matchkey``; ``deadline`` (absolute) or None for no limit."""

    matchkey: str
    deadline: float | None


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer ``code`` (MISMATCH or DUPLICATE) and close; ``reason`` is for the log."""

    code: HandshakeCode
    reason: str


@dataclass(slots=True)
class _Waiting:
    peer: Hashable
    key: PeerKey
    role: str
    matchkey: str
    deadline: float | None
    granted_since: float | None = None  # tracker mode: when the tracker stopped listing it as pending
    host: str = ""  # the peer's address (servers: counted against ``max_servers_per_host``)


@dataclass(slots=True)
class Matcher:
    """The pools. ``tracker_mode`` switches between the two behaviours above."""

    tracker_mode: bool = False
    timeout_client: float = 600.0
    timeout_server: float = 600.0
    alloc_timeout: float = 5.0
    new_matchkey: Callable[[str], str] = random_matchkey
    #: servers parked at once from one peer address, and in all (0: no limit)
    max_servers_per_host: int = 0
    max_servers: int = 0
    _servers: dict[str, _Waiting] = field(default_factory=dict)
    _clients: dict[str, _Waiting] = field(default_factory=dict)
    _by_peer: dict[Hashable, _Waiting] = field(default_factory=dict)
    _parked_by_host: dict[str, int] = field(default_factory=dict)

    def arrive(self, peer: Hashable, raw_key: str, now: float, host: str = "") -> Pair | Wait | Refuse:
        """A peer from address ``host`` completed its handshake with ``raw_key``."""
        key = lenient_key(raw_key)
        if key is None:
            return Refuse(HandshakeCode.MISMATCH, f"key {raw_key!r:.80} is not 'client:NAME' or 'server:NAME'")
        if self.tracker_mode:
            return self._arrive_tracker(peer, key, host)
        if key.role == "server":
            own, other, timeout = self._servers, self._clients, self.timeout_server
        else:
            own, other, timeout = self._clients, self._servers, self.timeout_client
        match = other.pop(key.name, None)
        if match is not None:
            self._unpark(match)
            return Pair(match.peer, match.key, key.name)
        if key.name in own:
            return Refuse(HandshakeCode.DUPLICATE, f"another {key.role} already waits with key {key.name!r}")
        full = self._full(key, host)
        if full is not None:
            return full
        return self._wait(own, peer, key, key.name, now + timeout, host=host)

    def _arrive_tracker(self, peer: Hashable, key: PeerKey, host: str) -> Pair | Wait | Refuse:
        if key.role == "server":
            if len(key.name.encode()) > MAX_TRACKED_NAME_BYTES:
                return Refuse(HandshakeCode.MISMATCH, f"key names over {MAX_TRACKED_NAME_BYTES} bytes are not offered")
            full = self._full(key, host)
            if full is not None:
                return full
            matchkey = self.new_matchkey(key.name)
            while matchkey in self._servers:
                matchkey = self.new_matchkey(key.name)
            return self._wait(self._servers, peer, key, matchkey, None, host=host)
        match = self._servers.pop(key.name, None)
        if match is None:
            return Refuse(HandshakeCode.MISMATCH, f"no server waits with matchkey {key.name!r}")
        self._unpark(match)
        return Pair(match.peer, match.key, key.name)

    def _full(self, key: PeerKey, host: str) -> Refuse | None:
        """MISMATCH when one more server may not park (clients are not counted)."""
        if key.role != "server":
            return None
        if self.max_servers and len(self._servers) >= self.max_servers:
            return Refuse(HandshakeCode.MISMATCH, f"{len(self._servers)} servers parked, the limit (--max-parked)")
        parked = self._parked_by_host.get(host, 0)
        if self.max_servers_per_host and parked >= self.max_servers_per_host:
            return Refuse(
                HandshakeCode.MISMATCH, f"{parked} servers parked from {host}, the limit (--max-parked-per-peer)"
            )
        return None

    def _wait(
        self,
        pool: dict[str, _Waiting],
        peer: Hashable,
        key: PeerKey,
        matchkey: str,
        deadline: float | None,
        *,
        host: str,
    ) -> Wait:
        entry = _Waiting(peer, key, key.role, matchkey, deadline, host=host)
        pool[matchkey] = entry
        self._by_peer[peer] = entry
        if entry.role == "server":
            self._parked_by_host[host] = self._parked_by_host.get(host, 0) + 1
        return Wait(matchkey, deadline)

    def _unpark(self, entry: _Waiting) -> None:
        """``entry`` left its pool (paired or gone): forget its peer, and count its server no more."""
        del self._by_peer[entry.peer]
        if entry.role == "server":
            n = self._parked_by_host.get(entry.host, 0) - 1
            if n > 0:
                self._parked_by_host[entry.host] = n
            else:
                self._parked_by_host.pop(entry.host, None)

    def leave(self, peer: Hashable) -> str | None:
        """A waiting peer went away (or was refused); returns the matchkey it held, if it was waiting."""
        entry = self._by_peer.get(peer)
        if entry is None:
            return None
        self._unpark(entry)
        pool = self._servers if entry.role == "server" else self._clients
        if pool.get(entry.matchkey) is entry:
            del pool[entry.matchkey]
        return entry.matchkey

    def expire(self, peer: Hashable, now: float) -> bool:
        """True (and the peer leaves) when ``peer`` still waits and its deadline has passed."""
        entry = self._by_peer.get(peer)
        if entry is None or entry.deadline is None or now < entry.deadline:
            return False
        self.leave(peer)
        return True

    def waiting(self, peer: Hashable) -> bool:
        return peer in self._by_peer

    def matchkey_of(self, peer: Hashable) -> str | None:
        entry = self._by_peer.get(peer)
        return entry.matchkey if entry else None

    def key_of(self, peer: Hashable) -> PeerKey | None:
        entry = self._by_peer.get(peer)
        return entry.key if entry else None

    def key_for(self, matchkey: str) -> PeerKey | None:
        """The key of the server waiting under ``matchkey``, if one does."""
        entry = self._servers.get(matchkey)
        return entry.key if entry else None

    def servers(self) -> list[tuple[str, PeerKey]]:
        """(matchkey, key) of every waiting server, oldest first."""
        return [(mk, e.key) for mk, e in self._servers.items()]

    def counts(self) -> dict[str, int]:
        return {"servers": len(self._servers), "clients": len(self._clients)}

    # -- tracker mode ---------------------------------------------------------------------------

    def stale(self, pending: set[str], now: float) -> list[tuple[str, str]]:
        """Given the matchkeys the tracker still lists as free, rename those handed out more than
        ``alloc_timeout`` ago and never redeemed. Returns ``(old, new)`` pairs to re-offer."""
        renamed: list[tuple[str, str]] = []
        for matchkey, entry in list(self._servers.items()):
            if matchkey in pending:
                entry.granted_since = None
            elif entry.granted_since is None:
                entry.granted_since = now
            elif now - entry.granted_since > self.alloc_timeout:
                renamed.append((matchkey, self.rename(matchkey)))
        return renamed

    def rename(self, matchkey: str) -> str:
        """Give the waiting server of ``matchkey`` a fresh one (the old is refused from now on)."""
        entry = self._servers.pop(matchkey)
        new = self.new_matchkey(entry.key.name)
        while new in self._servers:
            new = self.new_matchkey(entry.key.name)
        entry.matchkey, entry.granted_since = new, None
        self._servers[new] = entry
        return new

    def rename_all(self) -> list[tuple[str, str]]:
        """Fresh matchkeys for every waiting server (the tracker forgot them all)."""
        return [(mk, self.rename(mk)) for mk in list(self._servers)]
