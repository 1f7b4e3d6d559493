"""The builder and the measurement cache behind ``tether tune``.

:class:`WarmBuilder` is a meta_schedule builder whose worker processes live for the whole run: TVM's
``LocalBuilder`` starts a new pool for every batch, and each of its workers first imports
``tvm.s_tir.tensor_intrin`` (seconds on a small machine, counted against the build's timeout: see
``docs/tvm-tuning-notes.md``). Here each worker pays that once, ahead of the first batch, and a candidate
is exported as a shared library with the host's compiler or the cross compiler given (``cc``).

:class:`MeasureCache` remembers, in the work dir, what every candidate measured (by the structural hash of
its scheduled module and the target): a candidate proposed again (in this run, or in a later run on the same
work dir) is neither built nor measured again. The builder marks such a candidate with an artifact path in a
directory of its own; :class:`CachingRunner` answers it from the cache and measures the rest with the runner
it wraps.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, Runner, RunnerFuture, RunnerInput, RunnerResult

from . import _worker

__all__ = ["CachingRunner", "MeasureCache", "WarmBuilder"]

logger = logging.getLogger(__name__)

CACHE_FILE = "tether_measured.jsonl"


class MeasureCache:
    """Candidates' measurements by key (a JSON-lines file in the work dir; a torn last line is dropped).
    Thread-safe; ``hits`` and ``stored`` count this run's lookups that found one and new entries."""

    def __init__(self, work_dir: Path) -> None:
        self.path = Path(work_dir) / CACHE_FILE
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.stored = 0
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # a run killed mid-write: drop the torn line, append after
                with self.path.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
            for line in data.decode("utf-8", "replace").splitlines():
                try:
                    entry = json.loads(line)
                    self._entries[str(entry["key"])] = entry
                except (ValueError, KeyError, TypeError):
                    continue
        self.loaded = len(self._entries)

    @staticmethod
    def key_of(mod: Any, target_json: str) -> str:
        import tvm_ffi

        text = f"{tvm_ffi.structural_hash(mod) & (2**64 - 1):016x}|{target_json}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._entries.get(key)

    def hit(self) -> None:
        with self._lock:
            self.hits += 1

    def put(self, key: str, run_secs: list[float] | None, error: str | None) -> None:
        entry = {"key": key, "run_secs": run_secs, "error": error}
        with self._lock:
            self._entries[key] = entry
            self.stored += 1
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


