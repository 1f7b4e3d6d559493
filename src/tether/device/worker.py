"""A session worker: one process per session, started ahead of time by the server.

Life of a worker: start, import what ``--preload`` names (numpy, onnxruntime, tvm: the slow part of a
first call), say ``ready`` on the control socket, wait for one job (a JSON line and the session's
socket, passed as a file descriptor), serve that session, exit. The server kills the whole process group
afterwards, so whatever the session started dies with it.

Two protocols: tether's native session (:class:`NativeSession`, standard library plus the backends) and
TVM's, handed to TVM's own C++ loop (``tvm.rpc._ffi_api.ServerLoop``) with tether's workspace rules.
A watchdog ends a session past its deadline with a typed timeout error before the process exits.

Quotas (:class:`Quotas`, from the server's flags) are checked before anything is allocated or written: a
request announcing more payload than ``--max-upload-mb`` is refused from its header (QuotaExceeded, then its
bytes are skipped), an upload that would take the workspace past ``--workspace-quota-mb`` before a byte is
written; with ``--worker-memory-mb`` the worker's address space is limited (RLIMIT_AS) before the session
loads anything, and a failed allocation is that request's WorkerMemoryExceeded.

``--load-library`` (TVM's flag): each library is loaded with ``ctypes`` (RTLD_GLOBAL, so a backend finds
its symbols through ``ctypes.CDLL(None)`` or the dynamic linker) when the job arrives, before the session
serves its first request, whatever the protocol and backend (for TVM's protocol after ``import tvm``, as
TVM's server does). One that fails to load ends the session with a ``LibraryLoadError`` naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import mmap
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..aio.channel import Channel
from ..aio.net import finish_sending
from ..errors import (
    BadHeader,
    ConnectionClosed,
    LocalProtocolError,
    QuotaExceeded,
    RemoteError,
    RemoteProtocolError,
    WorkspaceError,
)
from ..protocol.session import (
    DTYPE_SIZES,
    MAX_PAYLOAD_BYTES,
    FrameHeader,
    FrameKind,
    HotOp,
    TensorDesc,
    decode_run_call,
    encode_reply,
    encode_run_reply,
    parse_json_header,
    ping_reply,
    shape_nbytes,
    tensor_descs,
)
from ..runtime import Model, RawTensor, backend_for_path, fill_shape, fill_tensor, get_backend
from . import conditions
from .cache import ContentCache, is_sha256
from .workspace import Workspace

__all__ = ["NativeSession", "Quotas", "main", "measure"]

logger = logging.getLogger("tether.worker")

TIMEOUT_MESSAGE = "RPCSessionTimeoutError: the {0:g} s session timeout expired; ask for a longer session_timeout"


#: Error types a request's failure keeps whatever the operation (others become ModelLoadError/ModelRunError).
_KEPT_TYPES = frozenset({"WorkspaceError", "QuotaExceeded", "WorkerMemoryExceeded"})

#: The JSON names of the binary (CALL) operations, for messages and typed errors.
_HOT_NAMES: dict[int, str] = {op.value: op.name.lower() for op in HotOp}

_CALL, _PING, _RUN = int(FrameKind.CALL), int(HotOp.PING), int(HotOp.RUN)  # enum attribute lookups cost ~0.2 us each
_PING_HEADER = bytes([_PING])

#: Tensors received at least this large get memory that is only committed as their bytes arrive.
_LAZY_BYTES = 1 << 20


@dataclass(frozen=True)
class Quotas:
    """What one session may use, in bytes; 0: no bound of its own."""

    #: The largest payload (a file, a request's tensors) one request may announce.
    max_upload: int = 0
    #: The bytes of files the session's workspace may hold at once.
    workspace: int = 0
    #: The worker's address-space limit past what it had mapped when the session began (RLIMIT_AS).
    memory: int = 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def check_workspace_quota(workspace: Workspace, quota: int, path: Path, size: int, name: Any) -> None:
    """Refuse (QuotaExceeded) a file of ``size`` bytes at ``path`` that would take the workspace past
    ``quota`` bytes (0: none); what it replaces is counted out."""
    if not quota:
        return
    used = workspace.usage()
    with contextlib.suppress(OSError):
        if path.is_file() and not path.is_symlink():
            used -= path.stat().st_size
    if used + size > quota:
        raise QuotaExceeded(
            f"{name!r:.80} ({size} bytes) would take the workspace to {used + size} bytes; this session may "
            f"keep {quota} ({_mib(quota)}, --workspace-quota-mb): remove files first",
            "QuotaExceeded",
        )


def _tensor_buffer(nbytes: int) -> bytearray | mmap.mmap:
    """Memory for a tensor about to be received: a large one is an anonymous mapping, whose pages are
    committed only as the bytes arrive (a request that announces 1 GiB and sends nothing costs nothing)."""
    if nbytes < _LAZY_BYTES:
        return bytearray(nbytes)
    try:
        return mmap.mmap(-1, nbytes)
    except OSError as exc:  # ENOMEM: past the worker's address-space limit
        raise MemoryError(f"cannot map {nbytes} bytes for a tensor: {exc.strerror}") from None


@dataclass(frozen=True)
class _FileOut:
    """A response payload streamed from a file (``sendfile``) instead of buffers."""

    file: BinaryIO
    size: int


class _Payload:
    """The unread payload of the request being handled; whatever a handler leaves is skipped."""

    def __init__(self, channel: Channel, size: int) -> None:
        self.channel, self.left = channel, size

    def into(self, view: memoryview) -> None:
        self.left -= view.nbytes
        self.channel.recv_into(view)

    def drain(self) -> None:
        if self.left:
            left, self.left = self.left, 0
            self.channel.discard(left)


def _positive_seconds(value: Any, name: str) -> bool:
    """True for a usable time limit (a positive finite number), False for none (absent, 0); else an error."""
    if value is None or value == 0:
        return False
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
        raise RemoteProtocolError(f"{name} must be a positive number of seconds below 1e9, not {value!r:.40}")
    return True


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit // 2] + "\n[...]\n" + text[-limit // 2 :]


def measure(
    run: Callable[[], None],
    *,
    number: int,
    repeat: int,
    min_repeat_ms: float,
    cooldown_ms: float,
    warmup: int,
    before_repeat: Callable[[], None] | None = None,
) -> tuple[list[float], int]:
    """TVM's ``time_evaluator``: per repeat, ``number`` runs timed together, ``number`` grown until a
    repeat lasts ``min_repeat_ms``; returns seconds per run for each repeat, and the final ``number``.
    ``before_repeat`` runs untimed before each repeat (a cache flush)."""
    if number < 1 or repeat < 1 or warmup < 0 or min_repeat_ms < 0 or cooldown_ms < 0:
        raise ValueError("number and repeat must be >= 1; warmup, min_repeat_ms, cooldown_ms >= 0")
    for _ in range(warmup):
        run()
    samples = []
    for index in range(repeat):
        while True:
            if before_repeat is not None:
                before_repeat()
            start = time.perf_counter()
            for _ in range(number):
                run()
            elapsed = time.perf_counter() - start
            if min_repeat_ms <= 0 or elapsed * 1000 >= min_repeat_ms:
                break
            per_run_ms = max(elapsed * 1000 / number, 1e-6)
            number = max(int(min_repeat_ms / per_run_ms) + 1, int(number * 1.618))
        samples.append(elapsed / number)
        if cooldown_ms and index + 1 < repeat:
            time.sleep(cooldown_ms / 1000)
    return samples, number


def _cache_size() -> int:
    """Twice the last-level CPU cache (64 MiB when the system does not say)."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        with contextlib.suppress(OSError, ValueError):
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
    return 2 * best if best else 64 << 20


