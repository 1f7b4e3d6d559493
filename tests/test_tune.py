"""``tether tune`` end to end, run as users run it (the CLI in a process of its own): a small MLP imported from
ONNX with Relax, tuned with meta_schedule through tether's tracker on two tether servers (TetherRunner) and on
a TVM ``rpc_server`` (TVM's RPCRunner), exported, and measured untuned vs tuned against onnxruntime; a second
run on the same work dir measures nothing twice; an aarch64 cross-compile yields an aarch64 shared object.

Each run builds in warm worker processes (each imports TVM's tensor intrinsics once: ~10 s of CPU here), so
the trial counts are small: these check the machinery, ``bench/tune_bench.py`` measures the speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tether.tracker import TrackerThread

from .test_tvm_interop import tvm_server  # noqa: F401 - fixture

pytest.importorskip("tvm")
pytest.importorskip("tvm.s_tir.meta_schedule")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

pytestmark = [pytest.mark.tvm, pytest.mark.timeout(300)]


def _mlp(path: Path) -> Path:
    """x[8,64] @ w1 + b1 -> relu -> @ w2: two tasks (a fused matmul+add+relu, a matmul)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((64, 96)) * 0.1).astype("float32"), "w1")
    b1 = numpy_helper.from_array((rng.standard_normal((96,)) * 0.1).astype("float32"), "b1")
    w2 = numpy_helper.from_array((rng.standard_normal((96, 10)) * 0.1).astype("float32"), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 10])],
        [w1, b1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _mlp(tmp_path_factory.mktemp("tune") / "mlp.onnx")


def tether_tune(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tether", "tune", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _measured_keys(work_dir: Path) -> list[str]:
    lines = (work_dir / "tether_measured.jsonl").read_text().splitlines()
    return [json.loads(line)["key"] for line in lines]


def _elf_machine(path: Path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def test_tunes_on_two_tether_servers_and_resumes(
    tracker: TrackerThread, device_server: Callable[..., Any], mlp: Path, tmp_path: Path
) -> None:
    servers = [device_server(key="tune-cpu", tracker=(tracker.host, tracker.port), preload=["tvm"]) for _ in "ab"]
    work = tmp_path / "work"
    common = ["--key", "tune-cpu", "--target", "llvm -num-cores=1", "--work-dir", str(work), "--builders", "2"]
    # the seed's spelling: the tracker from TVM_TRACKER_HOST/PORT, an old CLI target string translated
    env = {"TVM_TRACKER_HOST": tracker.host, "TVM_TRACKER_PORT": str(tracker.port)}
    rc, out, err = tether_tune(
        str(mlp), *common, "--trials", "8", "-o", str(tmp_path / "mlp.so"), "--json", str(tmp_path / "r1.json"), env=env
    )
    assert rc == 0, err
    report = json.loads((tmp_path / "r1.json").read_text())
    assert report["target"] == {"kind": "llvm", "num-cores": 1}
    assert report["runner"] == "tether"
    assert (report["trials_before"], report["trials_run"]) == (0, 8)
    assert report["measured"] + report["cached"] == 8
    names = {t["name"] for t in report["progress"]["tasks"]}
    assert len(names) == 2 and sum(t["trials"] for t in report["progress"]["tasks"]) == 8, report["progress"]
    addresses = {f"127.0.0.1:{s.port}" for s in servers}
    assert set(report["progress"]["devices"]) <= addresses and report["progress"]["devices"]
    # progress lines while it ran: trials of N, best latency, devices, the key's queue at the tracker
    assert "tune: trials 8/8 |" in err and "best " in err and "tune-cpu: " in err
    # the tuned and the untuned library: measured on the same device, both matching onnxruntime
    assert report["untuned"]["checked"] and report["tuned"]["checked"], (report["untuned"], report["tuned"])
    assert report["untuned"]["device"] == report["tuned"]["device"] in addresses
    assert report["untuned"]["stats"]["n"] == report["tuned"]["stats"]["n"] == 10
    assert report["speedup"] > 0 and Path(report["output"]) == tmp_path / "mlp.so"
    assert _elf_machine(tmp_path / "mlp.so") == 62  # x86-64
    assert "speedup: x" in out and "untuned" in out
    first = _measured_keys(work)
    assert len(first) == len(set(first)) == report["measured"]

    # the same run again: everything is in the work dir, nothing is measured
    rc, out, err = tether_tune(
        str(mlp),
        *common,
        "--trials",
        "8",
        "--json",
        str(tmp_path / "r2.json"),
        "--tracker",
        f"{tracker.host}:{tracker.port}",
    )
    assert rc == 0, err
    again = json.loads((tmp_path / "r2.json").read_text())
    assert (again["trials_before"], again["trials_run"], again["measured"]) == (8, 0, 0)
    assert again["tuned"]["checked"]
    assert _measured_keys(work) == first
    # more trials continue from there; a candidate proposed again comes from the work dir, not the device
    rc, out, err = tether_tune(
        str(mlp),
        *common,
        "--trials",
        "12",
        "--json",
        str(tmp_path / "r3.json"),
        "--rpc-tracker",
        f"{tracker.host}:{tracker.port}",
        "--no-measure",
    )
    assert rc == 0, err
    more = json.loads((tmp_path / "r3.json").read_text())
    assert (more["trials_before"], more["trials_run"]) == (8, 4)
    assert more["measured"] + more["cached"] == 4 and more["untuned"] is None
    keys = _measured_keys(work)
    assert len(keys) == len(set(keys)) == len(first) + more["measured"]  # nothing measured twice


def test_tunes_through_rpcrunner_on_a_tvm_rpc_server(
    tracker: TrackerThread,
    tvm_server: Callable[..., Any],  # noqa: F811 - fixture
    mlp: Path,
    tmp_path: Path,
) -> None:
    """A key served only by TVM's rpc_server: measured with TVM's RPCRunner, the final numbers through TVM RPC."""
    tvm_server(tracker.port, "tune-tvm")
    rc, _out, err = tether_tune(
        str(mlp),
        "--rpc-tracker",
        f"{tracker.host}:{tracker.port}",
        "--rpc-key",
        "tune-tvm",
        "--target",
        '{"kind": "llvm", "num-cores": 1}',
        "--trials",
        "4",
        "--builders",
        "2",
        "--work-dir",
        str(tmp_path / "work"),
        "--output",
        str(tmp_path / "t.so"),
        "--json",
        str(tmp_path / "r.json"),
    )
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["runner"] == "tvm" and report["trials_run"] == 4
    assert report["progress"]["failures"] == {}, report["progress"]
    assert report["tuned"]["checked"] and report["untuned"]["checked"], report["tuned"]
    assert "(TVM RPC)" in report["tuned"]["device"]


def test_cross_compiles_for_aarch64(
    tracker: TrackerThread, device_server: Callable[..., Any], mlp: Path, tmp_path: Path
) -> None:
    cc = shutil.which("aarch64-linux-gnu-g++")
    if cc is None:
        pytest.skip("needs Debian's g++-aarch64-linux-gnu (the cross compiler): apt-get install g++-aarch64-linux-gnu")
    device_server(key="tune-board", tracker=(tracker.host, tracker.port))
    out_so = tmp_path / "mlp-aarch64.so"
    # trials 0: nothing to measure (this host's servers cannot run aarch64 code), the library is still built
    rc, _out, err = tether_tune(
        str(mlp),
        "--tracker",
        f"{tracker.host}:{tracker.port}",
        "--key",
        "tune-board",
        "--target",
        "llvm -mtriple=aarch64-linux-gnu -mattr=+neon",
        "--cc",
        cc,
        "--trials",
        "0",
        "--no-measure",
        "--work-dir",
        str(tmp_path / "w"),
        "-o",
        str(out_so),
    )
    assert rc == 0, err
    assert _elf_machine(out_so) == 183  # EM_AARCH64
    # a candidate, as the build workers make them for such a board: cross-compiled too
    import tvm
    from tvm import te

    from tether.tune import _worker

    a = te.placeholder((64,), name="A")
    func = te.create_prim_func([a, te.compute((64,), lambda i: a[i] * 2.0, name="B")])
    target = json.dumps({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    path, _ = _worker.build(tvm.ir.save_json(tvm.IRModule({"main": func})), target, cc, str(tmp_path))
    assert _elf_machine(Path(path)) == 183


def test_a_bad_target_says_what_json_to_write(tracker: TrackerThread, mlp: Path, tmp_path: Path) -> None:
    rc, _, err = tether_tune(
        str(mlp),
        "--tracker",
        f"{tracker.host}:{tracker.port}",
        "--key",
        "k",
        "--target",
        "llvm mtriple",
        "--work-dir",
        str(tmp_path),
    )
    assert rc == 2 and 'write the target as JSON, e.g. {"kind": "llvm"}' in err and "Traceback" not in err
    rc, _, err = tether_tune(
        str(mlp),
        "--tracker",
        f"{tracker.host}:{tracker.port}",
        "--key",
        "nobody",
        "--target",
        "llvm",
        "--work-dir",
        str(tmp_path),
    )
    assert rc == 1 and "lists no server of key 'nobody'" in err and "Traceback" not in err
