"""The README's main job, as a newcomer runs it: ``tether demo`` in a real process."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("tvm")
pytest.importorskip("onnxruntime")

pytestmark = [pytest.mark.tvm, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_demo_runs_a_real_model_through_tracker_and_server() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tether", "--log-level", "WARNING", "demo", "--repeat", "3"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "remote onnxruntime vs local onnxruntime" in out and "remote TVM library vs local onnxruntime" in out
    assert "through the proxy, onnxruntime vs local" in out
    assert "-> OK" in out
    assert "Server List" in out and "server:demo-cpu" in out  # the query table, read while the session was held
    assert "top-5 classes" in out
