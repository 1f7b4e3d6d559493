"""Baselines: saved timings per model and kind of device, and new timings checked against them.

A device is known by its **fingerprint**, not its address: the first 16 hex digits of the SHA-256 of
the canonical JSON of the facts that decide its speed (:data:`FINGERPRINT_FACTS`: OS, architecture,
CPU model, cores, memory, accelerators' kinds and models, backends and their versions). A server that
moves to another port or host, or restarts, keeps its fingerprint; identical boards share one (their
samples are pooled); an upgraded onnxruntime makes a new one. Kernel release, Python version, labels and
the address are left out.

A baseline file (``tether bench --save-baseline``) is JSON, ``{"format": "tether-baseline/1", "entries":
[...]}``, one entry per model file name and fingerprint with its samples (seconds per run) and their
statistics. :func:`check_baseline` compares new samples with an entry's by
:func:`~tether.client.compare.compare_blocks` (unpaired: each sample its own block), the statistics of
``tether compare``: a Hodges-Lehmann estimate of the ratio with the Mann-Whitney interval. Samples of one
run are not independent draws (the load of that moment is in all of them), so that interval is narrower
than the truth between runs: a threshold (``--regression-threshold``) guards against calling the
difference between two quiet and busy moments a regression. :func:`load_entries`
also reads ``tether bench --json`` and ``tether compare --json`` files, for ``tether compare --saved``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigError
from .compare import MIN_EFFECT, Comparison, compare_blocks, is_regression, overall
from .stats import summarize

if TYPE_CHECKING:
    from .bench import BenchRecord, BenchSettings

__all__ = [
    "FINGERPRINT_FACTS",
    "BaselineRow",
    "Entry",
    "SavedPair",
    "check_baseline",
    "compare_saved",
    "entries_from_records",
    "fingerprint",
    "fingerprint_facts",
    "load_entries",
    "save_baseline",
]

FORMAT = "tether-baseline/1"
#: The device facts (``tether.device.facts.device_facts``) a fingerprint is made of.
FINGERPRINT_FACTS = ("os", "arch", "cpu", "cores", "memory", "accelerators", "backends")


def fingerprint_facts(facts: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a device's facts that its fingerprint covers (accelerators by kind and model only)."""
    out = {name: facts.get(name) for name in FINGERPRINT_FACTS}
    out["accelerators"] = sorted(
        (str(a.get("kind")), str(a.get("model"))) for a in (facts.get("accelerators") or []) if isinstance(a, dict)
    )
    out["backends"] = dict(sorted((facts.get("backends") or {}).items()))
    return out


def fingerprint(facts: Mapping[str, Any]) -> str:
    """A stable name for a kind of device: 16 hex digits of a hash of :func:`fingerprint_facts`."""
    canonical = json.dumps(fingerprint_facts(facts), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(slots=True)
class Entry:
    """One model's samples on one kind of device (every device with that fingerprint, pooled)."""

    model: str
    fingerprint: str
    facts: dict[str, Any] = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "fingerprint": self.fingerprint,
            "facts": self.facts,
            "devices": self.devices,
            "samples": self.samples,
            "stats": summarize(self.samples).to_dict() if self.samples else None,
        }


def _add(
    entries: dict[tuple[str, str], Entry], model: str, device: str, facts: Mapping[str, Any], samples: Iterable[float]
) -> None:
    fp = fingerprint(facts)
    entry = entries.setdefault((model, fp), Entry(model, fp, fingerprint_facts(facts)))
    if device not in entry.devices:
        entry.devices.append(device)
    entry.samples.extend(float(s) for s in samples)


def entries_from_records(records: Iterable[BenchRecord]) -> list[Entry]:
    """Bench records with samples, pooled per model and fingerprint (in the records' order)."""
    entries: dict[tuple[str, str], Entry] = {}
    for r in records:
        if r.error is None and r.samples:
            _add(entries, r.model, r.device, r.facts, r.samples)
    return list(entries.values())


def save_baseline(
    records: Iterable[BenchRecord], path: str | os.PathLike[str], settings: BenchSettings | None = None
) -> list[Entry]:
    """Write the records' samples as a baseline file; returns its entries."""
    from .. import __version__

    entries = entries_from_records(records)
    doc: dict[str, Any] = {
        "format": FORMAT,
        "tether": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "entries": [e.to_dict() for e in entries],
    }
    if settings is not None:
        doc["settings"] = {
            "number": settings.number,
            "repeat": settings.repeat,
            "min_repeat_ms": settings.min_repeat_ms,
            "warmup": settings.warmup,
            "fill": settings.fill,
            "backend": settings.backend,
        }
    Path(path).write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return entries


def _samples(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(s, int | float) and s > 0 for s in value):
        raise ConfigError(f"{where}: samples must be a list of positive numbers")
    return [float(s) for s in value]


