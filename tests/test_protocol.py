"""Codecs: golden bytes from tvm-wire-protocol.md, and round trips split at arbitrary byte boundaries."""

from __future__ import annotations

import itertools
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from tether.protocol import (
    RPC_MAGIC,
    RPC_TRACKER_MAGIC,
    Cancel,
    FrameDecoder,
    GetPendingMatchkeys,
    Grant,
    HandshakeCode,
    HandshakeDecoder,
    HandshakeReplyDecoder,
    PeerKey,
    Ping,
    Put,
    Request,
    RequestOptions,
    SessionEvent,
    Stop,
    Summary,
    TrackerClientStream,
    TrackerServerStream,
    UpdateInfo,
    Withdraw,
    decode_message,
    encode_frame,
    encode_handshake,
    encode_handshake_reply,
    encode_message,
    encode_value,
    format_peer_key,
    parse_peer_key,
    parse_request_reply,
)
from tether.protocol.session import (
    FIXED_HEADER,
    MAX_BINARY_HEADER,
    FrameKind,
    encode_frame_head,
    parse_fixed_header,
)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``data`` at the given offsets (sorted, deduplicated, clipped)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- golden bytes ---------------------------------------------------------------------------------


def test_magics_are_tvms() -> None:
    assert struct.pack("<i", RPC_MAGIC) == bytes.fromhex("71f20f00")
    assert RPC_TRACKER_MAGIC == 0x2F271
    assert [c.value for c in HandshakeCode] == [RPC_MAGIC, RPC_MAGIC + 1, RPC_MAGIC + 2]


@pytest.mark.parametrize(
    ("msg", "wire"),
    [
        (Ping(), b"[1]"),
        (Stop("k"), b'[2, "k"]'),
        (Put("foo", 9090, "foo:0.5"), b'[3, "foo", [9090, "foo:0.5"], null]'),
        (Put("foo", 9090, "foo:0.5", "10.0.0.1"), b'[3, "foo", [9090, "foo:0.5"], "10.0.0.1"]'),
        (Request("foo", "", 1), b'[4, "foo", "", 1]'),
        (UpdateInfo({"key": "server:foo", "addr": [None, 9090]}), b'[5, {"key": "server:foo", "addr": [null, 9090]}]'),
        (Summary(), b"[6]"),
        (GetPendingMatchkeys(), b"[7]"),
        (Cancel("r1"), b'[101, "r1"]'),
        (Withdraw("k:1"), b'[103, "k:1"]'),
        (
            Put("k", 9090, "k:1", None, frozenset({"tvm", "tether"}), {"soc": "x"}),
            b'[3, "k", [9090, "k:1"], null, {"protocols": ["tether", "tvm"], "labels": {"soc": "x"}}]',
        ),
    ],
)
def test_messages_encode_as_tvm_does(msg: object, wire: bytes) -> None:
    frame = encode_message(msg)  # type: ignore[arg-type]
    assert frame == struct.pack("<i", len(wire)) + wire
    assert decode_message(wire) == msg


def test_replies_are_tvms_exact_bytes() -> None:
    assert encode_value(0) == b"\x01\x00\x00\x00" + b"0"
    grant = b'[0, ["127.0.0.1", 29555, "foo:0.5"]]'
    assert encode_value([0, ["127.0.0.1", 29555, "foo:0.5"]])[4:] == grant
    summary = (
        b'[0, {"queue_info": {"foo": {"free": 3, "pending": 0}}, '
        b'"server_info": [{"key": "server:foo", "addr": ["127.0.0.1", 29555]}]}]'
    )
    value = [
        0,
        {
            "queue_info": {"foo": {"free": 3, "pending": 0}},
            "server_info": [{"key": "server:foo", "addr": ["127.0.0.1", 29555]}],
        },
    ]
    assert encode_value(value)[4:] == summary


def test_non_ascii_keys_stay_literal_and_lengths_count_bytes() -> None:
    # Java and C++ servers search the raw reply text for their matchkey; TVM counts characters.
    frame = encode_value(["clé:0.1"])
    assert "clé:0.1".encode() in frame
    assert struct.unpack("<i", frame[:4])[0] == len(frame) - 4 == len('["clé:0.1"]'.encode())
    hello = encode_handshake("client:clé")
    assert struct.unpack("<i", hello[4:8])[0] == len("client:clé".encode())


