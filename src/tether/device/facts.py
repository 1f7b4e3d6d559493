"""What a device is: OS, CPU, memory, accelerators, backends. Standard library only, no imports of
the runtimes themselves (their versions come from package metadata); backend plug-ins (``tether.backends``
entry points) are imported, to learn their names, versions and suffixes, and listed with their errors."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["device_facts"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("model name", "Hardware", "Processor", "cpu model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _accelerators() -> list[dict[str, str]]:
    found: list[dict[str, str]] = []
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir():
        for entry in sorted(gpus.iterdir()):
            model = "NVIDIA GPU"
            try:
                for line in (entry / "information").read_text().splitlines():
                    if line.startswith("Model:"):
                        model = line.split(":", 1)[1].strip()
            except OSError:
                pass
            found.append({"kind": "cuda", "model": model, "bus": entry.name})
    for node in sorted(Path("/dev").glob("kgsl-3d*")) + sorted(Path("/dev").glob("mali*")):
        found.append({"kind": "opencl", "model": node.name})
    if Path("/dev/accel").is_dir():
        found.extend({"kind": "npu", "model": node.name} for node in sorted(Path("/dev/accel").iterdir()))
    return found


def device_facts() -> dict[str, Any]:
    """The facts a server sends the tracker in ``info["tether"]["device"]``."""
    from ..runtime import available_backends, plugins

    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "os": platform.system(),
        "release": platform.release(),
        "arch": platform.machine(),
        "cpu": _cpu_model(),
        "cores": len(affinity(0)) if affinity else os.cpu_count(),
        "memory": _memory_bytes(),
        "accelerators": _accelerators(),
        "python": platform.python_version(),
        "backends": available_backends(),
        #: entry point name -> entry_point, dist, dist_version, version, suffixes, error (None when it loaded)
        "plugins": {name: plugin.fact() for name, plugin in plugins().items()},
    }
