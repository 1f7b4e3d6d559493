"""tether's native session protocol, sans I/O: what flows after TVM's handshake with ``-tether=1``.

Every message is one frame::

    +------+---------+------+---------+-------------+----------------+---------------+-----------------+
    | "TQ" | version | kind | id      | header_len  | payload_len    | header        | payload         |
    | 2 B  | u8 = 1  | u8   | u32 LE  | u32 LE      | u64 LE         | UTF-8 JSON    | raw bytes       |
    +------+---------+------+---------+-------------+----------------+---------------+-----------------+

- ``kind``: REQUEST (client to server), RESPONSE or ERROR (server to client, same ``id``). A response to
  id 0 is a session-level event (the session timed out, the server is closing it).
- ``header`` is a JSON object: ``{"op": ..., ...}`` for requests, the result for responses,
  ``{"type", "message", "traceback"}`` for errors.
- ``payload`` carries raw bytes the header describes: a file's content (``"size"``), or tensors
  (``"tensors": [{"name", "dtype", "shape", "nbytes"}, ...]`` back to back, C order, little-endian).
  The I/O layer reads it straight into its destination (a file, a tensor buffer) in chunks: nothing is
  pickled, no tensor is copied on the way.

Both lengths are checked from the 20-byte fixed header, before anything else is read: a garbage frame
ends the session with :class:`~tether.errors.RemoteProtocolError` and touches nothing else.

The hot path: binary headers
----------------------------

JSON costs microseconds a frame on each side; an empty call is mostly that. The operations a measurement
loop repeats have a binary form: kind CALL (a request) and REPLY (its answer, same ``id``), whose header is
a 1-byte operation code (:class:`HotOp`) and that operation's fixed little-endian fields, no JSON::

    +----------------------------------+--------+-------------------+-----------------+
    | fixed header, kind CALL or REPLY | op u8  | fields (op's own) | payload         |
    | 20 B, header_len = 1 + fields    | 1 B    | 0..4095 B         | raw bytes       |
    +----------------------------------+--------+-------------------+-----------------+

- ``PING``: no fields, no payload, either way.
- ``RUN``: a loaded model's run (the JSON ``run`` with ``model``, ``inputs``, ``tensors``, ``fill``,
  ``seed``, ``keep``, ``timeout``; not ``shapes``, which stays JSON). Fields, little-endian::

      flags u8 (1 keep, 2 seed, 4 timeout) | fill u8 (0 none, 1 random, 2 zeros, 3 ones) | seed i64 |
      timeout f64 | model str | n u8 | n inputs: name str, then kind u8: 0 a handle (str), 1 inline (tensor)

  where ``str`` is a u8 length and that many UTF-8 bytes, and ``tensor`` a dtype u8 (an index in
  :data:`DTYPE_CODES`), ndim u8 and ndim u64 dims; inline tensors' bytes are the payload, in order.
  Its REPLY: ``run_s f64 | n u8 | n outputs: name str, tensor, and with keep its handle str``; without
  keep the outputs' bytes are the payload, in order.

A failed CALL is answered by an ERROR frame with the usual JSON header (errors are not the hot path): the
same typed errors as its JSON twin. A binary header is bounded by :data:`MAX_BINARY_HEADER`, checked from
the fixed header like any other length. Peers that understand CALL say so in the handshake: the server's
key carries ``-bin=1`` (:data:`BINARY_OPTION`); a client sends CALL frames only to such a server, and a
server answers a client that never sends one exactly as before (JSON requests keep working everywhere).
"""

from __future__ import annotations

import enum
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..errors import BadHeader, FrameTooLarge, LocalProtocolError, RemoteProtocolError

__all__ = [
    "BINARY_OPTION",
    "DTYPE_CODES",
    "DTYPE_SIZES",
    "FIXED_HEADER",
    "HOT_HEAD",
    "MAX_BINARY_HEADER",
    "MAX_HEADER_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_TENSOR_BYTES",
    "FrameHeader",
    "FrameKind",
    "HotOp",
    "TensorDesc",
    "decode_run_call",
    "decode_run_reply",
    "encode_call",
    "encode_frame_head",
    "encode_reply",
    "encode_run_call",
    "encode_run_reply",
    "parse_fixed_header",
    "parse_json_header",
    "ping_call",
    "ping_reply",
    "shape_nbytes",
    "tensor_desc",
    "tensor_descs",
    "unpack_fixed_header",
]

