"""The tracker's settings, written once. The CLI's flags map onto these fields."""

from __future__ import annotations

from dataclasses import dataclass

from ..aio.tls import TLSConfig
from ..protocol.constants import MAX_TRACKER_FRAME_BYTES

__all__ = ["TrackerConfig"]


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    """Settings of one tracker.

    ``port``/``port_end`` follow ``python -m tvm.exec.rpc_tracker``: the first free port of
    ``[port, port_end)`` is bound; ``port=0`` lets the OS choose. Times are seconds.
    """

    host: str = "127.0.0.1"
    port: int = 9190
    port_end: int = 9199
    #: Key a STOP message must carry; None draws a random one (readable on the running tracker).
    stop_key: str | None = None
    #: Largest tracker frame accepted, in bytes (TVM: 1 MiB).
    max_frame_bytes: int = MAX_TRACKER_FRAME_BYTES
    #: A tether server that promised heartbeats leaves the pool after this many periods of silence.
    heartbeat_misses: float = 3.0
    #: Longest silence tolerated from a heartbeating server, whatever period it promised.
    max_silence_s: float = 9.0
    #: Granted-but-unfinished records kept per connection (oldest forgotten first): bounds memory
    #: for peers such as TVM's proxy that never report a session's end.
    max_held_per_connection: int = 1024
    #: A key with no server, grant or waiter leaves SUMMARY (and ``tether query``) after this many seconds
    #: (TVM's tracker lists it forever: a misspelt key stays in the table)...
    idle_key_s: float = 300.0
    #: ...or sooner, when more than this many idle keys accumulate (the oldest go first)...
    max_idle_keys: int = 4096
    #: ...or their characters add up to more than this: keys of a frame's 1 MiB each, asked for and left
    #: by a peer, held 4 GiB until they were forgotten.
    max_idle_key_bytes: int = 16 << 20
    #: TCP keepalive on every accepted connection: idle time, probe interval, probes.
    keepalive_idle_s: int = 30
    keepalive_interval_s: int = 10
    keepalive_probes: int = 3
    #: A request that asked to fail when no registered server could serve it (``unservable_after``) is
    #: not judged before the tracker has run this long: its servers may be re-registering after a restart.
    registration_grace_s: float = 10.0
    #: listen() backlog; TVM uses 1, which drops connects in a burst.
    backlog: int = 4096
    #: A SUMMARY asked again within this many seconds, with nothing changed since, gets the same answer
    #: (its ages then lag by as much): a query storm at 10,000 servers costs one summary, not one each.
    summary_reuse_s: float = 0.25
    # -- resource bounds: what one peer can make the tracker hold (0 turns a count limit off) -------------
    #: Seconds a new connection has to send the 4-byte magic; then it is closed (TVM waits forever).
    handshake_timeout_s: float = 10.0
    #: Seconds of silence after which a connection that holds nothing is closed: no free slot (PUT), no
    #: grant it serves, no waiting request, no heartbeat promised. Queries, clients between requests
    #: (tether's and TVM's clients reconnect), a TVM server's tracker link (it PUTs and keeps a slot or a
    #: grant) stay unharmed. 0: never.
    idle_timeout_s: float = 60.0
    #: Connections open at once from one peer address (IP, any port); the next is closed at once with a
    #: log line. Half the usual 1024 descriptors: one address alone cannot fill a tracker started under
    #: ``ulimit -n 1024``. Loopback is not exempt: a NAT in front of many devices, or a bench of 10,000
    #: servers on one machine, needs more. 0: no limit.
    max_connections_per_peer: int = 512
    #: Connections open at once in all; 0: the process's file descriptor limit (RLIMIT_NOFILE, soft)
    #: less ``fd_reserve``. At the limit a new peer is still answered: the connections idle longest that
    #: hold nothing (not servers, not waiters) are closed to make room.
    max_connections: int = 0
    #: File descriptors kept free for everything else (listener, logs, the loop) when ``max_connections`` is 0.
    fd_reserve: int = 64
    #: Waiting requests per connection; one more is rejected (``[-1, {"error": "rejected", ...}]``).
    max_waiters_per_connection: int = 1024
    #: Waiting requests per user (the REQUEST's user, else the peer's address), over all connections.
    max_waiters_per_user: int = 4096
    #: Waiting requests from one peer address, whatever users they name (a name costs nothing), over all
    #: its connections. A bench of 10,000 waiters on one machine needs more.
    max_waiters_per_peer: int = 4096
    #: Free slots one connection may offer (PUT); one more is answered -1 (TVM's FAIL).
    max_slots_per_connection: int = 256
    #: ...for a connection registered as a proxy (``server:proxy[...]``), which offers every server parked
    #: at it (tether's proxy parks at most 4096 by default). TVM's proxy sends its PUTs before its
    #: UPDATE_INFO: with more than ``max_slots_per_connection`` servers parked there, raise that too.
    max_proxy_slots: int = 4096
    #: Free slots offered from one peer address, over all its connections (a proxy's and its neighbours').
    #: A NAT in front of more devices, or a bench of 10,000 servers on one machine, needs more.
    max_slots_per_peer: int = 8192
    #: Largest priority a REQUEST gets (a larger one is clamped, a smaller one than minus this too): TVM's
    #: clients and meta_schedule ask with 1. See :func:`tether.tracker.core.cap_priority`.
    max_priority: float = 1000.0
    #: Device health (:mod:`.health`): this many failed sessions in a row quarantine a server (0: never).
    quarantine_after: int = 3
    #: A quarantined tether server is asked for a canary this often (0: never; an admin brings it back).
    canary_interval_s: float = 30.0
    #: Keyring file (``name role secret`` a line): authentication on. None: off, as TVM's tracker.
    auth_file: str | None = None
    #: With ``auth_file``: networks (CIDR) whose unauthenticated TVM peers are still served.
    allow_tvm: tuple[str, ...] = ()
    #: TLS: with a certificate, ``port`` speaks TLS only (client certificates required when ``tls.ca`` is
    #: set); TVM's peers cannot speak TLS, see ``plain_port``.
    tls: TLSConfig | None = None
    #: With ``tls``: also listen in the clear on this port (0: the OS chooses), for TVM's servers and clients.
    plain_port: int | None = None
