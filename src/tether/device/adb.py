"""Android phones over adb: the forwards, the bundle on the device, a server kept alive on each.

What TVM's Android docs do by hand, per phone::

    adb reverse tcp:9190 tcp:9190     # the phone's 127.0.0.1:9190 reaches the tracker on this host
    adb forward tcp:5000 tcp:5000     # this host's 127.0.0.1:5000 reaches the server on the phone
    adb shell /data/local/tmp/tvm_rpc server --port=5000 --tracker=127.0.0.1:9190 --key=android ...

The server registers with ``--custom-addr 127.0.0.1``, and the tracker hands clients
``127.0.0.1:<its port>``: the *device's* port, so each forward maps a host port to the same port on the
device (the docs' ``forward tcp:5002 tcp:5001`` would send clients to a port nothing forwards), and two
phones get different ports. tether's server takes all its ``--slots`` sessions on one port (one forward);
TVM's ``tvm_rpc`` serves one session at a time, so ``slots`` sessions are ``slots`` processes on
``slots`` ports (the docs' 5000..5003), one forward each.

A :class:`Supervisor` polls ``adb devices``; it sets a phone up when it appears (again after a
reconnect: adb drops a phone's forwards when it goes), restarts a server that exits, and on stop kills
the servers and removes the forwards it made. Standard library only.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import ConfigError

__all__ = [
    "AdbConfig",
    "Supervisor",
    "check_devices",
    "find_adb",
    "list_devices",
    "parse_devices",
    "pick_ports",
    "server_argv",
    "server_shell_line",
    "setup_commands",
    "start_commands",
    "stop_commands",
    "tracker_is_here",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install Android platform-tools (apt-get install adb, or developer.android.com/tools/releases/platform-tools)"
)
#: The bundle's name on the device (the stale-server check looks for it in a process's command line).
BUNDLE_NAME = "tether-server.pyz"
TVM_RPC_NAME = "tvm_rpc"
#: What each adb state other than "device" means to the person at the desk.
STATE_HINTS = {
    "unauthorized": "unlock it and accept the 'Allow USB debugging' prompt",
    "offline": "replug it, or run `adb reconnect`",
    "no permissions": "add a udev rule for it (see the Android docs' 'Run apps on a hardware device')",
}
#: Seconds one adb call may take (a push of a large binary gets more).
ADB_TIMEOUT_S = 30.0
PUSH_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class AdbConfig:
    """What ``tether adb`` sets up on each phone."""

    key: str
    #: This host's tracker port: ``adb reverse`` reaches this host's 127.0.0.1:PORT.
    tracker_port: int
    #: The port on the phone that leads to the tracker (default: the same number).
    device_tracker_port: int | None = None
    #: The zipapp of ``tether pack``; or, with ``tvm_rpc``, TVM's C++ server binary instead.
    bundle: Path | None = None
    tvm_rpc: Path | None = None
    #: Concurrent sessions per phone.
    slots: int = 1
    #: The first port of the forwards; each phone takes the next free block.
    base_port: int = 5000
    #: What the tracker hands clients for the phone (127.0.0.1: clients on this host, through the forwards).
    custom_addr: str = "127.0.0.1"
    device_dir: str = "/data/local/tmp/tether"
    device_python: str = "python3"
    #: More files pushed beside the server (shared libraries for tvm_rpc: LD_LIBRARY_PATH is the dir).
    push: tuple[Path, ...] = ()
    #: More flags for the server on the device.
    server_args: tuple[str, ...] = ()
    #: The adb command (resolved by :func:`find_adb` before anything runs).
    adb: str = "adb"
    poll_s: float = 2.0
    restart_delay_s: float = 1.0
    max_restart_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if (self.bundle is None) == (self.tvm_rpc is None):
            raise ConfigError("give the server to run: --bundle PATH (tether pack) or --tvm-rpc PATH")
        if self.slots < 1:
            raise ConfigError("--slots must be at least 1")
        if not 1 <= self.base_port <= 65535 - self.ports_per_device + 1:
            raise ConfigError(f"--port {self.base_port}: the forwards need ports up to 65535")

    @property
    def device_tracker(self) -> int:
        return self.tracker_port if self.device_tracker_port is None else self.device_tracker_port

    @property
    def ports_per_device(self) -> int:
        """tether's server: every slot on one port; tvm_rpc: one process, port and forward per slot."""
        return self.slots if self.tvm_rpc is not None else 1

    @property
    def server_name(self) -> str:
        return TVM_RPC_NAME if self.tvm_rpc is not None else BUNDLE_NAME

    def device_path(self, name: str) -> str:
        return str(PurePosixPath(self.device_dir) / name)


