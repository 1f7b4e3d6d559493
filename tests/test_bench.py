"""``tether bench`` and its library: statistics from raw samples, fan-out over every device of a key."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.client.bench import BenchSettings, bench
from tether.client.stats import median_ci, summarize
from tether.runtime.reference import write_reference_model
from tether.tracker import TrackerThread

pytestmark = pytest.mark.timeout(90)


def test_median_ci_matches_the_order_statistics_table() -> None:
    assert median_ci(list(range(1, 11))) == (2, 9)  # n=10: 2nd and 9th, coverage 97.9 %
    assert median_ci(list(range(1, 101))) == (40, 61)  # n=100: the textbook 40th and 61st
    assert median_ci([5.0, 6.0]) == (5.0, 6.0)  # too few samples: the whole range


@given(st.lists(st.floats(min_value=1e-6, max_value=10.0), min_size=1, max_size=200))
def test_summary_is_consistent(samples: list[float]) -> None:
    s = summarize(samples)
    assert s.min <= s.median_ci[0] <= s.median <= s.median_ci[1] <= s.max
    assert s.min <= s.p90 <= s.p99 <= s.max
    assert s.median == statistics.median(samples) and s.n == len(samples)


def _model(path: Path, scale: float) -> Path:
    spec = {"name": "x", "dtype": "float32", "shape": [4, 4]}
    write_reference_model(
        path, [spec], [{**spec, "name": "y"}], [{"op": "affine", "input": "x", "output": "y", "scale": scale}]
    )
    return path


def test_all_devices_fan_out_over_three_labelled_servers(
    tracker: TrackerThread, device_server: Any, tmp_path: Path
) -> None:
    for soc in ("a", "b", "c"):
        device_server(key="pool", tracker=(tracker.host, tracker.port), labels={"soc": soc})
    good = _model(tmp_path / "good.json", 2.0)
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "tether-reference/1", "inputs": []')
    records = bench(
        tracker.host,
        tracker.port,
        "pool",
        [good, broken],
        BenchSettings(number=2, repeat=7),
        devices=None,
        timeout=30,
    )
    assert sorted(r.labels["soc"] for r in records if r.model == "good.json") == ["a", "b", "c"]
    for r in records:
        if r.model == "good.json":
            assert r.error is None and r.stats is not None and r.stats.n == 7 and len(r.samples) == 7
            assert r.load_s is not None and r.facts.get("cores")
        else:
            assert r.error is not None and r.error["type"] == "ModelLoadError"
    # the CLI: one table, JSON and CSV, exit code 1 because one model failed to load
    out_json, out_csv = tmp_path / "out.json", tmp_path / "out.csv"
    done = subprocess.run(
        [sys.executable, "-m", "tether", "--log-level", "WARNING", "bench", str(good), "--tracker",
         f"{tracker.host}:{tracker.port}", "--key", "pool", "--all-devices", "--number", "1", "--repeat", "3",
         "--label", "soc=b", "--json", str(out_json), "--csv", str(out_csv)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "median ms" in done.stdout and "soc=b" in done.stdout
    (record,) = json.loads(out_json.read_text())
    assert record["labels"] == {"soc": "b"} and len(record["samples"]) == 3
    rows = list(csv.DictReader(out_csv.read_text().splitlines()))
    assert len(rows) == 1 and rows[0]["labels"] == "soc=b" and float(rows[0]["median_s"]) > 0


def test_reference_checks_report_wrong_answers(tracker: TrackerThread, device_server: Any, tmp_path: Path) -> None:
    """A tiny ONNX model checked against a local onnxruntime run, and a reference model against an .npz."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    device_server(key="check", tracker=(tracker.host, tracker.port))
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    onnx_path = tmp_path / "double.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=9), str(onnx_path))
    (ok,) = bench(
        tracker.host, tracker.port, "check", [onnx_path], BenchSettings(number=1, repeat=2, reference="onnxruntime")
    )
    assert ok.error is None and ok.stats is not None
    model = _model(tmp_path / "affine.json", 2.0)  # y = 2x, checked against y = 3x
    x = np.ones((4, 4), "float32")
    wrong = BenchSettings(number=1, repeat=2, inputs={"x": x}, reference={"y": 3 * x})
    (bad,) = bench(tracker.host, tracker.port, "check", [model], wrong)
    assert bad.error is not None and bad.error["type"] == "WrongAnswer" and "max |diff| 1" in bad.error["message"]
    right = BenchSettings(number=1, repeat=2, inputs={"x": x}, reference={"y": 2 * x})
    (good,) = bench(tracker.host, tracker.port, "check", [model], right)
    assert good.error is None and good.stats is not None and good.stats.n == 2
