"""Fidelity: results carry the device's conditions, the worker's peak memory, a validity verdict and, on
request, per-operator profiles (onnxruntime and TVM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tether
from tether.client.bench import BenchSettings, bench
from tether.client.stats import ValidityRules, condition_warnings, validity
from tether.device import conditions
from tether.runtime.ort_backend import ort_operator_times
from tether.tracker import TrackerThread

# -- the rules, on crafted samples ----------------------------------------------------------------------


def test_too_few_samples_is_invalid() -> None:
    verdict = validity([0.1, 0.1], number=10, rules=ValidityRules(min_samples=5, min_duration_s=0))
    assert not verdict.valid and verdict.label == "INVALID"
    assert verdict.reasons[0].startswith("too few samples: 2 < 5")


def test_too_short_is_invalid() -> None:
    samples = [1e-3] * 20  # 20 samples of 10 runs of 1 ms: 0.2 s measured
    verdict = validity(samples, number=10, rules=ValidityRules(min_duration_s=1.0))
    assert not verdict.valid and verdict.label == "INVALID"
    (reason,) = verdict.reasons
    assert reason.startswith("too short: 0.2 s of timed runs < 1 s")
    assert validity(samples, number=50, rules=ValidityRules(min_duration_s=1.0)).valid


def test_noise_makes_a_result_noisy_not_valid() -> None:
    steady = [1.0 + 0.001 * (i % 3) for i in range(30)]
    assert validity(steady, rules=ValidityRules(min_duration_s=0)).valid
    noisy = [1.0, 1.3] * 15  # CV ~ 13%
    verdict = validity(noisy, rules=ValidityRules(min_duration_s=0, max_ci_width=0))
    assert not verdict.valid and verdict.noisy and verdict.label == "NOISY"
    assert verdict.reasons[0].startswith("too noisy to trust: coefficient of variation")
    # a wide CI of the median alone (few samples: the whole range) also flags noise
    few = [1.0, 1.02, 1.04, 1.06, 1.08]
    verdict = validity(few, rules=ValidityRules(min_duration_s=0, max_cv=0.5, max_ci_width=0.05))
    assert verdict.label == "NOISY" and "CI spans" in verdict.reasons[0]
    off = ValidityRules(min_samples=1, min_duration_s=0, max_cv=0, max_ci_width=0)
    assert validity(noisy, rules=off).valid


def test_conditions_add_notes_not_invalidity() -> None:
    cond = {
        "governor": {"0": "powersave", "1": None},
        "other_sessions": 0,
        "other_sessions_after": 2,
        "before": {"freq_mhz": {"0": 2000.0, "1": None}, "temp_c": {"cpu": 50.0}},
        "after": {"freq_mhz": {"0": 1200.0, "1": None}, "temp_c": {"cpu": 58.0}},
    }
    notes = condition_warnings(cond)
    assert len(notes) == 4 and notes[0].startswith("2 other session(s)")
    assert any("CPU(s) 0" in n for n in notes) and any("powersave" in n for n in notes)
    verdict = validity([1.0] * 10, rules=ValidityRules(min_duration_s=0), conditions=cond)
    assert verdict.valid and verdict.warnings == notes
    assert condition_warnings({"governor": {"0": None}, "other_sessions": None}) == []


# -- conditions on the device --------------------------------------------------------------------------


def test_conditions_read_sysfs_and_tolerate_its_absence(tmp_path: Path) -> None:
    cpu = tmp_path / "cpu"
    for n, (gov, khz) in enumerate([("performance", "2400000"), (None, None)]):
        d = cpu / f"cpu{n}"
        (d / "cpufreq").mkdir(parents=True)
        if gov:
            (d / "cpufreq" / "scaling_governor").write_text(gov + "\n")
            (d / "cpufreq" / "scaling_cur_freq").write_text(khz + "\n")
    (cpu / "cpufreq").mkdir()  # not a CPU
    thermal = tmp_path / "thermal"
    for n, (kind, milli) in enumerate([("x86_pkg_temp", "45000"), ("acpitz", "30500"), ("acpitz", "31000")]):
        (thermal / f"thermal_zone{n}").mkdir(parents=True)
        (thermal / f"thermal_zone{n}" / "type").write_text(kind + "\n")
        (thermal / f"thermal_zone{n}" / "temp").write_text(milli + "\n")
    assert conditions.governors(cpu) == {"0": "performance", "1": None}
    assert conditions.frequencies_mhz(cpu) == {"0": 2400.0, "1": None}
    assert conditions.temperatures_c(thermal) == {"x86_pkg_temp": 45.0, "acpitz": 30.5, "acpitz#2": 31.0}
    assert conditions.governors(tmp_path / "absent") == {} and conditions.temperatures_c(tmp_path / "absent") == {}
    snap = conditions.snapshot()  # the real machine: types only (a container may expose nothing)
    assert isinstance(snap["loadavg"], list) and len(snap["loadavg"]) == 3
    assert all(v is None or isinstance(v, float) for v in snap["freq_mhz"].values())
    assert (conditions.peak_rss_bytes() or 0) > 0


def test_ort_profile_trace_aggregates_kernel_events_by_node() -> None:
    trace = [
        {"cat": "Session", "name": "model_run", "dur": 500},
        {"cat": "Node", "name": "conv_fence_before", "dur": 0, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "conv_kernel_time", "dur": 300, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "conv_kernel_time", "dur": 300, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "relu_kernel_time", "dur": 200, "args": {"op_name": "Relu"}},
    ]
    conv, relu = ort_operator_times(trace, runs=2)
    assert (conv["name"], conv["op"], conv["calls"]) == ("conv", "Conv", 2)
    assert conv["total_s"] == pytest.approx(600e-6) and conv["per_run_s"] == pytest.approx(300e-6)
    assert conv["percent"] == pytest.approx(75.0) and relu["percent"] == pytest.approx(25.0)


# -- real measurements ------------------------------------------------------------------------------------


def _convnet(path: Path) -> Path:
    """A tiny ONNX convnet: Conv -> Relu -> GlobalAveragePool."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype("float32"), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["y"]),
        ],
        "convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1])],
        initializer=[w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=9), str(path))
    return path