@derived_object
class WarmBuilder(PyBuilder):  # type: ignore[misc]
    """Builds candidates in ``workers`` processes that stay up for the whole run (see the module's text).

    ``timeout_s`` bounds one build; a build past it (or a worker that crashed) fails that candidate and
    the pool is replaced."""

    def __init__(
        self,
        target_json: str,
        *,
        workers: int = 0,
        timeout_s: float = 120.0,
        cc: str | None = None,
        cache: MeasureCache | None = None,
    ) -> None:
        super().__init__()
        self.target_json = target_json
        self.workers = workers or max(1, os.cpu_count() or 1)
        self.timeout_s = timeout_s
        self.cc = cc
        self.cache = cache
        self.keys: dict[str, str] = {}  # artifact path -> cache key (what CachingRunner stores results under)
        self.cached_root = tempfile.mkdtemp(prefix="tether-tune-cached-")
        self.built = 0
        self.failed = 0
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._start_pool()

    def _start_pool(self) -> None:
        self._pool = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker.preload
        )
        for _ in range(self.workers):  # start every worker now: their imports overlap the task extraction
            self._pool.submit(_worker.ping)

    def _replace_pool(self) -> None:
        self.close()  # a hung build: nothing but killing its worker stops it
        self._start_pool()

    def close(self) -> None:
        """Stop the workers now (one may still be warming up: nothing is lost by killing it)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            processes = list(getattr(pool, "_processes", {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in processes:
                proc.kill()
            for proc in processes:
                proc.join(10)

    def _cached_path(self, key: str) -> str:
        path = tempfile.mkdtemp(prefix=key[:12] + "-", dir=self.cached_root)
        return os.path.join(path, "cached.so")

    def is_cached(self, path: str) -> bool:
        return path.startswith(self.cached_root + os.sep)

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        import tvm

        results: list[BuilderResult | None] = [None] * len(build_inputs)
        pending: list[tuple[int, str, concurrent.futures.Future[tuple[str, float]]]] = []
        assert self._pool is not None
        for i, inp in enumerate(build_inputs):
            key = MeasureCache.key_of(inp.mod, self.target_json) if self.cache is not None else ""
            if self.cache is not None and self.cache.get(key) is not None:
                path = self._cached_path(key)
                self.keys[path] = key
                results[i] = BuilderResult(path, None)
                continue
            mod_json = tvm.ir.save_json(inp.mod)
            try:
                future = self._pool.submit(_worker.build, mod_json, self.target_json, self.cc, None)
            except BrokenProcessPool:
                self._replace_pool()
                future = self._pool.submit(_worker.build, mod_json, self.target_json, self.cc, None)
            pending.append((i, key, future))
        failed = 0
        broken = False
        for i, key, future in pending:
            try:
                path, _seconds = future.result(timeout=self.timeout_s)
            except concurrent.futures.TimeoutError:
                results[i] = BuilderResult(None, f"WarmBuilder: timeout, the build took over {self.timeout_s:g} s")
                broken = True
            except BrokenProcessPool as exc:
                results[i] = BuilderResult(None, f"WarmBuilder: the build worker died: {exc}")
                broken = True
            except Exception as exc:
                results[i] = BuilderResult(None, f"WarmBuilder: {type(exc).__name__}: {exc}")
            else:
                if key:
                    self.keys[path] = key
                results[i] = BuilderResult(path, None)
                continue
            failed += 1
            if broken:  # later candidates of this batch may still finish; the rest get their own timeout
                for j, _key, rest in pending:
                    if results[j] is None and not rest.done():
                        rest.cancel()
                self._replace_pool()
                broken = False
                pending = [(j, k, f) for j, k, f in pending if results[j] is None and not f.cancelled()]
        for i, result in enumerate(results):
            if result is None:
                failed += 1
                results[i] = BuilderResult(None, "WarmBuilder: not built (its worker pool was replaced)")
        self.built += len(build_inputs) - failed
        self.failed += failed
        return [r for r in results if r is not None]


@derived_object
class _CachedFuture(PyRunnerFuture):  # type: ignore[misc]
    def __init__(self, result: RunnerResult) -> None:
        super().__init__()
        self._result = result

    def done(self) -> bool:
        return True

    def result(self) -> RunnerResult:
        return self._result


@derived_object
class _StoringFuture(PyRunnerFuture):  # type: ignore[misc]
    """The wrapped runner's future; its result goes to the cache once (a failure only when ``keep_error``
    says it would fail again)."""

    def __init__(
        self, inner: RunnerFuture, key: str | None, cache: MeasureCache, keep_error: Callable[[str], bool]
    ) -> None:
        super().__init__()
        self._inner, self._key, self._cache, self._keep_error = inner, key, cache, keep_error
        self._result: RunnerResult | None = None

    def done(self) -> bool:
        return self._result is not None or bool(self._inner.done())

    def result(self) -> RunnerResult:
        if self._result is None:
            result = self._result = self._inner.result()
            secs = [float(s) for s in result.run_secs] if result.run_secs is not None else None
            error = None if result.error_msg is None else str(result.error_msg)
            if self._key and (error is None or self._keep_error(error)):
                self._cache.put(self._key, secs, error)
        return self._result


def _never(_error: str) -> bool:
    return False


@derived_object
class CachingRunner(PyRunner):  # type: ignore[misc]
    """Answers candidates the :class:`WarmBuilder` marked cached from the cache; measures the rest with
    ``runner`` and stores what it measured."""

    def __init__(
        self, runner: Runner, builder: WarmBuilder, cache: MeasureCache, keep_error: Callable[[str], bool] = _never
    ) -> None:
        super().__init__()
        self.runner, self.builder, self.cache, self.keep_error = runner, builder, cache, keep_error
        self.measured = 0

    def run(self, runner_inputs: list[RunnerInput]) -> list[RunnerFuture]:
        out: list[RunnerFuture | None] = [None] * len(runner_inputs)
        fresh: list[tuple[int, RunnerInput]] = []
        for i, inp in enumerate(runner_inputs):
            path = str(inp.artifact_path)
            entry = self.cache.get(self.builder.keys.get(path, "")) if self.builder.is_cached(path) else None
            if entry is not None:
                self.cache.hit()
                out[i] = _CachedFuture(RunnerResult(entry["run_secs"], entry["error"]))
            else:
                fresh.append((i, inp))
        if fresh:
            self.measured += len(fresh)
            futures = self.runner.run([inp for _, inp in fresh])
            for (i, inp), future in zip(fresh, futures, strict=True):
                key = self.builder.keys.get(str(inp.artifact_path))
                out[i] = _StoringFuture(future, key, self.cache, self.keep_error)
        return [f for f in out if f is not None]