class _Flusher:
    """Evicts the CPU caches by reading a buffer twice their size (TVM's ``enable_cpu_cache_flush``)."""

    def __init__(self) -> None:
        self.buffer = bytearray(b"\x01") * _cache_size()

    def __call__(self) -> None:
        self.buffer.count(b"\x00")  # reads every byte


class _RequestTimer:
    """Ends the worker when one request outlives its time limit: the model cannot be interrupted
    mid-run, so the timer tells the client (``RunTimeout``, frame id 0: the session is over) and exits."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._cond = threading.Condition()
        self._armed: tuple[float, float, str] | None = None  # (deadline, limit, op)
        self._thread: threading.Thread | None = None

    def arm(self, limit: float, op: str) -> None:
        with self._cond:
            self._armed = (time.monotonic() + limit, limit, op)
            if self._thread is None:
                self._thread = threading.Thread(target=self._wait, name="tether-request-timer", daemon=True)
                self._thread.start()
            self._cond.notify()

    def disarm(self) -> None:
        """Called before the answer goes out: from here on the request cannot time out."""
        with self._cond:
            self._armed = None
            self._cond.notify()

    def _wait(self) -> None:
        with self._cond:
            while True:
                if self._armed is None:
                    self._cond.wait()
                    continue
                deadline, limit, op = self._armed
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                # Still holding the lock: a disarm() racing with this waits until the process is gone,
                # so the request's answer can no longer go out after the timeout was sent.
                message = f"{op} outlived its {limit:g} s time limit; the device ended the session's worker"
                try:
                    frame = {"type": "RunTimeout", "message": message, "traceback": ""}
                    self.channel.send_frame(FrameKind.ERROR, 0, frame)
                    finish_sending(self.channel.sock)
                except (ConnectionClosed, OSError):
                    pass
                finally:
                    logging.shutdown()
                    os._exit(124)


class NativeSession:
    """Serves tether's native requests on one channel until the client closes or says ``close``."""

    #: requests that may carry ``"timeout"``: seconds before the worker gives up on them and ends
    TIMED_OPS = frozenset({"load_model", "run", "benchmark"})

    def __init__(
        self,
        channel: Channel,
        workspace: Workspace,
        info: dict[str, Any],
        cache: ContentCache | None = None,
        quotas: Quotas | None = None,
        *,
        sessions: tuple[str, str] | None = None,
    ) -> None:
        self.channel = channel
        #: (the directory of the server's session workspaces, this session's): who else runs, for results
        self.sessions = sessions
        self.workspace = workspace
        self.info = info
        self.cache = cache
        self.quotas = quotas or Quotas()
        #: The largest payload one request may carry, or a tensor the device makes.
        self.max_request = min(channel.max_payload, self.quotas.max_upload or channel.max_payload)
        self._timer = _RequestTimer(channel)
        self._flusher: _Flusher | None = None
        self.tensors: dict[str, RawTensor] = {}
        self.models: dict[str, Model] = {}
        self._ids = 0
        self._ops: dict[str, Callable[[dict[str, Any], _Payload], tuple[dict[str, Any], list[Any] | _FileOut]]] = {
            "ping": self._ping,
            "info": self._info,
            "upload": self._upload,
            "download": self._download,
            "remove": self._remove,
            "listdir": self._listdir,
            "load_model": self._load_model,
            "unload": self._unload,
            "put": self._put,
            "fill": self._fill,
            "get": self._get,
            "free": self._free,
            "run": self._run,
            "benchmark": self._benchmark,
            "fetch": self._fetch,
            "close": self._ping,
        }

    def _handle(self, name: str) -> str:
        self._ids += 1
        return f"{name}{self._ids}"

    def serve(self) -> None:
        recv, send = self.channel.recv_frame_head, self.channel.send_bytes
        call, ping = _CALL, _PING_HEADER  # locals: the loop's hot names
        while True:
            try:
                kind, frame_id, raw, payload_len = recv()
            except ConnectionClosed:
                return
            if kind == call:  # the hot path: a binary header
                if raw == ping and not payload_len:
                    send(ping_reply(frame_id))
                else:
                    self._serve_call(FrameHeader(kind, frame_id, len(raw), payload_len), raw)
                continue
            head = FrameHeader(kind, frame_id, len(raw), payload_len)
            try:
                header = parse_json_header(raw)
            except BadHeader as exc:  # framed fine, unusable JSON: answer this request alone
                self.channel.discard(payload_len)
                detail = {"type": "ProtocolError", "message": str(exc), "traceback": ""}
                self.channel.send_frame(FrameKind.ERROR, frame_id, detail)
                continue
            if kind != FrameKind.REQUEST:
                raise RemoteProtocolError(f"expected a request frame, got {FrameKind(kind).name}")
            if self._serve_request(head, header):
                return

    def _serve_call(self, head: FrameHeader, raw: bytes | bytearray) -> None:
        """A CALL frame other than a plain ping: its op code, then that op's fixed fields (:class:`HotOp`);
        answered by a REPLY, or an ERROR frame with the same typed error its JSON twin would get."""
        op = raw[0]
        if op == _RUN:
            try:
                header = decode_run_call(raw)
            except RemoteProtocolError as exc:  # the frame is whole: answer it alone, skip its payload
                self.channel.discard(head.payload_len)
                self._send_error(head, exc, "run")
                return
            self._serve_request(head, header, binary=_RUN)
            return
        name = _HOT_NAMES.get(op, f"binary op {op}")
        if head.payload_len > self.max_request:
            refusal = QuotaExceeded(
                f"{name!r:.40} announces {head.payload_len} bytes of payload; this server takes at most "
                f"{self.max_request} ({_mib(self.max_request)}, --max-upload-mb) in one request",
                "QuotaExceeded",
            )
            self._send_error(head, refusal, name)
            self.channel.discard(head.payload_len)
            return
        self.channel.discard(head.payload_len)
        error: Exception
        if op not in _HOT_NAMES:
            error = RemoteError(f"unknown binary operation {op}; this server knows {sorted(_HOT_NAMES)}", "UnknownOp")
        else:
            error = RemoteProtocolError(f"{name}: {len(raw) - 1} bytes of fields and {head.payload_len} of payload")
        self._send_error(head, error, name)

    def _serve_request(self, head: FrameHeader, header: dict[str, Any], binary: int = 0) -> bool:
        """A JSON request (or a CALL of op ``binary``, its header decoded to the JSON it stands for),
        answered (a CALL by a REPLY where its result fits a binary header); True after ``close``."""
        op = header.get("op")
        if head.payload_len > self.max_request:  # refused from the header: nothing allocated, nothing read
            refusal = QuotaExceeded(
                f"{op!r:.40} announces {head.payload_len} bytes of payload; this server takes at most "
                f"{self.max_request} ({_mib(self.max_request)}, --max-upload-mb) in one request",
                "QuotaExceeded",
            )
            self._send_error(head, refusal, op)  # at once: a client that waits for it hears before it sends
            self.channel.discard(head.payload_len)  # then its payload is skipped: the session goes on
            return False
        payload = _Payload(self.channel, head.payload_len)
        try:
            handler = self._ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise RemoteError(f"unknown operation {op!r}; this server knows {sorted(self._ops)}", "UnknownOp")
            limit = header.get("timeout")
            timed = op in self.TIMED_OPS and _positive_seconds(limit, "timeout")
            if timed:
                self._timer.arm(float(limit or 0), str(op))
            try:
                result, out = handler(header, payload)
            finally:
                if timed:
                    self._timer.disarm()
            payload.drain()
        except ConnectionClosed:
            raise
        except BaseException as exc:  # a failed request is an answer, not the end of the session
            if isinstance(exc, QuotaExceeded):  # a small error, sent before the payload is skipped
                self._send_error(head, exc, op)
                payload.drain()
                return False
            payload.drain()
            self._send_error(head, exc, op)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            return False
        if binary and not isinstance(out, _FileOut):
            fields = encode_run_reply(result)
            if fields is not None:
                views = [memoryview(b).cast("B") for b in out]
                nbytes = sum(v.nbytes for v in views)
                self.channel.send_raw(encode_reply(binary, head.id, fields, nbytes), views)
                return False
        try:
            if isinstance(out, _FileOut):
                with out.file:
                    self.channel.send_file_frame(FrameKind.RESPONSE, head.id, result, out.file, out.size)
            else:
                self.channel.send_frame(FrameKind.RESPONSE, head.id, result, out)
        except LocalProtocolError as exc:  # e.g. a listing too large for one header: an error reply
            self._send_error(head, exc, op)
        return op == "close"

    def _send_error(self, head: FrameHeader, exc: BaseException, op: Any) -> None:
        # a malformed request is the client's mistake: the message says it all, no device traceback
        trace = "" if isinstance(exc, RemoteError | RemoteProtocolError) else traceback.format_exc(limit=20)
        if self._out_of_memory(exc):
            limit = self.quotas.memory
            allowed = f" (this server allows a worker {_mib(limit)} more than it starts with, --worker-memory-mb)"
            exc = RemoteError(
                f"{op!r:.40} ran out of memory{allowed if limit else ''}: {str(exc) or type(exc).__name__}",
                "WorkerMemoryExceeded",
            )
        if isinstance(exc, RemoteProtocolError):  # a malformed request (tensor descriptions, sizes)
            kind = "ProtocolError"
        elif isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError):
            kind = "WorkspaceError"
        elif isinstance(exc, RemoteError) and exc.remote_type in _KEPT_TYPES:
            kind = exc.remote_type
        elif op == "load_model":
            kind = "ModelLoadError"
        elif op in ("run", "benchmark"):
            kind = "ModelRunError"
        else:
            kind = exc.remote_type if isinstance(exc, RemoteError) else type(exc).__name__
        message = exc.remote_message if isinstance(exc, RemoteError) else str(exc) or type(exc).__name__
        message, trace = _clip(message, 16 << 10), _clip(trace, 256 << 10)  # an error frame must fit its header
        self.channel.send_frame(FrameKind.ERROR, head.id, {"type": kind, "message": message, "traceback": trace})

    def _out_of_memory(self, exc: BaseException) -> bool:
        """A MemoryError, or one a backend wrapped; with a memory limit set, also a native runtime's failed
        allocation (C++'s ``bad_alloc``, onnxruntime's "Failed to allocate memory")."""
        seen: BaseException | None = exc
        for _ in range(8):
            if seen is None:
                break
            if isinstance(seen, MemoryError):
                return True
            seen = seen.__cause__ or seen.__context__
        text = str(exc)
        return bool(self.quotas.memory) and ("bad_alloc" in text or "Failed to allocate memory" in text)

    # -- operations ----------------------------------------------------------------------------

    def _ping(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], list[Any]]:
        return {}, []

    def _info(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], list[Any]]:
        q = self.quotas
        limits = {
            "max_payload": self.max_request,
            "workspace_quota": q.workspace or None,
            "worker_memory": q.memory or None,
            "cache": self.cache is not None,
        }
        return {**self.info, "pid": os.getpid(), "workspace": str(self.workspace.root), **limits}, []

    def _upload(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], list[Any]]:
        name = header.get("path")
        path = self.workspace.resolve(name if isinstance(name, str) else "")
        size = payload.left
        digest = header.get("sha256")
        if digest is not None and not is_sha256(digest):
            raise RemoteError(f"sha256 must be 64 lowercase hex digits, not {digest!r:.80}", "ValueError")
        hasher = hashlib.sha256() if digest else None
        self._check_workspace(path, size, name)
        chunk = memoryview(bytearray(min(max(size, 1), 1 << 20)))
        try:
            with self.workspace.open_for_write(path) as file:
                while payload.left:
                    part = chunk[: min(payload.left, chunk.nbytes)]
                    payload.into(part)  # what a failed write leaves unread is skipped by drain()
                    file.write(part)
                    if hasher is not None:
                        hasher.update(part)
            if hasher is not None and hasher.hexdigest() != digest:
                raise RemoteError(
                    f"{name!r}: content hashes to {hasher.hexdigest()}, not the sha256 it was sent with",
                    "WorkspaceError",
                )
        except (OSError, RemoteError):
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        if digest and self.cache is not None:
            try:
                self.cache.store(str(digest), path)
            except OSError as exc:  # a full disk must not fail the upload itself
                logger.warning("could not cache %s: %s", digest, exc)
        return {"path": name, "size": size}, []

    def _fetch(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], list[Any]]:
        """Files the server's cache holds, placed in the workspace by sha256 (``{"files": [{"path",
        "sha256"}]}``); answers ``{"found": [paths]}``: the client uploads the rest."""
        files = header.get("files")
        if not isinstance(files, list):
            raise RemoteError("files must be a list of {path, sha256} objects", "ValueError")
        found = []
        for item in files:
            digest = item.get("sha256") if isinstance(item, dict) else None
            name = item.get("path") if isinstance(item, dict) else None
            if not is_sha256(digest) or not isinstance(name, str):
                raise RemoteError(f"bad fetch entry {item!r:.120}: needs a path and a sha256", "ValueError")
            target = self.workspace.resolve(name)
            size = None if self.cache is None else self.cache.size(str(digest))
            if size is not None:
                self._check_workspace(target, size, name)
            if self.cache is not None and self.cache.materialize(str(digest), target):
                found.append(name)
        return {"found": found}, []

    def _check_workspace(self, path: Path, size: int, name: Any) -> None:
        check_workspace_quota(self.workspace, self.quotas.workspace, path, size, name)

    def _download(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], _FileOut]:
        name = header.get("path")
        path = self.workspace.resolve(name if isinstance(name, str) else "", must_exist=True)
        file = open(path, "rb")  # noqa: SIM115 - serve() closes it once the frame is out
        size = os.fstat(file.fileno()).st_size
        return {"path": name, "size": size}, _FileOut(file, size)

    def _remove(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], list[Any]]:
        self.workspace.remove(str(header.get("path", "")))
        return {}, []

    def _listdir(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], list[Any]]:
        return {"entries": self.workspace.listdir(str(header.get("path") or "."))}, []

    def _load_model(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], list[Any]]:
        name = str(header.get("path", ""))
        path = self.workspace.resolve(name, must_exist=True)
        options = header.get("options") or {}
        if not isinstance(options, dict):
            raise RemoteError("options must be an object", "ModelLoadError")
        backend_name = header.get("backend") or backend_for_path(name)
        start = time.perf_counter()
        model = get_backend(str(backend_name)).load(str(path), options)
        load_s = time.perf_counter() - start
        handle = self._handle("m")
        self.models[handle] = model
        return {
            "model": handle,
            "backend": model.backend,
            "inputs": [s.to_wire() for s in model.inputs],
            "outputs": [s.to_wire() for s in model.outputs],
            "load_s": load_s,
            "peak_rss": conditions.peak_rss_bytes(),  # the worker's high-water mark with the model loaded
        }, []

    def _model(self, header: dict[str, Any]) -> Model:
        model = self.models.get(str(header.get("model")))
        if model is None:
            raise RemoteError(f"no model {header.get('model')!r} in this session", "KeyError")
        return model

    def _unload(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], list[Any]]:
        self._model(header).close()
        del self.models[str(header["model"])]
        return {}, []

    def _receive_tensors(self, header: dict[str, Any], payload: _Payload) -> list[tuple[TensorDesc, RawTensor]]:
        received = []
        for desc in tensor_descs(header.get("tensors"), payload.left):
            data = _tensor_buffer(desc.nbytes)
            payload.into(memoryview(data))
            received.append((desc, RawTensor(desc.dtype, desc.shape, data)))
        return received

    def _put(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], list[Any]]:
        handles = []
        for _, tensor in self._receive_tensors(header, payload):
            handle = self._handle("t")
            self.tensors[handle] = tensor
            handles.append(handle)
        return {"handles": handles}, []

    def _fill(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], list[Any]]:
        shape = header.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise RemoteError(f"shape must be a list of non-negative ints, not {shape!r:.200}", "ValueError")
        dtype = header.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise RemoteError(f"unsupported dtype {dtype!r:.80}; known: {', '.join(DTYPE_SIZES)}", "ValueError")
        seed = header.get("seed")
        tensor = self._generated(dtype, tuple(shape), str(header.get("kind", "random")), seed)
        handle = self._handle("t")
        self.tensors[handle] = tensor
        return {"tensor": handle}, []

    def _generated(self, dtype: str, shape: tuple[int, ...], kind: str, seed: Any) -> RawTensor:
        """A tensor made on the device, no larger than what the session may receive in one frame."""
        if all(isinstance(d, int) for d in shape) and dtype in DTYPE_SIZES:
            limit = self.max_request
            nbytes = shape_nbytes(shape, DTYPE_SIZES[dtype], limit + 1)  # None past the limit: never a huge product
            if nbytes is None:
                raise RemoteError(
                    f"a generated {dtype} tensor of shape {list(shape)!r:.200} would be larger than this server "
                    f"makes: at most {limit} bytes (its payload limit)",
                    "ValueError",
                )
        return fill_tensor(dtype, shape, kind, seed)

    def _tensor(self, handle: Any) -> RawTensor:
        tensor = self.tensors.get(str(handle))
        if tensor is None:
            raise RemoteError(f"no tensor {handle!r} in this session", "KeyError")
        return tensor

    def _get(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], list[Any]]:
        tensor = self._tensor(header.get("tensor"))
        return {"tensors": [tensor.desc("").to_wire()]}, [tensor.data]

    def _free(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], list[Any]]:
        for handle in header.get("tensors") or []:
            self.tensors.pop(str(handle), None)
        return {}, []

    def _inputs(self, model: Model, header: dict[str, Any], payload: _Payload) -> dict[str, Any]:
        """Prepared inputs: tensors in the payload, handles (``{"name": "t3"}``), or generated ones
        (``fill``; ``shapes`` by name for inputs with dynamic dims or an unknown rank)."""
        inline = {desc.name: tensor for desc, tensor in self._receive_tensors(header, payload)}
        refs = header.get("inputs") or {}
        shapes = dict(header.get("shapes") or {})
        if not isinstance(refs, dict):
            raise RemoteError("inputs must map names to tensor handles", "ValueError")
        fill = header.get("fill")
        prepared: dict[str, Any] = {}
        for spec in model.inputs:
            if spec.name in inline:
                tensor = inline.pop(spec.name)
            elif spec.name in refs:
                tensor = self._tensor(refs.pop(spec.name))
            elif fill:
                shape = fill_shape(spec, shapes.pop(spec.name, None))
                tensor = self._generated(spec.dtype, shape, str(fill), header.get("seed"))
            else:
                raise RemoteError(
                    f"input {spec.name!r} missing; the model takes {[s.name for s in model.inputs]}", "ValueError"
                )
            prepared[spec.name] = model.prepare(spec.name, tensor)
        extra = sorted(inline) + sorted(refs) + sorted(set(shapes) - set(prepared))
        if extra:
            raise RemoteError(f"unknown inputs {extra}; the model takes {[s.name for s in model.inputs]}", "ValueError")
        return prepared

    def _run(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], list[Any]]:
        model = self._model(header)
        prepared = self._inputs(model, header, payload)
        start = time.perf_counter()
        outputs = model.run(prepared)
        model.sync()
        run_s = time.perf_counter() - start
        raws = [(name, model.to_raw(value)) for name, value in outputs]
        if header.get("keep"):
            kept = []
            for name, raw in raws:
                handle = self._handle("t")
                self.tensors[handle] = raw
                kept.append({**raw.desc(name).to_wire(), "tensor": handle})
            return {"outputs": kept, "run_s": run_s}, []
        return {"tensors": [raw.desc(name).to_wire() for name, raw in raws], "run_s": run_s}, [r.data for _, r in raws]

    def _benchmark(self, header: dict[str, Any], payload: _Payload) -> tuple[dict[str, Any], list[Any]]:
        model = self._model(header)
        prepared = self._inputs(model, header, payload)

        def once() -> None:
            model.run(prepared)
            model.sync()

        flush = None
        if header.get("flush_cache"):
            self._flusher = flush = self._flusher or _Flusher()
        threads = getattr(model, "threads", None)
        sessions_dir, own = self.sessions or (None, None)
        setup = conditions.setup(
            other_sessions=conditions.active_sessions(sessions_dir, own),
            threads=threads() if callable(threads) else {"runtime": model.backend},
        )
        before = conditions.snapshot()
        samples, number = measure(
            once,
            number=int(header.get("number", 1)),
            repeat=int(header.get("repeat", 1)),
            min_repeat_ms=float(header.get("min_repeat_ms", 0)),
            cooldown_ms=float(header.get("cooldown_ms", 0)),
            warmup=int(header.get("warmup", 1)),
            before_repeat=flush,
        )
        after = conditions.snapshot()
        setup["other_sessions_after"] = conditions.active_sessions(sessions_dir, own)
        reply: dict[str, Any] = {
            "samples": samples,
            "number": number,
            "conditions": {**setup, "before": before, "after": after},
            "peak_rss": conditions.peak_rss_bytes(),
        }
        if header.get("profile"):  # after the timing, in a profiling run of its own: the samples never see it
            reply["profile"], reply["profile_error"] = self._profile(model, prepared, header.get("profile_runs"))
        return reply, []

    @staticmethod
    def _profile(model: Model, prepared: dict[str, Any], runs: Any) -> tuple[list[Any] | None, str | None]:
        """Per-operator times from the backend's profiler, or why there are none."""
        profile = getattr(model, "profile", None)
        if not callable(profile):
            return None, f"the {model.backend} backend has no per-operator profiler"
        count = runs if isinstance(runs, int) and not isinstance(runs, bool) and 1 <= runs <= 10_000 else 10
        try:
            return list(profile(prepared, count)), None
        except Exception as exc:  # the timing stands without it
            return None, str(exc)


