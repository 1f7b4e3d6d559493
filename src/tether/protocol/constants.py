"""Numbers fixed by Apache TVM's RPC wire protocol, and tether's additions.

Every integer below travels as int32 little-endian (``struct "<i"``). The values are TVM 0.27's
(``python/tvm/rpc/base.py``); tether-only tracker codes live outside TVM's range (-1..7) so that a
TVM peer never sees one.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "MAX_HANDSHAKE_KEY_BYTES",
    "MAX_TRACKER_REPLY_BYTES",
    "MAX_TRACKER_FRAME_BYTES",
    "RPC_MAGIC",
    "RPC_TRACKER_MAGIC",
    "TETHER_OPTION",
    "HandshakeCode",
    "TrackerCode",
]

#: Data-plane magic: first 4 bytes a client sends to a server or proxy; also the SUCCESS reply.
RPC_MAGIC: Final = 0xFF271
#: Control-plane magic: first 4 bytes a peer sends to the tracker, echoed back by the tracker.
RPC_TRACKER_MAGIC: Final = 0x2F271

#: TVM's tracker closes a connection whose frame length is <= 0 or above this (1 MiB).
MAX_TRACKER_FRAME_BYTES: Final = 1 << 20
#: Largest tracker reply a client accepts: a detailed SUMMARY of 10,000 servers and 10,000 waiters is
#: about 7 MiB (TVM's clients read replies without any limit).
MAX_TRACKER_REPLY_BYTES: Final = 256 << 20
#: Upper bound on a handshake key string, in bytes. TVM sets none; keys are short identifiers.
MAX_HANDSHAKE_KEY_BYTES: Final = 64 * 1024

#: The option a tether peer appends to its handshake key (``client:K -tether=1``).
TETHER_OPTION: Final = "tether"

#: Seconds between heartbeats a tether server promises in its UPDATE_INFO by default.
DEFAULT_HEARTBEAT_S: Final = 2.0


class HandshakeCode(enum.IntEnum):
    """Reply codes of the data-plane handshake (server or proxy to client)."""

    SUCCESS = RPC_MAGIC
    DUPLICATE = RPC_MAGIC + 1
    MISMATCH = RPC_MAGIC + 2


class TrackerCode(enum.IntEnum):
    """First element of every tracker request; ``SUCCESS``/``FAIL`` are also reply values.

    ``CANCEL``, ``SESSION`` and ``WITHDRAW`` are tether's own: TVM's tracker would close the connection on them,
    so tether peers send them only to a tracker whose SUMMARY said it is tether.
    """

    FAIL = -1
    SUCCESS = 0
    PING = 1
    STOP = 2
    PUT = 3
    REQUEST = 4
    UPDATE_INFO = 5
    SUMMARY = 6
    GET_PENDING_MATCHKEYS = 7
    # tether extensions
    CANCEL = 101
    SESSION = 102
    WITHDRAW = 103
    AUTH = 104
    CONTROL = 105
    ADMIN = 106
