"""The fuzzer of ``bench/fuzz.py`` in a bounded run: every parser with a fixed seed, no crash and no hang;
the inputs that once crashed a parser; and live servers fed malformed input over sockets, which must still
serve honest requests and log no traceback."""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tether.protocol.constants import RPC_TRACKER_MAGIC

pytestmark = pytest.mark.timeout(180)

SEED = 20240601
#: Inputs per target: a few seconds each on a loaded two-CPU machine.
INPUTS = 3000
#: Inputs per live target.
LIVE_INPUTS = 150


def _load_fuzz() -> ModuleType:
    """``bench/fuzz.py`` as a module (bench scripts are not a package; they run as ``python bench/x.py``)."""
    name = "tether_bench_fuzz"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()


def _report(result: object) -> str:
    findings = getattr(result, "findings", {}).values()
    return "\n".join(f"{f.kind} {f.what} ({f.count}x)\n{f.trace}\nreproducer {f.reproducer()[:4000]}" for f in findings)


@pytest.mark.parametrize("name", sorted(fuzz.TARGETS))
def test_no_parser_crashes_or_hangs(name: str) -> None:
    result = fuzz.run_target(name, INPUTS, SEED, deadline_s=2.0, traced_inputs=300, kill_after=60.0)
    assert result.inputs == INPUTS
    assert result.crashes == 0 and result.hangs == 0, _report(result)


def _frame(payload: bytes) -> bytes:
    return struct.pack("<i", len(payload)) + payload


def _session(header: bytes, kind: int = 1, payload_len: int = 0) -> bytes:
    return struct.pack("<2sBBIIQ", b"TQ", 1, kind, 1, len(header), payload_len) + header


_TRACKER = struct.pack("<i", RPC_TRACKER_MAGIC)
_NINES = b"9" * 400  # an int no float can hold: math.isfinite raised OverflowError

#: Inputs that crashed a parser before it was fixed (target, input).
REGRESSIONS = [
    ("tracker_messages", b'[4, "k", "", ' + _NINES + b"]"),  # priority
    ("tracker_messages", b'[4, "k", "", 1, {"timeout": ' + _NINES + b"}]"),
    ("tracker_messages", b'[4, "k", "", 1, {"unservable_after": ' + _NINES + b"}]"),
    ("tracker_messages", '[3, "k", ["³", "k:1"]]'.encode()),  # "³".isdigit(), int("³") raised ValueError
    ("tracker_messages", b'[3, "k", ["' + b"9" * 5000 + b'", "k:1"]]'),  # int() of 5,000 digits
    ("tracker_server", _TRACKER + _frame('[3, "k", ["90¹", "k:1"]]'.encode())),
    ("tracker_client", _TRACKER + _frame('[0, ["127.0.0.1", "²", "k:1"]]'.encode())),
    ("session", _session(b'{"op": "put", "tensors": [{"name": "x", "dtype": {"f": 1}, "shape": [2]}]}', 1)),
    ("session", _session(b'{"tensors": [{"name": "x", "dtype": ["float32"], "shape": [2]}]}', 2)),
    # a shape whose byte count has more than 4,300 digits: computed at length, then unprintable
    ("session", _session(b'{"tensors": [{"name": "x", "dtype": "float32", "shape": [2, ' + b"9" * 4300 + b"]}]}", 2)),
    ("session", _session(b'{"tensors": [{"name": "x", "dtype": "int8", "shape": [' + b", ".join([b"9" * 4000] * 200) + b"]}]}", 2)),
    ("http_response", "HTTP/1.1 4²6 Upgrade Required\r\n\r\n".encode("latin-1")),  # "4²6".isdigit() holds
    ("hostport", "host:²".encode()),
    ("hostport", b"host:" + b"9" * 5000),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data"), REGRESSIONS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(REGRESSIONS)])
def test_inputs_that_once_crashed_a_parser(name: str, data: bytes) -> None:
    target = fuzz.TARGETS[name]
    assert fuzz._attempt(target.make(), data, target.allowed) is None


@pytest.mark.slow
def test_live_servers_survive_malformed_input_and_still_serve() -> None:
    """A tracker, a device server and a proxy, each its own process on loopback: every live target's inputs
    over sockets, then honest requests; no connection left hanging, no traceback in any log."""
    with fuzz.live_servers() as servers:
        for name in fuzz.live_target_names():
            result = fuzz.run_live(servers, name, LIVE_INPUTS, SEED, deadline_s=5.0)
            assert result.inputs == LIVE_INPUTS
            assert result.crashes == 0 and result.hangs == 0, f"{name}: {_report(result)}"
        checks = fuzz.honest_checks(servers)
        assert all(verdict == "ok" for verdict in checks.values()), checks
        for server in servers.all:
            assert server.alive(), f"{server.name} exited: {list(server.tail)}"
            assert not server.tracebacks, f"{server.name} logged a traceback:\n" + "\n\n".join(server.tracebacks)
            assert server.lines > 0  # its log was read: the check above means something