def test_put_variants_from_every_server_kind() -> None:
    assert decode_message(b'[3, "k", [9090, "k:1"]]') == Put("k", 9090, "k:1")  # 3 elements
    assert decode_message(b'[3, "k", [9090, "k:1"], null]') == Put("k", 9090, "k:1")
    assert decode_message(b'[3, "k", ["9090", "k:1"], "1.2.3.4"]') == Put("k", 9090, "k:1", "1.2.3.4")


def test_update_info_keeps_extra_fields_and_string_ports() -> None:
    msg = decode_message(b'[5, {"key": "server:k", "addr": [null, "9090"], "x": [1]}]')
    assert msg == UpdateInfo({"key": "server:k", "addr": [None, "9090"], "x": [1]})


def test_tether_request_options_round_trip() -> None:
    opts = RequestOptions("r1", "tether", {"gpu": "a100"}, 2.5, "alice")
    msg = Request("k", "alice", 3, opts)
    assert decode_message(encode_message(msg)[4:]) == msg
    assert decode_message(b'[4, "k", "", 1, null]') == Request("k", "", 1)


def test_ping_hello_and_session_event() -> None:
    assert decode_message(b'[1, {"hello": true}]') == Ping(hello=True)
    assert decode_message(b'[1, "whatever"]') == Ping()
    ev = SessionEvent("start", "k:1", "127.0.0.1:5000")
    assert decode_message(encode_message(ev)[4:]) == ev


@pytest.mark.parametrize(
    "wire",
    [
        b"not json",
        b"{}",
        b"[]",
        b"[99]",
        b'["1"]',
        b"[true]",
        b'[3, "k", [70000, "m"]]',
        b'[3, "k", 9090]',
        b'[3, 1, [9090, "m"]]',
        b'[4, "k", "", "high"]',
        b'[4, "k", "", 1, {"timeout": -1}]',
        b'[4, "k", "", 1, {"labels": {"a": 1}}]',
        b"[5, []]",
        b'[5, {"addr": [1, 2, 3]}]',
        b"[2]",
        b'[102, {"event": "maybe", "matchkey": "m"}]',
        b"\xff\xfe",
        # found by bench/fuzz.py: each was a ValueError or OverflowError traceback in the tracker's log
        '[3, "k", ["²", "m"]]'.encode(),  # "²".isdigit() holds, int("²") raises
        '[3, "k", ["٣", "m"]]'.encode(),  # a port is ASCII digits
        b'[3, "k", ["' + b"9" * 5000 + b'", "m"]]',  # int() of over 4,300 digits raises
        b'[4, "k", "", ' + b"9" * 400 + b"]",  # an int no float holds: math.isfinite raised OverflowError
        b'[4, "k", "", 1, {"timeout": ' + b"9" * 400 + b"}]",
        b'[4, "k", "", 1, {"unservable_after": -' + b"9" * 400 + b"}]",
    ],
)
def test_bad_messages_raise_remote_protocol_error(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(wire)


def test_ports_as_strings_and_huge_numbers_that_fit() -> None:
    assert decode_message(b'[3, "k", [" 9090 ", "m"]]') == Put("k", 9090, "m")  # C++/Java servers send a string
    assert decode_message(b'[4, "k", "", 1' + b"0" * 300 + b"]") == Request("k", "", 10**300)  # fits a float
    with pytest.raises(RemoteProtocolError, match="bad port"):
        parse_request_reply([0, ["h", "²", "m"]])


def test_request_replies() -> None:
    assert parse_request_reply([0, ["h", 1, "m"]]) == Grant("h", 1, "m")
    assert parse_request_reply([0, ["h", 1, "m"], {"id": "x"}]) == Grant("h", 1, "m", {"id": "x"})
    assert parse_request_reply([-1, {"error": "timeout"}]) == {"error": "timeout"}
    with pytest.raises(RemoteProtocolError):
        parse_request_reply(0)


# -- frames ---------------------------------------------------------------------------------------


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.lists(st.integers(0, 10_000), max_size=20))
def test_frames_survive_any_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    decoder = FrameDecoder(limit=1000)
    out: list[bytes] = []
    for piece in chunks(stream, cuts):
        out.extend(decoder.feed(piece))
    assert out == payloads
    assert not decoder.incomplete


