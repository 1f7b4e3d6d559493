"""What ``tether query`` knows: a tracker's summary turned into rows, with the counts done right.

TVM's ``query_rpc_tracker`` computes a key's total with ``key.split(":")[1]``, so keys containing ``:``
and keys served through a proxy show total 0 and vanish. Here a key's total comes from the tracker's
own per-slot accounting (tether) or, for TVM's tracker, from ``server:K`` registrations with the prefix
removed (never split) plus what the proxies' ``server:proxy[k1,k2]`` entries and free counts imply.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any

from ..aio.net import format_hostport
from ..aio.tls import TLSLike
from ..protocol.auth import Token
from ..protocol.keys import proxied_keys, server_key_name
from .tracker import TrackerClient

__all__ = ["KeyRow", "ServerRow", "TrackerStatus", "WaiterRow", "query_tracker", "status_from_summary"]


@dataclass(frozen=True, slots=True)
class ServerRow:
    """One registered server (or proxy). ``state``: free, busy, granted, idle, or counts for several slots;
    "?" when the tracker does not say (TVM's)."""

    address: str
    key: str
    state: str
    holder: str | None = None
    since_s: float | None = None
    protocols: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    #: its id at the tracker (what ``tether admin`` takes), and its standing when it is not granted
    #: (cordoned, draining, quarantined: ``{"state", "reason", "by", "failures", ...}``)
    server: str | None = None
    health: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class WaiterRow:
    """One waiting request. ``position``: 1-based, in the order its key's queue would serve it (tether's
    tracker only); ``id``: the request id it was sent with (None for TVM's plain requests)."""

    key: str
    user: str
    priority: float
    waited_s: float
    protocol: str = "tvm"
    labels: dict[str, str] = field(default_factory=dict)
    id: str | None = None
    position: int = 0


@dataclass(frozen=True, slots=True)
class KeyRow:
    """A key's queue. ``exact`` is False when ``total`` is a lower bound (proxied keys on TVM's tracker)."""

    key: str
    total: int
    free: int
    pending: int
    busy: int | None = None
    exact: bool = True
    note: str | None = None


@dataclass(frozen=True, slots=True)
class TrackerStatus:
    address: str
    tether_version: str | None
    servers: list[ServerRow]
    keys: list[KeyRow]
    waiters: list[WaiterRow]
    uptime_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def query_tracker(
    host: str, port: int, timeout: float = 5.0, *, tls: TLSLike | None = None, token: Token | str | None = None
) -> TrackerStatus:
    """Connect (over TLS with ``tls``; authenticated with ``token``, default ``$TETHER_TOKEN``), read one
    detailed summary, close; every step within ``timeout`` seconds.

    Raises :class:`~tether.errors.ConnectFailed`, :class:`~tether.errors.RemoteProtocolError` (not a
    tracker) or :class:`TimeoutError`.
    """
    with TrackerClient.connect(host, port, timeout, tls=tls, token=token) as client:
        summary = client.summary(detail=True, timeout=timeout)
    return status_from_summary(summary, format_hostport(host, port))


def _addr_text(addr: Any) -> str:
    if isinstance(addr, list | tuple) and len(addr) == 2:
        host, port = addr
        return format_hostport(str(host), port) if isinstance(port, int) else f"{host}:{port}"
    return str(addr)


def _notes(rows: list[KeyRow]) -> list[KeyRow]:
    names = [r.key for r in rows if r.total]
    out = []
    for row in rows:
        note = None
        if row.pending and not row.total:
            note = f"{row.pending} waiting, but no server is registered with key {row.key!r}"
            near = difflib.get_close_matches(row.key, [n for n in names if n != row.key], n=3)
            if near:
                note += f" (did you mean {', '.join(map(repr, near))}?)"
        elif row.pending and not row.free:
            note = f"all {row.total} server(s) busy; {row.pending} waiting"
        out.append(KeyRow(row.key, row.total, row.free, row.pending, row.busy, row.exact, note))
    return out


def status_from_summary(summary: dict[str, Any], address: str) -> TrackerStatus:
    """Rows from a SUMMARY reply of either tracker."""
    detail = summary.get("tether")
    if isinstance(detail, dict):
        return _from_tether(detail, address)
    return _from_tvm(summary, address)


def _from_tether(detail: dict[str, Any], address: str) -> TrackerStatus:
    servers = []
    for entry in detail.get("servers", []):
        slots = entry.get("slots", [])
        states = [s.get("state", "?") for s in slots]
        if len(states) == 1:
            state = states[0]
        elif not states:
            state = "idle"
        else:
            state = ", ".join(f"{states.count(s)} {s}" for s in ("free", "granted", "busy") if s in states)
        holder, since = None, None
        held = [s for s in slots if s.get("state") in ("busy", "granted")]
        health = entry.get("health") if isinstance(entry.get("health"), dict) else None
        if health is not None and health.get("state") not in (None, "ok"):
            state = f"{health['state']}, {state}" if held else str(health["state"])
        if held:
            first = held[0]
            holder = f"{first.get('user')} ({first.get('peer') or first.get('requester')})"
            since = first.get("since_s")
        elif len(slots) == 1:
            since = slots[0].get("since_s")
        servers.append(
            ServerRow(
                address=_addr_text(entry.get("addr")) if entry.get("addr") else str(entry.get("peer")),
                key=entry.get("key") or "(no UPDATE_INFO)",
                state=state,
                holder=holder,
                since_s=since,
                protocols=list(entry.get("protocols", [])),
                labels=dict(entry.get("labels", {})),
                device=dict(entry.get("device", {})),
                server=entry.get("server"),
                health=health,
            )
        )
    keys, waiters = [], []
    for key, row in sorted(detail.get("keys", {}).items()):
        keys.append(KeyRow(key, row["total"], row["free"], row["pending"], row.get("busy")))
        for position, w in enumerate(row.get("waiters", []), 1):
            waiters.append(
                WaiterRow(
                    key,
                    w["user"],
                    w["priority"],
                    w["waited_s"],
                    w.get("protocol", "tvm"),
                    w.get("labels", {}),
                    w.get("id"),
                    position,
                )
            )
    servers.sort(key=lambda s: (s.key, s.address))
    return TrackerStatus(address, str(detail.get("version")), servers, _notes(keys), waiters, detail.get("uptime_s"))


def _from_tvm(summary: dict[str, Any], address: str) -> TrackerStatus:
    servers: list[ServerRow] = []
    direct: dict[str, int] = {}
    proxied: set[str] = set()
    for info in summary.get("server_info", []):
        key = str(info.get("key", ""))
        servers.append(ServerRow(_addr_text(info.get("addr")), key, "?"))
        proxied.update(proxied_keys(key))
        name = server_key_name(key)
        if name is not None:
            direct[name] = direct.get(name, 0) + 1
    queue_info: dict[str, Any] = summary.get("queue_info", {})
    keys = []
    for key in sorted(set(queue_info) | set(direct)):
        q = queue_info.get(key, {})
        free, pending = int(q.get("free", 0)), int(q.get("pending", 0))
        total = max(direct.get(key, 0), free)
        keys.append(KeyRow(key, total, free, pending, exact=key not in proxied))
    servers.sort(key=lambda s: (s.key, s.address))
    return TrackerStatus(address, None, servers, _notes(keys), [])
