"""Backends from other packages: a vendor adds its runtime (an NPU's, say) without touching tether.

A distribution registers a backend under the entry-point group ``tether.backends``::

    [project.entry-points."tether.backends"]
    fakenpu = "tether_fakenpu:Backend"

The contract (see also :class:`tether.runtime.base.Backend`):

- the entry point's **name** is the backend's name: what a client passes as ``backend=``, what the device's
  facts list under ``backends`` and ``plugins``, and the label the server advertises (``backend.<name>``,
  see :func:`backend_label`). Letters, digits, ``_``, ``-`` and ``.``; a built-in backend's name
  (``onnxruntime``, ``tvm``, ``reference``) is refused, and so is a name an earlier plug-in took;
- it loads to a backend **class** (called with no arguments), a **factory** (a function called with no
  arguments that returns a backend) or a backend **instance**;
- the backend has ``load(path, options) -> Model`` (:class:`tether.runtime.base.Model`: ``inputs``,
  ``outputs``, ``prepare``, ``run``, ``sync``, ``to_raw``, ``close``); ``options`` are the client's JSON
  values, and unknown ones should raise :class:`~tether.runtime.base.BackendError`;
- optionally ``name`` (if present, equal to the entry point's name), ``version()`` (the runtime's version,
  None when unknown; default: the distribution's version) and ``suffixes`` (model file suffixes it
  claims, such as ``(".npu",)``, so a model is loaded by it without ``backend=``; a built-in's suffix, or
  one an earlier plug-in claimed, is dropped with a log line).

Plug-ins are found and imported lazily, the first time tether needs to know its backends (a device's
facts, a model to load), once per process. Import the vendor's SDK inside ``load``: the plug-in's module
itself is imported by the server process to read its name, version and suffixes. A plug-in whose import
(or construction) raises is logged once and reported with its error in the device's facts; it never stops
the server, and the other backends work.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import threading
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .base import Backend, BackendError, Model

__all__ = ["GROUP", "LABEL_PREFIX", "Plugin", "backend_label", "discover"]

logger = logging.getLogger("tether.runtime")

#: The entry-point group backends register under.
GROUP = "tether.backends"
#: Servers advertise ``backend.<name>=<version>`` for each plug-in backend they can run.
LABEL_PREFIX = "backend."

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_SUFFIX = re.compile(r"\.[A-Za-z0-9_.-]+\Z")


def backend_label(name: str) -> str:
    """The label a server advertises for backend ``name``: ask for ``{"backend.NAME": "*"}`` (any version)
    or ``{"backend.NAME": "1.2"}`` (that one)."""
    return LABEL_PREFIX + name


@dataclass(frozen=True)
class Plugin:
    """One ``tether.backends`` entry point: the backend it gave, or why it gave none."""

    name: str
    #: ``module:attr``, as the entry point names it.
    target: str
    dist: str | None
    dist_version: str | None
    backend: Backend | None = None
    #: Why there is no backend (an import error, a refused name); None when it loaded.
    error: str | None = None
    suffixes: tuple[str, ...] = ()

    def version(self) -> str | None:
        """The backend's own ``version()`` when it has one that answers, else its distribution's."""
        if self.backend is None:
            return None
        try:
            version = self.backend.version()
        except Exception as exc:  # a plug-in's bug must not take the device's facts down
            logger.debug("backend plug-in %r: version() raised %r", self.name, exc)
            version = None
        return str(version) if version is not None else self.dist_version

    def fact(self) -> dict[str, Any]:
        """What the device's facts say of it (``facts["plugins"][name]``)."""
        return {
            "entry_point": self.target,
            "dist": self.dist,
            "dist_version": self.dist_version,
            "version": self.version(),
            "suffixes": list(self.suffixes),
            "error": self.error,
        }


class _Adapter:
    """A plug-in backend with the whole :class:`Backend` interface (name, version) whatever it defines, and
    models that carry the backend's name."""

    def __init__(self, name: str, inner: Any, dist_version: str | None) -> None:
        self.name = name
        self.inner = inner
        self.dist_version = dist_version

    def version(self) -> str | None:
        version = getattr(self.inner, "version", None)
        got = version() if callable(version) else None
        return str(got) if got is not None else self.dist_version

    def load(self, path: str, options: Mapping[str, Any]) -> Model:
        model: Model = self.inner.load(path, options)
        if not isinstance(getattr(model, "backend", None), str):
            try:
                model.backend = self.name
            except (AttributeError, TypeError):
                raise BackendError(f"backend plug-in {self.name!r} returned a model without a 'backend' name") from None
        return model


