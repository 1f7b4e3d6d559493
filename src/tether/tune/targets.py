"""Targets as TVM 0.27 takes them: JSON dicts. The CLI strings of older TVM (and of the seeds' ``tvmc``
commands) are translated::

    >>> target_dict("llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+fp16")
    {'kind': 'llvm', 'mtriple': 'aarch64-linux-gnu', 'mattr': ['+neon', '+fp16']}
    >>> target_dict("opencl -device=adreno", host="llvm -mtriple=aarch64-linux-gnu")
    {'kind': 'opencl', 'device': 'adreno', 'host': {'kind': 'llvm', 'mtriple': 'aarch64-linux-gnu'}}

A value's type comes from the target kind's own option table when apache-tvm is importable (``Array<str>``
options split at commas, ``int`` and ``bool`` parsed), else from the same rules applied to the options every
CPU and GPU kind has. JSON text (``'{"kind": "llvm", "num-cores": 2}'``) and tag names (``"nvidia/..."``) pass
through. Anything else raises :class:`~tether.errors.ConfigError` naming the JSON to write instead.
Standard library only (the option table is asked of TVM only when it is there).
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from ..errors import ConfigError

__all__ = ["target_dict", "target_json"]

#: Options whose values are lists in every TVM target kind that has them (when TVM is not importable).
_LISTS = {"keys", "libs", "mattr", "cl-opt"}
_INTS = {"num-cores", "opt-level", "vector-width", "max_num_threads", "thread_warp_size", "max_threads_per_block"}
_BOOLS = {"fast-math"} | {f"fast-math-{s}" for s in ("nnan", "ninf", "nsz", "arcp", "contract", "reassoc")}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _schema(kind: str) -> dict[str, str] | None:
    """The kind's option table from TVM (``{"mattr": "Array<str>", ...}``), or None without TVM; raises
    ConfigError for a kind TVM does not have."""
    try:
        from tvm.target import Target, TargetKind
    except ImportError:
        return None
    if kind not in Target.list_kinds():
        raise ConfigError(f"unknown target kind {kind!r} (TVM has: {', '.join(sorted(Target.list_kinds()))})")
    return {str(k): str(v) for k, v in TargetKind.options_from_name(kind).items()}


def _value(kind: str, name: str, text: str | None, schema: dict[str, str] | None, source: str) -> Any:
    typ = (schema or {}).get(name)
    if schema is not None and typ is None:
        raise ConfigError(f"target {source!r}: {kind} has no option -{name} (it has: {', '.join(sorted(schema))})")
    is_list = typ.startswith("Array") if typ else name in _LISTS
    is_int = typ == "int" if typ else name in _INTS
    is_bool = typ == "bool" if typ else name in _BOOLS
    if text is None:  # a bare flag: "-fast-math"
        if is_bool or typ is None:
            return True
        raise ConfigError(f"target {source!r}: -{name} needs a value (-{name}=...)")
    if is_list:
        return [part for part in text.split(",") if part]
    if is_int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"target {source!r}: -{name}={text} is not an integer") from None
    if is_bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"target {source!r}: -{name}={text} is not true or false")
    return text


def _from_cli(text: str) -> dict[str, Any]:
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"target {text!r}: {exc}") from None
    if not words or words[0].startswith("-"):
        raise ConfigError(f"target {text!r}: it must start with a kind (llvm, cuda, opencl, ...)")
    kind, rest = words[0], words[1:]
    schema = _schema(kind)
    out: dict[str, Any] = {"kind": kind}
    for word in rest:
        if not word.startswith("-") or word in ("-", "--"):
            raise ConfigError(
                f"target {text!r}: {word!r} is not an option (-name=value); write the target as JSON, "
                f"e.g. {json.dumps({'kind': kind})}"
            )
        name, eq, value = word.lstrip("-").partition("=")
        out[name] = _value(kind, name, value if eq else None, schema, text)
    return out


def target_dict(target: str | dict[str, Any], host: str | dict[str, Any] | None = None) -> dict[str, Any]:
    """``target`` (a JSON dict, its text, an old CLI string or a tag) as the dict TVM 0.27 takes, with
    ``host`` as its ``"host"``. Raises ConfigError with the JSON to write when it cannot be read."""
    if isinstance(target, dict):
        out = dict(target)
    else:
        text = target.strip()
        if text.startswith("{"):
            try:
                out = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"target {text!r} is not valid JSON: {exc}") from None
            if not isinstance(out, dict) or ("kind" not in out and "tag" not in out):
                raise ConfigError(f'target {text!r}: a JSON target is an object with a "kind" (or "tag")')
        elif "/" in text.split()[0] if text else False:  # a tag: "nvidia/geforce-rtx-3080"
            out = {"tag": text} if " " not in text else _from_cli(text)
        else:
            out = _from_cli(text)
    if host is not None:
        out["host"] = target_dict(host)
    return out


def target_json(target: str | dict[str, Any], host: str | dict[str, Any] | None = None) -> str:
    """:func:`target_dict` as JSON text (what to write on a command line)."""
    return json.dumps(target_dict(target, host))