# -- adb itself ---------------------------------------------------------------------------------


def find_adb(adb: str = "adb") -> str:
    """The path of the adb executable; :class:`ConfigError` saying how to get one when there is none."""
    found = shutil.which(adb)
    if found is None:
        raise ConfigError(f"{adb} not found on PATH: {INSTALL_HINT}, or pass --adb PATH")
    return found


def parse_devices(text: str) -> dict[str, str]:
    """``adb devices`` output as serial -> state ("device", "unauthorized", "offline", ...)."""
    devices: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("*", "List of devices")):
            continue
        serial, _, state = line.partition("\t")
        if not state:
            serial, _, state = line.partition(" ")
        if serial and state.strip():
            devices[serial] = state.strip()
    return devices


def list_devices(adb: str, timeout: float = ADB_TIMEOUT_S) -> dict[str, str]:
    """The attached devices by serial, each with its state. Raises :class:`ConfigError` when adb fails."""
    try:
        done = subprocess.run([adb, "devices"], check=False, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"`adb devices` failed: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise ConfigError(f"`adb devices` failed: {last}")
    return parse_devices(done.stdout)


def check_devices(devices: dict[str, str], wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """The serials to set up (``wanted``, else every device in state "device"), and a warning for each
    attached phone left out for its state. Raises :class:`ConfigError` when none can be set up or a
    named one cannot."""
    if wanted:
        for serial in wanted:
            state = devices.get(serial)
            if state is None:
                attached = ", ".join(sorted(devices)) or "none"
                raise ConfigError(f"device {serial} is not attached (attached: {attached}; see `adb devices`)")
            if state != "device":
                raise ConfigError(f"device {serial} is {state}: {STATE_HINTS.get(state, 'see `adb devices`')}")
        return list(wanted), []
    ready = [s for s, state in devices.items() if state == "device"]
    others = [
        f"device {s} is {state}: {STATE_HINTS.get(state, 'left out')}"
        for s, state in devices.items()
        if state != "device"
    ]
    if not ready:
        if others:
            raise ConfigError("; ".join(others))
        raise ConfigError("no devices attached: plug a phone in with USB debugging on (see `adb devices`)")
    return ready, others


def tracker_is_here(host: str) -> bool:
    """Whether ``host`` is an address of this machine (adb reverse reaches only this machine's loopback, so a
    tracker elsewhere is out of the phones' reach); True when it cannot be told."""
    if host in ("localhost", "127.0.0.1", "::1", "0.0.0.0", "::"):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return True
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((addr[0], 0))  # only an address of this machine can be bound
            except OSError:
                continue
            return True
    return False


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``adb forward`` could listen on this host's ``port``."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def pick_ports(cfg: AdbConfig, taken: Iterable[int], free: Callable[[int], bool] = port_free) -> list[int]:
    """The next block of ``cfg.ports_per_device`` ports from ``cfg.base_port`` that no other phone has
    and that are free on this host; :class:`ConfigError` when none is left."""
    taken = set(taken)
    n = cfg.ports_per_device
    start = cfg.base_port
    while start + n - 1 <= 65535:
        block = list(range(start, start + n))
        if not taken.intersection(block) and all(free(p) for p in block):
            return block
        start += n
    raise ConfigError(f"no block of {n} free port(s) left from {cfg.base_port} for the forwards")


# -- the commands -------------------------------------------------------------------------------


def _adb(cfg: AdbConfig, serial: str, *args: str) -> list[str]:
    return [cfg.adb, "-s", serial, *args]


def setup_commands(cfg: AdbConfig, serial: str, ports: Sequence[int]) -> list[list[str]]:
    """The reverse to the tracker, one forward per server port, and the pushes."""
    cmds = [_adb(cfg, serial, "reverse", f"tcp:{cfg.device_tracker}", f"tcp:{cfg.tracker_port}")]
    cmds += [_adb(cfg, serial, "forward", f"tcp:{p}", f"tcp:{p}") for p in ports]
    server = cfg.tvm_rpc if cfg.tvm_rpc is not None else cfg.bundle
    assert server is not None
    cmds.append(_adb(cfg, serial, "push", str(server), cfg.device_path(cfg.server_name)))
    cmds += [_adb(cfg, serial, "push", str(extra), cfg.device_path(extra.name)) for extra in cfg.push]
    if cfg.tvm_rpc is not None:
        cmds.append(_adb(cfg, serial, "shell", f"chmod 755 {shlex.quote(cfg.device_path(TVM_RPC_NAME))}"))
    return cmds


def server_argv(cfg: AdbConfig, serial: str, port: int) -> list[str]:
    """The server's command line on the device: it binds the phone's loopback (adb forward connects
    there), reaches the tracker through the reverse, and registers as ``custom_addr:port``."""
    tracker = f"127.0.0.1:{cfg.device_tracker}"
    if cfg.tvm_rpc is not None:
        return [
            cfg.device_path(TVM_RPC_NAME),
            "server",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--port-end={port + 1}",
            f"--tracker={tracker}",
            f"--key={cfg.key}",
            f"--custom-addr={cfg.custom_addr}",
            *cfg.server_args,
        ]
    return [
        cfg.device_python,
        cfg.device_path(BUNDLE_NAME),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--port-end",
        str(port + 1),
        "--tracker",
        tracker,
        "--key",
        cfg.key,
        "--custom-addr",
        cfg.custom_addr,
        "--slots",
        str(cfg.slots),
        "--label",
        f"adb-serial={serial}",
        *cfg.server_args,
    ]


def _pidfile(cfg: AdbConfig, port: int) -> str:
    return shlex.quote(cfg.device_path(f"server-{port}.pid"))


def _kill_line(cfg: AdbConfig, port: int, wait: bool = False) -> str:
    """Stop the server a pidfile names, if that process still is one (a pid may be reused; a zombie's
    command line is empty); ``wait``: up to 5 s for it to go (it holds the port)."""
    running = f"grep -q {shlex.quote(cfg.server_name)} /proc/$p/cmdline 2>/dev/null"
    line = f'p=$(cat {_pidfile(cfg, port)} 2>/dev/null); [ -n "$p" ] && {running} && kill $p'
    if wait:
        line += f'; n=0; while [ -n "$p" ] && {running} && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done'
    return line


def server_shell_line(cfg: AdbConfig, serial: str, port: int, background: bool = False) -> str:
    """The line ``adb shell`` runs: stop a server left from before (it would hold the port), note the
    new one's pid, start it (in the foreground, so its output streams back and its exit is seen; or in
    the background with nohup, its output in a log beside it)."""
    env = f"LD_LIBRARY_PATH={shlex.quote(cfg.device_dir)} " if cfg.tvm_rpc is not None else ""
    argv = shlex.join(server_argv(cfg, serial, port))
    head = f"cd {shlex.quote(cfg.device_dir)} && {{ {_kill_line(cfg, port, wait=True)}; "
    if background:
        log = shlex.quote(cfg.device_path(f"server-{port}.log"))
        return f"{head}{env}nohup {argv} >{log} 2>&1 </dev/null & echo $! >{_pidfile(cfg, port)}; }}"
    return f"{head}echo $$ >{_pidfile(cfg, port)}; {env}exec {argv}; }}"


def start_commands(cfg: AdbConfig, serial: str, ports: Sequence[int], background: bool = False) -> list[list[str]]:
    """One ``adb shell`` per server process: one for tether's bundle, one per port for tvm_rpc."""
    return [_adb(cfg, serial, "shell", server_shell_line(cfg, serial, p, background)) for p in ports]


def stop_commands(cfg: AdbConfig, serial: str, ports: Sequence[int]) -> list[list[str]]:
    """Stop the servers, then remove the forwards and the reverse."""
    cmds = [_adb(cfg, serial, "shell", _kill_line(cfg, p)) for p in ports]
    cmds += [_adb(cfg, serial, "forward", "--remove", f"tcp:{p}") for p in ports]
    cmds.append(_adb(cfg, serial, "reverse", "--remove", f"tcp:{cfg.device_tracker}"))
    return cmds


def run_adb(cmd: Sequence[str], timeout: float | None = None) -> tuple[bool, str]:
    """Run one adb command; (ok, its last line of error output or of output)."""
    if timeout is None:
        timeout = PUSH_TIMEOUT_S if "push" in cmd[3:4] else ADB_TIMEOUT_S
    logger.debug("running %s", shlex.join(cmd))
    try:
        done = subprocess.run(
            list(cmd), check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return False, f"no answer within {timeout:g} s"
    except OSError as exc:
        return False, str(exc)
    text = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return done.returncode == 0, text[-1] if text else f"exit code {done.returncode}"


# -- the supervisor -----------------------------------------------------------------------------


@dataclass
class _Server:
    """One server process on a phone, run through a host-side ``adb shell``."""

    port: int
    proc: subprocess.Popen[str] | None = None
    started: float = 0.0
    next_start: float = 0.0
    delay: float = 0.0
    starts: int = 0


@dataclass
class _Phone:
    serial: str
    ports: list[int]
    servers: list[_Server] = field(default_factory=list)
    #: Set up (forwards made, bundle pushed) since it last appeared.
    ready: bool = False
    #: The state last reported, to say each change once.
    state: str = ""
    #: The last setup failure said (said again only when it changes).
    failure: str = ""


class Supervisor:
    """Keeps each phone set up and its servers running until :meth:`stop` (or Ctrl-C in :meth:`run`).

    ``serials``: only these phones (else every phone in state "device", as they come). ``say``: where
    events and the servers' output go, one line each.
    """

    def __init__(self, cfg: AdbConfig, serials: Sequence[str] = (), say: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.serials = list(serials)
        self._say = say
        self._say_lock = threading.Lock()
        self._stop = threading.Event()
        self._phones: dict[str, _Phone] = {}
        self._noted: dict[str, str] = {}
        self._readers: list[threading.Thread] = []

    def say(self, line: str) -> None:
        with self._say_lock:
            self._say(line)

    def stop(self) -> None:
        """Ask :meth:`run` to return (it then tears down); safe from any thread or a signal handler."""
        self._stop.set()

    def phone_ports(self, serial: str) -> list[int]:
        """The ports a phone has (picked when it is first seen; kept across reconnects)."""
        phone = self._phones.get(serial)
        if phone is None:
            taken = [p for other in self._phones.values() for p in other.ports]
            phone = _Phone(serial, pick_ports(self.cfg, taken))
            phone.servers = [_Server(p) for p in phone.ports]
            self._phones[serial] = phone
        return phone.ports

    # -- one-shot -------------------------------------------------------------------------------

    def setup_once(self, serials: Sequence[str]) -> bool:
        """Set each phone up and start its servers in the background on it; True when all went well."""
        ok = True
        for serial in serials:
            ports = self.phone_ports(serial)
            for cmd in [*setup_commands(self.cfg, serial, ports), *start_commands(self.cfg, serial, ports, True)]:
                done, detail = run_adb(cmd)
                if not done:
                    self.say(f"{serial}: failed: {shlex.join(cmd[3:])[:80]}: {detail}")
                    ok = False
                    break
            else:
                self.say(f"{serial}: {self._describe(ports)}; started in the background")
        return ok

    # -- supervising ------------------------------------------------------------------------------

    def run(self, max_polls: int | None = None) -> None:
        """Poll until stopped (or ``max_polls`` polls); tear down on the way out, Ctrl-C included."""
        try:
            polls = 0
            while not self._stop.is_set():
                self.poll()
                polls += 1
                if max_polls is not None and polls >= max_polls:
                    break
                self._stop.wait(self._wait_s())
        finally:
            self.teardown()

    def _wait_s(self) -> float:
        """Until the next poll, or sooner when a server is due to restart."""
        now = time.monotonic()
        wait = self.cfg.poll_s
        for phone in self._phones.values():
            for server in phone.servers:
                if phone.ready and server.proc is None:
                    wait = min(wait, max(0.05, server.next_start - now))
        return wait

    def poll(self) -> None:
        """One round: read ``adb devices``; set up phones that (re)appeared, drop those gone, restart
        servers that exited."""
        try:
            devices = list_devices(self.cfg.adb)
        except ConfigError as exc:
            logger.warning("%s", exc)
            return
        for serial, state in devices.items():  # a phone not served yet, in a state it cannot be: said once
            if serial not in self._phones and state != "device" and self._noted.get(serial) != state:
                self.say(f"{serial}: {state}: {STATE_HINTS.get(state, 'see `adb devices`')}")
            self._noted[serial] = state
        serials = self.serials or [s for s, state in devices.items() if state == "device"]
        for serial in list(dict.fromkeys([*serials, *(s for s in self._phones if not self.serials)])):
            state = devices.get(serial, "gone")
            phone = self._phones.get(serial)
            if state != "device":
                if phone is not None and phone.state != state:
                    self._lost(phone, state)
                continue
            if phone is None:
                try:
                    self.phone_ports(serial)
                except ConfigError as exc:
                    self.say(f"{serial}: {exc}")
                    continue
                phone = self._phones[serial]
            phone.state = state
            if not phone.ready:
                self._setup(phone)
            if phone.ready:
                self._keep_running(phone)

    def _describe(self, ports: Sequence[int]) -> str:
        where = ", ".join(f"127.0.0.1:{p}" for p in ports)
        return f"tracker via device port {self.cfg.device_tracker}, server(s) at {where} (key {self.cfg.key!r})"

    def _setup(self, phone: _Phone) -> None:
        for cmd in setup_commands(self.cfg, phone.serial, phone.ports):
            ok, detail = run_adb(cmd)
            if not ok:
                failure = f"{phone.serial}: setup failed: {shlex.join(cmd[3:])[:80]}: {detail}"
                if failure != phone.failure:
                    self.say(f"{failure} (trying again every {self.cfg.poll_s:g} s)")
                phone.failure = failure
                return
        phone.ready, phone.failure = True, ""
        for server in phone.servers:
            server.next_start, server.delay = 0.0, 0.0
        self.say(f"{phone.serial}: set up: {self._describe(phone.ports)}")

    def _lost(self, phone: _Phone, state: str) -> None:
        hint = f": {STATE_HINTS[state]}" if state in STATE_HINTS else ""
        self.say(f"{phone.serial}: {'disconnected' if state == 'gone' else state}{hint}; waiting for it")
        phone.state = state
        phone.ready = False  # adb dropped its forwards: they are made again when it is back
        for server in phone.servers:
            self._end_host_side(server)

    def _keep_running(self, phone: _Phone) -> None:
        now = time.monotonic()
        for server in phone.servers:
            if server.proc is not None:
                code = server.proc.poll()
                if code is None:
                    continue
                ran = now - server.started
                server.proc = None
                # 1 s, doubling to 30 s while it keeps failing; 1 s again after a run longer than that
                longer = ran > self.cfg.max_restart_delay_s
                server.delay = min(
                    max(0.0 if longer else server.delay * 2, self.cfg.restart_delay_s), self.cfg.max_restart_delay_s
                )
                server.next_start = now + server.delay
                self.say(
                    f"{phone.serial}: server on port {server.port} exited (code {code}) after {ran:.1f} s; "
                    f"restarting in {server.delay:g} s"
                )
            if server.proc is None and now >= server.next_start:
                self._start(phone, server)

    def _start(self, phone: _Phone, server: _Server) -> None:
        (cmd,) = start_commands(self.cfg, phone.serial, [server.port])
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        except OSError as exc:
            self.say(f"{phone.serial}: cannot run adb: {exc}")
            server.next_start = time.monotonic() + max(self.cfg.restart_delay_s, server.delay)
            return
        server.proc, server.started = proc, time.monotonic()
        server.starts += 1
        verb = "started" if server.starts == 1 else "restarted"
        self.say(f"{phone.serial}: server on port {server.port} {verb} (start {server.starts})")
        reader = threading.Thread(
            target=self._relay, args=(phone.serial, proc), daemon=True, name=f"adb-{phone.serial}-{server.port}"
        )
        reader.start()
        self._readers.append(reader)

    def _relay(self, serial: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.say(f"[{serial}] {line.rstrip()}")

    def _end_host_side(self, server: _Server) -> None:
        proc, server.proc = server.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def teardown(self) -> None:
        """Stop the servers on the phones still attached, remove the forwards made, end every ``adb shell``."""
        for phone in self._phones.values():
            was_ready, phone.ready = phone.ready, False
            if was_ready:
                for cmd in stop_commands(self.cfg, phone.serial, phone.ports):
                    ok, detail = run_adb(cmd, timeout=10.0)
                    if not ok and "shell" not in cmd[3:4]:  # a server already gone is no news
                        self.say(f"{phone.serial}: {shlex.join(cmd[3:])}: {detail}")
            for server in phone.servers:
                self._end_host_side(server)
            if was_ready:
                self.say(f"{phone.serial}: servers stopped, forwards removed")
        for reader in self._readers:
            reader.join(5)
        self._readers.clear()
