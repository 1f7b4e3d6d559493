"""A meta_schedule runner that measures through tether: ``TetherRunner``, a drop-in for ``RPCRunner``.

::

    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig
    from tether.integrations.meta_schedule import TetherRunner

    runner = TetherRunner(RPCConfig(tracker_host="127.0.0.1", tracker_port=9190, tracker_key="rasp4"),
                          EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100), max_workers=4)
    results = [f.result() for f in runner.run(runner_inputs)]      # RunnerResult(run_secs, error_msg)

It takes ``RPCRunner``'s arguments and gives its results (``run_secs``: ``alloc_repeat`` x ``repeat`` seconds
per run, inputs filled at random on the device, one warm-up run first, ``number`` grown to reach
``min_repeat_ms``), measured with :mod:`tether.client.batch` on tether servers: ``max_workers`` devices are
leased once per ``run()`` call and kept for every candidate in it (``RPCRunner`` opens a tracker
connection, a session and a fresh server process per candidate), each library is sent once (the server's
content-addressed cache keeps it for later calls), and transport failures are retried on another device.
``rpc_config.session_timeout_sec`` bounds each candidate's load and measurement on the device.

The ``f_*`` hooks of ``RPCRunner`` customise a TVM RPC session; tether's sessions do not have one, so
passing any is refused. Needs apache-tvm (0.27's ``tvm.s_tir.meta_schedule``) on the host only.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Mapping
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.runner import (
    EvaluatorConfig,
    PyRunner,
    PyRunnerFuture,
    RPCConfig,
    RunnerFuture,
    RunnerInput,
    RunnerResult,
)

from ..client.batch import Candidate, Measurement, MeasureSettings, submit_candidates

__all__ = ["TetherRunner", "TetherRunnerFuture", "candidate_of"]

#: The function a library built by ``tvm.compile`` exposes as its entry (``tvm_ffi.Module.entry_name``).
ENTRY = "main"


def candidate_of(runner_input: RunnerInput) -> Candidate:
    """A meta_schedule candidate as a batch :class:`Candidate`: the library's entry function called with
    every argument filled at random on the device (destination-passing, no separate outputs)."""
    args = []
    for i, info in enumerate(runner_input.args_info):
        kind, dtype, shape = info.as_json()
        if kind != "TENSOR":
            raise ValueError(f"argument {i} of {runner_input.artifact_path} is {kind}, not a tensor")
        args.append({"name": f"arg{i}", "dtype": str(dtype), "shape": [int(d) for d in shape]})
    return Candidate(
        str(runner_input.artifact_path),
        backend="tvm",
        options={"function": ENTRY, "device": str(runner_input.device_type), "inputs": args, "outputs": []},
    )


@derived_object
class TetherRunnerFuture(PyRunnerFuture):  # type: ignore[misc]
    """One candidate's pending result."""

    def __init__(self, future: concurrent.futures.Future[Measurement]) -> None:
        super().__init__()
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> RunnerResult:
        try:
            measured = self.future.result()
        except Exception as exc:  # the batch ends every candidate itself; this is a bug on this side
            return RunnerResult(None, error_msg=f"TetherRunner: {type(exc).__name__}: {exc}")
        if measured.error is not None:
            return RunnerResult(None, error_msg=f"TetherRunner: {measured.error} (on {measured.device or 'no device'})")
        return RunnerResult(list(measured.samples), None)


@derived_object
class TetherRunner(PyRunner):  # type: ignore[misc]
    """``RPCRunner``'s interface, measured through tether's batch API (see the module's text)."""

    def __init__(  # noqa: PLR0917 - RPCRunner's positional signature, kept for drop-in use
        self,
        rpc_config: RPCConfig | None = None,
        evaluator_config: EvaluatorConfig | None = None,
        cooldown_sec: float = 0.0,
        alloc_repeat: int = 1,
        f_create_session: Any = None,
        f_upload_module: Any = None,
        f_alloc_argument: Any = None,
        f_run_evaluator: Any = None,
        f_cleanup: Any = None,
        max_workers: int | None = None,
        initializer: Callable[[], None] | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        queue_timeout_sec: float | None = None,
        retries: int = 2,
        on_result: Callable[[Measurement], None] | None = None,
    ) -> None:
        super().__init__()
        hooks = [f_create_session, f_upload_module, f_alloc_argument, f_run_evaluator, f_cleanup]
        if any(h is not None for h in hooks):
            raise ValueError(
                "TetherRunner measures in tether sessions, not TVM RPC sessions: the f_* hooks of RPCRunner "
                "do not apply (use RPCRunner for custom sessions)"
            )
        self.rpc_config = RPCConfig._normalized(rpc_config)
        self.evaluator_config = EvaluatorConfig._normalized(evaluator_config)
        self.cooldown_sec = cooldown_sec
        self.alloc_repeat = alloc_repeat
        self.max_workers = max_workers or 1
        self.labels = dict(labels or {})
        self.queue_timeout_sec = queue_timeout_sec
        self.retries = retries
        self.on_result = on_result  # told of each candidate's measurement (its device, its queue wait)
        if initializer is not None:  # RPCRunner runs it in each popen worker; here the work is in-process
            initializer()

    def settings(self) -> MeasureSettings:
        ec, rc = self.evaluator_config, self.rpc_config
        return MeasureSettings(
            number=ec.number,
            repeat=ec.repeat,
            min_repeat_ms=float(ec.min_repeat_ms),
            warmup=1,
            cooldown_ms=self.cooldown_sec * 1000,
            flush_cache=bool(ec.enable_cpu_cache_flush),
            fill="random",
            seed=None,
            input_sets=self.alloc_repeat,
            timeout=float(rc.session_timeout_sec) or None,  # RPCRunner's per-candidate session time; 0: none
            queue_timeout=self.queue_timeout_sec,
            retries=self.retries,
            priority=rc.session_priority,
        )

    def run(self, runner_inputs: list[RunnerInput]) -> list[RunnerFuture]:
        rc = self.rpc_config
        assert rc.tracker_host is not None and rc.tracker_port is not None and rc.tracker_key is not None
        futures = submit_candidates(
            (rc.tracker_host, int(rc.tracker_port)),
            rc.tracker_key,
            [candidate_of(i) for i in runner_inputs],
            self.settings(),
            devices=self.max_workers,
            labels=self.labels,
            on_result=self.on_result,
        )
        return [TetherRunnerFuture(f) for f in futures]
