"""Auto-tuning on the pool: ``tether tune`` and :func:`tune` (needs apache-tvm 0.27 on the host).

Target translation (:func:`target_dict`) needs nothing beyond the standard library; the rest imports TVM
when first used."""

from __future__ import annotations

from typing import Any

from .targets import target_dict, target_json

__all__ = [
    "TuneError",
    "TuneOptions",
    "TuneReport",
    "compile_model",
    "default_work_dir",
    "target_dict",
    "target_json",
    "tune",
]


def __getattr__(name: str) -> Any:
    if name in ("TuneError", "TuneOptions", "TuneReport", "compile_model", "default_work_dir", "tune"):
        from . import core

        return getattr(core, name)
    raise AttributeError(name)