MAGIC: Final = b"TQ"
VERSION: Final = 1
FIXED_HEADER: Final = struct.Struct("<2sBBIIQ")
#: Bound on a frame's JSON header.
MAX_HEADER_BYTES: Final = 1 << 20
#: Bound on a CALL or REPLY frame's binary header (its op byte and fields).
MAX_BINARY_HEADER: Final = 4096
#: The fixed header and the op byte of a CALL or REPLY, packed at once (the whole frame of a ping).
HOT_HEAD: Final = struct.Struct("<2sBBIIQB")
#: The handshake option (``-bin=1`` in the server's key) that says its sessions take CALL frames.
BINARY_OPTION: Final = "bin"
#: Default bound on a frame's payload (a file or a set of tensors); servers may set their own.
MAX_PAYLOAD_BYTES: Final = 16 << 30
#: No tensor description may announce this many bytes (its payload must fit in a frame's u64 length).
MAX_TENSOR_BYTES: Final = 1 << 63

#: Element sizes of the dtypes the protocol carries (numpy's names).
DTYPE_SIZES: Final[dict[str, int]] = {
    "bool": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "float16": 2,
    "bfloat16": 2,
    "int32": 4,
    "uint32": 4,
    "float32": 4,
    "int64": 8,
    "uint64": 8,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
}