# -- TVM's protocol ----------------------------------------------------------------------------


def serve_tvm(
    sock: socket.socket,
    workspace: Workspace,
    load_library: list[str],
    quotas: Quotas | None = None,
    session: Any = None,
) -> None:
    """Hand the socket to TVM's session loop, with tether's workspace behind TVM's file functions.

    ``quotas``: TVM's loop receives an upload whole before any function sees it, so its size and the
    workspace quota are checked before it is written, not before it is received (the worker's memory
    limit bounds that); the memory limit counts from after TVM's own imports."""
    quotas = quotas or Quotas()
    import tvm_ffi
    from tvm.rpc import _ffi_api
    from tvm.runtime import load_module

    try:
        libs = load_libraries(load_library)
    except RemoteError as exc:
        logger.warning("session %s ended before it began: %s", session, exc.remote_message)
        _ffi_api.ReturnException(sock.fileno(), f"LibraryLoadError: {exc.remote_message}")
        finish_sending(sock)
        return

    def workpath(path: str) -> str:
        return str(workspace.root if path in ("", ".") else workspace.resolve(path))  # "": TVM's temp dir

    def remove(path: str) -> None:
        # TVM's semantics, which meta_schedule's RPCRunner relies on in its cleanup (remove(p), remove(p +
        # ".so"), remove("")): "" is the whole workspace, a file that is not there is no error.
        if path in ("", "."):
            workspace.clear()
            return
        target = workspace.resolve(path)  # paths that leave the workspace are still refused
        if target.exists() or target.is_symlink():
            workspace.remove(path)

    def listdir(path: str) -> str:
        return ",".join(entry["name"] for entry in workspace.listdir(path or "."))

    def upload(path: str, blob: Any) -> None:
        data = memoryview(blob.encode() if isinstance(blob, str) else blob).cast("B")
        if quotas.max_upload and data.nbytes > quotas.max_upload:
            raise QuotaExceeded(
                f"{path!r:.80} is {data.nbytes} bytes; this server takes at most {quotas.max_upload} "
                f"({_mib(quotas.max_upload)}, --max-upload-mb) in one upload",
                "QuotaExceeded",
            )
        target = workspace.resolve(path)
        check_workspace_quota(workspace, quotas.workspace, target, data.nbytes, path)
        with workspace.open_for_write(target) as file:
            file.write(data)

    def load(path: str) -> Any:
        return load_module(workpath(path))

    def download_linked_module(path: str) -> bytearray:
        real = workpath(path)
        if real.endswith(".o") or real.endswith(".tar"):
            from tvm.support import cc, tar, utils

            files = [real]
            if real.endswith(".tar"):
                unpacked = utils.tempdir(custom_path=real[: -len(".tar")])
                tar.untar(real, unpacked.temp_dir)
                files = [unpacked.relpath(x) for x in unpacked.listdir()]
            cc.create_shared(real + ".so", files)
            real += ".so"
        elif not real.endswith((".so", ".dylib")):
            raise RuntimeError(f"do not know how to link {path}")
        with open(real, "rb") as file:
            return bytearray(file.read())

    for name, func in (
        ("workpath", workpath),
        ("remove", remove),
        ("listdir", listdir),
        ("upload", upload),
        ("load_module", load),
        ("download_linked_module", download_linked_module),
    ):
        tvm_ffi.register_global_func(f"tvm.rpc.server.{name}", func, override=True)
    if quotas.memory:
        limit_memory(quotas.memory, session)  # after TVM's own imports: their reservations are not the session's
    _ffi_api.ServerLoop(sock.fileno())
    del libs