def _check_conditions(cond: dict[str, Any], runtime: str) -> None:
    assert set(cond) >= {"governor", "affinity", "other_sessions", "threads", "before", "after"}
    assert all(g is None or isinstance(g, str) for g in cond["governor"].values())
    assert isinstance(cond["affinity"], list) and cond["affinity"] and all(isinstance(c, int) for c in cond["affinity"])
    assert cond["threads"]["runtime"] == runtime
    for snap in (cond["before"], cond["after"]):
        assert isinstance(snap["loadavg"], list) and len(snap["loadavg"]) == 3
        assert all(v is None or isinstance(v, float) for v in snap["freq_mhz"].values())
        assert all(isinstance(v, float) for v in snap["temp_c"].values())


def test_bench_records_conditions_memory_validity_and_profile(
    tracker: TrackerThread, device_server: Any, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    device_server(key="fid", tracker=(tracker.host, tracker.port))
    model = _convnet(tmp_path / "convnet.onnx")
    settings = BenchSettings(number=1, repeat=2, profile=True, profile_runs=3, options={"intra_op_num_threads": 1})
    (record,) = bench(tracker.host, tracker.port, "fid", [model], settings, timeout=30)
    assert record.error is None and record.stats is not None
    assert record.valid is False and record.verdict == "INVALID"
    assert any(w.startswith("too few samples: 2 < 5") for w in record.warnings)
    assert any(w.startswith("too short") for w in record.warnings)
    assert record.conditions is not None
    _check_conditions(record.conditions, "onnxruntime")
    assert record.conditions["other_sessions"] == 0 and record.conditions["threads"]["intra_op_num_threads"] == 1
    assert (record.memory["after_load"] or 0) > 0 and (record.memory["after_bench"] or 0) >= record.memory["after_load"]
    assert record.profile is not None and record.profile_error is None
    ops = {row["op"] for row in record.profile}  # (onnxruntime fuses Conv+Relu and may reorder layouts)
    assert {"Conv", "GlobalAveragePool"} <= ops
    assert all(row["calls"] == 3 for row in record.profile)
    assert sum(row["percent"] for row in record.profile) == pytest.approx(100.0)
    # the CLI: a validity column, the conditions line, the operators, and every field in --json
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "tether", "--log-level", "WARNING", "bench", str(model), "--tracker",
         f"{tracker.host}:{tracker.port}", "--key", "fid", "--number", "1", "--repeat", "2", "--profile",
         "--profile-runs", "2", "--profile-top", "2", "--json", str(out), "--quiet"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout.splitlines()[0] and "INVALID" in done.stdout
    assert "conditions: governor" in done.stdout and "other sessions 0" in done.stdout
    assert "peak memory (worker RSS)" in done.stdout and f"top 2 of {len(record.profile)} operators" in done.stdout
    (data,) = json.loads(out.read_text())
    assert data["valid"] is False and any(w.startswith("too few samples") for w in data["warnings"])
    _check_conditions(data["conditions"], "onnxruntime")
    assert data["memory"]["after_load"] > 0 and data["memory"]["after_bench"] > 0
    assert len(data["profile"]) == len(record.profile) and data["number"] == 1


def test_other_sessions_and_model_benchmark_fields(device_server: Any, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    server = device_server(key="dev", slots=2)
    model = _convnet(tmp_path / "convnet.onnx")
    with (
        tether.connect("127.0.0.1", server.port, key="dev") as sess,
        tether.connect("127.0.0.1", server.port, key="dev") as other,
    ):
        other.ping()  # the second session is running
        remote = sess.load_model(sess.upload(model, "m.onnx"))
        assert (remote.peak_rss or 0) > 0
        result = remote.benchmark(number=1, repeat=3)
        assert result.conditions is not None and result.conditions["other_sessions"] == 1
        assert result.peak_rss and result.peak_rss > 0 and result.profile is None
        assert not result.valid and "1 other session(s) ran on the device during the measurement" in result.warnings
        as_dict = result.to_dict()
        assert as_dict["valid"] is False and as_dict["conditions"]["other_sessions"] == 1


@pytest.mark.tvm
def test_tvm_model_profile_and_threads(device_server: Any, tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    pytest.importorskip("onnxruntime")
    from .test_runtime import compile_onnx

    lib = compile_onnx(_convnet(tmp_path / "convnet.onnx"), tmp_path / "convnet.so")
    server = device_server(key="dev")
    with tether.connect("127.0.0.1", server.port, key="dev") as sess:
        remote = sess.load_model(sess.upload(lib, "convnet.so"))
        result = remote.benchmark(number=2, repeat=2, profile=True, profile_runs=2)
    assert result.conditions is not None
    _check_conditions(result.conditions, "tvm")
    threads = result.conditions["threads"]
    assert isinstance(threads["num_threads"], int) and threads["num_threads"] >= 1
    if hasattr(os, "sched_getaffinity"):
        # asking TVM for its thread count starts its pool, which pins the asking thread to one CPU: the
        # worker puts its affinity back, so it measures on the CPUs the server was given, as in-process
        assert result.conditions["affinity"] == sorted(os.sched_getaffinity(0))
    assert result.profile is not None, result.profile_error
    kernels = [row for row in result.profile if row["op"] == "kernel"]
    assert kernels and all(row["calls"] == 2 for row in kernels)
    assert sum(row["percent"] for row in result.profile) == pytest.approx(100.0)
    assert result.peak_rss and result.peak_rss > 0