@pytest.mark.parametrize("length", [0, -1, 1001, 2**31 - 1])
def test_frame_length_checked_from_header_alone(length: int) -> None:
    decoder = FrameDecoder(limit=1000)
    with pytest.raises(FrameTooLarge):
        decoder.feed(struct.pack("<i", length))  # no payload needed to refuse it


def test_tracker_stream_accepts_magic_and_message_in_one_chunk() -> None:
    stream = TrackerServerStream()
    msgs = stream.receive_data(struct.pack("<i", RPC_TRACKER_MAGIC) + encode_message(Ping()))
    assert msgs == [Ping()]
    assert stream.data_to_send() == struct.pack("<i", RPC_TRACKER_MAGIC)
    assert stream.data_to_send() == b""


@given(
    st.lists(st.sampled_from([Ping(), Summary(), GetPendingMatchkeys(), Put("k", 1, "k:1")]), max_size=6),
    st.lists(st.integers(0, 500)),
)
def test_tracker_stream_any_chunking(msgs: list[object], cuts: list[int]) -> None:
    wire = struct.pack("<i", RPC_TRACKER_MAGIC) + b"".join(encode_message(m) for m in msgs)  # type: ignore[arg-type]
    stream = TrackerServerStream()
    got: list[object] = []
    for piece in chunks(wire, cuts):
        got.extend(stream.receive_data(piece))
    assert got == msgs
    assert not stream.incomplete


def test_tracker_stream_wrong_magic() -> None:
    with pytest.raises(RemoteProtocolError, match="magic"):
        TrackerServerStream().receive_data(struct.pack("<i", RPC_MAGIC))


def test_tracker_client_stream_rejects_a_non_tracker() -> None:
    client = TrackerClientStream()
    with pytest.raises(RemoteProtocolError, match="not an RPC tracker"):
        client.receive_data(b"HTTP")
    client = TrackerClientStream()
    values = client.receive_data(struct.pack("<i", RPC_TRACKER_MAGIC) + encode_value([0, {"a": 1}]))
    assert client.connected and values == [[0, {"a": 1}]]


# -- handshake ------------------------------------------------------------------------------------


def test_handshake_golden_bytes() -> None:
    assert encode_handshake("client:foo") == bytes.fromhex("71f20f00") + b"\x0a\x00\x00\x00client:foo"
    assert encode_handshake_reply(HandshakeCode.MISMATCH) == struct.pack("<i", RPC_MAGIC + 2)
    assert encode_handshake_reply(HandshakeCode.SUCCESS, "server:foo") == (
        struct.pack("<i", RPC_MAGIC) + struct.pack("<i", 10) + b"server:foo"
    )
    with pytest.raises(LocalProtocolError):
        encode_handshake_reply(HandshakeCode.SUCCESS)


@given(st.text(min_size=1, max_size=100), st.binary(max_size=20), st.lists(st.integers(0, 200)))
def test_handshake_any_chunking_keeps_trailing_bytes(key: str, tail: bytes, cuts: list[int]) -> None:
    wire = encode_handshake(key) + tail
    decoder = HandshakeDecoder()
    got = None
    for piece in chunks(wire, cuts):
        if got is None:
            got = decoder.feed(piece)
        else:
            decoder.unused += piece
    assert got == key
    assert decoder.unused == tail


@given(st.sampled_from(list(HandshakeCode)), st.text(min_size=1, max_size=50), st.lists(st.integers(0, 100)))
def test_handshake_reply_any_chunking(code: HandshakeCode, key: str, cuts: list[int]) -> None:
    wire = encode_handshake_reply(code, key)
    decoder = HandshakeReplyDecoder()
    reply = None
    for piece in chunks(wire, cuts):
        assert reply is None
        reply = decoder.feed(piece)
    assert reply is not None and reply.code is code
    assert reply.key == (key if code is HandshakeCode.SUCCESS else None)