def _tvm_deadline_guard(sock: socket.socket, message: str, deadline: float) -> None:
    """Fork a guard that, at the deadline, kills this worker and only then writes TVM's timeout error.

    TVM's session loop may be writing a reply when the deadline comes; an exception packet written
    beside it would interleave and corrupt the stream (TVM's client then reads a garbage length). TVM's
    own server kills the session process first and writes from the parent: the guard does the same,
    then waits until the client's kernel has acknowledged the error before it exits (a request that
    arrived meanwhile would otherwise make the close a reset that drops the unsent error: the client
    then got "Connection reset by peer", 4 runs in 21).

    The guard watches the worker through a pidfd and leaves its process group: the server kills that
    group as soon as it sees the worker die, which could otherwise take the guard before it has written.
    A worker that ends before the deadline ends the guard quietly; one that ends after it (the server's
    own kill, a grace period later, when the guard ran late) still gets its error written. Without
    pidfds the guard stays in the group and sleeps.
    """
    import select
    import signal

    from tvm.rpc import _ffi_api

    worker = os.getpid()
    pidfd = os.pidfd_open(worker) if hasattr(os, "pidfd_open") else None
    if os.fork():
        if pidfd is not None:
            os.close(pidfd)
        return
    code = 124
    try:
        if pidfd is not None:
            os.setpgid(0, 0)
        remaining = deadline - time.monotonic()
        while remaining > 0:
            if pidfd is None:
                time.sleep(remaining)  # the guard's only job is to wait
            elif select.select([pidfd], [], [], min(remaining, 3600.0))[0]:
                break
            remaining = deadline - time.monotonic()
        if remaining > 0:
            code = 0  # the worker ended by itself, in time
            return
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # this worker, even if its pid were reused
            select.select([pidfd], [], [], 2.0)  # readable once the worker is gone
        else:
            os.kill(worker, signal.SIGKILL)
        _ffi_api.ReturnException(sock.fileno(), message)
        finish_sending(sock)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


