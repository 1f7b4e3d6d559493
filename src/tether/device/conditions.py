"""The conditions a measurement was taken under, read on the device around it. Standard library only.

A timing means little without the state of the machine that produced it: a CPU held at a low frequency
by its governor or by heat, other sessions running at the same time, a runtime told to use one thread.
:func:`snapshot` reads what changes during a measurement (frequencies, temperatures, load), taken before
and after it; :func:`setup` what does not (governors, CPU affinity, the sessions active at that moment,
the runtime's thread settings). Every reading is best effort: what the system does not expose (no cpufreq
in a container, no thermal zones) is ``None`` or empty, never an error.

:func:`peak_rss_bytes` is the worker's high-water resident memory (``VmHWM``, else ``ru_maxrss``).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["active_sessions", "peak_rss_bytes", "setup", "snapshot"]

_CPU_DIR = Path("/sys/devices/system/cpu")
_THERMAL_DIR = Path("/sys/class/thermal")
_CPU_NAME = re.compile(r"cpu(\d+)")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def _cpus(root: Path) -> list[tuple[int, Path]]:
    """The CPUs the system lists (``cpu0``, ``cpu1``, ...), in order."""
    found = []
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            match = _CPU_NAME.fullmatch(entry.name)
            if match:
                found.append((int(match.group(1)), entry))
    return sorted(found)


def governors(root: Path = _CPU_DIR) -> dict[str, str | None]:
    """Each CPU's cpufreq governor by CPU number (``None`` where cpufreq is not exposed)."""
    return {str(n): _read(path / "cpufreq" / "scaling_governor") for n, path in _cpus(root)}


def frequencies_mhz(root: Path = _CPU_DIR) -> dict[str, float | None]:
    """Each CPU's current frequency in MHz by CPU number (``scaling_cur_freq`` is in kHz; ``None`` where absent)."""
    out: dict[str, float | None] = {}
    for n, path in _cpus(root):
        text = _read(path / "cpufreq" / "scaling_cur_freq")
        out[str(n)] = int(text) / 1000 if text and text.isdigit() else None
    return out


def temperatures_c(root: Path = _THERMAL_DIR) -> dict[str, float]:
    """Thermal sensors in °C by ``<type>`` (``<type>#<zone>`` when two zones share a type); sysfs gives m°C."""
    out: dict[str, float] = {}
    zones = []
    with contextlib.suppress(OSError):
        zones = sorted(p for p in root.iterdir() if p.name.startswith("thermal_zone"))
    for zone in zones:
        temp = _read(zone / "temp")
        if temp is None or not temp.lstrip("-").isdigit():
            continue
        name = _read(zone / "type") or zone.name
        if name in out:
            name = f"{name}#{zone.name.removeprefix('thermal_zone')}"
        out[name] = int(temp) / 1000
    return out


def load_average() -> list[float] | None:
    try:
        return [round(v, 3) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def affinity() -> list[int] | None:
    """The CPUs this process may run on (``None`` where the OS does not tell)."""
    get = getattr(os, "sched_getaffinity", None)
    return sorted(get(0)) if get else None


def peak_rss_bytes() -> int | None:
    """This process's high-water resident set size in bytes: ``VmHWM`` (Linux), else ``ru_maxrss``."""
    status = _read(Path("/proc/self/status"))
    if status:
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    return int(parts[1]) * 1024
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB elsewhere


def active_sessions(sessions_dir: str | None, own: str | None) -> int | None:
    """Sessions running on this server other than ``own``: the server gives each session a workspace
    ``session-<id>-*`` in one directory, made before its worker starts and removed once it has exited.
    ``None`` when unknown."""
    if not sessions_dir:
        return None
    try:
        return sum(1 for name in os.listdir(sessions_dir) if name.startswith("session-") and name != own)
    except OSError:
        return None


def snapshot() -> dict[str, Any]:
    """What may change while a measurement runs: frequencies (MHz), temperatures (°C), load average."""
    return {"freq_mhz": frequencies_mhz(), "temp_c": temperatures_c(), "loadavg": load_average()}


def setup(*, other_sessions: int | None, threads: dict[str, Any]) -> dict[str, Any]:
    """What holds for the whole measurement: governors, affinity, other sessions, the runtime's threads."""
    return {
        "governor": governors(),
        "affinity": affinity(),
        "other_sessions": other_sessions,
        "threads": threads,
    }