def _origin(dist: str | None, version: str | None) -> str:
    """`` from tether-fakenpu 0.3.0`` (nothing when the entry point has no distribution)."""
    return f" from {dist}" + (f" {version}" if version else "") if dist else ""


def _distribution(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    """The name and version of the distribution that declares ``ep`` (None, None when unknown)."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    try:
        return dist.metadata["Name"], dist.version
    except Exception:  # unreadable metadata: the entry point itself may still work
        return None, None


def _instantiate(obj: Any) -> Any:
    """A class or a factory is called with no arguments; anything else is the backend itself."""
    if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "load")):
        return obj()
    return obj


def _claimed_suffixes(backend: Any) -> list[Any]:
    raw = getattr(backend, "suffixes", ())
    if callable(raw):
        raw = raw()
    if isinstance(raw, str):
        raw = (raw,)
    return list(raw or ())


def _load_one(
    ep: importlib.metadata.EntryPoint,
    dist: str | None,
    dist_version: str | None,
    taken_suffixes: dict[str, str],
    log: int,
) -> Plugin:
    name = ep.name
    try:
        inner = _instantiate(ep.load())
        if not callable(getattr(inner, "load", None)):
            raise BackendError(f"{ep.value} is not a backend: it has no load(path, options)")
        own = getattr(inner, "name", name)
        if own != name:
            raise BackendError(f"{ep.value} calls itself {own!r}, but its entry point is {name!r}")
        suffixes = _claimed_suffixes(inner)
    except BaseException as exc:  # an import error, SystemExit in a module body, a broken constructor
        if isinstance(exc, KeyboardInterrupt):
            raise
        error = f"{type(exc).__name__}: {exc}"
        logger.log(
            log, "backend plug-in %r (%s%s) failed to load: %s", name, ep.value, _origin(dist, dist_version), error
        )
        return Plugin(name, ep.value, dist, dist_version, error=error)
    kept = []
    for suffix in suffixes:
        norm = suffix.lower() if isinstance(suffix, str) else suffix
        if not isinstance(norm, str) or not _SUFFIX.match(norm):
            logger.log(log, "backend plug-in %r: ignoring suffix %r (suffixes look like '.npu')", name, suffix)
        elif norm in taken_suffixes:
            logger.log(
                log,
                "backend plug-in %r: suffix %s already belongs to %r; ignoring it",
                name,
                norm,
                taken_suffixes[norm],
            )
        else:
            taken_suffixes[norm] = name
            kept.append(norm)
    return Plugin(name, ep.value, dist, dist_version, _Adapter(name, inner, dist_version), None, tuple(kept))


def discover(
    reserved_names: Collection[str],
    reserved_suffixes: Mapping[str, str],
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
    log: int = logging.WARNING,
) -> dict[str, Plugin]:
    """Every ``tether.backends`` entry point, loaded (or with its error), by name.

    ``reserved_names``/``reserved_suffixes``: the built-in backends', which no plug-in may take. ``log``:
    the level of the lines about plug-ins that fail or are refused (a session worker repeats what its
    server already said at DEBUG)."""
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=GROUP)
    found: dict[str, Plugin] = {}
    taken = dict(reserved_suffixes)
    for ep in entry_points:
        dist, dist_version = _distribution(ep)
        name = ep.name
        refusal = None
        if name in reserved_names:
            refusal = f"refused: {name!r} is a built-in backend, which a plug-in cannot replace"
        elif name in found:
            other = found[name]
            refusal = f"refused: {name!r} is already the backend plug-in {other.target}{_origin(other.dist, None)}"
        elif not _NAME.match(name):
            refusal = f"refused: {name!r} is not a backend name (letters, digits, '_', '-', '.')"
        if refusal is not None:
            logger.log(log, "backend plug-in %s%s %s", ep.value, _origin(dist, dist_version), refusal)
            key = name if name not in found else f"{name} ({ep.value}{_origin(dist, dist_version)})"
            found[key] = Plugin(name, ep.value, dist, dist_version, error=refusal)
            continue
        found[name] = _load_one(ep, dist, dist_version, taken, log)
    return found


class _Registry:
    """The plug-ins of this process, found once (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._found: dict[str, Plugin] | None = None

    def get(self, reserved_names: Collection[str], reserved_suffixes: Mapping[str, str], log: int) -> dict[str, Plugin]:
        with self._lock:
            if self._found is None:
                self._found = discover(reserved_names, reserved_suffixes, log=log)
            return self._found

    def reset(self) -> None:
        with self._lock:
            self._found = None


registry = _Registry()
