"""The pieces of ``tether tune`` without a tuning run: the work dir's measurements, failure kinds, progress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tvm")
pytest.importorskip("tvm.s_tir.meta_schedule")
from tvm.s_tir.meta_schedule.runner import RunnerResult

from tether.client.batch import Measurement
from tether.tune.builder import CACHE_FILE, MeasureCache
from tether.tune.progress import TuneProgress, failure_kind

pytestmark = [pytest.mark.tvm, pytest.mark.timeout(60)]


def test_measurements_survive_a_restart_and_a_torn_last_line(tmp_path: Path) -> None:
    cache = MeasureCache(tmp_path)
    cache.put("k1", [0.001, 0.002], None)
    cache.put("k2", None, "TetherRunner: load: ModelLoadError: bad library (on 127.0.0.1:1)")
    with (tmp_path / CACHE_FILE).open("a") as f:
        f.write('{"key": "k3", "run_s')  # a run killed mid-write
    again = MeasureCache(tmp_path)
    assert again.loaded == len(again) == 2
    assert again.get("k1") == {"key": "k1", "run_secs": [0.001, 0.002], "error": None}
    assert again.get("k2")["error"].startswith("TetherRunner: load:")  # type: ignore[index]
    assert again.get("k3") is None
    again.put("k3", [0.5], None)  # appended after the torn line, still read back
    assert MeasureCache(tmp_path).get("k3") == {"key": "k3", "run_secs": [0.5], "error": None}


def test_a_candidate_key_is_its_structure_and_target() -> None:
    import tvm
    from tvm import te

    def func(scale: float) -> Any:
        a = te.placeholder((16,), name="A")
        return tvm.IRModule({"main": te.create_prim_func([a, te.compute((16,), lambda i: a[i] * scale, name="B")])})

    llvm, arm = json.dumps({"kind": "llvm"}), json.dumps({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    assert MeasureCache.key_of(func(2.0), llvm) == MeasureCache.key_of(func(2.0), llvm)  # rebuilt: same key
    assert MeasureCache.key_of(func(2.0), llvm) != MeasureCache.key_of(func(3.0), llvm)
    assert MeasureCache.key_of(func(2.0), llvm) != MeasureCache.key_of(func(2.0), arm)


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("TetherRunner: load: ModelLoadError: cannot open (on 127.0.0.1:9)", "load"),
        ("TetherRunner: timeout: RunTimeout: 60 s (on 127.0.0.1:9)", "timeout"),
        ("TetherRunner: lost: ConnectionClosed: reset (3 sessions lost under it) (on x)", "lost"),
        ("TetherRunner: no_device: RequestTimeout: no device left (on no device)", "no_device"),
        ("RPCRunner: An exception occurred\nTraceback ...\nTimeoutError: timed out", "timeout"),
        ("RPCRunner: An exception occurred\nTraceback ...\nTypeError: Mismatched type", "run"),
    ],
)
def test_failure_kinds(message: str, kind: str) -> None:
    assert failure_kind(message) == kind


def test_progress_counts_and_says_what_it_knows() -> None:
    lines: list[str] = []
    now = [100.0]
    progress = TuneProgress(8, on_line=lines.append, status=lambda: "cpu: 2/2 busy, 0 waiting", clock=lambda: now[0])
    progress.measured(Measurement(0, "c0", [0.001], device="127.0.0.1:9001", waited_s=1.5))
    progress.measured(Measurement(1, "c1", [0.001], device="127.0.0.1:9002"))
    now[0] = 110.0
    ok = RunnerResult([0.004, 0.002], None)
    progress.batch(0, "fused_matmul", [None, None, "WarmBuilder: timeout"], [ok, RunnerResult([0.001], None), ok])
    progress.batch(1, "matmul", [None], [RunnerResult(None, "TetherRunner: load: ModelLoadError: x (on y)")])
    assert progress.done == 4 and progress.failures == {"build": 1, "load": 1}
    assert lines[0] == (
        "tune: trials 3/8 | fused_matmul (3 trials, best 1 ms) | devices 2 | queue wait 1.5 s | "
        "failures build 1 | ~17 s left | cpu: 2/2 busy, 0 waiting"
    )
    assert "matmul (1 trials, best -)" in lines[1] and "failures build 1, load 1" in lines[1]
    report = progress.to_dict()
    assert report["tasks"][0] == {"name": "fused_matmul", "trials": 3, "best_ms": 1.0}
    assert report["devices"] == ["127.0.0.1:9001", "127.0.0.1:9002"] and report["queue_wait_s"] == 1.5
    assert report["last_errors"]["build"] == "WarmBuilder: timeout"


def test_a_progress_line_survives_a_tracker_that_does_not_answer() -> None:
    lines: list[str] = []

    def status() -> str:
        raise ConnectionRefusedError

    progress = TuneProgress(1, on_line=lines.append, status=status)
    progress.batch(0, "t", [None], [RunnerResult([0.001], None)])
    assert lines[0].endswith("(tracker: ConnectionRefusedError)")
