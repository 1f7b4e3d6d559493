"""TVM's meta_schedule ``RPCRunner`` (apache-tvm 0.27: ``tvm.s_tir.meta_schedule.runner``) measuring
prebuilt candidates through tether's tracker, against TVM's ``rpc_server``s and against tether's servers,
with TVM's own tracker as the reference.

The runner's standalone ``run([RunnerInput(...)])`` is what talks to the tracker and the servers; one test
constructs a ``TuneContext`` (what every ``tune_tir``/``tune_relax`` does first), which segfaults when
apache-tvm-ffi 0.1.15 is installed beside the 0.27 wheel (the ``tvm`` extra pins it below). The
candidates are a 128x128 float32 matmul prim func named ``main``, tiled a few ways with
``tvm.s_tir.Schedule``, compiled for llvm and exported once per module.

RPCRunner measures in its own popen workers: each one connects to the tracker, requests a session of the
key, uploads the artifact, fills the arguments with ``tvm.contrib.random.random_fill_for_measure``, runs
``time_evaluator`` on the module's entry function and removes the artifact (and ``""``) afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import version
from typing import Any

import pytest

from tether.tracker import TrackerThread

from .conftest import wait_until
from .test_tvm_interop import free_of, tvm_server, tvm_tracker  # noqa: F401 - fixtures

tvm = pytest.importorskip("tvm")
pytest.importorskip("tvm.s_tir.meta_schedule")
from tvm import rpc, te  # noqa: E402
from tvm.s_tir import Schedule  # noqa: E402
from tvm.s_tir.meta_schedule.arg_info import ArgInfo, TensorInfo  # noqa: E402
from tvm.s_tir.meta_schedule.runner import (  # noqa: E402
    EvaluatorConfig,
    RPCConfig,
    RPCRunner,
    RunnerInput,
    RunnerResult,
)

pytestmark = pytest.mark.tvm

N = 128
TILES: list[tuple[int, int] | None] = [None, (8, 8), (16, 16), (32, 32), (8, 32), (32, 8)]
EVALUATOR = EvaluatorConfig(number=2, repeat=3, min_repeat_ms=0, enable_cpu_cache_flush=False)


def _matmul() -> Any:
    a = te.placeholder((N, N), name="A", dtype="float32")
    b = te.placeholder((N, N), name="B", dtype="float32")
    k = te.reduce_axis((0, N), name="k")
    c = te.compute((N, N), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    return te.create_prim_func([a, b, c])


@pytest.fixture(scope="module")
def candidates(tmp_path_factory: pytest.TempPathFactory) -> list[RunnerInput]:
    """Six variants of ``main`` (C = A @ B, 128x128 float32) for llvm, each an exported library."""
    func = _matmul()
    args_info = list(ArgInfo.from_prim_func(func))
    assert [(str(i.dtype), list(i.shape)) for i in args_info] == [("float32", [N, N])] * 3
    assert all(isinstance(i, TensorInfo) for i in args_info)
    out = tmp_path_factory.mktemp("ms_candidates")
    inputs = []
    for tile in TILES:
        sch = Schedule(tvm.IRModule({"main": func}))
        if tile is not None:
            i, j, k = sch.get_loops(sch.get_sblock("C"))
            io, ii = sch.split(i, [None, tile[0]])
            jo, ji = sch.split(j, [None, tile[1]])
            sch.reorder(io, jo, k, ii, ji)
            sch.vectorize(ji)
        lib = tvm.compile(sch.mod, target={"kind": "llvm"})
        name = "matmul_plain.so" if tile is None else f"matmul_{tile[0]}x{tile[1]}.so"
        lib.export_library(str(out / name))
        inputs.append(RunnerInput(str(out / name), "cpu", args_info))
    return inputs


@pytest.fixture
def runner_for() -> Iterator[Callable[[int, str], RPCRunner]]:
    """RPCRunners whose popen worker pools are shut down afterwards."""
    runners: list[RPCRunner] = []

    def make(tracker_port: int, key: str) -> RPCRunner:
        config = RPCConfig(
            tracker_host="127.0.0.1",
            tracker_port=tracker_port,
            tracker_key=key,
            session_priority=1,
            session_timeout_sec=60,
        )
        runner = RPCRunner(rpc_config=config, evaluator_config=EVALUATOR, max_workers=2)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.pool.shutdown(wait=True)


def measure(runner: RPCRunner, inputs: list[RunnerInput]) -> list[RunnerResult]:
    return [future.result() for future in runner.run(inputs)]


def assert_measured(results: list[RunnerResult], count: int) -> None:
    """Every candidate measured: ``repeat`` positive times each and no error."""
    assert len(results) == count
    for result in results:
        assert result.error_msg is None, result.error_msg
        assert result.run_secs is not None
        secs = [float(s) for s in result.run_secs]
        assert len(secs) == EVALUATOR.repeat
        assert all(0 < s < 10 for s in secs), secs


def remove_workspace_root(tracker_port: int, key: str) -> None:
    """What RPCRunner's ``default_cleanup`` does after each measurement, then a call that must still work."""
    client = rpc.connect_tracker("127.0.0.1", tracker_port)
    sess = client.request(key, session_timeout=30)
    sess.upload(bytearray(b"artifact"), "cand.so")
    sess.remove("cand.so")
    sess.remove("cand.so.so")  # never existed: TVM's server ignores that
    sess.remove("")  # the workspace root: TVM's server ignores a failure here too
    assert sess.get_function("rpc.test.addone")(41) == 42
    del sess
    client.close()


