"""What runs in a build worker process (kept small: a spawned worker imports this module first)."""

from __future__ import annotations

import json
import os
import tempfile
import time


def preload() -> None:
    """The worker's initializer: TVM and the tensor intrinsics that meta_schedule's ``default_build``
    imports (about 250 TVMScript parses: seconds on a small machine, paid once per worker, not per batch)."""
    import tvm.s_tir.tensor_intrin
    import tvm.s_tir.transform  # noqa: F401


def ping() -> int:
    """A no-op that makes the pool start a worker (and run its initializer) ahead of the first build."""
    return os.getpid()


def build(mod_json: str, target_json: str, cc: str | None, tmp_root: str | None) -> tuple[str, float]:
    """One candidate: the scheduled IRModule (``tvm.ir.save_json``) built for the target and exported as a
    shared library in a directory of its own (meta_schedule removes the directory when it is measured).
    Returns its path and the seconds the build took."""
    import tvm
    import tvm.s_tir.tensor_intrin
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    started = time.perf_counter()
    mod = tvm.ir.load_json(mod_json)
    target = tvm.target.Target(json.loads(target_json))
    # meta_schedule's default_build, without its deprecated tvm.driver.build wrapper
    rt_mod = tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)
    path = os.path.join(tempfile.mkdtemp(prefix="tether-tune-", dir=tmp_root), "candidate.so")
    if cc:
        from tvm.support import cc as tvm_cc

        rt_mod.export_library(path, fcompile=tvm_cc.cross_compiler(cc))
    else:
        rt_mod.export_library(path)
    return path, time.perf_counter() - started
