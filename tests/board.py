"""An emulated aarch64 board: Debian bookworm's arm64 userland with its own Python 3.11 and nothing else (no
pip, no third-party package), its programs run by qemu-user through the kernel's binfmt_misc, in a chroot of
their own (a private mount namespace gives it ``/proc``, ``/sys`` and what a test binds in).

What it stands for: the seeds' ARM board (a Raspberry Pi, a Jetson without its GPU) reached over the
network; its network is the host's (loopback included), its CPU an emulated Cortex.

    python tests/board.py build                      # the userland, once (cached), and binfmt for aarch64
    python tests/board.py run BUNDLE -- ARGS...      # ./tether-server ARGS on the board, BUNDLE at /opt/tether

Needs root (a chroot, mounts, binfmt), Debian's ``mmdebstrap`` and ``qemu-user-static``:
``apt-get install -y mmdebstrap qemu-user-static`` (``.ci/run`` installs them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

SUITE = "bookworm"
#: The userland: Python and the C/C++ runtime every Debian has (apt needs libstdc++); nothing from PyPI.
PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1")
PYTHON = "/usr/bin/python3.11"
#: Mount points made when the userland is built, so that running it never writes to it.
MOUNT_POINTS = ("proc", "sys", "tmp", "opt/tether", "mnt/host")
#: What a cached userland was built with: another means build it again.
_STAMP = f"layout 2: {SUITE} arm64 {' '.join(PACKAGES)}; {' '.join(MOUNT_POINTS)}; etc/cpuinfo\n"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")  # from qemu-user-static
HOST_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")


def cache_dir() -> Path:
    base = os.environ.get("TETHER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tether"
    )
    return Path(base) / "boards" / f"debian-{SUITE}-arm64"


def missing() -> str | None:
    """Why no board can run here (None: it can)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the emulated board needs Linux and root (chroot, mounts, binfmt_misc)"
    for tool in ("mmdebstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            return f"no {tool}: apt-get install -y mmdebstrap qemu-user-static"
    if not (BINFMT / "qemu-aarch64").exists() and not BINFMT_CONF.is_file():
        return f"no {BINFMT_CONF}: apt-get install -y qemu-user-static"
    return None


def ensure_binfmt() -> None:
    """aarch64 ELF files run through qemu (``F``: the interpreter is opened now, so it works in a chroot)."""
    if (BINFMT / "qemu-aarch64").exists():
        return
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True, timeout=30)
    (BINFMT / "register").write_text(BINFMT_CONF.read_text().strip())


def build(target: Path | None = None) -> Path:
    """The userland at ``target`` (default: the cache), built unless it is there; its path."""
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    ensure_binfmt()
    root = target or cache_dir()
    stamp = root / ".complete"
    if stamp.is_file() and stamp.read_text() == _STAMP:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".building-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        argv = ["mmdebstrap", "--mode=root", "--variant=extract", "--architectures=arm64", "--quiet"]
        argv += [f"--include={','.join(PACKAGES)}", SUITE, str(rootfs)]
        if HOST_SOURCES.is_file():  # this host's mirror, as apt here is set up
            argv.append(str(HOST_SOURCES))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed: {proc.stderr.strip()[-800:]}")
        for point in MOUNT_POINTS:
            (rootfs / point).mkdir(parents=True, exist_ok=True)
        (rootfs / "etc" / "cpuinfo").write_text(_cpuinfo())
        (rootfs / ".complete").write_text(_STAMP)
        if root.exists():
            shutil.rmtree(root)
        rootfs.rename(root)
    return root


def _cpuinfo() -> str:
    """An aarch64 ``/proc/cpuinfo`` (qemu-user shows the host's, whose x86 lines crash ARM CPU probes such as
    onnxruntime's cpuinfo): one Cortex-A76 entry per host CPU."""
    entry = (
        "processor\t: {n}\nBogoMIPS\t: 48.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
        "asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
        "CPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
    )
    cpus = "".join(entry.format(n=n) for n in range(os.cpu_count() or 1))
    return cpus + "Hardware\t: emulated aarch64 board (qemu-user)\n"


def command(rootfs: Path, argv: Sequence[str], binds: Mapping[str, Path], *, tmp: Path) -> list[str]:
    """``argv`` run on the board: in a private mount namespace, ``/proc`` and ``/sys`` mounted, each of
    ``binds`` (board path -> host directory; read-only) and ``tmp`` (its ``/tmp``) bound in, then chroot."""
    script = ['set -e; R="$1"; shift', 'mount --bind /sys "$R/sys"', 'mount -t proc proc "$R/proc"']
    script.append('mount --bind "$R/etc/cpuinfo" "$R/proc/cpuinfo"')
    script.append(f'mount --bind "{tmp}" "$R/tmp"')
    for point, host in binds.items():
        inside = point.strip("/")
        if inside not in MOUNT_POINTS:
            raise ValueError(f"/{inside} is not a mount point of the board ({', '.join(MOUNT_POINTS)})")
        script.append(f'mount --bind "{host}" "$R/{inside}" && mount -o remount,bind,ro "$R/{inside}"')
    script.append('exec chroot "$R" "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "; ".join(script), "sh", str(rootfs), *argv]


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["build"]:
        print(build())
        return 0
    if argv[:1] == ["run"] and len(argv) >= 2:
        bundle = Path(argv[1]).resolve()
        rest = list(argv[2:])
        if rest[:1] == ["--"]:
            rest = rest[1:]
        rootfs = build()
        with tempfile.TemporaryDirectory(prefix="board-tmp-") as tmp:
            cmd = command(
                rootfs, [PYTHON, "/opt/tether/tether-server.pyz", *rest], {"/opt/tether": bundle}, tmp=Path(tmp)
            )
            return subprocess.call(cmd)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