def kind(results: list[RunnerResult]) -> list[tuple[bool, int]]:
    """What "equal in kind" compares: per candidate, whether it failed and how many times it has."""
    return [(r.error_msg is not None, len(r.run_secs or [])) for r in results]


#: Runs in its own interpreter: the failure it guards against is a segfault. ``TuneContext`` imports
#: ``tvm.s_tir.tensor_intrin``, whose TVMScript parser calls ``inspect.stack()`` about 500 times; each call
#: scans ``sys.modules`` once per frame whose file is ``<frozen ...>`` (40 s here). Those frames have no
#: module, so answering None for them at once gives the same result in a fraction of the time.
_TUNE_CONTEXT_SCRIPT = """
import inspect
_getmodule = inspect.getmodule
def _getmodule_fast(obj, _filename=None):
    name = _filename or getattr(getattr(obj, "f_code", obj), "co_filename", None)
    if isinstance(name, str) and name.startswith("<") and name.endswith(">"):
        return None
    return _getmodule(obj, _filename)
inspect.getmodule = _getmodule_fast

import tvm
from tvm import te
from tvm.s_tir import meta_schedule as ms

n = 64
a = te.placeholder((n, n), name="A")
b = te.placeholder((n, n), name="B")
k = te.reduce_axis((0, n), name="k")
func = te.create_prim_func([a, b, te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")])
ctx = ms.TuneContext(
    mod=tvm.IRModule({"main": func}),
    target=tvm.target.Target({"kind": "llvm", "num-cores": 2}),
    space_generator="post-order-apply",
    search_strategy="replay-trace",
    task_name="matmul",
    num_threads=1,
)
print("spaces", len(ctx.generate_design_space()))
print("json", len(tvm.ir.save_json(func)))
"""