# -- process entry -----------------------------------------------------------------------------


def _watchdog(deadline: float, on_expire: Callable[[], None]) -> None:
    def wait() -> None:
        remaining = deadline - time.monotonic()
        while remaining > 0:
            time.sleep(remaining)  # a worker's own clock; nothing to wake early for
            remaining = deadline - time.monotonic()
        try:
            on_expire()
        except Exception:
            logger.exception("could not tell the client that its session timed out")
        finally:
            os._exit(124)

    threading.Thread(target=wait, name="tether-watchdog", daemon=True).start()


def _mapped_bytes() -> int | None:
    """This process's address space in bytes (Linux: VmSize), None where the system does not say."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return None


def limit_memory(extra: int, session: Any = None) -> int | None:
    """Let this process's address space (RLIMIT_AS) grow by at most ``extra`` bytes past what it has mapped
    now (the runtimes a worker preloads reserve far more address space than they use, so a limit counted
    from zero would fail them); soft and hard, for the rest of the process. Past it an allocation fails:
    MemoryError in Python, a failed allocation in a native runtime. Returns the limit in bytes, None where
    it cannot be set (no ``resource`` module, no /proc)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not a POSIX system
        return None
    mapped = _mapped_bytes()
    if mapped is None:
        logger.warning("session %s: cannot limit the worker's memory here (no /proc/self/status)", session)
        return None
    limit = mapped + extra
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logger.info(
        "session %s: address space limited to %d MiB (%d MiB mapped + %d MiB, --worker-memory-mb)",
        session,
        limit >> 20,
        mapped >> 20,
        extra >> 20,
    )
    return limit


