"""The tracker's settings, written once. The CLI's flags map onto these fields."""

from __future__ import annotations

from dataclasses import dataclass

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
