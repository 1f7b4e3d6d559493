"""``tether adb`` against a fake ``adb`` first on PATH: it logs each call and emulates the phones on this
machine (a phone's /data/local/tmp is a directory; ``adb shell`` runs the line with sh; forwards are
identity mappings, host and phone sharing one loopback), so the server it starts really registers with a
real tracker."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tether.cli import main
from tether.cli.pack import build_zipapp
from tether.client.query import ServerRow, query_tracker
from tether.device.adb import AdbConfig, parse_devices, pick_ports
from tether.tracker import TrackerThread

from .conftest import CliProcess, wait_until

pytestmark = pytest.mark.timeout(60)

FAKE_ADB = """\
import json, os, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(os.environ["FAKE_ADB_ROOT"])
args = sys.argv[1:]
with open(ROOT / "calls.log", "a") as log:
    log.write(json.dumps(args) + "\\n")
states = dict(line.split() for line in (ROOT / "devices").read_text().splitlines() if line.strip())
if args == ["devices"]:
    print("List of devices attached")
    print("".join(f"{serial}\\t{state}\\n" for serial, state in states.items()))
    sys.exit(0)
if args[:1] != ["-s"] or len(args) < 4:
    sys.exit(f"fake adb: unsupported {args}")
serial, command, rest = args[1], args[2], args[3:]
if serial not in states:
    sys.exit(f"adb: device '{serial}' not found")
if states[serial] != "device":
    sys.exit(f"adb: device {states[serial]}")
phone = ROOT / "phones" / serial
if command in ("reverse", "forward"):
    if rest[0] != "--remove" and rest[0] != rest[1]:
        sys.exit("fake adb: identity mappings only (this host and the phone share one loopback)")
    sys.exit(0)