def test_handshake_bad_input() -> None:
    with pytest.raises(RemoteProtocolError, match="wrong magic"):
        HandshakeDecoder().feed(struct.pack("<i", RPC_TRACKER_MAGIC))
    with pytest.raises(FrameTooLarge):
        HandshakeDecoder().feed(struct.pack("<ii", RPC_MAGIC, 1 << 30))
    with pytest.raises(RemoteProtocolError, match="UTF-8"):
        HandshakeDecoder().feed(struct.pack("<ii", RPC_MAGIC, 2) + b"\xff\xfe")
    with pytest.raises(RemoteProtocolError, match="unknown handshake reply"):
        HandshakeReplyDecoder().feed(struct.pack("<i", 7))


# -- keys -----------------------------------------------------------------------------------------


def test_keys_with_colons_and_options() -> None:
    key = parse_peer_key("client:127.0.0.1:5555:0.123 -timeout=1.5 -tether=1")
    assert (key.role, key.name) == ("client", "127.0.0.1:5555:0.123")
    assert key.session_timeout == 1.5 and key.is_tether
    assert parse_peer_key("client:k -timeout=0").session_timeout is None  # TVM: 0 means no limit
    assert parse_peer_key("server:k").options == {}
    assert format_peer_key("client", "a:b", {"timeout": "10"}) == "client:a:b -timeout=10"


def test_empty_names_are_read_as_tvms_server_reads_them() -> None:
    """``tvm.rpc.connect(host, port)`` sends ``client:`` (``tvm.rpc.Server()``'s key is ""), with a session
    timeout ``client: -timeout=10``: the name is empty and the timeout an option, not the name."""
    assert parse_peer_key("client:") == PeerKey("client", "", {}, "client:")
    key = parse_peer_key("client: -timeout=10")
    assert (key.name, key.session_timeout) == ("", 10.0)
    assert parse_peer_key("client:   -timeout=2.5 -tether=1").is_tether
    assert format_peer_key("server", "") == "server:"
    assert format_peer_key("client", "", {"timeout": "10"}) == "client: -timeout=10"


@pytest.mark.parametrize("raw", ["", "   ", "foo:bar", "nokey", "client:k junk", ":k", "client -timeout=1"])
def test_bad_keys(raw: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_peer_key(raw)


def test_bad_timeout_option() -> None:
    with pytest.raises(RemoteProtocolError):
        _ = parse_peer_key("client:k -timeout=soon").session_timeout


_token = st.text(st.characters(blacklist_categories=["Z", "C"], blacklist_characters="="), min_size=1, max_size=12)


@given(
    st.sampled_from(["client", "server"]),
    _token,
    st.dictionaries(_token.filter(lambda s: s[0] != "-"), _token, max_size=3),
)
def test_key_round_trip(role: str, name: str, options: dict[str, str]) -> None:
    raw = format_peer_key(role, name, options)
    key = parse_peer_key(raw)
    assert (key.role, key.name, key.options, key.raw) == (role, name, options, raw)
    assert raw[7:].split()[0] == name  # how TVM's proxy reads the same string


def test_json_dumps_default_is_tvm_compatible() -> None:
    assert json.dumps([0, ["a", 1, "b"]]).encode() == encode_value([0, ["a", 1, "b"]])[4:]


# -- native session frames ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        {"name": "x", "dtype": {"float32": 1}, "shape": [2]},  # unhashable: was a TypeError
        {"name": "x", "dtype": ["float32"], "shape": [2]},
        {"name": "x", "dtype": "float32", "shape": [2, int("9" * 4300)]},  # its byte count could not be printed
        {"name": "x", "dtype": "float32", "shape": [1 << 61]},  # 2**63 bytes
        {"name": 1, "dtype": "float32", "shape": [2]},
        {"name": "x", "dtype": "float32", "shape": [True]},
        {"name": "x", "dtype": "float32", "shape": [2], "nbytes": 9},
    ],
)
def test_bad_tensor_descriptions_are_protocol_errors(raw: dict[str, object]) -> None:
    from tether.protocol.session import tensor_desc

    with pytest.raises(RemoteProtocolError):
        tensor_desc(raw)


