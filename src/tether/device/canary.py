"""The canary: a small reference model a device server runs when the tracker asks (device health).

A quarantined server (too many failed sessions in a row, :mod:`tether.tracker.health`) is granted nothing
until a canary passes. The canary runs the way a session does, in a fresh Python process started from the
server's interpreter: ``python -m tether.device.canary`` imports the runtime, loads a 202-byte ONNX model
(``y = relu(x @ W + b)``, 4 -> 3, weights below), runs it on a fixed input and compares the output with the
answer computed here in plain Python (within 1e-4). Without onnxruntime (a bare device) the same model is
evaluated in plain Python, which still proves that a worker starts, computes and writes its answer back.

It prints one JSON line, ``{"ok": bool, "detail": str, "backend": str, "seconds": float}``, and exits 0.
:func:`run_canary` starts it with a time limit (seconds) and never raises. Standard library only.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from typing import Any

__all__ = ["MODEL", "expected_output", "run_canary"]

#: The canary model, ONNX (opset 13, IR 8): y = relu(x @ W + b), x of shape [1, 4].
MODEL = base64.b64decode(
    "CAgSBnRldGhlcjq3AQoRCgF4CgFXEgFoIgZNYXRNdWwKDgoBaAoBYhIBeiIDQWRkCgwKAXoSAXkiBFJlbHUSBmNhbmFyeSo7CAQIAxABQgFX"
    "SjAAAIA/AAAAwAAAAD8AAIA+AACAPwAAgL8AAAC/AABAPwAAAEAAAMA/AACAvwAAgD4qFQgDEAFCAWJKDM3MzD3NzEy+mpmZPloTCgF4Eg4K"
    "DAgBEggKAggBCgIIBGITCgF5Eg4KDAgBEggKAggBCgIIA0IECgAQDQ=="
)
_W = ((1.0, -2.0, 0.5), (0.25, 1.0, -1.0), (-0.5, 0.75, 2.0), (1.5, -1.0, 0.25))
_B = (0.1, -0.2, 0.3)
_X = (1.0, 2.0, 3.0, 4.0)
_TOLERANCE = 1e-4


def expected_output(x: tuple[float, ...] = _X) -> list[float]:
    """The model's answer, computed in plain Python."""
    return [max(0.0, sum(x[i] * _W[i][j] for i in range(4)) + _B[j]) for j in range(3)]


def _with_onnxruntime() -> tuple[list[float], str]:
    # optional: a bare device has neither (then the canary computes in plain Python)
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.array([_X], dtype=np.float32)})
    return [float(v) for v in y[0]], f"onnxruntime {ort.__version__}"


def check() -> dict[str, Any]:
    """Run the canary in this process."""
    started = time.perf_counter()
    want = expected_output()
    try:
        got, backend = _with_onnxruntime()
    except ImportError:
        got, backend = expected_output(), "python (no onnxruntime)"
    except Exception as exc:  # the runtime is broken: that is what the canary is for
        return {
            "ok": False,
            "detail": f"onnxruntime failed: {type(exc).__name__}: {exc}"[:400],
            "backend": "onnxruntime",
        }
    seconds = time.perf_counter() - started
    if len(got) != len(want) or any(abs(a - b) > _TOLERANCE for a, b in zip(got, want, strict=False)):
        return {"ok": False, "detail": f"{backend}: wrong output {got}, expected {want}", "backend": backend}
    return {"ok": True, "detail": f"{backend}: {seconds * 1e3:.1f} ms", "backend": backend, "seconds": seconds}


def run_canary(timeout: float = 60.0, python: str = sys.executable) -> tuple[bool, str]:
    """Run the canary in a fresh process of ``python``; (passed, what happened). Never raises."""
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    started = time.monotonic()
    try:
        done = subprocess.run(
            [python, "-m", "tether.device.canary"],
            capture_output=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, f"the canary did not finish within {timeout:g} s"
    except OSError as exc:
        return False, f"the canary could not start: {exc}"
    took = time.monotonic() - started
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
        ok, detail = result["ok"] is True, str(result["detail"])
    except (IndexError, ValueError, KeyError, TypeError):
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        return False, f"the canary process exited with code {done.returncode}: {tail[0][:300]}"
    return ok, f"{detail} (process {took:.2f} s)"


def main() -> int:
    print(json.dumps(check()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