class FrameKind(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    ERROR = 3
    #: A request with a binary header (:class:`HotOp` and its fields): the hot path.
    CALL = 4
    #: The answer to a CALL, binary header.
    REPLY = 5


class HotOp(enum.IntEnum):
    """Operation codes of CALL frames (the first byte of their header)."""

    PING = 1
    RUN = 2


#: The dtypes of binary headers, by code (an index here); fixed: codes never change meaning.
DTYPE_CODES: Final = (
    "bool",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "float16",
    "bfloat16",
    "int32",
    "uint32",
    "float32",
    "int64",
    "uint64",
    "float64",
    "complex64",
    "complex128",
)
_DTYPE_CODE: Final = {name: code for code, name in enumerate(DTYPE_CODES)}
_FILLS: Final = (None, "random", "zeros", "ones")
_FILL_CODE: Final = {name: code for code, name in enumerate(_FILLS)}
_RUN_FIXED: Final = struct.Struct("<BBqd")
_F64: Final = struct.Struct("<d")
_KEEP, _SEED, _TIMEOUT = 1, 2, 4


_KINDS: Final = frozenset(int(k) for k in FrameKind)
_BINARY_KINDS: Final = frozenset((FrameKind.CALL, FrameKind.REPLY))
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_decode_json = json.JSONDecoder().decode
_pack_fixed = FIXED_HEADER.pack
_unpack_fixed = FIXED_HEADER.unpack


@dataclass(slots=True)  # not frozen: built once per frame, and frozen dataclasses construct slowly
class FrameHeader:
    kind: int  # a FrameKind value (kept a plain int: this is the hot path)
    id: int
    header_len: int
    payload_len: int


def encode_frame_head(kind: FrameKind, frame_id: int, header: dict[str, Any], payload_len: int = 0) -> bytes:
    """The fixed header and the JSON header of one frame; the payload follows it on the wire."""
    body = _encode_json(header).encode()
    if len(body) > MAX_HEADER_BYTES:
        raise LocalProtocolError(f"frame header of {len(body)} bytes is above {MAX_HEADER_BYTES}")
    if not 0 <= frame_id < 1 << 32 or payload_len < 0:
        raise LocalProtocolError(f"bad frame id {frame_id} or payload length {payload_len}")
    return _pack_fixed(MAGIC, VERSION, kind, frame_id, len(body), payload_len) + body


_pack_hot = HOT_HEAD.pack


def encode_call(op: int, frame_id: int, fields: bytes = b"", payload_len: int = 0) -> bytes:
    """A CALL frame's fixed and binary header (``op``, a :class:`HotOp` value, then its packed ``fields``);
    the payload follows."""
    if len(fields) >= MAX_BINARY_HEADER:
        raise LocalProtocolError(f"binary header of {len(fields) + 1} bytes is above {MAX_BINARY_HEADER}")
    if not 0 <= frame_id < 1 << 32 or payload_len < 0:
        raise LocalProtocolError(f"bad frame id {frame_id} or payload length {payload_len}")
    return _pack_hot(MAGIC, VERSION, _CALL, frame_id, 1 + len(fields), payload_len, op) + fields


def encode_reply(op: int, frame_id: int, fields: bytes = b"", payload_len: int = 0) -> bytes:
    """A REPLY frame's fixed and binary header, answering a CALL of ``op``."""
    if len(fields) >= MAX_BINARY_HEADER:
        raise LocalProtocolError(f"binary header of {len(fields) + 1} bytes is above {MAX_BINARY_HEADER}")
    return _pack_hot(MAGIC, VERSION, _CALL + 1, frame_id, 1 + len(fields), payload_len, op) + fields


_unpack_fixed_from = FIXED_HEADER.unpack_from
_CALL: Final = int(FrameKind.CALL)


def unpack_fixed_header(
    data: bytes | bytearray | memoryview, offset: int = 0, max_payload: int = MAX_PAYLOAD_BYTES
) -> tuple[int, int, int, int]:
    """``(kind, id, header_len, payload_len)`` of the fixed header at ``offset``: the hot path's
    :func:`parse_fixed_header` (no object built, one combined check); the same errors for a bad one."""
    magic, version, kind, frame_id, header_len, payload_len = _unpack_fixed_from(data, offset)
    if (
        magic == MAGIC
        and version == VERSION
        and payload_len <= max_payload
        and (
            (1 <= header_len <= MAX_BINARY_HEADER and _CALL <= kind <= _CALL + 1)
            or (2 <= header_len <= MAX_HEADER_BYTES and 1 <= kind < _CALL)
        )
    ):
        return kind, frame_id, header_len, payload_len
    parse_fixed_header(bytes(data[offset : offset + FIXED_HEADER.size]), max_payload)  # raises the reason
    raise AssertionError("unreachable: parse_fixed_header accepted what unpack_fixed_header refused")


_PING_FRAME: Final = struct.Struct("<4sI13s")  # a ping's CALL or REPLY: all constant but the id
_pack_ping = _PING_FRAME.pack
_CALL_HEAD, _PING_TAIL = (
    _pack_hot(MAGIC, VERSION, FrameKind.CALL, 0, 1, 0, HotOp.PING)[:4],
    b"\x01\0\0\0" + bytes(8) + b"\x01",
)
_REPLY_HEAD = _pack_hot(MAGIC, VERSION, FrameKind.REPLY, 0, 1, 0, HotOp.PING)[:4]


def ping_call(frame_id: int) -> bytes:
    """``encode_call(HotOp.PING, frame_id)`` in one small pack (``frame_id`` already a u32)."""
    return _pack_ping(_CALL_HEAD, frame_id, _PING_TAIL)


def ping_reply(frame_id: int) -> bytes:
    """``encode_reply(HotOp.PING, frame_id)`` in one small pack."""
    return _pack_ping(_REPLY_HEAD, frame_id, _PING_TAIL)


def parse_fixed_header(data: bytes | bytearray | memoryview, max_payload: int = MAX_PAYLOAD_BYTES) -> FrameHeader:
    """Validate the 20-byte fixed header; raise before any of the frame's body is read."""
    magic, version, kind, frame_id, header_len, payload_len = _unpack_fixed(data)
    if magic != MAGIC:
        raise RemoteProtocolError(f"not a tether session frame (magic {bytes(magic)!r})")
    if version != VERSION:
        raise RemoteProtocolError(f"session protocol version {version}, this side speaks {VERSION}")
    if kind not in _KINDS:
        raise RemoteProtocolError(f"unknown frame kind {kind}")
    if kind in _BINARY_KINDS:
        if not 1 <= header_len <= MAX_BINARY_HEADER:
            raise FrameTooLarge(header_len, MAX_BINARY_HEADER)
    elif not 2 <= header_len <= MAX_HEADER_BYTES:
        raise FrameTooLarge(header_len, MAX_HEADER_BYTES)
    if payload_len > max_payload:
        raise FrameTooLarge(payload_len, max_payload)
    return FrameHeader(kind, frame_id, header_len, payload_len)


def parse_json_header(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The JSON object of a frame header; :class:`BadHeader` when it is not one.

    Python's own limits stand for malice here: an integer of more than 4,300 digits raises ValueError,
    nesting deeper than the interpreter's recursion limit RecursionError; both are the peer's error.
    """
    if data == b"{}":  # most responses: no need to run the decoder
        return {}
    try:
        value = _decode_json(bytes(data).decode())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError, int digit limit
        raise BadHeader(f"frame header is not usable JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise BadHeader("frame header must be a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class TensorDesc:
    """One tensor of a payload: ``nbytes`` raw little-endian C-order bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes}


def tensor_desc(raw: Any) -> TensorDesc:
    """Validate one tensor description from a peer."""
    if not isinstance(raw, dict):
        raise RemoteProtocolError("a tensor description must be an object")
    name, dtype, shape = raw.get("name", ""), raw.get("dtype"), raw.get("shape")
    if not isinstance(name, str):
        raise RemoteProtocolError("tensor name must be a string")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # a list or an object is not hashable
        raise RemoteProtocolError(f"unsupported dtype {dtype!r}; known: {', '.join(DTYPE_SIZES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RemoteProtocolError(f"tensor shape must be a list of non-negative ints, not {shape!r:.200}")
    nbytes = shape_nbytes(shape, DTYPE_SIZES[dtype])
    if nbytes is None:
        raise RemoteProtocolError(f"tensor {name!r:.80} of shape {shape!r:.200} has {MAX_TENSOR_BYTES} bytes or more")
    if raw.get("nbytes", nbytes) != nbytes:
        raise RemoteProtocolError(f"tensor {name!r:.80}: nbytes {raw.get('nbytes')!r:.40} != {nbytes} for its shape")
    return TensorDesc(name, dtype, tuple(shape))


def shape_nbytes(shape: Sequence[int], itemsize: int, limit: int = MAX_TENSOR_BYTES) -> int | None:
    """Bytes of a tensor of ``shape``, or None when that is ``limit`` or more: the product is checked as it
    grows (a peer's shape of a few thousand-digit dims must not cost a multiplication of a million digits,
    nor an int too long to print)."""
    if 0 in shape:
        return 0
    nbytes = itemsize
    for dim in shape:
        nbytes *= dim
        if nbytes >= limit:
            return None
    return nbytes


def tensor_descs(raw: Any, payload_len: int) -> list[TensorDesc]:
    """Validate a frame's ``"tensors"`` list against its payload length."""
    if raw is None:
        if payload_len:
            raise RemoteProtocolError(f"a frame with no tensors has {payload_len} payload bytes")
        return []
    if not isinstance(raw, list):
        raise RemoteProtocolError("'tensors' must be a list")
    descs = [tensor_desc(item) for item in raw]
    total = sum(d.nbytes for d in descs)
    if total != payload_len:
        raise RemoteProtocolError(f"tensors need {total} payload bytes, the frame has {payload_len}")
    return descs


# -- RUN's binary fields -----------------------------------------------------------------------------


def _str(text: str) -> bytes | None:
    data = text.encode()
    return bytes((len(data),)) + data if len(data) < 256 else None


def _tensor_fields(dtype: str, shape: Sequence[int]) -> bytes | None:
    code = _DTYPE_CODE.get(dtype)
    if code is None or len(shape) > 255 or not all(0 <= d < 1 << 64 for d in shape):
        return None
    return struct.pack(f"<BB{len(shape)}Q", code, len(shape), *shape)


def encode_run_call(
    model: str,
    refs: dict[str, str],
    inline: Sequence[TensorDesc],
    *,
    fill: str | None = None,
    seed: int | None = None,
    keep: bool = False,
    timeout: float | None = None,
) -> bytes | None:
    """A RUN's fields (what follows its op byte), or None when the request does not fit a binary header
    (a name of 256 bytes or more, over 255 inputs, a seed past i64, an unknown fill): send it as JSON."""
    if fill not in _FILL_CODE or len(refs) + len(inline) > 255:
        return None
    if seed is not None and not -(1 << 63) <= seed < 1 << 63:
        return None
    flags = (_KEEP if keep else 0) | (_SEED if seed is not None else 0) | (_TIMEOUT if timeout is not None else 0)
    parts: list[bytes | None] = [_RUN_FIXED.pack(flags, _FILL_CODE[fill], seed or 0, timeout or 0.0), _str(model)]
    parts.append(bytes((len(refs) + len(inline),)))
    for name, handle in refs.items():
        parts += [_str(name), b"\x00", _str(handle)]
    for desc in inline:
        parts += [_str(desc.name), b"\x01", _tensor_fields(desc.dtype, desc.shape)]
    if any(part is None for part in parts):
        return None
    fields = b"".join(part for part in parts if part is not None)
    return fields if len(fields) < MAX_BINARY_HEADER else None


class _Reader:
    """Reads a binary header's fields; a truncated or malformed one is the peer's RemoteProtocolError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | bytearray, pos: int) -> None:
        self.data, self.pos = data, pos

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        try:
            values = fmt.unpack_from(self.data, self.pos)
        except struct.error:
            raise RemoteProtocolError("binary header ends inside a field") from None
        self.pos += fmt.size
        return values

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise RemoteProtocolError("binary header ends inside a field")
        self.pos += 1
        return self.data[self.pos - 1]

    def text(self) -> str:
        n = self.byte()
        end = self.pos + n
        if end > len(self.data):
            raise RemoteProtocolError("binary header ends inside a string")
        try:
            text = bytes(self.data[self.pos : end]).decode()
        except UnicodeDecodeError:
            raise RemoteProtocolError("a binary header's string is not UTF-8") from None
        self.pos = end
        return text

    def tensor(self, name: str) -> dict[str, Any]:
        code, ndim = self.byte(), self.byte()
        if code >= len(DTYPE_CODES):
            raise RemoteProtocolError(f"unknown dtype code {code}")
        shape = list(self.unpack(struct.Struct(f"<{ndim}Q")))
        return {"name": name, "dtype": DTYPE_CODES[code], "shape": shape}

    def end(self) -> None:
        if self.pos != len(self.data):
            raise RemoteProtocolError(f"{len(self.data) - self.pos} bytes past a binary header's fields")


def decode_run_call(raw: bytes | bytearray) -> dict[str, Any]:
    """A RUN CALL's header (op byte first) as the JSON ``run`` request it stands for: ``model``,
    ``inputs`` (handles by name), ``tensors`` (inline descriptions, checked later against the payload
    like JSON's), ``fill``, ``seed``, ``keep``, ``timeout``. RemoteProtocolError when malformed."""
    reader = _Reader(raw, 1)
    flags, fill, seed, timeout = reader.unpack(_RUN_FIXED)
    if fill >= len(_FILLS):
        raise RemoteProtocolError(f"unknown fill code {fill}")
    header: dict[str, Any] = {
        "op": "run",
        "model": reader.text(),
        "fill": _FILLS[fill],
        "seed": seed if flags & _SEED else None,
        "keep": bool(flags & _KEEP),
    }
    if flags & _TIMEOUT:
        header["timeout"] = timeout
    refs: dict[str, str] = {}
    tensors: list[dict[str, Any]] = []
    for _ in range(reader.byte()):
        name, kind = reader.text(), reader.byte()
        if kind == 0:
            refs[name] = reader.text()
        elif kind == 1:
            tensors.append(reader.tensor(name))
        else:
            raise RemoteProtocolError(f"unknown input kind {kind}")
    reader.end()
    header["inputs"] = refs
    if tensors:
        header["tensors"] = tensors
    return header


def encode_run_reply(result: dict[str, Any]) -> bytes | None:
    """A RUN REPLY's fields from the JSON result of ``run`` (``run_s`` and ``tensors``, or ``outputs``
    with their handles), or None when it does not fit a binary header (then it goes as JSON)."""
    kept = "outputs" in result
    outputs = result["outputs"] if kept else result["tensors"]
    if len(outputs) > 255:
        return None
    parts: list[bytes | None] = [_F64.pack(float(result.get("run_s", 0.0))), bytes((len(outputs),))]
    for out in outputs:
        parts += [_str(out["name"]), _tensor_fields(out["dtype"], out["shape"])]
        if kept:
            parts.append(_str(out["tensor"]))
    if any(part is None for part in parts):
        return None
    fields = b"".join(part for part in parts if part is not None)
    return fields if len(fields) < MAX_BINARY_HEADER else None


def decode_run_reply(raw: bytes | bytearray, keep: bool) -> dict[str, Any]:
    """A RUN REPLY's header (op byte first) as the JSON result it stands for."""
    reader = _Reader(raw, 1)
    (run_s,) = reader.unpack(_F64)
    outputs = []
    for _ in range(reader.byte()):
        out = reader.tensor(reader.text())
        if keep:
            out["tensor"] = reader.text()
        outputs.append(out)
    reader.end()
    return {"run_s": run_s, "outputs" if keep else "tensors": outputs}