def test_a_shape_of_huge_dims_is_refused_without_multiplying_them() -> None:
    import time

    from tether.protocol.session import MAX_TENSOR_BYTES, shape_nbytes, tensor_descs

    huge = [int("9" * 4000)] * 200  # the product has 800,000 digits: seconds of bignum arithmetic
    started = time.perf_counter()
    with pytest.raises(RemoteProtocolError, match="or more"):
        tensor_descs([{"name": "x", "dtype": "int8", "shape": huge}], 0)
    assert time.perf_counter() - started < 0.5
    assert shape_nbytes([2, 3], 4) == 24
    assert shape_nbytes([0, *huge], 4) == 0  # an empty tensor, whatever its other dims
    assert shape_nbytes([1 << 61], 4) is None
    assert shape_nbytes([(1 << 61) - 1], 4) == MAX_TENSOR_BYTES - 4
    assert shape_nbytes([3], 4, limit=12) is None


# -- the hot path: CALL and REPLY frames with binary headers ------------------------------------------


def test_binary_call_and_reply_round_trip() -> None:
    from tether.protocol.session import HotOp, encode_call, encode_reply, unpack_fixed_header

    call = encode_call(HotOp.PING, 77)
    assert len(call) == FIXED_HEADER.size + 1
    assert unpack_fixed_header(call) == (FrameKind.CALL, 77, 1, 0)
    head = parse_fixed_header(call[: FIXED_HEADER.size])
    assert (head.kind, head.id, head.header_len, head.payload_len) == (FrameKind.CALL, 77, 1, 0)
    assert call[FIXED_HEADER.size] == HotOp.PING
    reply = encode_reply(HotOp.PING, 77, b"\x01\x02", payload_len=5)
    assert unpack_fixed_header(reply) == (FrameKind.REPLY, 77, 3, 5)
    assert reply[FIXED_HEADER.size :] == b"\x01\x01\x02"
    # a JSON frame reads the same through both parsers
    json_frame = encode_frame_head(FrameKind.REQUEST, 9, {"op": "ping"})
    assert unpack_fixed_header(json_frame) == (FrameKind.REQUEST, 9, len(json_frame) - FIXED_HEADER.size, 0)
    with pytest.raises(LocalProtocolError):
        encode_call(HotOp.PING, 1, b"x" * MAX_BINARY_HEADER)
    with pytest.raises(LocalProtocolError):
        encode_call(HotOp.PING, 1 << 32)


@pytest.mark.parametrize(
    ("kind", "header_len", "payload_len", "error"),
    [
        (FrameKind.CALL, 0, 0, FrameTooLarge),  # a binary header has at least its op byte
        (FrameKind.CALL, MAX_BINARY_HEADER + 1, 0, FrameTooLarge),
        (FrameKind.REPLY, MAX_BINARY_HEADER + 1, 0, FrameTooLarge),
        (FrameKind.CALL, 1, 1 << 40, FrameTooLarge),  # over the payload limit, from the fixed header
        (FrameKind.REQUEST, 1, 0, FrameTooLarge),  # a JSON header is at least "{}"
        (6, 1, 0, RemoteProtocolError),  # unknown kind
        (0, 1, 0, RemoteProtocolError),
    ],
)
def test_malformed_binary_frames_get_the_same_typed_errors(
    kind: int, header_len: int, payload_len: int, error: type[Exception]
) -> None:
    from tether.protocol.session import unpack_fixed_header

    data = FIXED_HEADER.pack(b"TQ", 1, kind, 3, header_len, payload_len)
    with pytest.raises(error):
        parse_fixed_header(data, 1 << 30)
    with pytest.raises(error):
        unpack_fixed_header(data, 0, 1 << 30)


@given(st.binary(min_size=20, max_size=20))
def test_the_hot_parser_agrees_with_the_full_one(data: bytes) -> None:
    """Any 20 bytes: :func:`unpack_fixed_header` accepts exactly what :func:`parse_fixed_header` accepts,
    with the same fields, and raises the same error type otherwise."""
    from tether.protocol.session import unpack_fixed_header

    try:
        head = parse_fixed_header(data, 1 << 30)
    except RemoteProtocolError as exc:
        with pytest.raises(type(exc)):
            unpack_fixed_header(data, 0, 1 << 30)
        return
    assert unpack_fixed_header(b"pad" + data, 3, 1 << 30) == (head.kind, head.id, head.header_len, head.payload_len)