#: The ``--load-library`` libraries of this process's session (kept loaded until it exits).
_LIBRARIES: list[Any] = []


def load_libraries(paths: list[str]) -> list[Any]:
    """Load each of ``paths`` (``ctypes.CDLL``, RTLD_GLOBAL) in order; :class:`RemoteError` of type
    ``LibraryLoadError`` naming the first that fails and why (the dynamic linker's words)."""
    import ctypes

    libs = []
    for path in paths:
        try:
            libs.append(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
        except OSError as exc:
            raise RemoteError(f"--load-library {path}: {exc}", "LibraryLoadError") from None
    return libs


def run_job(job: dict[str, Any], sock: socket.socket) -> None:
    workspace = Workspace(job["workspace"])
    os.chdir(workspace.root)
    memory = int(job.get("worker_memory") or 0)
    quotas = Quotas(int(job.get("max_upload") or 0), int(job.get("workspace_quota") or 0), memory)
    timeout = job.get("timeout")
    deadline = time.monotonic() + timeout if timeout else 0.0
    timeout_message = str(job.get("timeout_message") or TIMEOUT_MESSAGE.format(timeout or 0))
    if job["protocol"] == "tvm":
        if timeout:
            _tvm_deadline_guard(sock, timeout_message, deadline)
        serve_tvm(sock, workspace, job.get("load_library") or [], quotas, job.get("session"))
        return
    channel = Channel(sock, int(job.get("max_payload") or MAX_PAYLOAD_BYTES))
    if timeout:

        def expire() -> None:
            frame = {"type": "SessionTimeout", "message": timeout_message, "traceback": ""}
            channel.send_frame(FrameKind.ERROR, 0, frame)
            finish_sending(sock)

        _watchdog(deadline, expire)
    try:
        cache = job.get("cache") or {}
        store = ContentCache(cache["dir"], int(cache.get("max_bytes", 0))) if cache.get("dir") else None
        try:
            _LIBRARIES.extend(load_libraries(job.get("load_library") or []))
        except RemoteError as exc:
            logger.warning("session %s ended before it began: %s", job.get("session"), exc.remote_message)
            channel.send_frame(
                FrameKind.ERROR, 0, {"type": exc.remote_type, "message": exc.remote_message, "traceback": ""}
            )
            finish_sending(sock)
            return
        if memory:
            limit_memory(memory, job.get("session"))  # before anything of the session is loaded
        # the server keeps one workspace directory per running session, side by side: who else runs
        sessions = (str(Path(workspace.root).parent), Path(workspace.root).name)
        NativeSession(channel, workspace, job.get("info") or {}, store, quotas, sessions=sessions).serve()
    except RemoteProtocolError as exc:
        logger.warning("session %s ended: %s", job.get("session"), exc)
        with contextlib.suppress(ConnectionClosed):
            channel.send_frame(FrameKind.ERROR, 0, {"type": "ProtocolError", "message": str(exc), "traceback": ""})


def preload(modules: list[str]) -> list[str]:
    """Import what sessions will need; returns the modules that imported."""
    done = []
    for name in modules:
        try:
            importlib.import_module(name)
            done.append(name)
        except Exception as exc:  # a broken optional runtime must not stop the worker
            logger.debug("preload %s failed: %s", name, exc)
    return done


def serve_one(control: socket.socket) -> int:
    """Say ready, take one job (a JSON message and the session's socket), serve it."""
    try:
        control.sendall(json.dumps({"ready": True, "pid": os.getpid()}).encode() + b"\n")
        message, fds, _, _ = socket.recv_fds(control, 1 << 20, 1)
    except OSError:  # the server is gone: nothing to serve
        return 0
    if not message or not fds:
        return 0  # the server let this worker go unused
    job = json.loads(message)
    sock = socket.socket(fileno=fds[0])
    sock.setblocking(True)  # the descriptor's O_NONBLOCK is shared with the server's copy: TVM's loop needs it clear
    try:
        run_job(job, sock)
    except (ConnectionClosed, WorkspaceError) as exc:
        logger.info("session %s ended: %s", job.get("session"), exc)
    finally:
        with contextlib.suppress(OSError):
            sock.close()
    return 0


def zygote(control: socket.socket) -> int:
    """Fork a worker per request, from a process that has already imported the runtimes.

    Requests: ``{"fork": true}`` with one descriptor, the new worker's control socket; replies
    ``{"forked": pid}``. Each child starts its own session (process group) and serves one job. Exits
    are reported as ``{"exit": pid, "code": n}`` as soon as SIGCHLD arrives. EOF on the control socket,
    or a broken one (the server is gone, even killed), ends the zygote quietly; its workers' sessions
    go on to their own end.
    """
    try:
        return _zygote_loop(control)
    except OSError as exc:  # BrokenPipe, ConnectionReset: reporting to a server that was killed
        logger.debug("zygote: the server is gone (%s); exiting", exc)
        return 0


def _zygote_loop(control: socket.socket) -> int:
    import select
    import signal

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)

    def send(message: dict[str, Any]) -> None:
        control.sendall(json.dumps(message).encode() + b"\n")

    import gc

    gc.collect()
    gc.freeze()  # the imported runtimes' objects: a forked worker's collections must not copy their pages
    send({"ready": True, "pid": os.getpid()})
    while True:
        readable = select.select([control.fileno(), wake_r], [], [])[0]
        if wake_r in readable:
            os.read(wake_r, 4096)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            send({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if control.fileno() not in readable:
            continue
        try:
            message, fds, _, _ = socket.recv_fds(control, 1 << 16, 1)
        except OSError:
            return 0
        if not message:
            return 0
        if not fds:
            continue
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.setsid()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(wake_r)
                os.close(wake_w)
                control.close()
                code = serve_one(socket.socket(fileno=fds[0]))
            except BaseException:
                logger.exception("worker failed")
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(fds[0])
        send({"forked": pid, "id": request.get("id")})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether-worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--preload", default="")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--zygote", action="store_true", help="fork workers on request instead of serving one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")
    control = socket.socket(fileno=args.control_fd)
    preload([m for m in args.preload.split(",") if m])
    from ..runtime import plugins

    # the backend plug-ins, found once (a zygote's forks inherit them); the server has logged their errors
    plugins(log=logging.DEBUG)
    return zygote(control) if args.zygote else serve_one(control)


if __name__ == "__main__":
    sys.exit(main())