def load_entries(path: str | os.PathLike[str]) -> list[Entry]:
    """The entries of a baseline file, a ``tether bench --json`` file (its records with samples) or a
    ``tether compare --json`` file (both models' samples). Raises :class:`ConfigError` naming the file for
    anything else."""
    name = os.fspath(path)
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{name}: not a readable JSON file ({exc})") from None
    entries: dict[tuple[str, str], Entry] = {}
    try:
        if isinstance(doc, dict) and doc.get("format") == FORMAT:
            out = []
            for i, e in enumerate(doc["entries"]):
                where = f"{name}: entry {i + 1}"
                if not isinstance(e.get("model"), str) or not isinstance(e.get("fingerprint"), str):
                    raise ConfigError(f"{where}: no model or fingerprint")
                samples = _samples(e.get("samples"), where)
                out.append(
                    Entry(
                        e["model"], e["fingerprint"], dict(e.get("facts") or {}), list(e.get("devices") or []), samples
                    )
                )
            return out
        if isinstance(doc, dict) and doc.get("format") == "tether-compare/1":
            for d in doc["devices"]:
                if d.get("error") is None and d.get("facts"):
                    for side in ("a", "b"):
                        samples = _samples(d[side]["samples"], f"{name}: {d.get('device')}")
                        _add(entries, f"{side.upper()}:{doc[side]}", d["device"], d["facts"], samples)
            return list(entries.values())
        if isinstance(doc, list):  # tether bench --json
            for r in doc:
                if r.get("error") is None and r.get("samples"):
                    samples = _samples(r["samples"], f"{name}: {r.get('model')}")
                    _add(entries, str(r["model"]), str(r.get("device")), r.get("facts") or {}, samples)
            return list(entries.values())
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{name}: a damaged file ({type(exc).__name__}: {exc})") from None
    raise ConfigError(f"{name}: not a tether baseline, bench --json or compare --json file")


Status = Literal["ok", "faster", "slower", "regression", "no baseline"]


@dataclass(slots=True)
class BaselineRow:
    """One model on one kind of device against the baseline: ``comparison`` is the new (B) against the
    baseline (A); ``status``: ``regression`` (significantly slower by more than the threshold), ``slower``
    (significantly, within it), ``faster``, ``ok`` (no significant difference) or ``no baseline``."""

    model: str
    fingerprint: str
    devices: list[str]
    status: Status
    comparison: Comparison | None = None

    def text(self, threshold: float) -> str:
        c = self.comparison
        if c is None:
            return "no baseline"
        if self.status == "regression":
            return f"REGRESSION {c.verdict('new').removeprefix('new is ')} (over {threshold * 100:g} %)"
        if self.status == "slower":
            return f"slower: {c.verdict('new')} (within {threshold * 100:g} %)"
        if self.status == "faster":
            return f"faster: {c.verdict('new')}"
        return f"ok: {c.verdict('new')}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "fingerprint": self.fingerprint,
            "devices": self.devices,
            "status": self.status,
            "comparison": self.comparison.to_dict() if self.comparison else None,
        }


def _status(c: Comparison, threshold: float) -> Status:
    if is_regression(c, threshold):
        return "regression"
    return "ok" if c.direction == "same" else c.direction


def check_baseline(
    baseline: Sequence[Entry],
    new: Sequence[Entry],
    *,
    threshold: float = 0.05,
    confidence: float = 0.95,
    min_effect: float = MIN_EFFECT,
) -> list[BaselineRow]:
    """Each new entry against the baseline's entry of the same model and fingerprint."""
    stored = {(e.model, e.fingerprint): e for e in baseline}
    rows = []
    for e in new:
        old = stored.get((e.model, e.fingerprint))
        if old is None:
            rows.append(BaselineRow(e.model, e.fingerprint, e.devices, "no baseline"))
            continue
        c = compare_blocks(
            [[s] for s in old.samples],
            [[s] for s in e.samples],
            paired=False,
            confidence=confidence,
            min_effect=min_effect,
        )
        rows.append(BaselineRow(e.model, e.fingerprint, e.devices, _status(c, threshold), c))
    return rows


@dataclass(slots=True)
class SavedPair:
    """Model ``a`` of the old file against ``b`` of the new one: per fingerprint in both, and overall.
    ``unmatched``: fingerprints in only one of the files."""

    a: str
    b: str
    devices: list[tuple[Entry, Entry, Comparison]]
    overall: Comparison | None
    unmatched: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "devices": [
                {"fingerprint": old.fingerprint, "a": old.to_dict(), "b": new.to_dict(), "comparison": c.to_dict()}
                for old, new, c in self.devices
            ],
            "overall": self.overall.to_dict() if self.overall else None,
            "unmatched": self.unmatched,
        }


def compare_saved(
    old: Sequence[Entry], new: Sequence[Entry], *, confidence: float = 0.95, min_effect: float = MIN_EFFECT
) -> list[SavedPair]:
    """Saved results against each other. Models are matched by name; when each file holds a single model,
    those two are compared whatever their names. Devices are matched by fingerprint."""
    old_models = list(dict.fromkeys(e.model for e in old))
    new_models = list(dict.fromkeys(e.model for e in new))
    if len(old_models) == 1 and len(new_models) == 1:
        pairs = [(old_models[0], new_models[0])]
    else:
        pairs = [(m, m) for m in old_models if m in new_models]
    out = []
    for a, b in pairs:
        olds = {e.fingerprint: e for e in old if e.model == a}
        news = {e.fingerprint: e for e in new if e.model == b}
        rows = []
        for fp, o in olds.items():
            if fp in news:
                n = news[fp]
                c = compare_blocks(
                    [[s] for s in o.samples],
                    [[s] for s in n.samples],
                    paired=False,
                    confidence=confidence,
                    min_effect=min_effect,
                )
                rows.append((o, n, c))
        pooled = None
        if rows:
            groups = [([[s] for s in o.samples], [[s] for s in n.samples], False) for o, n, _ in rows]
            pooled = overall(groups, [c for _, _, c in rows], confidence=confidence, min_effect=min_effect)
        unmatched = sorted(set(olds) ^ set(news))
        out.append(SavedPair(a, b, rows, pooled, unmatched))
    return out
