"""Blocking frame I/O for tether's native session (both ends: the device worker and the client).

Frames are described in :mod:`tether.protocol.session`. Sending gathers the head and every payload
buffer into ``sendmsg`` calls (no concatenation); receiving reads the head through a small buffer and
the payload straight into its destination with ``recv_into`` (a tensor's memory, a file's chunks).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Sequence
from typing import IO, Any

from ..errors import BadHeader, ConnectionClosed
from ..protocol.session import (
    FIXED_HEADER,
    MAX_PAYLOAD_BYTES,
    FrameHeader,
    FrameKind,
    encode_frame_head,
    parse_fixed_header,
    parse_json_header,
    unpack_fixed_header,
)

__all__ = ["Channel"]

_CHUNK = 1 << 20
_FIXED = FIXED_HEADER.size
_IOV_MAX = 512


class Channel:
    """One session's socket. ``send_*`` may be called from two threads (a lock keeps frames whole);
    ``recv_*`` from one."""

    def __init__(self, sock: socket.socket, max_payload: int = MAX_PAYLOAD_BYTES) -> None:
        sock.settimeout(None)
        self.sock = sock
        self.max_payload = max_payload
        self._buf = bytearray(65536)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._send_lock = threading.Lock()
        self._timeout: float | None = None

    def set_timeout(self, seconds: float | None) -> None:
        """The socket's timeout, set only when it changes (``settimeout`` is a system call)."""
        if seconds != self._timeout:
            self.sock.settimeout(seconds)
            self._timeout = seconds

    # -- sending -------------------------------------------------------------------------------

    def send_frame(self, kind: FrameKind, frame_id: int, header: dict[str, Any], payload: Sequence[Any] = ()) -> None:
        """One frame; ``payload`` is a sequence of buffers sent back to back without copying."""
        if not payload:
            head = encode_frame_head(kind, frame_id, header)
            with self._send_lock:
                try:
                    self.sock.sendall(head)
                except OSError as exc:
                    raise ConnectionClosed(f"send failed: {exc}") from exc
            return
        views = [memoryview(b).cast("B") for b in payload]
        head = encode_frame_head(kind, frame_id, header, sum(v.nbytes for v in views))
        with self._send_lock:
            self._sendmsg_all([memoryview(head), *views])

    def send_raw(self, head: bytes, payload: Sequence[memoryview] = ()) -> None:
        """An encoded head and its payload buffers (bytes, C-contiguous views): one ``sendmsg`` usually."""
        if not payload:
            self.send_bytes(head)
            return
        with self._send_lock:
            self._sendmsg_all([memoryview(head), *payload])

    def send_bytes(self, frame: bytes) -> None:
        """A frame already encoded whole (a CALL or REPLY without payload): one system call."""
        lock = self._send_lock
        lock.acquire()
        try:
            self.sock.sendall(frame)
        except OSError as exc:
            raise ConnectionClosed(f"send failed: {exc}") from exc
        finally:
            lock.release()

    def send_file_frame(
        self, kind: FrameKind, frame_id: int, header: dict[str, Any], file: IO[bytes], size: int
    ) -> None:
        """One frame whose payload is the next ``size`` bytes of ``file`` (``sendfile`` where it can)."""
        head = encode_frame_head(kind, frame_id, header, size)
        with self._send_lock:
            self._sendmsg_all([memoryview(head)])
            try:
                sent = self.sock.sendfile(file, count=size) if size else 0
            except OSError as exc:
                raise ConnectionClosed(f"send failed: {exc}") from exc
            if sent != size:
                raise ConnectionClosed(f"file shrank while sending: {sent} of {size} bytes")

    def _sendmsg_all(self, views: list[memoryview]) -> None:
        views = [v for v in views if v.nbytes]
        try:
            while views:
                sent = self.sock.sendmsg(views[:_IOV_MAX])
                while sent:
                    if sent >= views[0].nbytes:
                        sent -= views.pop(0).nbytes
                    else:
                        views[0] = views[0][sent:]
                        sent = 0
        except OSError as exc:
            raise ConnectionClosed(f"send failed: {exc}") from exc

    # -- receiving -----------------------------------------------------------------------------

    def _fill(self, need: int) -> None:
        """Make ``need`` (at most the buffer's size) unread bytes available in the buffer."""
        if self._end - self._start >= need:
            return
        if self._start == self._end:  # all read (the usual case between frames): nothing to move
            self._start = self._end = 0
        elif self._start:
            size = self._end - self._start
            self._buf[:size] = self._buf[self._start : self._end]
            self._start, self._end = 0, size
        while self._end - self._start < need:
            n = self._recv_into(self._view[self._end :])
            self._end += n

    def _recv_into(self, view: memoryview) -> int:
        try:
            n = self.sock.recv_into(view)
        except OSError as exc:
            raise ConnectionClosed(f"receive failed: {exc}") from exc
        if n == 0:
            raise ConnectionClosed("peer closed the connection")
        return n

    def _take(self, n: int) -> bytes:
        if n > len(self._buf):
            out = bytearray(n)
            self.recv_into(memoryview(out))
            return bytes(out)
        self._fill(n)
        data = bytes(self._view[self._start : self._start + n])
        self._start += n
        return data

    def recv_frame_head(self) -> tuple[int, int, bytes | bytearray, int]:
        """The next frame's ``(kind, id, header bytes, payload_len)``, the header unparsed (JSON, or
        binary for CALL and REPLY); its payload is still to be read. Usually one ``recv_into`` or none."""
        start = self._start
        if start == self._end:  # all read before (the usual case): one read into the whole buffer
            try:
                got = self.sock.recv_into(self._view)
            except OSError as exc:
                raise ConnectionClosed(f"receive failed: {exc}") from exc
            if not got:
                raise ConnectionClosed("peer closed the connection")
            self._start, self._end, start = 0, got, 0
        if self._end - start < _FIXED:
            self._fill(_FIXED)
            start = self._start
        kind, frame_id, header_len, payload_len = unpack_fixed_header(self._buf, start, self.max_payload)
        start += _FIXED
        end = start + header_len
        if end <= self._end:  # the usual case: the whole head arrived in one read
            self._start = end
            return kind, frame_id, self._buf[start:end], payload_len
        self._start = start
        return kind, frame_id, self._take(header_len), payload_len

    def recv_head(self) -> tuple[FrameHeader, dict[str, Any]]:
        """The next frame's fixed header and JSON header; its payload is still to be read."""
        start = self._start
        if self._end - start < _FIXED:
            self._fill(_FIXED)
            start = self._start
        head = parse_fixed_header(self._view[start : start + _FIXED], self.max_payload)
        start += _FIXED
        end = start + head.header_len
        try:
            if end <= self._end:  # the usual case: the whole head arrived in one read
                self._start = end
                return head, parse_json_header(self._view[start:end])
            self._start = start
            return head, parse_json_header(self._take(head.header_len))
        except BadHeader as exc:  # the frame's head is consumed: its payload is still to be read or skipped
            exc.frame_id, exc.payload_len = head.id, head.payload_len
            raise

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` completely with payload bytes."""
        view = view.cast("B")
        buffered = min(self._end - self._start, view.nbytes)
        if buffered:
            view[:buffered] = self._view[self._start : self._start + buffered]
            self._start += buffered
        got = buffered
        while got < view.nbytes:
            got += self._recv_into(view[got:])

    def recv_bytes(self, n: int) -> bytearray:
        out = bytearray(n)
        self.recv_into(memoryview(out))
        return out

    def discard(self, n: int) -> None:
        """Skip ``n`` payload bytes (a request that failed before its payload was used)."""
        chunk = memoryview(bytearray(min(max(n, 1), _CHUNK)))
        while n:
            part = chunk[: min(n, chunk.nbytes)]
            self.recv_into(part)
            n -= part.nbytes

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