if command == "push":
    target = Path(str(phone) + rest[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(rest[0], target)
    print(f"{rest[0]}: 1 file pushed")
    sys.exit(0)
if command == "shell":
    line = " ".join(rest).replace("/data/local/tmp", str(phone) + "/data/local/tmp")
    code = subprocess.run(["sh", "-c", line]).returncode  # the phone's processes outlive adb's
    sys.exit(128 - code if code < 0 else code)  # as a shell reports a signal
sys.exit(f"fake adb: unsupported {args}")
"""


class FakeAdb:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        script = self.bin / "adb"
        script.write_text(f"#!{sys.executable}\n{FAKE_ADB}")
        script.chmod(0o755)
        self.attach()

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}", "FAKE_ADB_ROOT": str(self.root)}

    def attach(self, **phones: str) -> None:
        """The phones ``adb devices`` lists, by serial, with their state."""
        (self.root / "devices").write_text("".join(f"{s} {state}\n" for s, state in phones.items()))

    def calls(self) -> list[list[str]]:
        log = self.root / "calls.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def device_dir(self, serial: str) -> Path:
        return self.root / "phones" / serial / "data/local/tmp/tether"

    def server_pid(self, serial: str, port: int) -> int | None:
        pidfile = self.device_dir(serial) / f"server-{port}.pid"
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        return int(text) if text.isdigit() else None

    def kill_servers(self) -> None:
        """What the test leaves running on the fake phones (by the pids they wrote)."""
        for pidfile in self.root.glob("phones/*/data/local/tmp/tether/server-*.pid"):
            text = pidfile.read_text().strip()
            if text.isdigit() and _alive(int(text)):
                os.kill(int(text), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.fixture
def adb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAdb]:
    fake = FakeAdb(tmp_path / "adb")
    for name, value in fake.env.items():
        monkeypatch.setenv(name, value)
    yield fake
    fake.kill_servers()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_zipapp(tmp_path_factory.mktemp("pack") / "tether-server.pyz", interpreter=None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def servers(tracker: TrackerThread, key: str) -> list[ServerRow]:
    """The servers registered under ``key`` (a server's row at the tracker is ``server:KEY``)."""
    return [s for s in query_tracker(tracker.host, tracker.port).servers if s.key == f"server:{key}"]


def registered_since(tracker: TrackerThread, key: str, since: float) -> bool:
    """Whether a server registered under ``key`` after the ``time.monotonic()`` ``since``."""
    age = time.monotonic() - since
    return any(s.since_s is not None and s.since_s < age for s in servers(tracker, key))


def test_dry_run_prints_reverse_forwards_push_and_shell_per_phone(
    adb: FakeAdb, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adb.attach(phone1="device", phone2="device")
    base = free_port()
    code = main(["adb", "--dry-run", "--tracker", "127.0.0.1:9190", "--key", "android", "--bundle", str(bundle),
                 "--port", str(base), "--slots", "2"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert adb.calls() == [["devices"]]  # only looked: nothing set up
    ports = {"phone1": base, "phone2": base + 1}  # one port each (tether's 2 slots share it), never the same
    if not all(_free(p) for p in ports.values()):
        pytest.skip(f"a port next to a free one is taken: {lines}")
    expected = []
    for serial, port in ports.items():
        expected += [
            f"adb -s {serial} reverse tcp:9190 tcp:9190",
            f"adb -s {serial} forward tcp:{port} tcp:{port}",
            f"adb -s {serial} push {bundle} /data/local/tmp/tether/tether-server.pyz",
        ]
        shell = lines[len(expected)]
        assert shell.startswith(f"adb -s {serial} shell ")
        for part in (f"exec python3 /data/local/tmp/tether/tether-server.pyz --host 127.0.0.1 --port {port} "
                     f"--port-end {port + 1} --tracker 127.0.0.1:9190 --key android --custom-addr 127.0.0.1 "
                     f"--slots 2 --label adb-serial={serial}", f"server-{port}.pid"):  # fmt: skip
            assert part in shell
        expected.append(shell)
    assert lines == expected


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_dry_run_tvm_rpc_runs_one_server_and_forward_per_slot_without_calling_adb(
    adb: FakeAdb, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tvm_rpc, libcxx = tmp_path / "tvm_rpc", tmp_path / "libc++_shared.so"
    tvm_rpc.write_bytes(b"\x7fELF")
    libcxx.write_bytes(b"\x7fELF")
    base = free_port()
    args = ["adb", "--dry-run", "--serial", "R58M", "--tracker", "127.0.0.1:9190", "--key", "android",
            "--tvm-rpc", str(tvm_rpc), "--push", str(libcxx), "--slots", "4", "--port", str(base)]  # fmt: skip
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert adb.calls() == []  # --serial named the phone: nothing to ask adb
    ports = [int(line.split("tcp:")[1].split()[0]) for line in lines if " forward " in line]
    assert len(ports) == 4 and len(set(ports)) == 4
    assert lines[:7] == [
        "adb -s R58M reverse tcp:9190 tcp:9190",
        *(f"adb -s R58M forward tcp:{p} tcp:{p}" for p in ports),
        f"adb -s R58M push {tvm_rpc} /data/local/tmp/tether/tvm_rpc",
        f"adb -s R58M push {libcxx} /data/local/tmp/tether/libc++_shared.so",
    ]
    assert lines[7] == "adb -s R58M shell 'chmod 755 /data/local/tmp/tether/tvm_rpc'"
    shells = lines[8:]
    assert len(shells) == 4
    for port, shell in zip(ports, shells, strict=True):
        assert (
            f"LD_LIBRARY_PATH=/data/local/tmp/tether exec /data/local/tmp/tether/tvm_rpc server --host=127.0.0.1 "
            f"--port={port} --port-end={port + 1} --tracker=127.0.0.1:9190 --key=android --custom-addr=127.0.0.1"
        ) in shell


@pytest.mark.parametrize(
    ("phones", "extra", "message"),
    [
        ({}, [], "tether adb: no devices attached: plug a phone in with USB debugging on (see `adb devices`)\n"),
        (
            {"R58M": "unauthorized"},
            [],
            "tether adb: device R58M is unauthorized: unlock it and accept the 'Allow USB debugging' prompt\n",
        ),
        (
            {"R58M": "device"},
            ["--serial", "other"],
            "tether adb: device other is not attached (attached: R58M; see `adb devices`)\n",
        ),
    ],
    ids=["none", "unauthorized", "serial-not-attached"],
)
def test_phones_that_cannot_be_served_are_one_line_errors(
    adb: FakeAdb,
    bundle: Path,
    capsys: pytest.CaptureFixture[str],
    phones: dict[str, str],
    extra: list[str],
    message: str,
) -> None:
    adb.attach(**phones)
    assert main(["adb", "--key", "android", "--bundle", str(bundle), *extra]) == 2
    assert capsys.readouterr().err == message
    assert adb.calls() == [["devices"]]


def test_no_adb_on_path_says_how_to_install_it(
    tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["adb", "--key", "android", "--bundle", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tether adb: adb not found on PATH: install Android platform-tools (apt-get install adb")
    assert err.count("\n") == 1


def test_serves_a_phone_restarts_its_server_and_sets_it_up_again_after_a_reconnect(
    adb: FakeAdb, bundle: Path, tracker: TrackerThread, cli: Callable[..., CliProcess]
) -> None:
    adb.attach(phone1="device")
    base = free_port()
    proc = cli(
        "adb", "--tracker", f"127.0.0.1:{tracker.port}", "--key", "android", "--bundle", str(bundle),
        "--port", str(base), "--device-python", sys.executable, "--poll", "0.2",
        "--server-arg=--preload=none", "--server-arg=--no-prestart",
        env=adb.env,
    )  # fmt: skip
    proc.wait_line(f"phone1: set up: tracker via device port {tracker.port}, server(s) at 127.0.0.1:{base}")
    proc.wait_line(f"phone1: server on port {base} started")
    first = wait_until(lambda: servers(tracker, "android"), timeout=15, what="the phone's server to register")
    assert [(s.address, s.labels) for s in first] == [(f"127.0.0.1:{base}", {"adb-serial": "phone1"})]
    pid = wait_until(lambda: adb.server_pid("phone1", base), what="the pidfile")
    assert [c[2:4] for c in adb.calls() if c[0] == "-s"][:3] == [
        ["reverse", f"tcp:{tracker.port}"],
        ["forward", f"tcp:{base}"],
        ["push", str(bundle)],
    ]

    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)  # the server dies on the phone: it is started again, and registers again
    proc.wait_line(f"phone1: server on port {base} exited (code 137)")
    proc.wait_line(f"phone1: server on port {base} restarted (start 2)")
    wait_until(lambda: registered_since(tracker, "android", killed), timeout=15, what="a new registration")
    second_pid = adb.server_pid("phone1", base)
    assert second_pid != pid and second_pid is not None and _alive(second_pid)

    setups_before = sum(1 for c in adb.calls() if c[2:3] == ["reverse"])
    unplugged = time.monotonic()
    adb.attach()  # unplugged: the forwards go with it (the server on the phone lives on)
    proc.wait_line("phone1: disconnected; waiting for it")
    adb.attach(phone1="device")
    proc.wait_line(f"phone1: set up: tracker via device port {tracker.port}")
    proc.wait_line(f"phone1: server on port {base} restarted (start 3)")
    calls = adb.calls()
    assert sum(1 for c in calls if c[2:3] == ["reverse"]) == setups_before + 1
    assert sum(1 for c in calls if c[2:4] == ["forward", f"tcp:{base}"]) == 2
    wait_until(lambda: not _alive(second_pid), what="the server left from before the reconnect to be stopped")
    third_pid = wait_until(
        lambda: adb.server_pid("phone1", base) not in (None, second_pid) and adb.server_pid("phone1", base)
    )
    wait_until(lambda: registered_since(tracker, "android", unplugged), timeout=15, what="a registration after it")
    assert len(servers(tracker, "android")) == 1

    os.kill(proc.proc.pid, signal.SIGINT)  # Ctrl-C: servers stopped, forwards removed
    assert proc.proc.wait(15) == 130
    proc.wait_line("phone1: servers stopped, forwards removed")
    tail = adb.calls()[-3:]
    assert tail[1:] == [
        ["-s", "phone1", "forward", "--remove", f"tcp:{base}"],
        ["-s", "phone1", "reverse", "--remove", f"tcp:{tracker.port}"],
    ]
    assert tail[0][2] == "shell" and "kill" in tail[0][3]
    wait_until(lambda: not _alive(third_pid), what="the server to stop")
    wait_until(lambda: not servers(tracker, "android"), what="the registration to go")


def test_once_sets_up_starts_in_the_background_and_exits(
    adb: FakeAdb, bundle: Path, tracker: TrackerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    adb.attach(phone1="device")
    base = free_port()
    args = ["adb", "--once", "--tracker", f"127.0.0.1:{tracker.port}", "--key", "android", "--bundle", str(bundle),
            "--port", str(base), "--device-python", sys.executable, "--server-arg=--preload=none"]  # fmt: skip
    assert main(args) == 0
    assert "phone1: tracker via device port" in capsys.readouterr().out
    pid = wait_until(lambda: adb.server_pid("phone1", base), what="the pidfile")
    assert _alive(pid)
    wait_until(lambda: servers(tracker, "android"), timeout=15, what="the phone's server to register")
    log = adb.device_dir("phone1") / f"server-{base}.log"
    wait_until(lambda: "listening on" in log.read_text(), what="the server's log on the phone")


def test_adb_devices_output_and_port_blocks() -> None:
    text = (
        "* daemon not running; starting now at tcp:5037\n* daemon started successfully\nList of devices attached\n"
        "emulator-5554\tdevice\nR58M\tunauthorized\n192.168.1.9:5555\toffline\n\n"
    )
    assert parse_devices(text) == {"emulator-5554": "device", "R58M": "unauthorized", "192.168.1.9:5555": "offline"}
    cfg = AdbConfig(key="k", tracker_port=9190, tvm_rpc=Path("tvm_rpc"), slots=4, base_port=5000)
    assert pick_ports(cfg, [], lambda p: True) == [5000, 5001, 5002, 5003]  # the docs' 5000..5003
    assert pick_ports(cfg, [5000, 5001, 5002, 5003], lambda p: p != 5005) == [5008, 5009, 5010, 5011]
    one = AdbConfig(key="k", tracker_port=9190, bundle=Path("b.pyz"), slots=4, base_port=5000)
    assert pick_ports(one, [5000], lambda p: True) == [5001]  # tether's 4 slots share one port


def test_a_tracker_elsewhere_is_warned_about(adb: FakeAdb, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["adb", "--dry-run", "--serial", "p", "--tracker", "192.0.2.7:9190", "--key", "k",
                 "--bundle", str(bundle)]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert "adb -s p reverse tcp:9190 tcp:9190" in out.splitlines()
    assert err.startswith("tether adb: warning: 192.0.2.7 is not this host, and adb reverse leads the phones")