def test_run_fields_round_trip() -> None:
    from tether.protocol.session import TensorDesc, decode_run_call, encode_run_call

    inline = [TensorDesc("x", "float32", (2, 3)), TensorDesc("mask", "bool", ())]
    fields = encode_run_call("m1", {"y": "t4"}, inline, fill="random", seed=-5, keep=True, timeout=2.5)
    assert fields is not None
    header = decode_run_call(b"\x02" + fields)
    assert header == {
        "op": "run",
        "model": "m1",
        "fill": "random",
        "seed": -5,
        "keep": True,
        "timeout": 2.5,
        "inputs": {"y": "t4"},
        "tensors": [
            {"name": "x", "dtype": "float32", "shape": [2, 3]},
            {"name": "mask", "dtype": "bool", "shape": []},
        ],
    }
    plain = decode_run_call(b"\x02" + (encode_run_call("m2", {}, []) or b""))
    assert plain == {"op": "run", "model": "m2", "fill": None, "seed": None, "keep": False, "inputs": {}}
    # what a binary header cannot say goes as JSON instead
    assert encode_run_call("m" * 256, {}, []) is None
    assert encode_run_call("m1", {}, [], seed=1 << 63) is None
    assert encode_run_call("m1", {}, [], fill="gaussian") is None


def test_run_reply_fields_round_trip() -> None:
    from tether.protocol.session import decode_run_reply, encode_run_reply

    tensors = [{"name": "y", "dtype": "float16", "shape": [1, 1000], "nbytes": 2000}]
    fields = encode_run_reply({"tensors": tensors, "run_s": 0.25})
    assert fields is not None
    got = decode_run_reply(b"\x02" + fields, keep=False)
    assert got == {"run_s": 0.25, "tensors": [{"name": "y", "dtype": "float16", "shape": [1, 1000]}]}
    kept = [{"name": "y", "dtype": "int64", "shape": [3], "nbytes": 24, "tensor": "t9"}]
    fields = encode_run_reply({"outputs": kept, "run_s": 1.0})
    assert fields is not None
    got = decode_run_reply(b"\x02" + fields, keep=True)
    assert got == {"run_s": 1.0, "outputs": [{"name": "y", "dtype": "int64", "shape": [3], "tensor": "t9"}]}


@pytest.mark.parametrize(
    "raw",
    [
        b"\x02",  # no fields at all
        b"\x02" + struct.pack("<BBqd", 0, 0, 0, 0.0),  # ends before the model's name
        b"\x02" + struct.pack("<BBqd", 0, 9, 0, 0.0) + b"\x02m1\x00",  # unknown fill code
        b"\x02" + struct.pack("<BBqd", 0, 0, 0, 0.0) + b"\x05m1",  # a string longer than the header
        b"\x02" + struct.pack("<BBqd", 0, 0, 0, 0.0) + b"\x02\xff\xfe\x00",  # not UTF-8
        b"\x02" + struct.pack("<BBqd", 0, 0, 0, 0.0) + b"\x02m1\x01\x01x\x07",  # unknown input kind
        b"\x02" + struct.pack("<BBqd", 0, 0, 0, 0.0) + b"\x02m1\x01\x01x\x01\x63\x00",  # unknown dtype code
        b"\x02" + struct.pack("<BBqd", 0, 0, 0, 0.0) + b"\x02m1\x01\x01x\x01\x09\x02\x01",  # dims cut short
        b"\x02" + struct.pack("<BBqd", 0, 0, 0, 0.0) + b"\x02m1\x00extra",  # bytes past the fields
    ],
)
def test_malformed_run_fields_are_the_peers_protocol_error(raw: bytes) -> None:
    from tether.protocol.session import decode_run_call

    with pytest.raises(RemoteProtocolError):
        decode_run_call(raw)


@given(st.binary(max_size=80))
def test_any_run_fields_decode_or_raise_a_protocol_error(data: bytes) -> None:
    from tether.protocol.session import decode_run_call

    try:
        header = decode_run_call(b"\x02" + data)
    except RemoteProtocolError:
        return  # the peer's error; anything else (IndexError, struct.error) would fail here
    assert header["op"] == "run" and isinstance(header["model"], str)
