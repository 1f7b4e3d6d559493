"""The blocking client of tether's native session: files, models, tensors, timing. Needs numpy.

::

    import tether
    with tether.connect_tracker("127.0.0.1", 9190) as tracker:
        with tracker.request("android", session_timeout=60, timeout=300) as sess:
            sess.upload("model.onnx")
            model = sess.load_model("model.onnx")
            outputs = model.run({"x": image})              # {"y": numpy array}
            print(model.benchmark(number=10, repeat=5))

Everything closes explicitly (``close()``, ``with``); nothing waits for garbage collection.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import socket
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..aio.auth import prove_token, recv_step
from ..aio.channel import Channel
from ..aio.net import connect_tcp, format_hostport
from ..aio.tls import TLS_OPTION, TLSLike, client_context, start_client_tls
from ..errors import (
    AuthFailed,
    ConnectionClosed,
    NotTetherServer,
    RemoteError,
    RemoteProtocolError,
    RunTimeout,
    SessionLost,
    SessionRefused,
    SessionTimeout,
    TetherError,
    TLSError,
    remote_error,
)
from ..protocol.auth import AUTH_OPTION, Token, token_from_env
from ..protocol.constants import HandshakeCode
from ..protocol.framing import HandshakeReplyDecoder, encode_handshake
from ..protocol.keys import PeerKey, format_peer_key, parse_peer_key
from ..protocol.session import (
    BINARY_OPTION,
    DTYPE_SIZES,
    FrameHeader,
    FrameKind,
    HotOp,
    TensorDesc,
    decode_run_reply,
    encode_call,
    encode_run_call,
    parse_json_header,
    ping_call,
    tensor_descs,
)
from ..runtime.base import BackendError, numpy_dtype
from .stats import Validity, ValidityRules, validity

__all__ = ["BenchmarkResult", "RemoteModel", "RemoteTensor", "Session", "connect", "file_digest"]


def _authenticate(sock: Any, address: str, token: Token | str | None, deadline: float) -> None:
    """Prove our token to a server that asked for one, then wait for its last word (ready, or busy)."""
    creds = token_from_env(token)
    if creds is None:
        raise AuthFailed(f"{address} requires a token: set TETHER_TOKEN=name:secret (or pass token=)")
    prove_token(sock, creds, "server", deadline)
    last = recv_step(sock, deadline)
    if last.get("ready") is not True:
        raise SessionRefused(f"{address} refused the session: {str(last.get('message', last))[:300]}")


# enum attribute lookups cost ~0.2 us each: the hot path compares plain ints
_RESPONSE, _ERROR, _REPLY = int(FrameKind.RESPONSE), int(FrameKind.ERROR), int(FrameKind.REPLY)
_PING, _RUN = int(HotOp.PING), int(HotOp.RUN)
_PING_HEADER = bytes((_PING,))

#: How long past a request's own time limit the client waits for the device to say it timed out.
TIMEOUT_GRACE_S = 10.0


def connect(
    host: str,
    port: int = 0,
    key: str = "",
    session_timeout: float | None = None,
    timeout: float = 10.0,
    *,
    tls: TLSLike | None = None,
    token: Token | str | None = None,
) -> Session:
    """Open a native session with a tether server directly (no tracker): ``key`` is the server's key.

    Through a proxy in plain mode, ``host:port`` is the proxy's (or ``host`` its ``ws://.../ws`` URL) and
    ``key`` the key the server gave the proxy. ``tls``: see :meth:`Session.connect`. ``token``
    (``name:secret``, default ``$TETHER_TOKEN``): proven to a server that requires authentication."""
    return Session.connect(
        host, port, key or "tether", session_timeout=session_timeout, timeout=timeout, tls=tls, token=token
    )


def _start_tls(
    sock: socket.socket, tls: TLSLike | None, server: PeerKey, *, address: str, host: str, timeout: float
) -> socket.socket:
    """TLS after the handshake when both sides speak it (the server marks its answer ``-tls=1``); the
    socket that carries the session (a local relay's with TLS). :class:`TLSError` when one side only does."""
    server_tls = server.options.get(TLS_OPTION, "0") not in ("", "0")
    if tls is None and server_tls:
        raise TLSError(
            f"{address} requires TLS: connect with it (tls=TLSConfig(ca=...), --tls-ca and, where it asks for "
            "client certificates, --tls-cert/--tls-key)"
        )
    if tls is not None and not server_tls:
        raise TLSError(
            f"{address} does not speak TLS (it answered {server.raw!r}): a tether server with --tls-cert "
            "does; connect without TLS to this one"
        )
    if tls is None:
        return sock
    if host.startswith(("ws://", "wss://")):
        from ..protocol.websocket import parse_ws_url

        host = parse_ws_url(host)[1]
    return start_client_tls(sock, tls, host, address, timeout)


def file_digest(data: str | os.PathLike[str] | bytes) -> str:
    """The sha256 (hex) of bytes or of a file's content."""
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    with open(data, "rb") as file:
        while chunk := file.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _np() -> Any:
    import numpy

    return numpy


def _as_wire_array(value: Any) -> Any:
    np = _np()
    arr = np.asarray(value)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    name = arr.dtype.name
    if name not in DTYPE_SIZES:
        raise TypeError(f"dtype {arr.dtype} cannot travel; supported: {', '.join(DTYPE_SIZES)}")
    return np.ascontiguousarray(arr)


def _shapes(shapes: Mapping[str, Sequence[int]] | None) -> dict[str, Any]:
    """The request header's ``shapes`` entry (none when there are none: older servers never see it)."""
    return {"shapes": {name: [int(d) for d in dims] for name, dims in shapes.items()}} if shapes else {}


@dataclass(frozen=True)
class BenchmarkResult:
    """Seconds per run, one sample per repeat (TVM's ``time_evaluator`` semantics), and statistics."""

    samples: list[float]
    number: int
    inputs: str = "device"
    #: what the device recorded around the measurement (:mod:`tether.device.conditions`): ``governor``,
    #: ``affinity``, ``other_sessions``, ``threads``, and ``before``/``after`` (``freq_mhz``, ``temp_c``,
    #: ``loadavg``); None from a server that does not record them
    conditions: dict[str, Any] | None = None
    #: the worker's high-water resident memory (bytes) after the measurement
    peak_rss: int | None = None
    #: per-operator times (``profile=True``): ``{name, op, calls, total_s, mean_s, per_run_s, percent}``
    profile: list[dict[str, Any]] | None = None
    profile_error: str | None = None

    def validity(self, rules: ValidityRules | None = None, confidence: float = 0.95) -> Validity:
        """Whether the result may be trusted under ``rules`` (:func:`tether.client.stats.validity`)."""
        return validity(self.samples, self.number, rules, confidence=confidence, conditions=self.conditions)

    @property
    def valid(self) -> bool:
        return self.validity().valid

    @property
    def warnings(self) -> list[str]:
        return self.validity().warnings

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.samples) if len(self.samples) > 1 else 0.0

    def percentile(self, p: float) -> float:
        """Linear interpolation between order statistics (numpy's default), ``p`` in 0..100."""
        ordered = sorted(self.samples)
        rank = (len(ordered) - 1) * p / 100
        low, high = math.floor(rank), math.ceil(rank)
        return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)

    @property
    def results(self) -> list[float]:
        """Alias for TVM users: ``time_evaluator(...)().results``."""
        return self.samples

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples_s": self.samples,
            "number": self.number,
            "repeat": len(self.samples),
            "mean_s": self.mean,
            "median_s": self.median,
            "min_s": self.min,
            "max_s": self.max,
            "std_s": self.std,
            "p90_s": self.percentile(90),
            "p99_s": self.percentile(99),
            "valid": self.valid,
            "warnings": self.warnings,
            "conditions": self.conditions,
            "peak_rss": self.peak_rss,
            "profile": self.profile,
            "profile_error": self.profile_error,
        }

    def __str__(self) -> str:
        ms = 1000
        return (
            f"{len(self.samples)} repeats x {self.number} runs: mean {self.mean * ms:.3f} ms, "
            f"median {self.median * ms:.3f} ms, min {self.min * ms:.3f} ms, max {self.max * ms:.3f} ms, "
            f"std {self.std * ms:.3f} ms"
        )