@pytest.mark.timeout(240)
def test_tune_context_builds_for_a_matmul() -> None:
    """meta_schedule's first step works with the installed apache-tvm-ffi (0.1.15.x: SIGSEGV in ToJSONGraph)."""
    proc = subprocess.run([sys.executable, "-c", _TUNE_CONTEXT_SCRIPT], capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, (
        f"TuneContext for a 64x64 matmul failed (exit {proc.returncode}) with apache-tvm-ffi "
        f"{version('apache-tvm-ffi')}; the tvm extra pins apache-tvm-ffi<0.1.15\n{proc.stderr[-3000:]}"
    )
    lines = dict(line.split() for line in proc.stdout.splitlines() if line.startswith(("spaces", "json")))
    assert int(lines["spaces"]) >= 1
    assert int(lines["json"]) > 100


@pytest.mark.timeout(60)
def test_default_cleanup_calls_accepted_like_tvms_server(
    tracker: TrackerThread,
    tvm_server: Callable[..., Any],  # noqa: F811
    device_server: Callable[..., Any],
) -> None:
    """RPCRunner's cleanup removes ``""`` (the workspace root); an error there discards the measurement."""
    tvm_server(tracker.port, "rm-tvm")
    device_server(key="rm-tether", tracker=(tracker.host, tracker.port), preload=["tvm"])
    wait_until(lambda: free_of(tracker.port, "rm-tvm") == 1, timeout=20, what="TVM server registered")
    remove_workspace_root(tracker.port, "rm-tvm")
    remove_workspace_root(tracker.port, "rm-tether")


@pytest.mark.timeout(90)
def test_rpc_runner_through_tether_tracker_with_tvm_servers(
    tracker: TrackerThread,
    tvm_server: Callable[..., Any],  # noqa: F811
    runner_for: Callable[[int, str], RPCRunner],
    candidates: list[RunnerInput],
) -> None:
    tvm_server(tracker.port, "ms-tvm")
    tvm_server(tracker.port, "ms-tvm")
    wait_until(lambda: free_of(tracker.port, "ms-tvm") == 2, timeout=20, what="two TVM servers registered")
    results = measure(runner_for(tracker.port, "ms-tvm"), candidates)
    assert_measured(results, len(candidates))
    wait_until(lambda: free_of(tracker.port, "ms-tvm") == 2, timeout=10, what="both slots free again")


@pytest.mark.timeout(90)
def test_rpc_runner_through_tether_tracker_with_tether_servers(
    tracker: TrackerThread,
    device_server: Callable[..., Any],
    runner_for: Callable[[int, str], RPCRunner],
    candidates: list[RunnerInput],
) -> None:
    servers = [device_server(key="ms-tether", tracker=(tracker.host, tracker.port), preload=["tvm"]) for _ in "ab"]
    wait_until(lambda: free_of(tracker.port, "ms-tether") == 2, timeout=20, what="two tether servers registered")
    results = measure(runner_for(tracker.port, "ms-tether"), candidates)
    assert_measured(results, len(candidates))
    wait_until(lambda: all(s.busy_slots() == 0 for s in servers), timeout=10, what="sessions over")
    wait_until(lambda: free_of(tracker.port, "ms-tether") == 2, timeout=10, what="both slots free again")


@pytest.mark.timeout(90)
def test_rpc_runner_results_equal_in_kind_to_tvms_tracker(
    tracker: TrackerThread,
    tvm_tracker: Any,  # noqa: F811
    tvm_server: Callable[..., Any],  # noqa: F811
    device_server: Callable[..., Any],
    runner_for: Callable[[int, str], RPCRunner],
    candidates: list[RunnerInput],
) -> None:
    tvm_server(tvm_tracker.port, "ms-ref")
    tvm_server(tvm_tracker.port, "ms-ref")
    wait_until(lambda: free_of(tvm_tracker.port, "ms-ref") == 2, timeout=20, what="servers at TVM's tracker")
    reference = measure(runner_for(tvm_tracker.port, "ms-ref"), candidates)
    assert_measured(reference, len(candidates))

    tvm_server(tracker.port, "ms-mixed")
    device_server(key="ms-mixed", tracker=(tracker.host, tracker.port), preload=["tvm"])
    wait_until(lambda: free_of(tracker.port, "ms-mixed") == 2, timeout=20, what="servers at tether's tracker")
    through_tether = measure(runner_for(tracker.port, "ms-mixed"), candidates)
    assert kind(through_tether) == kind(reference) == [(False, EVALUATOR.repeat)] * len(candidates)


@pytest.mark.timeout(90)
def test_tether_runner_is_a_drop_in_for_rpc_runner(
    tracker: TrackerThread,
    device_server: Callable[..., Any],
    runner_for: Callable[[int, str], RPCRunner],
    candidates: list[RunnerInput],
    tmp_path: Any,
) -> None:
    """tether's runner on tether servers: the same candidates, results equal in kind to RPCRunner's; two
    input sets with ``alloc_repeat``; a broken library and a wrong signature end as errors, not hangs."""
    from tvm.s_tir.meta_schedule.runner import Runner

    from tether.integrations.meta_schedule import TetherRunner

    servers = [device_server(key="ms-own", tracker=(tracker.host, tracker.port), preload=["tvm"]) for _ in "ab"]
    wait_until(lambda: free_of(tracker.port, "ms-own") == 2, timeout=20, what="two tether servers registered")
    config = RPCConfig(
        tracker_host="127.0.0.1", tracker_port=tracker.port, tracker_key="ms-own", session_timeout_sec=60
    )
    runner = TetherRunner(config, EVALUATOR, max_workers=2)
    assert isinstance(runner, Runner)
    ours = measure(runner, candidates)
    assert_measured(ours, len(candidates))
    reference = measure(runner_for(tracker.port, "ms-own"), candidates)
    assert kind(ours) == kind(reference)

    broken = tmp_path / "broken.so"
    broken.write_bytes(b"\x7fELF not really a library")
    wrong_args = RunnerInput(candidates[1].artifact_path, "cpu", [TensorInfo("float32", [N, N])] * 2)
    twice = TetherRunner(config, EVALUATOR, alloc_repeat=2, max_workers=2)
    mixed = measure(twice, [candidates[0], RunnerInput(str(broken), "cpu", candidates[0].args_info), wrong_args])
    assert mixed[0].error_msg is None and len(mixed[0].run_secs) == 2 * EVALUATOR.repeat
    assert mixed[1].error_msg is not None and "load" in mixed[1].error_msg
    assert mixed[2].error_msg is not None and "run" in mixed[2].error_msg
    wait_until(lambda: all(s.busy_slots() == 0 for s in servers), timeout=10, what="sessions over")
    with pytest.raises(ValueError, match="f_\\* hooks"):
        TetherRunner(config, EVALUATOR, f_cleanup=lambda *a: None)
