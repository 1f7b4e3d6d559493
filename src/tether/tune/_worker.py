"""What runs in a build worker process (kept small: a spawned worker imports this module first)."""

from __future__ import annotations

import json
import os
import tempfile
import time


def preload() -> None:
    """The worker's initializer: TVM and the tensor intrinsics that meta_schedule's ``default_build``
    imports (about 250 TVMScript parses: seconds on a small machine, paid once per worker, not per batch)."""
    import tvm.s_tir.tensor_intrin  # noqa: F401
    from tvm.s_tir.meta_schedule.builder import local_builder  # noqa: F401


def ping() -> int:
    """A no-op that makes the pool start a worker (and run its initializer) ahead of the first build."""
    return os.getpid()


def build(mod_json: str, target_json: str, cc: str | None, tmp_root: str | None) -> tuple[str, float]:
    """One candidate: the scheduled IRModule (``tvm.ir.save_json``) built for the target and exported as a
    shared library in a directory of its own (meta_schedule removes the directory when it is measured).
    Returns its path and the seconds the build took."""
    import tvm
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build

    started = time.perf_counter()
    mod = tvm.ir.load_json(mod_json)
    target = tvm.target.Target(json.loads(target_json))
    rt_mod = default_build(mod, target, None)
    path = os.path.join(tempfile.mkdtemp(prefix="tether-tune-", dir=tmp_root), "candidate.so")
    if cc:
        from tvm.contrib import cc as tvm_cc

        rt_mod.export_library(path, fcompile=tvm_cc.cross_compiler(cc))
    else:
        rt_mod.export_library(path)
    return path, time.perf_counter() - started
