"""The ``tether`` command as a user runs it: real processes, real sockets."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tether.cli import _parser, main
from tether.client.tracker import TrackerClient
from tether.protocol import Request
from tether.runtime.reference import write_reference_model
from tether.tracker import TrackerThread

from .conftest import CliProcess


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_tracker_prints_address_and_hint_then_stops_on_sigterm(cli: Callable[..., CliProcess]) -> None:
    proc = cli("tracker", "--port", "0")
    host, port = proc.listening()
    assert host == "127.0.0.1" and port > 0
    proc.wait_line("--host 0.0.0.0")
    with TrackerClient.connect(host, port) as client:
        assert client.ping() > 0
    assert proc.stop() == 0


def test_port_range_skips_busy_ports(cli: Callable[..., CliProcess]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
        probe.listen()
        proc = cli("tracker", "--port", str(base), "--port-end", str(base + 50))
        _, port = proc.listening()
        assert base < port < base + 50


def test_no_free_port_is_a_clear_error_naming_the_range() -> None:
    with socket.socket() as probe, socket.socket() as next_one:
        probe.bind(("127.0.0.1", 0))
        probe.listen()
        port = probe.getsockname()[1]
        with contextlib.suppress(OSError):  # taken already: in use either way
            next_one.bind(("127.0.0.1", port + 1))
            next_one.listen()
        done = run_cli("tracker", "--port", str(port), "--port-end", str(port + 2))
        single = run_cli("proxy", "--port", str(port), "--port-end", str(port), "--no-web")
    assert done.returncode == 2 and single.returncode == 2
    assert done.stderr == f"tether tracker: ports {port}..{port + 1} (2 of them) on 127.0.0.1 are all in use\n"
    assert single.stderr == f"tether proxy: port {port} on 127.0.0.1 is in use\n"


def test_query_table_and_json(cli: Callable[..., CliProcess]) -> None:
    proc = cli("tracker", "--port", "0")
    host, port = proc.listening()
    with TrackerClient.connect(host, port) as server, TrackerClient.connect(host, port) as proxy:
        server.update_info({"key": "server:127.0.0.1:5555", "addr": [None, 9091]})
        server.put("127.0.0.1:5555", 9091, "127.0.0.1:5555:0.1")
        proxy.update_info({"key": "server:proxy[android]", "addr": [None, 9090]})
        proxy.put("android", 9090, "android:0.1")
        proxy.put("android", 9090, "android:0.2")
        with TrackerClient.connect(host, port) as waiter:
            waiter.send(Request("gpu", "carol", 2))
            waiter.ping()  # the request is queued before the query reads it
            text = run_cli("query", "--host", host, "--port", str(port))
            data = run_cli("query", "--json", "--host", host, "--port", str(port))
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "Server List" in out and "Queue Status" in out and "Waiting" in out
    queue_section = out.split("Queue Status", 1)[1].split("\n\n", 1)[0]
    rows = {line.split()[0]: line.split() for line in queue_section.splitlines() if line and not line.startswith("-")}
    assert rows["127.0.0.1:5555"][1:4] == ["1", "1", "0"]  # TVM's query shows total 0 and hides it
    assert rows["android"][1:4] == ["2", "2", "0"]  # proxied: TVM's query hides it too
    assert rows["gpu"][1:4] == ["0", "0", "1"]
    assert "no server is registered with key 'gpu'" in out
    status = json.loads(data.stdout)
    assert status["tether_version"]
    assert {k["key"]: k["total"] for k in status["keys"]} == {"127.0.0.1:5555": 1, "android": 2, "gpu": 0}
    assert status["waiters"][0]["user"] == "carol" and status["waiters"][0]["priority"] == 2


def test_query_honours_tvm_environment_variables(cli: Callable[..., CliProcess]) -> None:
    proc = cli("tracker", "--port", "0")
    _, port = proc.listening()
    done = run_cli("query", env={"TVM_TRACKER_HOST": "127.0.0.1", "TVM_TRACKER_PORT": str(port)})
    assert done.returncode == 0 and f"127.0.0.1:{port}" in done.stdout


def test_query_unreachable_tracker_fails_fast() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connection refused
        start = time.monotonic()
        done = run_cli("query", "--port", str(port))
    assert done.returncode == 2
    assert "cannot read the tracker" in done.stderr
    assert time.monotonic() - start < 10


def test_query_silent_peer_times_out() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog) but never answers
        start = time.monotonic()
        done = run_cli("query", "--port", str(silent.getsockname()[1]), "--timeout", "1")
    assert done.returncode == 2
    assert time.monotonic() - start < 10


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.startswith("tether ")
    assert "tracker" in run_cli("--help").stdout


# -- a first hour without friction ---------------------------------------------------------------------


def _reference_model(path: Path, *ops: dict[str, Any], shape: tuple[int, ...] = (2, 3)) -> Path:
    spec = {"name": "x", "dtype": "float32", "shape": list(shape)}
    affine = {"op": "affine", "input": "x", "output": "y", "scale": 2.0, "bias": 1.0}
    write_reference_model(path, [spec], [{**spec, "name": "y"}], [*ops, affine])
    return path


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``tether ARGS`` in this process: exit code, stdout, stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("address", ["127.0.0.1:abc", "127.0.0.1:", ":9190", "[::1]x", "127.0.0.1:70000"])
@pytest.mark.parametrize("command", ["run", "bench"])
def test_a_bad_tracker_address_is_a_one_line_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str, address: str
) -> None:
    model = _reference_model(tmp_path / "m.json")
    code, out, err = _cli(capsys, command, str(model), "--tracker", address, "--key", "k")
    assert code == 2 and out == ""
    assert err.startswith(f"tether {command}: argument --tracker: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["run", "bench"])
def test_local_mistakes_are_found_before_a_device_is_requested(
    capsys: pytest.CaptureFixture[str], tracker: TrackerThread, tmp_path: Path, command: str
) -> None:
    """No server has the key: a check made after the request would wait out --timeout and fail with 1.
    Each mistake is one line and exit code 2 instead."""
    np = pytest.importorskip("numpy")
    model = _reference_model(tmp_path / "m.json")
    np.savez(tmp_path / "wrong.npz", q=np.ones(3, "float32"))
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    request = ["--tracker", f"{tracker.host}:{tracker.port}", "--key", "nobody", "--timeout", "0.5"]
    cases = [
        (
            [str(tmp_path / "missing.json")],
            "argument MODEL: no file" if command == "bench" else "argument model: no file",
        ),
        ([str(model), "--input", str(tmp_path / "missing.npz")], "argument --input: no file"),
        ([str(model), "--input", str(model)], "m.json: not an .npz of arrays by name"),
        ([str(model), "--input", str(tmp_path / "wrong.npz")], "['q'] not among the model's inputs ['x']"),
        ([str(model), "--shape", "q=1"], "--shape"),
        ([str(model), "--shape", "x=1,a"], "argument --shape: shapes are NAME=D1,D2,..."),
        ([str(tmp_path / "garbage.onnx")], "garbage.onnx is not an ONNX model"),
        ([str(model), "--repeat", "-1"], "argument --repeat: expected a whole number >= 0"),
        ([str(model), "--backend", "tpu"], "argument --backend: invalid choice: 'tpu'"),
    ]
    if command == "bench":
        cases.append(([str(model), "--json", str(tmp_path / "no" / "x.json")], "cannot write"))
    else:
        cases.append(([str(model), "--output", str(tmp_path / "no" / "x.npz")], "cannot write"))
    for args, message in cases:
        code, _, err = _cli(capsys, command, *args, *request)
        assert (code, err.count("\n")) == (2, 1) and message in err, (args, err)


def test_no_traceback_for_a_mistake_in_any_subcommand(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """One line on stderr and exit code 2 (bad usage) or 1 (failed), never an exception out of main."""
    (tmp_path / "a-file").write_text("")
    cases: list[tuple[list[str], int, str]] = [
        (["tracker", "--port", "70000"], 2, "a port is 0..65535"),
        (["tracker", "--port", "x"], 2, "a port is 0..65535"),
        (["server", "--tracker", "127.0.0.1:abc"], 2, "not a number"),
        (["server", "--host", "127.0.0.1", "--port", "70000"], 2, "ports must be in 0..65535"),
        (["proxy", "--tracker", "127.0.0.1:"], 2, "has an empty port"),
        (["proxy", "--index-page", str(tmp_path / "missing.html")], 2, "argument --index-page: no file"),
        (["proxy", "--timeout-client", "soon"], 2, "expected a non-negative number"),
        (["query", "--port", "abc"], 2, "a port is 0..65535"),
        (["query", "--log-level", "LOUD"], 2, "invalid choice: 'LOUD'"),
        (["pack", "-o", str(tmp_path / "a-file" / "x.pyz")], 1, "a-file"),
        (["demo", "--model", str(tmp_path / "missing.onnx")], 2, "argument --model: no file"),
        (["demo", "--model", str(tmp_path / "a-file")], 2, "is not an ONNX model"),
        (["nonsense"], 2, "invalid choice: 'nonsense'"),
    ]
    for args, expected, message in cases:
        code, _, err = _cli(capsys, *args)
        assert (code, err.count("\n")) == (expected, 1) and message in err, (args, err)
    monkeypatch.setenv("TVM_TRACKER_PORT", "abc")
    assert _cli(capsys, "query") == (2, "", "tether query: TVM_TRACKER_PORT='abc' is not a port (0..65535)\n")


def test_a_device_error_is_one_line_and_its_traceback_comes_with_verbose(
    capsys: pytest.CaptureFixture[str], tracker: TrackerThread, device_server: Any, tmp_path: Path
) -> None:
    pytest.importorskip("numpy")
    server = device_server(key="cpu", tracker=(tracker.host, tracker.port))
    model = _reference_model(tmp_path / "boom.json", {"op": "raise", "message": "boom"})
    request = ["--tracker", f"{tracker.host}:{tracker.port}", "--key", "cpu", "--timeout", "30"]
    code, _, err = _cli(capsys, "run", str(model), *request)
    assert code == 1
    assert err == f"tether run: ModelRunError on 127.0.0.1:{server.port}: boom\n"
    code, _, err = _cli(capsys, "run", str(model), *request, "--verbose")
    assert code == 1 and err.startswith(f"tether run: ModelRunError on 127.0.0.1:{server.port}: boom\n")
    assert "--- traceback on the device ---\nTraceback (most recent call last):" in err
    assert err.rstrip().endswith("RuntimeError: boom")


def test_run_and_bench_share_their_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """The same names, meanings (help), types, choices and defaults; each documented with its default."""

    def options(command: str) -> dict[str, argparse.Action]:
        parser = _parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
        return {s: a for a in parser._actions for s in a.option_strings}

    run, bench = options("run"), options("bench")
    shared = set(run) & set(bench)
    expected = {"--tracker", "--key", "--label", "--timeout", "--number", "--repeat", "--min-repeat-ms"}
    expected |= {"--warmup", "--cooldown-ms", "--input", "--fill", "--shape", "--backend", "--provider"}
    expected |= {"--function", "--run-timeout", "--verbose", "--log-level"}
    assert expected <= shared
    for name in shared - {"-h", "--help"}:
        a, b = run[name], bench[name]
        assert (a.default, a.type, a.choices, a.help, a.required) == (b.default, b.type, b.choices, b.help, b.required)


@pytest.mark.parametrize("command", ["tracker", "server", "proxy", "query", "run", "bench", "pack", "demo"])
def test_every_help_has_a_description_defaults_and_choices(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = _cli(capsys, command, "--help")
    assert code == 0
    usage, description = out.split("\n\n")[:2]
    assert usage.startswith(f"usage: tether {command}") and len(description.strip()) > 10
    parser = _parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    chunks = re.split(r"\n  (?=-)", out)  # one per option
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        chunk = next(c for c in chunks if c.startswith(action.option_strings[0]))
        if action.default not in (None, False, "", [], argparse.SUPPRESS):
            assert "default" in chunk, chunk
        for choice in action.choices or ():
            assert str(choice) in chunk, chunk


def test_log_level_after_the_subcommand(cli: Callable[..., CliProcess]) -> None:
    proc = cli("tracker", "--port", "0", "--log-level", "DEBUG")
    proc.wait_line("DEBUG asyncio")  # asyncio says which selector it uses, at DEBUG only
    proc.listening()


def test_an_unreachable_tracker_is_exit_code_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = _reference_model(tmp_path / "m.json")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
        address = f"127.0.0.1:{probe.getsockname()[1]}"
        for command in ("run", "bench"):
            code, _, err = _cli(capsys, command, str(model), "--tracker", address, "--key", "k")
            assert (code, err.count("\n")) == (2, 1) and f"cannot connect to {address}" in err, err


# -- tether run while it waits: its place in the queue, and the reason when no server could serve it --


@pytest.fixture
def fresh_tracker() -> Any:
    """A tracker that judges requests at once (no grace for servers re-registering after a restart)."""
    from tether.tracker import TrackerConfig

    with TrackerThread(TrackerConfig(host="127.0.0.1", port=0, registration_grace_s=0)) as tracker:
        yield tracker


def test_run_fails_fast_naming_why_no_server_can_serve_it(
    capsys: pytest.CaptureFixture[str], fresh_tracker: TrackerThread, device_server: Any, tmp_path: Path
) -> None:
    from .conftest import RawPeer

    tracker = fresh_tracker
    device_server(key="android", tracker=(tracker.host, tracker.port), labels={"soc": "sd8"})
    tvm_only = RawPeer(tracker.host, tracker.port)  # a TVM server: it speaks TVM's protocol only
    assert tvm_only.call([5, {"key": "server:boards", "addr": [None, 9000]}]) == 0
    assert tvm_only.call([3, "boards", [9000, "boards:1"], None]) == 0
    model = str(_reference_model(tmp_path / "m.json"))
    where = ["--tracker", f"{tracker.host}:{tracker.port}", "--timeout", "60"]
    started = time.monotonic()
    code, out, err = _cli(capsys, "run", model, *where, "--key", "andriod")
    assert code == 1 and out == ""
    assert "tether run: no server is registered with key 'andriod' (did you mean 'android'?)" in err
    assert time.monotonic() - started < 50  # the reason, long before the 60 s queue timeout
    code, _, err = _cli(capsys, "run", model, *where, "--key", "boards")
    assert code == 1 and "1 server(s) of key 'boards' speak only tvm, not tether: use TVM's client" in err
    code, _, err = _cli(capsys, "run", model, *where, "--key", "android", "--label", "soc=sd7")
    assert code == 1 and "no server of key 'android' has labels soc=sd7 (theirs: soc=sd8)" in err
    code, _, err = _cli(capsys, "run", model, *where[:2], "--key", "andriod", "--timeout", "1", "--wait-for-servers")
    assert code == 1
    assert "no free server of key 'andriod' within 1 s: no server is registered with key 'andriod'" in err
    tvm_only.close()


def test_run_shows_its_place_in_the_queue_while_it_waits(
    fresh_tracker: TrackerThread, device_server: Any, tmp_path: Path
) -> None:
    import threading

    import tether

    tracker = fresh_tracker
    device_server(key="busy", tracker=(tracker.host, tracker.port))
    holder = tether.connect_tracker(tracker.host, tracker.port)
    held = holder.request("busy", timeout=10)
    model = str(_reference_model(tmp_path / "m.json"))
    run = CliProcess("run", model, "--tracker", f"{tracker.host}:{tracker.port}", "--key", "busy", "--repeat", "0",
                     env={"PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        line = run.wait_line("queued for key 'busy'", timeout=30)
        assert "position 1 of 1 (0 ahead)" in line
        threading.Thread(target=held.close, daemon=True).start()  # the holder is done: the run gets the device
        run.wait_line("outputs:", timeout=30)
        assert run.proc.wait(30) == 0
    finally:
        run.stop()
        holder.close()


def test_ctrl_c_stops_a_command_started_with_sigint_ignored(tracker: TrackerThread, tmp_path: Path) -> None:
    """A non-interactive shell's background job inherits SIGINT ignored, and Python keeps it so: tether
    still takes SIGINT as Ctrl-C (exit 130), as its promise of what Ctrl-C does needs."""
    import signal

    model = _reference_model(tmp_path / "m.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "run", str(model), "--tracker", f"{tracker.host}:{tracker.port}",
         "--key", "nobody", "--wait-for-servers", "--timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509 - the point of the test
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the request waits: its place in the queue is shown
            if "queued for key 'nobody'" in line:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("text", ["host:²", "host:٣", "host:" + "9" * 5000, "host:65536", "[::1]:x"])
def test_bad_ports_in_addresses_are_config_errors(text: str) -> None:
    """Found by bench/fuzz.py: "²".isdigit() holds and int("²") raises ValueError, as does int() of 5,000 digits."""
    from tether.aio.net import parse_hostport
    from tether.errors import ConfigError

    with pytest.raises(ConfigError, match="port"):
        parse_hostport(text)