@dataclass(eq=False)
class RemoteTensor:
    """A tensor kept on the device; pass it as an input without sending it again."""

    session: Session
    handle: str
    dtype: str
    shape: tuple[int, ...]

    def numpy(self) -> Any:
        _header, arrays = self.session._call("get", {"tensor": self.handle})
        return arrays[0]

    def free(self) -> None:
        if not self.session.closed:
            self.session._call("free", {"tensors": [self.handle]})


@dataclass(eq=False)
class RemoteModel:
    """A model loaded on the device by one of its backends."""

    session: Session
    handle: str
    backend: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    load_s: float
    #: the worker's high-water resident memory (bytes) once the model was loaded (None: not told)
    peak_rss: int | None = None
    last_run_s: float | None = field(default=None, init=False)

    @property
    def input_names(self) -> list[str]:
        return [spec["name"] for spec in self.inputs]

    def _split(self, inputs: Mapping[str, Any] | None) -> tuple[dict[str, str], dict[str, Any]]:
        refs: dict[str, str] = {}
        inline: dict[str, Any] = {}
        for name, value in (inputs or {}).items():
            if isinstance(value, RemoteTensor):
                refs[name] = value.handle
            else:
                inline[name] = _as_wire_array(value)
        return refs, inline

    def run(
        self,
        inputs: Mapping[str, Any] | None = None,
        *,
        fill: str | None = None,
        seed: int | None = None,
        keep: bool = False,
        timeout: float | None = None,
        shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> dict[str, Any]:
        """Run once; numpy arrays (or :class:`RemoteTensor` with ``keep=True``) by output name.

        ``inputs`` maps names to arrays or :class:`RemoteTensor`; inputs left out are generated on the
        device when ``fill`` is "random", "zeros" or "ones", in the shape ``shapes`` gives by name (needed
        for an input with dynamic dims or an unknown rank). Past ``timeout`` seconds the device ends the
        session and this raises :class:`RunTimeout`.
        """
        refs, inline = self._split(inputs)
        fields = None
        if self.session.binary and not shapes:  # the hot path: a binary header (shapes stay JSON)
            descs = [TensorDesc(n, a.dtype.name, a.shape) for n, a in inline.items()]
            fields = encode_run_call(self.handle, refs, descs, fill=fill, seed=seed, keep=keep, timeout=timeout)
        if fields is not None:
            result, arrays = self.session._hot_run(fields, list(inline.values()), keep=keep, timeout=timeout)
        else:
            header = {"model": self.handle, "inputs": refs, "fill": fill, "seed": seed, "keep": keep}
            header.update(_shapes(shapes))
            result, arrays = self.session._call("run", header, inline, timeout=timeout)
        self.last_run_s = float(result.get("run_s", 0.0))
        if keep:
            return {
                o["name"]: RemoteTensor(self.session, o["tensor"], o["dtype"], tuple(o["shape"]))
                for o in result["outputs"]
            }
        names = [d["name"] for d in result["tensors"]]
        return dict(zip(names, arrays, strict=True))

    def benchmark(
        self,
        inputs: Mapping[str, Any] | None = None,
        *,
        number: int = 1,
        repeat: int = 1,
        min_repeat_ms: float = 0,
        cooldown_ms: float = 0,
        warmup: int = 1,
        fill: str | None = "random",
        seed: int | None = None,
        flush_cache: bool = False,
        timeout: float | None = None,
        shapes: Mapping[str, Sequence[int]] | None = None,
        profile: bool = False,
        profile_runs: int | None = None,
    ) -> BenchmarkResult:
        """Time runs on the device with inputs kept there (sent once, or generated with ``fill``, in
        ``shapes`` as :meth:`run` takes them).

        ``flush_cache``: evict the CPU caches before each repeat (TVM's ``enable_cpu_cache_flush``).
        ``timeout``: seconds for the whole measurement; past it :class:`RunTimeout`, the session ends.
        ``profile``: after the timing, per-operator times from the backend's profiler over ``profile_runs``
        runs (default 10) in a profiling session of their own (``result.profile``, or why not in
        ``result.profile_error``). The result carries the device's conditions and the worker's peak memory."""
        refs, inline = self._split(inputs)
        header = {
            "model": self.handle,
            "inputs": refs,
            "fill": fill,
            "seed": seed,
            "number": number,
            "repeat": repeat,
            "min_repeat_ms": min_repeat_ms,
            "cooldown_ms": cooldown_ms,
            "warmup": warmup,
        }
        header.update(_shapes(shapes))
        if flush_cache:
            header["flush_cache"] = True
        if profile:
            header["profile"] = True
            if profile_runs is not None:
                header["profile_runs"] = int(profile_runs)
        result, _ = self.session._call("benchmark", header, inline, timeout=timeout)
        return BenchmarkResult(
            [float(s) for s in result["samples"]],
            int(result["number"]),
            conditions=result.get("conditions"),
            peak_rss=result.get("peak_rss"),
            profile=result.get("profile"),
            profile_error=result.get("profile_error"),
        )

    def close(self) -> None:
        if not self.session.closed:
            self.session._call("unload", {"model": self.handle})

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recv_arrays(channel: Channel, op: str, tensors: Any, payload_len: int) -> list[Any]:
    """A response's tensors (described by ``tensors``, its header's list) read into new numpy arrays."""
    descs = tensor_descs(tensors, payload_len)
    try:
        dtypes = [numpy_dtype(desc.dtype) for desc in descs]
    except BackendError as exc:  # e.g. bfloat16 without ml_dtypes: skip the payload, keep the session
        channel.discard(payload_len)
        raise TypeError(f"cannot receive the result of {op!r}: {exc}") from None
    arrays = []
    for desc, dtype in zip(descs, dtypes, strict=True):
        arr = _np().empty(desc.shape, dtype=dtype)
        if desc.nbytes:
            channel.recv_into(memoryview(arr.reshape(-1).view("uint8")))
        arrays.append(arr)
    return arrays


class Session:
    """One native session with a tether server. Not thread-safe: one request at a time."""

    def __init__(self, sock: Any, server_key: str, address: str) -> None:
        self._channel: Channel | None = Channel(sock)
        self.server_key = server_key
        self.address = address
        self._ids = itertools.count(1)
        self._on_close: list[Any] = []
        #: Seconds any one send or receive may wait without progress (None: forever). Past it the session
        #: is dropped with :class:`SessionLost`: a device that froze, a cable pulled. Requests sent with
        #: their own ``timeout`` wait that long plus :data:`TIMEOUT_GRACE_S` instead.
        self.io_timeout: float | None = None
        #: The server takes CALL frames (binary headers) for the hot operations (it answered ``-bin=1``).
        self.binary = parse_peer_key(server_key).options.get(BINARY_OPTION) == "1"

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        name: str,
        *,
        session_timeout: float | None = None,
        timeout: float = 10.0,
        tls: TLSLike | None = None,
        token: Token | str | None = None,
    ) -> Session:
        """Handshake as ``client:<name> -tether=1`` (``name``: the server's key, or a tracker's matchkey).

        ``host`` may be a proxy's WebSocket URL (``ws://proxy:8888/ws``; ``port`` is then ignored).
        ``tls`` (a :class:`~tether.aio.tls.TLSConfig` or an ``ssl.SSLContext``): TLS with the server after
        the handshake, end to end through a proxy (``wss://`` to a proxy uses it too);
        :class:`~tether.errors.TLSError` when TLS fails or only one side speaks it. A server that answers
        ``-auth=1`` requires ``token`` (default ``$TETHER_TOKEN``): :class:`AuthFailed` when there is none, it
        is refused, or the server cannot prove it knows it (an impostor)."""
        options = {"tether": "1", BINARY_OPTION: "1"}
        if session_timeout:
            options["timeout"] = f"{session_timeout:g}"
        if tls is not None:
            options[TLS_OPTION] = "1"
            client_context(tls)  # files that do not load: ConfigError now, not after connecting
        if host.startswith(("ws://", "wss://")):  # a proxy's WebSocket endpoint: bridged to a local socket
            from ..aio.ws import ws_open_socket

            context = client_context(tls) if tls is not None and host.startswith("wss://") else None
            address, sock = host, ws_open_socket(host, timeout, ssl_context=context)
        else:
            address = format_hostport(host, port)
            sock = connect_tcp(host, port, timeout)  # ConnectFailed names every address tried
        try:
            sock.settimeout(timeout)
            sock.sendall(encode_handshake(format_peer_key("client", name, options)))
            decoder = HandshakeReplyDecoder()
            reply = None
            while reply is None:
                data = sock.recv(4096)
                if not data:
                    raise ConnectionClosed(f"{address} closed the connection during the handshake")
                reply = decoder.feed(data)
            if reply.code != HandshakeCode.SUCCESS or reply.key is None:
                why = (
                    "busy, or the key/matchkey is not current" if reply.code == HandshakeCode.MISMATCH else "duplicate"
                )
                raise SessionRefused(f"{address} refused the session ({reply.code.name}: {why})")
            server = parse_peer_key(reply.key)
            if not server.is_tether:
                raise NotTetherServer(
                    f"{address} is a plain TVM server (it answered {reply.key!r}); it speaks only TVM's session "
                    "protocol: use tvm.rpc.connect for it, or run `tether server` on the device"
                )
            sock = _start_tls(sock, tls, server, address=address, host=host, timeout=timeout)
            if sock.family != socket.AF_UNIX:  # a WebSocket bridge, a TLS relay: a local socket pair
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small requests must not wait for Nagle
            if server.options.get(AUTH_OPTION) == "1":  # inside TLS when there is TLS
                _authenticate(sock, address, token, time.monotonic() + timeout)
        except TLSError:
            sock.close()
            raise
        except TimeoutError:
            sock.close()
            raise ConnectionClosed(
                f"{address} did not answer the handshake within {timeout} s (a server whose slots are all busy "
                "keeps a direct client waiting for one; pass a longer timeout to wait longer)"
            ) from None
        except OSError as exc:
            sock.close()
            raise ConnectionClosed(f"{address} failed during the handshake: {exc}") from None
        except BaseException:
            sock.close()
            raise
        return cls(sock, reply.key, address)

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._channel is None

    def _call(
        self,
        op: str,
        header: dict[str, Any],
        tensors: Mapping[str, Any] | None = None,
        *,
        payload: list[Any] | None = None,
        file: Any = None,
        size: int = 0,
        timeout: float | None = None,
    ) -> tuple[dict[str, Any], list[Any]]:
        """One request and its response: tensors (numpy arrays by name), raw ``payload`` buffers or the
        next ``size`` bytes of ``file`` go out; the response's header and its tensors come back.

        ``timeout``: the device ends the request (and the session) past it with :class:`RunTimeout`; this
        side gives up :data:`TIMEOUT_GRACE_S` later if the device does not even say so."""
        channel = self._channel
        if channel is None:
            raise ConnectionClosed("the session is closed")
        frame_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        request = {"op": op, **header}
        if timeout is not None:
            if not timeout > 0:
                raise ValueError(f"timeout must be positive seconds, not {timeout!r}")
            request["timeout"] = timeout
            channel.set_timeout(timeout + TIMEOUT_GRACE_S)
        else:
            channel.set_timeout(self.io_timeout)
        try:
            if file is not None:
                channel.send_file_frame(FrameKind.REQUEST, frame_id, request, file, size)
            elif tensors:
                request["tensors"] = [
                    {"name": n, "dtype": a.dtype.name, "shape": list(a.shape), "nbytes": a.nbytes}
                    for n, a in tensors.items()
                ]
                channel.send_frame(FrameKind.REQUEST, frame_id, request, list(tensors.values()))
            else:
                channel.send_frame(FrameKind.REQUEST, frame_id, request, payload or ())
            head, reply = channel.recv_head()
            if head.kind == FrameKind.ERROR:
                self._raise_error(channel, head, reply)
            if head.kind != FrameKind.RESPONSE or head.id != frame_id:
                raise RemoteProtocolError(
                    f"expected the response to request {frame_id}, got {FrameKind(head.kind).name} {head.id}"
                )
            if op == "download":
                return reply, [channel.recv_bytes(head.payload_len)]
            return reply, _recv_arrays(channel, op, reply.get("tensors"), head.payload_len)
        except ConnectionClosed as exc:
            raise self._lost(exc, op, timeout) from None
        except (RemoteError, TypeError):
            raise  # answered in full: the session goes on
        except BaseException:
            self._drop()  # Ctrl-C or a protocol error mid-frame: the stream cannot be trusted any more
            raise
        finally:
            if timeout is not None and self._channel is not None:
                self._channel.set_timeout(self.io_timeout)

    def _hot_ping(self) -> None:
        """A PING CALL and its REPLY (the hot path: no JSON either way, one send, usually one receive);
        the same typed errors and session rules as :meth:`_call`."""
        channel = self._channel
        if channel is None:
            raise ConnectionClosed("the session is closed")
        frame_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        channel.set_timeout(self.io_timeout)  # a system call only when it changed
        name = "ping"
        try:
            channel.send_bytes(ping_call(frame_id))
            kind, reply_id, raw, payload_len = channel.recv_frame_head()
            if kind == _REPLY and reply_id == frame_id and raw == _PING_HEADER:
                if payload_len:
                    raise RemoteProtocolError(f"a {name} reply carries {payload_len} payload bytes")
                return
            if kind == _ERROR:
                self._raise_error(channel, FrameHeader(kind, reply_id, len(raw), payload_len), parse_json_header(raw))
            raise RemoteProtocolError(f"expected the reply to call {frame_id}, got {FrameKind(kind).name} {reply_id}")
        except ConnectionClosed as exc:
            raise self._lost(exc, name, None) from None
        except RemoteError:
            raise  # answered in full: the session goes on
        except BaseException:
            self._drop()
            raise

    def _hot_run(
        self, fields: bytes, inline: list[Any], *, keep: bool, timeout: float | None
    ) -> tuple[dict[str, Any], list[Any]]:
        """A RUN CALL (``fields``: :func:`encode_run_call`'s, ``inline``: the inline inputs' arrays in
        their order) and its answer as :meth:`_call` returns it: the result header and the output arrays."""
        channel = self._channel
        if channel is None:
            raise ConnectionClosed("the session is closed")
        frame_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        if timeout is not None:
            if not timeout > 0:
                raise ValueError(f"timeout must be positive seconds, not {timeout!r}")
            channel.set_timeout(timeout + TIMEOUT_GRACE_S)
        else:
            channel.set_timeout(self.io_timeout)
        try:
            views = [memoryview(a).cast("B") for a in inline]
            channel.send_raw(encode_call(_RUN, frame_id, fields, sum(v.nbytes for v in views)), views)
            kind, reply_id, raw, payload_len = channel.recv_frame_head()
            if reply_id == frame_id and kind == _REPLY and raw[0] == _RUN:
                result = decode_run_reply(raw, keep)
            elif reply_id == frame_id and kind == _RESPONSE:  # a result too large for a binary header
                result = parse_json_header(raw)
            elif kind == _ERROR:
                self._raise_error(channel, FrameHeader(kind, reply_id, len(raw), payload_len), parse_json_header(raw))
                raise AssertionError("unreachable: _raise_error raises")
            else:
                raise RemoteProtocolError(
                    f"expected the reply to call {frame_id}, got {FrameKind(kind).name} {reply_id}"
                )
            if keep:
                if payload_len:
                    raise RemoteProtocolError(f"a run reply with kept outputs carries {payload_len} payload bytes")
                return result, []
            return result, _recv_arrays(channel, "run", result.get("tensors"), payload_len)
        except ConnectionClosed as exc:
            raise self._lost(exc, "run", timeout) from None
        except (RemoteError, TypeError):
            raise  # answered in full: the session goes on
        except BaseException:
            self._drop()
            raise
        finally:
            if timeout is not None and self._channel is not None:
                self._channel.set_timeout(self.io_timeout)

    def _raise_error(self, channel: Channel, head: FrameHeader, reply: dict[str, Any]) -> None:
        """Raise the typed error an ERROR frame carries (its payload skipped); one for frame id 0 (the
        session itself ended: timeout, worker died) drops the session."""
        channel.discard(head.payload_len)
        error = remote_error(
            str(reply.get("type", "Error")), str(reply.get("message", "")), str(reply.get("traceback", ""))
        )
        if head.id == 0:
            self._drop()
            if isinstance(error, SessionTimeout | RunTimeout):
                raise error
            if error.remote_type == "ProtocolError":  # e.g. a frame over the server's size limit
                raise RemoteProtocolError(f"{self.address} ended the session: {error.remote_message}")
            raise SessionLost(f"{self.address}: {error.remote_type}: {error.remote_message}")
        raise error

    def _lost(self, exc: ConnectionClosed, op: str, timeout: float | None) -> TetherError:
        """Drop the session after a failed send or receive; the error to raise for it."""
        self._drop()
        if timeout is not None and isinstance(exc.__cause__, TimeoutError):
            return RunTimeout(
                f"{op} got no answer within its {timeout:g} s time limit (+{TIMEOUT_GRACE_S:g} s); "
                "the session was dropped",
                "RunTimeout",
            )
        if isinstance(exc.__cause__, TimeoutError):
            return SessionLost(
                f"{self.address}: no progress during {op!r} for {self.io_timeout:g} s (io_timeout): dropped"
            )
        return SessionLost(f"{self.address}: the session ended during {op!r}: {exc}")

    def interrupt(self) -> None:
        """From any thread: shut the connection down, so that a request in flight ends at once (it raises
        :class:`SessionLost`) and the server ends the session. Nothing more can be sent afterwards."""
        channel = self._channel
        if channel is not None:
            with contextlib.suppress(OSError):
                channel.sock.shutdown(socket.SHUT_RDWR)

    def _drop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        for callback in self._on_close:
            callback()
        self._on_close.clear()

    # -- operations ----------------------------------------------------------------------------

    def ping(self) -> None:
        """An empty round trip (a binary CALL where the server takes them, else a JSON request)."""
        if self.binary:
            self._hot_ping()
        else:
            self._call("ping", {})

    def info(self) -> dict[str, Any]:
        """The device's facts, the worker's pid and workspace."""
        return self._call("info", {})[0]

    def upload(
        self,
        data: str | os.PathLike[str] | bytes | bytearray | memoryview,
        target: str | None = None,
        *,
        sha256: str | None = None,
    ) -> str:
        """Send a file (a path) or bytes into the workspace; returns its remote name. With ``sha256`` the
        server checks the content against it and keeps it in its cache for later sessions."""
        header: dict[str, Any] = {"sha256": sha256} if sha256 else {}
        if isinstance(data, bytes | bytearray | memoryview):
            if not target:
                raise ValueError("target is required when uploading bytes")
            self._call("upload", {"path": target, **header}, payload=[data])
            return target
        path = Path(data)
        target = target or path.name
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            self._call("upload", {"path": target, **header}, file=file, size=size)
        return target

    def upload_cached(self, data: str | os.PathLike[str] | bytes, target: str, digest: str | None = None) -> bool:
        """Put a file (a path, or bytes) in the workspace as ``target``, sending it only when the server's
        content-addressed cache does not hold it yet; returns True when the bytes were sent.

        ``digest``: its sha256 when already known. The server checks what it receives against it. A
        server without the cache (``--cache-mb 0``) or older than it simply gets the upload."""
        if digest is None:
            digest = file_digest(data)
        try:
            found = self._call("fetch", {"files": [{"path": target, "sha256": digest}]})[0].get("found", [])
        except RemoteError as exc:
            if exc.remote_type != "UnknownOp":
                raise
            found = []
        if target in found:
            return False
        self.upload(data, target, sha256=digest)
        return True

    def download(self, path: str) -> bytes:
        """A workspace file's content."""
        return bytes(self._call("download", {"path": path})[1][0])

    def remove(self, path: str) -> None:
        self._call("remove", {"path": path})

    def listdir(self, path: str = ".", detail: bool = False) -> list[Any]:
        """Names in a workspace directory (``detail``: dicts with name, type, size)."""
        entries = self._call("listdir", {"path": path})[0]["entries"]
        return entries if detail else [e["name"] for e in entries]

    def load_model(
        self, path: str, backend: str | None = None, *, timeout: float | None = None, **options: Any
    ) -> RemoteModel:
        """Load an uploaded model; the backend follows the file type unless given. ``options`` go to the
        backend (onnxruntime: ``providers``, ``intra_op_num_threads``; tvm: ``device``, ``function``).
        Past ``timeout`` seconds the device ends the session and this raises :class:`RunTimeout`."""
        header = {"path": path, "backend": backend, "options": options}
        reply = self._call("load_model", header, timeout=timeout)[0]
        return RemoteModel(
            self,
            reply["model"],
            reply["backend"],
            reply["inputs"],
            reply["outputs"],
            reply["load_s"],
            reply.get("peak_rss"),
        )

    def tensor(self, array: Any) -> RemoteTensor:
        """Send an array once and keep it on the device."""
        arr = _as_wire_array(array)
        handle = self._call("put", {}, {"": arr})[0]["handles"][0]
        return RemoteTensor(self, handle, arr.dtype.name, tuple(arr.shape))

    def fill(
        self, shape: tuple[int, ...], dtype: str = "float32", kind: str = "random", seed: int | None = None
    ) -> RemoteTensor:
        """A tensor generated on the device ("random", "zeros", "ones"): nothing crosses the network."""
        handle = self._call("fill", {"shape": list(shape), "dtype": dtype, "kind": kind, "seed": seed})[0]["tensor"]
        return RemoteTensor(self, handle, dtype, tuple(shape))

    def close(self) -> None:
        """End the session: the server kills its worker and removes its workspace."""
        if self._channel is None:
            return
        with contextlib.suppress(TetherError):
            self._call("close", {})
        self._drop()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<tether.Session {self.address} {self.server_key!r}{' closed' if self.closed else ''}>"
